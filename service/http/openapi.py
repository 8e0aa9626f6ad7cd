"""The OpenAPI document: each route lists only the errors it can answer
(service/http/route_errors.py),
and the API routes declare the API-key schemes that ApiKeyMiddleware checks.

FastAPI adds a 422 "Validation Error" to every route with a parameter; ours take only strings
(paths, optional headers) and decode their bodies themselves, so that response cannot happen.
It is dropped, with its schemas; a route that does answer 422 declares it (as invalid_input).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.http.middleware import is_api_path

FRAMEWORK_422 = "Validation Error"
# The keys ApiKeyMiddleware accepts: checked there, once, not by a dependency per route.
SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "API key as a bearer token"},
    "APIKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "API key",
    },
}


def install(app: FastAPI) -> None:
    """Replace app.openapi by the same document without FastAPI's own 422s, and with the
    API-key schemes on every API route."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            requirement = [{name: []} for name in SECURITY_SCHEMES]
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.get("422", {}).get("description") == FRAMEWORK_422:
                        del responses["422"]
                    if is_api_path(path):
                        operation["security"] = requirement
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
