"""What a session is: its state, its last applied push, and the memory of expired ids."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from service.models.inputs import InputSpec

_SERIALS = itertools.count(1)


class AppliedPush(NamedTuple):  # value records made per push: tuples, not frozen dataclasses
    """The last push a session applied, kept so that its exact retry is answered again."""

    offset: int
    length: int
    digest: bytes
    outputs: np.ndarray  # (rows, out) float32


@dataclass
class Session:
    id: str
    owner: str
    model: str
    ttl_s: float
    created_at: float
    last_used_at: float
    slot: int = -1
    position: int = 0
    last_push: AppliedPush | None = None
    closed: bool = False
    moved: bool = False  # closed here because another replica took it (a session store's)
    embedding: np.ndarray | None = None  # (E,) float64: a conditioned model's, fixed at open
    # Tells this session from a later one under the same id (an edge closes "this very one").
    serial: int = field(default_factory=_SERIALS.__next__)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def expires_at(self) -> float:
        return self.last_used_at + self.ttl_s


class SessionHandle(NamedTuple):
    """A session resolved once for a push (`SessionManager.resolve`): what its rows are decoded
    against, and, in the process that holds it, the session itself, so the push does not look
    it up again. An edge talking to an engine process holds no session (`session` is None):
    the engine's one lookup happens there."""

    owner: str
    session_id: str
    model: str
    spec: InputSpec
    session: Session | None = None


class PushResult(NamedTuple):
    outputs: np.ndarray  # (rows, out) float32
    position: int


class RecentIds:
    """A bounded set that forgets its oldest entries: expired ids answer 410, not forever."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, key: tuple[str, str]) -> None:
        if self._capacity <= 0:
            return
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def discard(self, key: tuple[str, str]) -> None:
        self._ids.pop(key, None)
