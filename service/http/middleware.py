"""ASGI middleware: request ids, request metrics, the body-size limit, last-resort 500s."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import ApiKeys
from service.http import errors as http_errors
from service.metrics import Metrics
from service.protocol.errors import BodyTooLarge, Overloaded, Unauthorized
from service.protocol.limits import InflightBudget, header_int

logger = logging.getLogger(__name__)
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
NO_BODY_BYTES = 1024  # routes outside the API (is_api_path) take none
OWNER = "tcnserve.owner"  # the scope state key of the authenticated key's owner id
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def is_api_path(path: str) -> bool:
    """/v1 and the Open Inference Protocol's /v2, but /v2's health probes (which, as /healthz
    and /readyz, answer anyone): the routes that need an API key, and alone take bodies."""
    if path.startswith("/v1/"):
        return True
    return (path == "/v2" or path.startswith("/v2/")) and not path.startswith("/v2/health/")


class RequestContextMiddleware:
    """Echo or assign X-Request-ID, count and time requests by route, turn crashes into 500s."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        # (route, method, status) -> its counter and histogram children: a labels() lookup
        # per request costs more than the increment itself.
        self._series: dict[tuple[str, str, str], tuple] = {}

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Other scopes (WebSockets, lifespan) get the inner app's awaitable itself: no frame of
        # ours stays on their stack, which every suspension of a stream would pass through.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != REQUEST_ID_HEADER]
                message = {
                    **message,
                    "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception(
                "unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id
            )
            if started:
                raise
            await http_errors.internal_error_response()(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            # A fixed label set: any client can send any method, and series live forever.
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            key = (label, method, str(status))
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = (
                    self.metrics.requests.labels(*key),
                    self.metrics.request_latency.labels(label, method),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - start)


class ApiKeyMiddleware:
    """401 for an API request without a valid key, before any body is read or parsed.

    The key is checked here once: the key's owner id goes into the scope's state (`OWNER`),
    where the handlers' dependency (service/http/deps.py) reads it.
    """

    def __init__(self, app: ASGIApp, api_keys: ApiKeys):
        self.app = app
        self.api_keys = api_keys

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http" and is_api_path(scope["path"]):
            return self._check(scope, receive, send)
        return self.app(scope, receive, send)  # WebSockets authenticate after their handshake

    async def _check(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = x_api_key = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"x-api-key":
                x_api_key = value.decode("latin-1")
        try:
            owner = self.api_keys.owner(authorization, x_api_key)
        except Unauthorized as e:
            await http_errors.error_response(e)(scope, receive, send)
            return
        scope.setdefault("state", {})[OWNER] = owner
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, by Content-Length or by counting a streamed body; 503 when
    the bodies buffered by all requests together would pass max_inflight_bytes.

    Each body is held until its request is answered, so without the shared budget a thousand
    connections sending large bodies at once could take the server's memory between them.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, budget: InflightBudget, retry_after_s: int):
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget  # shared with the WebSocket streams (service/ws/stream.py)
        self.retry_after_s = retry_after_s

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only API routes take bodies (and they need an API key): anywhere else a body is
        # refused at its first bytes, so anonymous clients cannot fill the shared budget.
        limit = self.max_bytes if is_api_path(scope["path"]) else NO_BODY_BYTES
        declared = header_int(dict(scope["headers"]).get(b"content-length"))
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit)
            return
        # Read the whole body here (the handlers would anyway) so an oversized stream is refused
        # before any handler has started.
        chunks, size = [], 0
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away mid-body: nobody to answer
                chunk = message.get("body", b"")
                if size + len(chunk) > limit:
                    await self._refuse(scope, receive, send, limit)
                    return
                if not self.budget.take(len(chunk)):
                    error = Overloaded(
                        "the server is holding too many request bodies; retry shortly",
                        self.retry_after_s,
                    )
                    await http_errors.error_response(error)(scope, receive, send)
                    return
                size += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            chunks.clear()
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.budget.release(size)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        if limit == self.max_bytes:
            error = BodyTooLarge(f"request body exceeds max_body_bytes ({limit} bytes)")
        else:
            error = BodyTooLarge(f"{scope['path']} takes no request body (at most {limit} bytes)")
        await http_errors.error_response(error)(scope, receive, send)


def _request_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if REQUEST_ID_RE.match(text):
                return text
            break
    return secrets.token_hex(16)
