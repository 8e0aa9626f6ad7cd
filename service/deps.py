"""FastAPI dependencies as Annotated aliases, so handlers take plain typed parameters.

Every /v1 handler takes one `CallerDep`: the API key is checked first (401), then readiness
(503). They are `async def` because they never block: FastAPI runs a plain `def` dependency in
its threadpool, a thread hop per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.registry import ModelRegistry
from service.runtime import Runtime
from service.sessions import SessionManager

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


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


async def get_caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key_header)],
) -> Caller:
    runtime: Runtime = request.app.state.runtime
    authorization = f"Bearer {bearer.credentials}" if bearer is not None else None
    owner = runtime.api_keys.owner(authorization, api_key)
    runtime.check_ready()
    return Caller(owner, runtime)


CallerDep = Annotated[Caller, Depends(get_caller)]
