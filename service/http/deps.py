"""FastAPI dependencies as Annotated aliases, so handlers take plain typed parameters.

Every /v1 handler takes one `CallerDep`: the key's owner, which ApiKeyMiddleware authenticated
before the body was read (401 otherwise), on a ready server (503 otherwise). It is read from the
request scope, not re-derived from headers: a dependency tree of security schemes costs more per
request than the push it guards. The schemes are still documented (service/http/openapi.py).
They are `async def` because they never block: FastAPI runs a plain `def` dependency in its
threadpool, a thread hop per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from service.engine.runtime import Runtime
from service.http.middleware import OWNER

if TYPE_CHECKING:
    from service.models.registry import ModelRegistry
    from service.sessions.manager import SessionManager


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@dataclass(frozen=True)
class Caller:
    """An authenticated request to a ready server: who asks, and what serves them."""

    owner: str
    runtime: Runtime

    @property
    def sessions(self) -> SessionManager:
        return self.runtime.sessions

    @property
    def registry(self) -> ModelRegistry:
        return self.runtime.registry


async def get_caller(request: Request) -> Caller:
    runtime: Runtime = request.app.state.runtime
    owner = request.scope.get("state", {}).get(OWNER)
    if owner is None:  # a route outside the API paths, which ApiKeyMiddleware does not check
        headers = request.headers
        owner = runtime.api_keys.owner(headers.get("authorization"), headers.get("x-api-key"))
    runtime.check_ready()
    return Caller(owner, runtime)


CallerDep = Annotated[Caller, Depends(get_caller)]
