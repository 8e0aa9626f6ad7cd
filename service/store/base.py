"""Where sessions outlive their replica: the store interface, and an in-process implementation.

The store keeps, per session (keyed by owner and id), its durable record (session_record.py)
and who owns it: a replica id and a fencing epoch. The operations are atomic:

- `register`: a new session, owned by this replica at epoch 1 (refused if the id is stored,
  unless by this very register: the same record, ours at epoch 1, so that a register whose
  answer was lost can be tried again);
- `claim`: take a session over. Released (its owner drained) or owned by a replica that is
  gone: taken at once, epoch + 1, and the old owner is told. Owned by a live replica: that
  owner is asked to hand it off and the answer is `busy` (claim again); with `force`, taken
  anyway, the old owner's later writes fenced off by the epoch;
- `save`: write records (pipelined), each only if this replica still owns it at that epoch
  (or the store lost it: then it is written again); `release` also gives the session up, so
  the next claim takes it at once;
- `delete`: forget a session, again only with the right owner and epoch.

Owners hear of handoff requests and takeovers through `on_message(kind, owner, session_id)`,
kind `handoff` or `taken`. No HTTP here; service/store/durability.py drives a SessionManager with
it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

SessionKey = tuple[str, str]  # (owner, session id)
MessageHandler = Callable[[str, str, str], Awaitable[None]]


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: `taken` (with the epoch now ours and the stored record),
    `busy` (a live owner was asked to hand it off) or `missing` (no such session)."""

    status: Literal["taken", "busy", "missing"]
    epoch: int = 0
    record: bytes | None = None


@dataclass(frozen=True)
class Write:
    """A fenced write of a session's record (None: keep the stored one)."""

    key: SessionKey
    epoch: int
    record: bytes | None
    ttl_ms: int
    release: bool = False


@dataclass(frozen=True)
class Stored:
    """What the store holds for a session (owner '' once released)."""

    replica: str
    epoch: int
    record: bytes


class StoreUnreachable(Exception):
    """The session store did not answer while the server started: it cannot serve."""


class SessionStore(ABC):
    """One replica's handle on the shared store."""

    replica: str

    def where(self) -> str:
        """The store's address for messages, with no credentials."""
        return type(self).__name__

    @abstractmethod
    async def connect(self, replica: str, on_message: MessageHandler) -> None:
        """Start: check the store answers, listen for messages, announce this replica alive."""

    @abstractmethod
    async def heartbeat(self) -> None:
        """Renew this replica's liveness (owners that stop renewing lose their sessions)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop listening and announce this replica gone."""

    @abstractmethod
    async def register(self, key: SessionKey, record: bytes, ttl_ms: int) -> bool:
        """Store a new session owned here at epoch 1; False if the id is stored already, but
        for this same record owned here at epoch 1 (an earlier try of this register)."""

    @abstractmethod
    async def claim(self, key: SessionKey, force: bool = False) -> Claim: ...

    @abstractmethod
    async def save(self, writes: list[Write]) -> list[bool]:
        """Apply each write if this replica owns its session at its epoch; which applied."""

    @abstractmethod
    async def delete(self, key: SessionKey, epoch: int) -> bool: ...

    @abstractmethod
    async def read(self, key: SessionKey) -> Stored | None:
        """The stored state of a session (for operators and tests)."""


@dataclass
class MemorySpace:
    """The shared state of in-process stores: several replicas in one process (tests)."""

    sessions: dict[SessionKey, Stored] = field(default_factory=dict)
    replicas: dict[str, MessageHandler] = field(default_factory=dict)


class MemoryStore(SessionStore):
    """The store in this process's memory: the same contract, for replicas sharing a process.

    Records do not expire here (the replicas delete what they expire); tasks deliver the
    messages, as a network would, after the operation that sent them has returned.
    """

    def __init__(self, space: MemorySpace | None = None):
        self.space = space if space is not None else MemorySpace()
        self.replica = ""
        self._tasks: set[asyncio.Task] = set()

    async def connect(self, replica: str, on_message: MessageHandler) -> None:
        self.replica = replica
        self.space.replicas[replica] = on_message

    async def heartbeat(self) -> None:
        pass

    async def close(self) -> None:
        self.space.replicas.pop(self.replica, None)
        for task in list(self._tasks):
            task.cancel()

    def _tell(self, replica: str, kind: str, key: SessionKey) -> None:
        handler = self.space.replicas.get(replica)
        if handler is not None:
            task = asyncio.get_running_loop().create_task(handler(kind, *key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def register(self, key: SessionKey, record: bytes, ttl_ms: int) -> bool:
        stored = self.space.sessions.get(key)
        if stored is not None:
            return stored == Stored(self.replica, 1, record)
        self.space.sessions[key] = Stored(self.replica, 1, record)
        return True

    async def claim(self, key: SessionKey, force: bool = False) -> Claim:
        stored = self.space.sessions.get(key)
        if stored is None:
            return Claim("missing")
        if stored.replica == self.replica:
            return Claim("taken", stored.epoch, stored.record)
        alive = stored.replica in self.space.replicas
        if stored.replica and alive and not force:
            self._tell(stored.replica, "handoff", key)
            return Claim("busy", stored.epoch)
        epoch = stored.epoch + 1
        self.space.sessions[key] = Stored(self.replica, epoch, stored.record)
        if stored.replica:
            self._tell(stored.replica, "taken", key)
        return Claim("taken", epoch, stored.record)

    async def save(self, writes: list[Write]) -> list[bool]:
        applied = []
        for w in writes:
            stored = self.space.sessions.get(w.key)
            if stored is None and w.record is not None:  # lost by the store: written again
                stored = Stored(self.replica, w.epoch, w.record)
            ok = stored is not None and (stored.replica, stored.epoch) == (self.replica, w.epoch)
            if ok:
                record = w.record if w.record is not None else stored.record
                replica = "" if w.release else self.replica
                self.space.sessions[w.key] = Stored(replica, w.epoch, record)
            applied.append(ok)
        return applied

    async def delete(self, key: SessionKey, epoch: int) -> bool:
        stored = self.space.sessions.get(key)
        if stored is None or (stored.replica, stored.epoch) != (self.replica, epoch):
            return False
        del self.space.sessions[key]
        return True

    async def read(self, key: SessionKey) -> Stored | None:
        return self.space.sessions.get(key)
