"""FastAPI dependencies as Annotated aliases, so handlers take plain typed parameters.

Every /v1 handler takes one `CallerDep`: the key's owner, which ApiKeyMiddleware authenticated
before the body was read (401 otherwise), on a ready server (503 otherwise). It is read from the
request scope, not re-derived from headers: a dependency tree of security schemes costs more per
request than the push it guards. The schemes are still documented (`document_security`).
They are `async def` because they never block: FastAPI runs a plain `def` dependency in its
threadpool, a thread hop per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from service.middleware import OWNER
from service.registry import ModelRegistry
from service.runtime import Runtime
from service.sessions import SessionManager

# The OpenAPI security schemes of /v1 (the keys ApiKeyMiddleware accepts).
SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "API key as a bearer token"},
    "APIKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "API key",
    },
}


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
    if owner is None:  # a route outside /v1, which ApiKeyMiddleware does not see
        headers = request.headers
        owner = runtime.api_keys.owner(headers.get("authorization"), headers.get("x-api-key"))
    runtime.check_ready()
    return Caller(owner, runtime)


CallerDep = Annotated[Caller, Depends(get_caller)]


def document_security(app: FastAPI) -> None:
    """Declare the API-key schemes in the app's OpenAPI document, on every /v1 operation."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        requirement = [{name: []} for name in SECURITY_SCHEMES]
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = requirement
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
