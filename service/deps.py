"""FastAPI dependencies as Annotated aliases, so handlers take plain typed parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.registry import ModelRegistry
from service.runtime import Runtime
from service.sessions import SessionManager

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_owner(
    runtime: RuntimeDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key_header)],
) -> str:
    """The owner id of the request's API key (Unauthorized when keys are on and it is wrong)."""
    authorization = f"Bearer {bearer.credentials}" if bearer is not None else None
    return runtime.api_keys.owner(authorization, api_key)


OwnerDep = Annotated[str, Depends(get_owner)]


def get_ready_runtime(runtime: RuntimeDep) -> Runtime:
    runtime.check_ready()
    return runtime


ReadyRuntimeDep = Annotated[Runtime, Depends(get_ready_runtime)]


def get_registry(runtime: ReadyRuntimeDep) -> ModelRegistry:
    return runtime.registry


def get_sessions(runtime: ReadyRuntimeDep) -> SessionManager:
    return runtime.sessions


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
SessionsDep = Annotated[SessionManager, Depends(get_sessions)]

# Every /v1 route: the API key first (401 before anything else), then readiness (503).
V1_DEPENDENCIES = [Depends(get_owner), Depends(get_ready_runtime)]
