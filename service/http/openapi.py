"""The OpenAPI document: each route lists only the errors it can answer
(service/http/route_errors.py), the API routes declare the API-key schemes that ApiKeyMiddleware
checks, and every path parameter has the example "Try it out" fills in.

FastAPI adds a 422 "Validation Error" to every route with a parameter; ours take only strings
(paths, optional headers) and decode their bodies themselves, so that response cannot happen.
It is dropped, with its schemas; a route that does answer 422 declares it (as invalid_input).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.http.middleware import is_api_path
from service.http.schemas import CreateSessionRequest
from service.oip.decode import VERSION

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

# What "Try it out" fills in for each path parameter: the session the create example opens, on
# the model it names (tests/service/test_openapi_examples.py sends every route so filled in).
PATH_EXAMPLES = {
    "name": CreateSessionRequest.EXAMPLE["model"],
    "version": VERSION,
    "session_id": CreateSessionRequest.EXAMPLE["session_id"],
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
                    for parameter in operation.get("parameters", []):
                        if parameter["in"] == "path" and parameter["name"] in PATH_EXAMPLES:
                            parameter["example"] = PATH_EXAMPLES[parameter["name"]]
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
