"""uvicorn's httptools protocol with a deadline for each request: headers and body must arrive
within `request_timeout_s`, or the connection is answered 408 and closed.

uvicorn itself only times out idle keep-alive connections; a client that trickles its headers or
body one byte at a time would hold a connection (and, with the body buffered, memory) forever.
The deadline starts when a connection opens or, on a kept-alive connection, when the next request
begins, and ends when the request is complete (or the connection upgrades to a WebSocket). A
pipelined request queued behind one still being answered is not timed out: uvicorn does not read
it meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_TIMEOUT_BODY = (
    b'{"error": {"code": "request_timeout", "message": "the request was not complete within '
    b'request_timeout_s"}}'
)


class DeadlineHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus a per-request deadline (set `request_timeout_s` by subclassing)."""

    request_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a kept-alive connection's next request
            self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
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
            self.transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's receive() now sees http.disconnect
            self.cycle.message_event.set()
        self.transport.close()


def deadline_protocol(request_timeout_s: float) -> type[DeadlineHttpProtocol]:
    """The protocol class to hand uvicorn.Config(http=...)."""
    return type(
        "DeadlineHttpProtocol", (DeadlineHttpProtocol,), {"request_timeout_s": request_timeout_s}
    )
