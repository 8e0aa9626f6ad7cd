"""Binary WebSocket frames: little-endian float32 rows, optionally behind an int64 header.

A frame is `[header][payload]`. The payload is T x width float32 values, row-major, little
endian; T is inferred from its length. With offset framing (`?framing=offset` on the socket
URL), every frame starts with an 8-byte little-endian signed int64: in a client frame, the
offset of its first row (the session position it expects, as in the HTTP `offset` field); in a
server frame, the session's position after the push. Without it there is no header.

Shared by the server and the Python client; needs only numpy.
"""

from __future__ import annotations

import struct

import numpy as np

HEADER = struct.Struct("<q")
ROW_DTYPE = np.dtype("<f4")


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
