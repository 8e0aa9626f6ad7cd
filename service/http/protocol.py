"""uvicorn's httptools protocol with a deadline for each request and a bound on its headers.

Deadline: headers and body must arrive within `request_timeout_s`, or the connection is
answered 408 and closed. uvicorn itself only times out idle keep-alive connections; a client
that trickles its headers or body one byte at a time would hold a connection (and, with the
body buffered, memory) forever. The deadline starts when a connection opens or, on a kept-alive
connection, when the next request begins, and ends when the request is complete (or the
connection upgrades to a WebSocket). A pipelined request queued behind one still being answered
is not timed out: uvicorn does not read it meanwhile.

Headers: the request line and headers of one request (a WebSocket handshake's included) may
take at most `max_header_bytes`, or the connection is answered 431 and closed. httptools keeps
an unfinished header in its own buffer and uvicorn keeps every finished one, outside any body
budget, so the bytes are counted as they arrive, before the parser has them all.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.protocol.error_codes import STATUS

# The codes this protocol answers itself, before any request reaches the app.
REQUEST_TIMEOUT, HEADERS_TOO_LARGE = "request_timeout", "headers_too_large"
CODES = (REQUEST_TIMEOUT, HEADERS_TOO_LARGE)


def _closing_response(code: str, message: str) -> bytes:
    """A complete JSON error response after which the connection closes."""
    status = HTTPStatus(STATUS[code])
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_TIMEOUT_RESPONSE = _closing_response(
    REQUEST_TIMEOUT, "the request was not complete within request_timeout_s"
)


class DeadlineHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus a per-request deadline and header bound (set `request_timeout_s`
    and `max_header_bytes` by subclassing: `deadline_protocol`)."""

    request_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting_headers = True  # until the current request's headers are complete
        self._header_bytes = 0  # bytes received since then: an upper bound of their size
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still inside the headers after all of it: every byte so far was header.
        if self._awaiting_headers and self._header_bytes > self.max_header_bytes:
            self._refuse_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a kept-alive connection's next request
            self._arm()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        # Headers that ended inside the last chunk: their exact size (4: ": " and CRLF).
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_header_bytes:
            self._refuse_headers()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_headers, self._header_bytes = True, 0
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        if self._refused:  # its headers were answered 431: nothing to upgrade
            return
        self._disarm()  # the WebSocket protocol takes over; its own pings time it out
        super().handle_websocket_upgrade()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.pipeline:
            # A pipelined request waits behind one still being answered, and uvicorn stops
            # reading meanwhile: the wait is the server's, not the client's. Look again later.
            self._arm()
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's receive() now sees http.disconnect
            self.cycle.message_event.set()
        self.transport.close()

    def _refuse_headers(self) -> None:
        """431 and close: nothing of this request reaches the app, nothing more is read."""
        self._refused = True
        self._disarm()
        # A pipelined request behind one still being answered: its 431 would land inside that
        # answer, so the connection just closes.
        answering = self.cycle is not None and not self.cycle.response_complete
        if not self.transport.is_closing() and not answering:
            self.transport.write(
                _closing_response(
                    HEADERS_TOO_LARGE,
                    f"the request line and headers exceed max_header_bytes "
                    f"({self.max_header_bytes} bytes)",
                )
            )
        if not self.transport.is_closing():
            self.transport.close()


def deadline_protocol(
    request_timeout_s: float, max_header_bytes: int
) -> type[DeadlineHttpProtocol]:
    """The protocol class to hand uvicorn.Config(http=...)."""
    return type(
        "DeadlineHttpProtocol",
        (DeadlineHttpProtocol,),
        {"request_timeout_s": request_timeout_s, "max_header_bytes": max_header_bytes},
    )
