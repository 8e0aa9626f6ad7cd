"""A session's durable record: what another replica needs to take it over exactly, as bytes.

A TCN's state after position p is a function of its last min(p, R - 1) inputs (R = receptive
field), so the record is that input tail (`SessionManager.snapshot`, `create(snapshot=...)`),
the session's model, owner and TTL, and its last applied push (offset, length, digest, outputs),
so that a retry of that push is answered again after a move rather than refused, and, for a
model with embedding_dims, the embedding the session is conditioned on (float64, exact).

Layout: a little-endian uint32 header length, a JSON header, the input rows as raw
little-endian bytes (float32/float64, int64 token ids), then the last push's float32 outputs.
No pickle: a record read from the store is parsed, never executed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgspec
import numpy as np

from service.sessions.state import AppliedPush

VERSION = 1
_LENGTH = struct.Struct("<I")
_DTYPES = {"float32": "<f4", "float64": "<f8", "int64": "<i8"}


class RecordError(ValueError):
    """Bytes that are not a session record of this version."""


class _Header(msgspec.Struct, frozen=True):
    v: int
    model: str
    ttl_s: float
    position: int
    dtype: str
    shape: list[int]
    last: list[int] | None = None  # [offset, length, outputs rows, outputs columns]
    digest: str | None = None  # hex of the last push's blake2b digest
    embedding: list[float] | None = None  # a conditioned model's session's (absent: none)


@dataclass(frozen=True)
class SessionRecord:
    """A session as the store keeps it (the owner and the id are the store's key)."""

    model: str
    ttl_s: float
    position: int
    rows: np.ndarray  # the last min(position, R - 1) inputs, oldest first
    last_push: AppliedPush | None = None
    embedding: np.ndarray | None = None  # (E,) float64: a conditioned model's session's

    def encode(self) -> bytes:
        dtype = self.rows.dtype.name
        if dtype not in _DTYPES:
            raise RecordError(f"rows of dtype {dtype} cannot be stored")
        last, digest, outputs = None, None, b""
        if self.last_push is not None:
            out = np.ascontiguousarray(self.last_push.outputs, dtype="<f4")
            last = [self.last_push.offset, self.last_push.length, *out.shape]
            digest, outputs = self.last_push.digest.hex(), out.tobytes()
        header = msgspec.json.encode(
            _Header(
                VERSION,
                self.model,
                self.ttl_s,
                self.position,
                dtype,
                list(self.rows.shape),
                last,
                digest,
                None if self.embedding is None else [float(v) for v in self.embedding],
            )
        )
        rows = np.ascontiguousarray(self.rows, dtype=_DTYPES[dtype]).tobytes()
        return _LENGTH.pack(len(header)) + header + rows + outputs

    @classmethod
    def decode(cls, data: bytes) -> SessionRecord:
        try:
            (length,) = _LENGTH.unpack_from(data)
            header = msgspec.json.decode(data[4 : 4 + length], type=_Header)
        except (struct.error, msgspec.DecodeError) as e:
            raise RecordError(f"not a session record: {e}") from None
        if header.v != VERSION or header.dtype not in _DTYPES:
            raise RecordError(f"unsupported session record (version {header.v})")
        dtype = np.dtype(_DTYPES[header.dtype])
        start = 4 + length
        end = start + int(np.prod(header.shape, dtype=np.int64)) * dtype.itemsize
        if end > len(data):
            raise RecordError("session record is truncated")
        rows = np.frombuffer(data[start:end], dtype=dtype).reshape(header.shape)
        rows = rows.astype(header.dtype)  # native byte order, writable
        last_push = None
        if header.last is not None and header.digest is not None:
            offset, pushed, n, m = header.last
            outputs = np.frombuffer(data[end : end + n * m * 4], dtype="<f4")
            if outputs.size != n * m:
                raise RecordError("session record is truncated")
            last_push = AppliedPush(
                offset, pushed, bytes.fromhex(header.digest), outputs.reshape(n, m).copy()
            )
        embedding = None if header.embedding is None else np.array(header.embedding, np.float64)
        return cls(header.model, header.ttl_s, header.position, rows, last_push, embedding)
