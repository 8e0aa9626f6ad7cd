"""LeanRoute: an APIRoute for the hot endpoints, called without FastAPI's per-request machinery.

FastAPI wraps every endpoint call in dependency solving, two exit stacks and a response-model
pass, which together cost more than a one-row push (bench/asgi_path.py). A LeanRoute keeps what
FastAPI gives at declaration time (path matching, the OpenAPI document from the signature and
decorator) and calls its endpoint directly with its path parameters, the Request and the Caller
(service/http/deps.py). So it takes only endpoints of exactly that shape, returning a Response, and
refuses any other at startup. Errors propagate to the app's exception handlers as usual.
"""

from __future__ import annotations

from typing import Any

from fastapi import Response
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from service.http.deps import get_caller


class LeanRoute(APIRoute):
    """Calls `endpoint(**path_params, request=..., caller=...)`; the endpoint returns a Response."""

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        d = self.dependant
        if (
            d.query_params
            or d.header_params
            or d.cookie_params
            or d.body_params
            or d.request_param_name != "request"
            or [(s.name, s.call) for s in d.dependencies] != [("caller", get_caller)]
            or any(
                p.field_info.annotation is not str or p.field_info.metadata for p in d.path_params
            )
        ):
            raise TypeError(
                f"LeanRoute {path}: {endpoint.__name__} must take only path parameters (plain "
                "`str`), `request: Request` and `caller: CallerDep`"
            )
        self.app = self._serve

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        overrides = request.app.dependency_overrides  # honoured, as for any other route
        caller = await (overrides.get(get_caller, get_caller) if overrides else get_caller)(request)
        response: Response = await self.endpoint(
            **scope["path_params"], request=request, caller=caller
        )
        await response(scope, receive, send)
