"""What crosses the engine boundary: typed requests, typed outcomes, and their framing.

Every message is a msgspec Struct encoded as MessagePack (array-like, tagged by its class), in a
frame of a 4-byte little-endian length and the payload. A request carries an `id` the edge picks;
its answer carries the same id and either one outcome struct or a `Failed` (the ServiceError a
client sees, rebuilt on the edge by its stable `code`). Rows travel as raw bytes (`Rows`), never
as Python lists. Frames made during one turn of an event loop go out in one write.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np

from service.protocol import errors

HEADER = struct.Struct("<I")
# The largest frame either side accepts: a request is bounded by the edge's body limits well
# below this; anything larger is a broken peer, and the connection is dropped.
MAX_FRAME_BYTES = 1 << 30


class Rows(msgspec.Struct, array_like=True):
    """An array as bytes: (T, cols) of `dtype`, or (T,) token ids when cols is 0. Decoded into
    a bytearray, so `array()` is a writable view of it (no copy)."""

    data: bytearray
    dtype: str
    cols: int

    @classmethod
    def of(cls, x: np.ndarray) -> Rows:
        return cls(x.tobytes(), x.dtype.str, x.shape[1] if x.ndim == 2 else 0)

    def array(self) -> np.ndarray:
        x = np.frombuffer(self.data, dtype=np.dtype(self.dtype))
        return x.reshape(-1, self.cols) if self.cols else x


class _Request(msgspec.Struct, array_like=True, tag=True):
    id: int


# ----- requests, edge -> engine --------------------------------------------------------------


class Create(_Request):
    owner: str
    model: str
    session_id: str | None
    ttl_s: float | None
    prefix: Rows | None
    snapshot_position: int | None
    snapshot: Rows | None
    bound: bool  # closed by the engine if this connection ends first (WS /v1/stream)
    embedding: list[float] | None = None  # a conditioned model's (service/models/inputs.py)


class Push(_Request):
    owner: str
    session_id: str
    rows: Rows
    offset: int | None


class PushMany(_Request):
    owner: str
    session_ids: list[str]
    rows: list[Rows]
    offsets: list[int | None]


class Get(_Request):
    owner: str
    session_id: str


class Resolve(_Request):
    """The models of these sessions (bringing any held by another replica here first)."""

    owner: str
    session_ids: list[str]


class TakeSnapshot(_Request):
    owner: str
    session_id: str


class Reset(_Request):
    owner: str
    session_id: str


class Delete(_Request):
    owner: str
    session_id: str


class ListSessions(_Request):
    """The owner's sessions by id, a page of at most `limit` after `after` (of `model`)."""

    owner: str
    limit: int
    after: str | None
    model: str | None


class DeleteSessions(_Request):
    """Every session of the owner (of `model`, if given)."""

    owner: str
    model: str | None


class Close(_Request):
    """Delete this very session (its serial), never a newer one that took its id."""

    owner: str
    session_id: str
    serial: int


class Predict(_Request):
    model: str
    sequences: list[Rows]
    last_only: bool
    embeddings: list[list[float]] | None = None  # one per sequence, for a conditioned model


class StreamOpen(_Request):
    """Count one more WebSocket stream of `owner` (max_streams_per_key, every edge together)."""

    owner: str


class StreamClose(_Request):
    owner: str


class Status(_Request):
    """Readiness and the models' descriptions (`Welcome`): an edge's first request on a
    connection, and then one every STATUS_EVERY_S (service/engine/client.py)."""


class MetricsText(_Request):
    """Every process's Prometheus page (`Pages`), for the edge to sum (engine/metrics.py)."""

    edge: bytes  # the asking edge's own series, fresh


class EdgeMetrics(_Request):
    """An edge's own series, sent with each status request, for other edges' /metrics."""

    pid: int
    text: bytes


Request = (
    Create | Push | PushMany | Get | Resolve | TakeSnapshot | Reset | Delete | ListSessions
    | DeleteSessions | Close | Predict | StreamOpen | StreamClose | Status | MetricsText
    | EdgeMetrics
)  # fmt: skip


# ----- outcomes, engine -> edge --------------------------------------------------------------


class SessionView(msgspec.Struct, array_like=True):
    """What an edge may know of a session: the fields its answers show."""

    id: str
    owner: str
    model: str
    ttl_s: float
    created_at: float
    last_used_at: float
    position: int
    serial: int
    embedding: list[float] | None = None  # what a conditioned model's session is conditioned on

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_s


class ModelView(msgspec.Struct, array_like=True):
    """A served model as an edge sees it: its /v1/models description and what its rows take."""

    info: dict[str, Any]
    width: int
    vocab_size: int | None
    input_dtype: str
    max_abs: float
    output_size: int
    receptive_field: int


class _Answer(msgspec.Struct, array_like=True, tag=True):
    id: int


class Welcome(_Answer):
    ready: bool
    draining: bool
    load_error: str | None
    models: list[ModelView]
    max_sessions: int


class Created(_Answer):
    session: SessionView
    outputs: Rows


class Pushed(_Answer):
    outputs: Rows
    position: int


class PushedMany(_Answer):
    """Per item, in order: its outcome (Pushed with id 0) or its Failed."""

    results: list[Pushed | Failed]


class Described(_Answer):
    session: SessionView


class Resolved(_Answer):
    models: list[str | Failed]  # per session: its model, or why it has none (404, 410)


class Listed(_Answer):
    sessions: list[SessionView]
    next: str | None  # pass as `after` for the next page; None: this was the last


class Deleted(_Answer):
    count: int


class Snapshotted(_Answer):
    session: SessionView
    rows: Rows


class Predicted(_Answer):
    outputs: list[Rows]


class Done(_Answer):
    pass


class Pages(_Answer):
    """Prometheus pages: the engine's, the gone edges' (summed), each live edge's."""

    pages: list[bytes]


class Failed(_Answer):
    code: str
    message: str
    retry_after_s: int | None = None
    position: int | None = None

    @classmethod
    def of(cls, id: int, error: errors.ServiceError) -> Failed:
        return cls(
            id,
            error.code,
            error.message,
            getattr(error, "retry_after_s", None),
            getattr(error, "position", None),
        )

    def error(self) -> errors.ServiceError:
        """The ServiceError the engine raised, as the edge raises it."""
        cls = _ERRORS.get(self.code, errors.InternalError)
        error = cls.__new__(cls)
        errors.ServiceError.__init__(error, self.message)
        if self.retry_after_s is not None:
            error.retry_after_s = self.retry_after_s
        if self.position is not None:
            error.position = self.position
        return error


Answer = (
    Welcome | Created | Pushed | PushedMany | Described | Resolved | Listed | Deleted
    | Snapshotted | Predicted | Done | Pages | Failed
)  # fmt: skip


def _error_classes() -> dict[str, type[errors.ServiceError]]:
    found: dict[str, type[errors.ServiceError]] = {}
    todo: list[type[errors.ServiceError]] = [errors.ServiceError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


_ERRORS = _error_classes()


class FrameReader:
    """Splits a byte stream into frames' payloads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[memoryview | bytes]:
        buffer = self._buffer
        buffer += data
        frames: list[Any] = []
        start, end = 0, len(buffer)
        while end - start >= 4:
            (size,) = HEADER.unpack_from(buffer, start)
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"a frame of {size} bytes is past the limit")
            if end - start - 4 < size:
                break
            frames.append(bytes(buffer[start + 4 : start + 4 + size]))
            start += 4 + size
        if start:
            del buffer[:start]
        return frames
