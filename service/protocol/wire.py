"""Binary WebSocket frames: little-endian float32 rows, optionally behind an int64 header.

A frame is `[header][payload]`. The payload is T x width float32 values, row-major, little
endian; T is inferred from its length. With offset framing (`?framing=offset` on the socket
URL), every frame starts with an 8-byte little-endian signed int64: in a client frame, the
offset of its first row (the session position it expects, as in the HTTP `offset` field); in a
server frame, the session's position after the push. Without it there is no header.

Many sessions on one connection (`WS /v1/streams`): a binary frame carries several pushes, each
self-describing so that one unknown session does not stop the others from being read:

    frame  = u32 count, then count items
    push   = u8 id length, id (ASCII), i64 offset (-1: none), u32 rows, u16 width,
             rows x width float32
    answer = u8 id length, id, i64 position, then, when position >= 0,
             u32 rows, u16 width, rows x width float32 outputs;
             when position is -1 (the push failed), u32 length, the UTF-8 JSON error body

All integers little endian.

Shared by the server and the Python client; needs only numpy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

HEADER = struct.Struct("<q")
ROW_DTYPE = np.dtype("<f4")
_COUNT = struct.Struct("<I")
_ID_LEN = struct.Struct("<B")
_PUSH = struct.Struct("<qIH")  # offset, rows, width
_ROWS = struct.Struct("<IH")  # rows, width
_POSITION = struct.Struct("<q")
_LENGTH = struct.Struct("<I")


class FrameError(ValueError):
    """A binary frame that does not decode to whole rows."""


def encode_frame(rows: np.ndarray, header: int | None = None) -> bytes:
    """(T, width) numbers -> frame bytes, with the int64 header when one is given."""
    payload = np.ascontiguousarray(rows, dtype=ROW_DTYPE).tobytes()
    return payload if header is None else HEADER.pack(header) + payload


def decode_frame(data: bytes, width: int, with_header: bool) -> tuple[int | None, np.ndarray]:
    """Frame bytes -> (header or None, (T, width) float32 rows)."""
    header = None
    if with_header:
        if len(data) < HEADER.size:
            raise FrameError(f"binary frame of {len(data)} bytes has no 8-byte offset header")
        (header,) = HEADER.unpack_from(data)
        data = memoryview(data)[HEADER.size :]
    row_bytes = width * ROW_DTYPE.itemsize
    if len(data) == 0 or len(data) % row_bytes:
        raise FrameError(
            f"binary payload of {len(data)} bytes is not a whole number of rows of "
            f"{width} float32 values ({row_bytes} bytes each)"
        )
    rows = np.frombuffer(data, dtype=ROW_DTYPE).reshape(-1, width)
    return header, rows


@dataclass(frozen=True)
class FramePush:
    session_id: str
    offset: int | None
    rows: np.ndarray  # (T, width) float32, a view of the frame


@dataclass(frozen=True)
class FrameAnswer:
    session_id: str
    position: int  # -1: the push failed, see `error`
    outputs: np.ndarray | None
    error: bytes | None  # the JSON error body


def encode_pushes(pushes: list[tuple[str, int | None, np.ndarray]]) -> bytes:
    """[(session id, offset or None, (T, width) rows)] -> one multi-session frame."""
    parts = [_COUNT.pack(len(pushes))]
    for session_id, offset, rows in pushes:
        sid = session_id.encode("ascii")
        payload = np.ascontiguousarray(rows, dtype=ROW_DTYPE)
        parts += [
            _ID_LEN.pack(len(sid)),
            sid,
            _PUSH.pack(-1 if offset is None else offset, *payload.shape),
            payload.tobytes(),
        ]
    return b"".join(parts)


_SMALLEST_PUSH = _ID_LEN.size + _PUSH.size  # an empty id and no rows: 15 bytes


def decode_pushes(data: bytes, max_items: int | None = None) -> list[FramePush]:
    """A multi-session frame -> its pushes; FrameError if it does not parse as a whole, or
    holds more than `max_items` pushes (refused before any is read)."""
    view = memoryview(data)
    reader = _Reader(view)
    (count,) = reader.take(_COUNT)
    if max_items is not None and count > max_items:
        raise FrameError(f"the frame holds {count} pushes; at most {max_items} per message")
    if count * _SMALLEST_PUSH > len(view) - _COUNT.size:
        raise FrameError(f"a frame of {len(view)} bytes cannot hold {count} pushes")
    pushes = []
    for _ in range(count):
        session_id = reader.text()
        offset, rows, width = reader.take(_PUSH)
        values = reader.floats(rows, width)
        pushes.append(FramePush(session_id, None if offset == -1 else offset, values))
    reader.end()
    return pushes


def encode_answers(answers: list[FrameAnswer]) -> bytes:
    parts = [_COUNT.pack(len(answers))]
    for answer in answers:
        sid = answer.session_id.encode("ascii", errors="replace")[:255]
        parts += [_ID_LEN.pack(len(sid)), sid, _POSITION.pack(answer.position)]
        if answer.position >= 0 and answer.outputs is not None:
            payload = np.ascontiguousarray(answer.outputs, dtype=ROW_DTYPE)
            parts += [_ROWS.pack(*payload.shape), payload.tobytes()]
        else:
            error = answer.error or b"{}"
            parts += [_LENGTH.pack(len(error)), error]
    return b"".join(parts)


def decode_answers(data: bytes) -> list[FrameAnswer]:
    reader = _Reader(memoryview(data))
    (count,) = reader.take(_COUNT)
    answers = []
    for _ in range(count):
        session_id = reader.text()
        (position,) = reader.take(_POSITION)
        if position >= 0:
            rows, width = reader.take(_ROWS)
            answers.append(FrameAnswer(session_id, position, reader.floats(rows, width), None))
        else:
            (length,) = reader.take(_LENGTH)
            answers.append(FrameAnswer(session_id, position, None, reader.raw(length)))
    reader.end()
    return answers


class _Reader:
    """Sequential reads from a frame; any overrun is a FrameError naming the byte."""

    def __init__(self, view: memoryview):
        self.view, self.at = view, 0

    def raw(self, n: int) -> bytes:
        if self.at + n > len(self.view):
            raise FrameError(
                f"frame ends at byte {len(self.view)}; {n} more bytes expected at {self.at}"
            )
        out = bytes(self.view[self.at : self.at + n])
        self.at += n
        return out

    def take(self, layout: struct.Struct) -> tuple:
        if self.at + layout.size > len(self.view):
            raise FrameError(f"frame ends at byte {len(self.view)}, inside a header at {self.at}")
        out = layout.unpack_from(self.view, self.at)
        self.at += layout.size
        return out

    def text(self) -> str:
        (n,) = self.take(_ID_LEN)
        try:
            return self.raw(n).decode("ascii")
        except UnicodeDecodeError:
            raise FrameError(f"session id at byte {self.at - n} is not ASCII") from None

    def floats(self, rows: int, width: int) -> np.ndarray:
        n = rows * width * ROW_DTYPE.itemsize
        if self.at + n > len(self.view):
            raise FrameError(
                f"frame ends at byte {len(self.view)}; {rows} rows of {width} float32 values "
                f"need {n} bytes from {self.at}"
            )
        values = np.frombuffer(self.view, dtype=ROW_DTYPE, count=rows * width, offset=self.at)
        self.at += n
        return values.reshape(rows, width)

    def end(self) -> None:
        if self.at != len(self.view):
            raise FrameError(f"{len(self.view) - self.at} bytes after the last item")
