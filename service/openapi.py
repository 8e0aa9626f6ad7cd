"""The OpenAPI document: each route lists only the errors it can answer (service/route_errors.py).

FastAPI adds a 422 "Validation Error" to every route with a parameter; ours take only strings
(paths, optional headers) and decode their bodies themselves, so that response cannot happen.
It is dropped, with its schemas; a route that does answer 422 declares it (as invalid_input).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

FRAMEWORK_422 = "Validation Error"


def install(app: FastAPI) -> None:
    """Replace app.openapi by the same document without FastAPI's own 422s."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.get("422", {}).get("description") == FRAMEWORK_422:
                        del responses["422"]
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
