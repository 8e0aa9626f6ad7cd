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

It also offers the app a direct path for binary messages (`DIRECT_BINARY`, a scope extension):
a stream that attaches a handler gets each binary message in the callback that parsed it, and
answers it by writing the answer frame itself, in the callback that has the answer. No ASGI
receive, no task wake-up and no Starlette wrapper per message: that is what the same stack's
echo spends most of its time on (docs/scaling.md). Messages are still handled one at a time and
in order, whichever path each takes: a message goes direct only while the app's own receive
loop is idle with nothing queued for it, and what arrives while one is being answered waits
(reading is paused meanwhile, as for the app's queue).

On such a stream the protocol also frames the common messages itself: a whole, unfragmented,
client-masked binary frame that arrives while websockets' parser sits between frames with
nothing buffered is unmasked and handed on here, and the answers are framed here (a server
frame is a 2-10 byte header and the payload). Everything else (text, control frames,
fragments, a frame split across reads, one over the size limit or malformed) goes to
websockets' parser, which answers it as it always has; its pure-Python parser and serializer
were an eighth of the event loop's time per message (docs/benchmarks/results/ws_direct_path.txt).
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.protocol import OPEN
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

logger = logging.getLogger(__name__)

DIRECT_BINARY = "tcnserve.direct_binary"  # the scope extension: {"attach": attach(handler)}

# What the direct path reads of uvicorn's protocol: without all of it (another uvicorn), the
# extension is not offered and every message takes the ASGI path.
_NEEDS_METHODS = ("send_receive_event_to_app", "receive", "handle_connect", "resume_writing")
_NEEDS_STATE = (
    "queue", "read_paused", "close_sent", "disconnected", "writable", "conn", "transport",
    "curr_msg_data_type", "frames", "close_timer", "close_timeout",
)  # fmt: skip
# What framing messages here reads of websockets' connection: without all of it, websockets
# frames every message (and a test fails in CI).
_NEEDS_CONN = (
    "state", "extensions", "current_size", "debug", "reader", "parser", "max_message_size",
    "max_fragment_size", "writes", "expect_continuation_frame",
)  # fmt: skip
_BETWEEN_FRAMES = StreamReader.at_eof.__code__  # where websockets' parser waits for a frame
_BINARY, _TEXT = 0x82, 0x81  # a final frame's first byte (FIN, no RSV bits, the opcode)


class DirectLink(Protocol):
    """What a direct handler answers through: exactly one of these per message it took (an
    answer after the connection is gone or closing is dropped), and `detach` when the stream's
    app is done with it."""

    def send_bytes(self, data: bytes) -> None: ...
    def send_text(self, text: str) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    def detach(self) -> None: ...


DirectHandler = Callable[[bytes], bool]  # True: taken, to be answered through the link


class ReleasingWebSocketProtocol(WebSocketsSansIOProtocol):
    """WebSocketsSansIOProtocol whose parser sees the end of the stream, however it ends, and
    keeps no frame's payload once the message has been handed on."""

    _direct_supported = all(hasattr(WebSocketsSansIOProtocol, n) for n in _NEEDS_METHODS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct: DirectHandler | None = None
        self._direct_busy = False  # a message taken by the handler, not answered yet
        self._draining = False
        self._waiting: deque[tuple[str, bytes]] = deque()  # arrived while one was answered
        self._app_receiving = False  # the app awaits receive() (its queue may hold messages)
        self._own_frames = False  # whether this protocol may frame messages (handle_connect)
        self._frame_limit: int | None = None  # the largest payload websockets' parser takes

    # ----- the direct path ---------------------------------------------------------------------

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        supported = self._direct_supported and all(hasattr(self, n) for n in _NEEDS_STATE)
        if scope is not None and supported:
            scope["extensions"][DIRECT_BINARY] = {"attach": self._attach}
            conn = self.conn
            self._own_frames = all(hasattr(conn, n) for n in _NEEDS_CONN) and hasattr(
                conn.parser, "gi_yieldfrom"
            )
            if self._own_frames:  # a frame of a whole message: both limits apply
                sizes = (conn.max_message_size, conn.max_fragment_size)
                self._frame_limit = min((s for s in sizes if s is not None), default=None)

    def _attach(self, handler: DirectHandler) -> DirectLink:
        self._direct = handler
        return self

    def detach(self) -> None:
        self._direct = None
        if not self._direct_busy:  # what waits goes to the app, in order
            self._drain()

    async def receive(self) -> Any:
        self._app_receiving = True
        try:
            return await super().receive()
        finally:
            self._app_receiving = False

    def data_received(self, data: bytes) -> None:
        if self._direct is not None and self._own_frames and self._parser_between_frames():
            data = self._take_frames(data)
            if not data:
                return
        super().data_received(data)

    def _parser_between_frames(self) -> bool:
        """Whether websockets' parser may be passed by: the connection open with no extension
        and no fragmented message, and the parser waiting for a next frame with no byte of it
        read (suspended in its end-of-stream check with an empty buffer)."""
        conn = self.conn
        if (
            conn.state is not OPEN
            or conn.extensions
            or conn.current_size is not None
            or conn.debug
            or conn.reader.buffer
        ):
            return False
        parser = conn.parser
        while (inner := parser.gi_yieldfrom) is not None:
            parser = inner
        return parser.gi_code is _BETWEEN_FRAMES

    def _take_frames(self, data: bytes) -> bytes:
        """Hand on each whole final client-masked binary frame at the start of `data`, as
        websockets' parser and uvicorn would; return what is left from the first frame that is
        anything else, or incomplete, for websockets' parser (b"" when nothing is)."""
        conn = self.conn
        limit = self._frame_limit
        size = len(data)
        at = 0
        while at + 6 <= size and data[at] == _BINARY and conn.state is OPEN:
            n = data[at + 1] ^ 0x80  # the mask bit set: the length; unset (unmasked): >= 128
            head = at + 2
            if n == 126:
                n = int.from_bytes(data[head : head + 2], "big")
                head += 2
            elif n == 127:
                n = int.from_bytes(data[head : head + 8], "big")
                head += 8
            elif n > 127:
                break  # unmasked: websockets refuses it
            end = head + 4 + n
            if end > size or (limit is not None and n > limit):
                break  # incomplete, or over the limit (websockets closes with 1009)
            self.curr_msg_data_type = "bytes"
            self.frames = [apply_mask(data[head + 4 : end], data[head : head + 4])]
            at = end
            self.send_receive_event_to_app()
        return data[at:] if at else data

    def send_receive_event_to_app(self) -> None:
        if self._direct is None and not self._waiting:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:  # as uvicorn: past the close, messages are dropped
            return
        self._waiting.append((self.curr_msg_data_type, data))
        if not self._direct_busy:
            self._drain()
        # Stop reading while a message waits, or the client does not read its answers; one
        # being answered with nothing behind it leaves reading on (no pause and resume per
        # message).
        if self._waiting or not self.writable.is_set():
            self._pause()

    def _drain(self) -> None:
        """Hand the waiting messages on in order: binary ones to the handler while the app's
        loop is idle, the rest (and everything after one of them) to the app's queue."""
        if self._draining:  # an answer given while the handler runs: its caller goes on
            return
        self._draining = True
        try:
            waiting = self._waiting
            while waiting and not self._direct_busy:
                kind, data = waiting.popleft()
                if self.close_sent or self.disconnected:
                    waiting.clear()
                    break
                if kind == "bytes" and self._direct_ready():
                    self._direct_busy = True
                    try:
                        taken = self._direct(data)  # type: ignore[misc]
                    except Exception:
                        logger.exception("a direct WebSocket handler failed")
                        taken = False
                    if taken:
                        continue  # answered already (a replay) or later
                    self._direct_busy = False
                self._to_app(kind, data)
        finally:
            self._draining = False
        self._resume_if_idle()

    def _direct_ready(self) -> bool:
        return (
            self._direct is not None
            and self._app_receiving
            and self.queue.empty()
            and not self.close_sent
            and not self.disconnected
        )

    def _to_app(self, kind: str, data: bytes) -> None:
        self.curr_msg_data_type = kind  # type: ignore[assignment]
        self.frames = [data]
        super().send_receive_event_to_app()

    def _answered(self) -> None:
        self._direct_busy = False
        if self._waiting:
            # On the next turn: the answer comes before the push lets go of its session, so
            # the next message now would find it busy.
            self.loop.call_soon(self._drain)
        else:
            self._resume_if_idle()

    def _pause(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_if_idle(self) -> None:
        """Read on once nothing is being answered or waits, and the client reads its answers
        (a client that does not read stops being read)."""
        if (
            self.read_paused
            and not self._direct_busy
            and not self._waiting
            and self.queue.empty()
            and self.writable.is_set()
            and not self.disconnected
        ):
            self.read_paused = False
            self.transport.resume_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._resume_if_idle()

    def send_bytes(self, data: bytes) -> None:
        self._write(_BINARY, data)

    def send_text(self, text: str) -> None:
        self._write(_TEXT, text.encode())

    def _write(self, first: int, payload: bytes) -> None:
        """One final frame, framed here (a server frame is unmasked), unless websockets has
        frames of its own to send first or the connection is not plainly open; an answer
        after the close (ours or the client's) is dropped."""
        conn = self.conn
        if not (
            self.close_sent
            or self.disconnected
            or self.transport.is_closing()
            or conn.state is not OPEN
        ):
            if self._own_frames and not (
                conn.writes or conn.extensions or conn.expect_continuation_frame or conn.debug
            ):
                self.transport.write(_frame_header(first, len(payload)) + payload)
            else:
                (conn.send_binary if first == _BINARY else conn.send_text)(payload)
                self.transport.write(b"".join(conn.data_to_send()))
        self._answered()

    def close(self, code: int, reason: str) -> None:
        """Close as the app's `websocket.close` does: the app's loop sees the disconnect."""
        if not (self.close_sent or self.disconnected or self.transport.is_closing()):
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
        self._waiting.clear()
        self._direct_busy = False
        if self.read_paused and not self.disconnected:  # read the peer's close reply
            self.read_paused = False
            self.transport.resume_reading()

    # ----- releasing -----------------------------------------------------------------------------

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
        self._waiting.clear()  # nobody will answer them
        self.frames = []  # an unfinished fragmented message: nobody will complete it

    def _end_parser(self) -> None:
        # After a close handshake the parser is done already, and receive_eof does nothing.
        with contextlib.suppress(Exception):  # nothing of a lost connection may raise here
            self.conn.receive_eof()
        # The parser keeps the exception that ended it (EOFError here, PayloadTooBig for a
        # message over the limit), whose traceback holds the parser's frame and its last frame.
        if self.conn.parser_exc is not None:
            self.conn.parser_exc.__traceback__ = None


def _frame_header(first: int, n: int) -> bytes:
    """The header of an unmasked frame of `n` payload bytes (RFC 6455 5.2)."""
    if n < 126:
        return bytes((first, n))
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n)
    return struct.pack("!BBQ", first, 127, n)
