"""The one place that maps errors to HTTP: `{"error": {"code", "message"}}`, status, headers.

Under /v2 (the Open Inference Protocol) the same errors are answered in that protocol's form,
`{"error": "message"}`, with its statuses (error_codes.OIP_STATUS). The form is chosen when the
response is sent, from the request's path, so the middleware's early refusals (401, 413, 503)
and the framework's own errors take it too without knowing of protocols.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from service.http.schemas import ErrorBody
from service.oip.schemas import OipErrorBody
from service.protocol import error_codes as codes
from service.protocol import errors

logger = logging.getLogger(__name__)

# Framework errors (no route, wrong method, unreadable request) by status, named in the table.
HTTP_CODES = {status: code for code, status in codes.STATUS.items() if status in (400, 405)}
HTTP_CODES[404] = "not_found"

# Every error status with one description: superseded by error_responses (each route lists
# only what it can answer, service/http/route_errors.py); kept for routes not yet moved to it.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "missing or invalid API key",
        404: "unknown model or session",
        409: "offset conflict or session id taken",
        410: "session expired",
        413: "body or timesteps over the limit",
        422: "invalid input",
        429: "no free session slot, or the key's session quota is used (see Retry-After)",
        503: "not ready, draining or overloaded (see Retry-After)",
    }.items()
}


def error_responses(*errors: type[errors.ServiceError], oip: bool = False) -> dict[int | str, Any]:
    """OpenAPI `responses` for the errors a route can answer: one entry per status, naming the
    error codes behind it (statuses from error_codes.py; `oip`: the /v2 statuses and body)."""
    table = codes.OIP_STATUS if oip else codes.STATUS
    by_status: dict[int, list[str]] = {}
    for error in errors:
        names = by_status.setdefault(table[error.code], [])
        if error.code not in names:
            names.append(error.code)
    body = OipErrorBody if oip else ErrorBody
    return {
        status: {"model": body, "description": "error codes: " + ", ".join(names)}
        for status, names in sorted(by_status.items())
    }


def is_oip_path(path: str) -> bool:
    """Whether a path is the Open Inference Protocol's (/v2 and below)."""
    return path == "/v2" or path.startswith("/v2/")


class ErrorResponse(JSONResponse):
    """An error in the form of the protocol its request spoke (see the module docstring)."""

    def __init__(
        self,
        code: str,
        message: str,
        headers: dict[str, str],
        status: int | None = None,  # the framework's own status, for both forms
        **extra: Any,
    ):
        v1_status = status or codes.STATUS.get(code, 500)
        super().__init__(error_body(code, message, **extra), v1_status, headers=headers)
        self._oip = (message, status or codes.OIP_STATUS.get(code, 500), headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_oip_path(scope.get("path", "")):
            message, status, headers = self._oip
            oip = JSONResponse({"error": message}, status, headers=headers)
            await oip(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def websocket_close_code(error: errors.ServiceError) -> int | None:
    """The close code for an error that ends a WebSocket stream, else None."""
    return codes.CLOSE.get(error.code)


def error_message(error: errors.ServiceError) -> dict[str, Any]:
    """An error as a message (the HTTP error body): a WebSocket answer, a /v1/steps item."""
    extra = {"position": error.position} if isinstance(error, errors.OffsetConflict) else {}
    return error_body(error.code, error.message, **extra)


def error_response(error: errors.ServiceError) -> JSONResponse:
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(error, errors.OffsetConflict):
        extra["position"] = error.position
    if isinstance(error, (errors.CapacityExceeded, errors.NotReady)):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, errors.Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return ErrorResponse(error.code, error.message, headers, **extra)


def internal_error_response() -> JSONResponse:
    return ErrorResponse("internal", "internal server error", {})


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def install(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are caught by the request middleware."""

    async def on_service_error(request: Request, exc: errors.ServiceError) -> JSONResponse:
        return error_response(exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return ErrorResponse("invalid_input", validation_message(exc), {})

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return ErrorResponse(code, str(exc.detail), dict(exc.headers or {}), exc.status_code)

    app.add_exception_handler(errors.ServiceError, on_service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
