"""uvicorn's sans-I/O WebSocket protocol, telling its parser when the connection is gone.

uvicorn (0.55) never feeds end-of-stream to the websockets parser: `eof_received` does nothing
and `connection_lost` does not tell it. A connection closed with a close handshake ends its
parser cleanly, but one dropped without it (a crashed client, a reset, a timeout) leaves the
parser suspended, its last frame (up to max_body_bytes) a local of the generator, which refers
back to its protocol: a reference cycle that only a full garbage collection frees, and on an
idle server none may come for minutes (40 dropped sockets with one 16 MiB message each held
+657 MiB). Feeding EOF ends the parser at once, as a clean close does, and dropping the
traceback of the exception it ends with lets reference counting free the frame when the
connection ends.
"""

from __future__ import annotations

import contextlib

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame


class ReleasingWebSocketProtocol(WebSocketsSansIOProtocol):
    """WebSocketsSansIOProtocol whose parser sees the end of the stream, however it ends, and
    keeps no frame's payload once the message has been handed on."""

    # The parser generator keeps the last frame it read as a local until the next frame
    # arrives, so an idle connection held its last message (up to max_body_bytes) after the
    # app had answered it. Once a data frame is handled, uvicorn holds its payload where it
    # needs it (the message, or the fragments so far); the frame lets go of it.

    def handle_text(self, event: Frame) -> None:
        super().handle_text(event)
        event.data = b""

    def handle_bytes(self, event: Frame) -> None:
        super().handle_bytes(event)
        event.data = b""

    def handle_cont(self, event: Frame) -> None:
        super().handle_cont(event)
        event.data = b""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._end_parser()
        self.frames = []  # an unfinished fragmented message: nobody will complete it

    def _end_parser(self) -> None:
        # After a close handshake the parser is done already, and receive_eof does nothing.
        with contextlib.suppress(Exception):  # nothing of a lost connection may raise here
            self.conn.receive_eof()
        # The parser keeps the exception that ended it (EOFError here, PayloadTooBig for a
        # message over the limit), whose traceback holds the parser's frame and its last frame.
        if self.conn.parser_exc is not None:
            self.conn.parser_exc.__traceback__ = None
