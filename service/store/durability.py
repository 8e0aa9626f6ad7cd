"""Sessions that outlive their replica: a SessionManager's hooks onto a shared session store.

- A push to a session this replica owns touches only memory: the store is written when a
  session is created, every `snapshot_interval_s` for the sessions that changed (one pipelined
  round trip for all of them), when it is handed off, and on drain.
- A request for a session not held here claims it (session_store.py). A live owner is asked
  to hand it off: it finishes the operation in progress, writes the snapshot and its last push
  under the session's lock, releases it and forgets it; the claimer then rebuilds it exactly
  (`SessionManager.create(snapshot=...)`). An owner that is gone (no heartbeat) or that does
  not answer within `handoff_timeout_s` is taken over from its last durable snapshot, with a
  new epoch: its later writes are refused and it is told to drop its copy.
- On drain (SIGTERM, after the in-flight requests), every live session is written and released.
- The loss bound is kept, not hoped for: each owned session remembers when its oldest
  acknowledged push that no write has stored was applied. Once that is more than
  `bound_s` (snapshot_interval_s + store_timeout_s) ago, because writes fail or the store
  hangs (each store operation gives up after store_timeout_s), the session's new pushes are
  refused `503 durability_unavailable` until a snapshot of it is written: a crash never loses
  more than `bound_s` of acknowledged pushes.
- A register whose answer is lost (a timeout: it may or may not have been applied) answers 503
  and leaves a note: the session is treated as absent here, a retry of the same create
  succeeds (registers are idempotent), and otherwise the record is deleted once the store
  answers again. So a create either exists or not after any answer.

docs/durability.md states what this guarantees and what a kill -9 loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter
from redis.exceptions import RedisError

from service.metrics import Metrics
from service.protocol.errors import DurabilityUnavailable, NotReady, ServiceError, SessionExists
from service.sessions.record import SessionRecord
from service.sessions.state import Session
from service.settings import Settings
from service.store.base import SessionKey, SessionStore, StoreUnreachable, Write

if TYPE_CHECKING:  # loaded by the process that serves the models, before this is built
    from service.models.registry import ModelRegistry
    from service.sessions.manager import SessionManager

logger = logging.getLogger(__name__)
HEARTBEAT_INTERVAL_S = 1.0
STORE_CONNECT_TIMEOUT_S = 30.0  # a store starting beside the server has this long
STORE_CONNECT_WARN_EVERY_S = 10.0
SAVE_CHUNK = 512  # writes per pipelined round trip
_NO_WRITES: Mapping[int, float] = MappingProxyType({})
# A failed create's record is deleted twice, this far apart: a register still queued on the
# connection that timed out reaches Redis within a moment of its other commands.
UNCONFIRMED_RECHECK_S = 1.0
Monotonic = Callable[[], float]


def default_replica_id() -> str:
    """Hostname (the pod name), pid and a random part: a restarted process is a new replica."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class SessionDurability:
    """The hooks a SessionManager calls (service/sessions/hooks.py) and the store's background
    work: heartbeat, periodic snapshots, handoffs asked by other replicas, the drain."""

    def __init__(
        self,
        store: SessionStore,
        sessions: SessionManager,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        replica: str,
        snapshot_interval_s: float,
        handoff_timeout_s: float,
        retry_after_s: int,
        store_timeout_s: float,
        monotonic: Monotonic = time.monotonic,
    ):
        self.store = store
        self.replica = replica
        self._sessions = sessions
        self._registry = registry
        self._interval = snapshot_interval_s
        self.bound_s = snapshot_interval_s + store_timeout_s  # the most a crash may lose
        self._handoff_timeout = handoff_timeout_s
        self._retry_after = retry_after_s
        self._monotonic = monotonic
        self._epochs: dict[SessionKey, int] = {}  # sessions this replica owns in the store
        self._saved: dict[SessionKey, tuple[int, float]] = {}  # (position, last use) stored
        self._restoring: dict[SessionKey, asyncio.Future] = {}
        self._handoffs: dict[SessionKey, asyncio.Task] = {}
        # Monotonic time of each owned session's oldest acknowledged, unstored push: pushed
        # since its last capture, and captured by a write still in flight.
        self._unsaved_since: dict[SessionKey, float] = {}
        # Writes in flight, per session: write number -> the oldest push it captured. A write
        # that lands stores every push captured by any earlier write, so it settles those too,
        # and an earlier write that fails afterwards has nothing left to give back.
        self._writing: dict[SessionKey, dict[int, float]] = {}
        self._write_seq = 0
        # Registers whose outcome is unknown (their answer was lost): key -> the record.
        self._unconfirmed: dict[SessionKey, bytes] = {}
        self._cleanups: dict[SessionKey, asyncio.Task] = {}
        self._deleting: set[SessionKey] = set()
        self._tasks: list[asyncio.Task] = []
        self.connected = False  # the runtime is not ready before
        self._moves = Counter(
            "tcnserve_session_moves",
            "Sessions moved through the store: restored here, handed off, taken over, drained",
            ["kind"],
            registry=metrics.registry,
        )
        for kind in ("restored", "handed_off", "taken_over", "lost", "drained"):
            self._moves.labels(kind)
        self._refused = Counter(
            "tcnserve_durability_refusals",
            "Pushes refused because their session's snapshots were not stored within the bound",
            registry=metrics.registry,
        )
        self._failed_writes = Counter(
            "tcnserve_store_write_failures",
            "Snapshot writes (one per session) the store did not take: errors and timeouts",
            registry=metrics.registry,
        )
        sessions.hooks = self

    # ----- lifecycle ---------------------------------------------------------------------------

    async def start(self, connect_timeout_s: float | None = None) -> None:
        """Connect (retrying while the store starts), then heartbeat and snapshot in background.
        StoreUnreachable when the store has not answered within `connect_timeout_s`
        (STORE_CONNECT_TIMEOUT_S unless given)."""
        if connect_timeout_s is None:
            connect_timeout_s = STORE_CONNECT_TIMEOUT_S
        started = self._monotonic()
        delay, warned = 0.1, -math.inf
        while True:
            try:
                await self.store.connect(self.replica, self._on_message)
                break
            except (RedisError, OSError) as e:
                waited = self._monotonic() - started
                if waited >= connect_timeout_s:
                    raise StoreUnreachable(
                        f"the session store at {self.store.where()} did not answer for "
                        f"{connect_timeout_s:g} s ({e}): start it, or name another with "
                        "--session-store / TCNSERVE_SESSION_STORE"
                    ) from None
                if waited - warned >= STORE_CONNECT_WARN_EVERY_S:  # a line now and then
                    warned = waited
                    logger.warning(
                        "session store at %s not reachable yet (%s); retrying for up to %g s",
                        self.store.where(), e, connect_timeout_s,
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.connected = True
        logger.info("session store connected as replica %s", self.replica)
        self._tasks.append(asyncio.create_task(self._heartbeats(), name="store-heartbeat"))
        self._tasks.append(asyncio.create_task(self._snapshots(), name="store-snapshots"))

    async def drain(self) -> int:
        """Write every live session to the store and release it; returns how many."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for handoff in list(self._handoffs.values()):
            with contextlib.suppress(Exception):
                await handoff
        started = self._monotonic()
        live = [s for s in self._sessions.live_sessions() if self._key(s) in self._epochs]
        written = 0
        for i in range(0, len(live), SAVE_CHUNK):
            written += await self._write_out(live[i : i + SAVE_CHUNK], release=True)
        self._moves.labels("drained").inc(written)
        logger.info(
            "drain: %d of %d sessions written to the store in %.3f s",
            written,
            len(live),
            self._monotonic() - started,
        )
        return written

    async def close(self) -> None:
        for task in [*self._tasks, *self._cleanups.values()]:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.store.close()

    # ----- SessionManager hooks ----------------------------------------------------------------

    async def missing(self, owner: str, session_id: str) -> Session | None:
        key = (owner, session_id)
        if key in self._unconfirmed:  # its create failed: it does not exist
            return None
        pending = self._restoring.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._restoring[key] = future
        try:
            session = await self._restore(key)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            future.set_result(session)
            return session
        finally:
            del self._restoring[key]

    async def opened(self, session: Session) -> None:
        key = self._key(session)
        if key in self._restoring:  # brought here from the store: registered already
            return
        # The session's lock is held and its prefix or snapshot rows applied: its record is
        # exact from the start.
        (rows,) = await self._registry.get(session.model).stream_histories([session.slot])
        record = SessionRecord(
            session.model, session.ttl_s, session.position, rows, embedding=session.embedding
        )
        if not await self._register(key, record, session.ttl_s):
            raise SessionExists(f"session {session.id!r} already exists")
        self._saved[key] = (session.position, session.last_used_at)

    async def retired(self, session: Session, expired: bool) -> None:
        key = self._key(session)
        epoch = self._epochs.pop(key, None)
        self._saved.pop(key, None)
        self._unsaved_since.pop(key, None)
        self._writing.pop(key, None)
        if epoch is not None:
            try:
                await self.store.delete(key, epoch)
            except (RedisError, OSError):  # the store's own expiry removes it later
                logger.warning("session store: could not delete a retired session")

    def check_push(self, session: Session) -> None:
        key = self._key(session)
        in_flight = self._writing.get(key, _NO_WRITES).values()
        oldest = min(self._unsaved_since.get(key, math.inf), min(in_flight, default=math.inf))
        age = self._monotonic() - oldest
        if age > self.bound_s:
            self._refused.inc()
            raise DurabilityUnavailable(
                f"the session store has not stored this session's pushes of the last {age:.1f} "
                f"s, past the durability bound of {self.bound_s:g} s (snapshot_interval_s + "
                "store_timeout_s): new pushes are refused, nothing was applied; retry once the "
                "store answers again",
                self._retry_after,
            )

    def pushed(self, session: Session) -> None:
        key = self._key(session)
        if key in self._epochs and key not in self._unsaved_since:
            self._unsaved_since[key] = self._monotonic()

    # ----- taking a session over ---------------------------------------------------------------

    async def _restore(self, key: SessionKey) -> Session | None:
        deadline = self._monotonic() + self._handoff_timeout
        delay = 0.001
        while True:
            force = self._monotonic() >= deadline
            try:
                claim = await self.store.claim(key, force=force)
            except (RedisError, OSError) as e:
                raise self._unreachable(e) from None
            if claim.status == "missing":
                return None
            if claim.status == "taken":
                break
            await asyncio.sleep(delay)  # the owner is writing it out (a few ms)
            delay = min(delay * 2, 0.01)
        self._moves.labels("taken_over" if force else "restored").inc()
        if force:
            logger.warning("took a session over without its owner's handoff (owner unresponsive)")
        record = SessionRecord.decode(claim.record or b"")
        owner, session_id = key
        self._disown(key)  # nothing of an earlier stay here counts now
        self._epochs[key] = claim.epoch
        try:
            session, _ = await self._sessions.create(
                owner,
                record.model,
                session_id,
                record.ttl_s,
                snapshot=(record.position, record.rows),
                embedding=record.embedding,
            )
        except ServiceError:  # e.g. no free slot here: leave it in the store for another try
            epoch = self._epochs.pop(key)
            with contextlib.suppress(RedisError, OSError):
                await self.store.save([Write(key, epoch, None, self._ttl_ms(record.ttl_s), True)])
            raise
        session.last_push = record.last_push  # so a retry of that push is answered again
        self._saved[key] = (session.position, session.last_used_at)
        return session

    async def _on_message(self, kind: str, owner: str, session_id: str) -> None:
        key = (owner, session_id)
        if kind == "taken":
            await self._drop(key)
        elif kind == "handoff" and key not in self._handoffs:
            task = asyncio.create_task(self._hand_off(key), name="store-handoff")
            self._handoffs[key] = task
            task.add_done_callback(lambda _: self._handoffs.pop(key, None))

    async def _hand_off(self, key: SessionKey) -> None:
        if key in self._unconfirmed:  # a failed create: make sure nobody restores it
            await self._delete_unconfirmed(key)
            return
        pending = self._restoring.get(key)
        if pending is not None:  # being brought here: hand off what we end up with
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        session = self._sessions.local(*key)
        if session is None or session.closed:
            epoch = self._epochs.get(key)
            self._disown(key)
            if epoch is not None:  # owned here but not held (it failed to open): release
                await self.store.save([Write(key, epoch, None, self._ttl_ms(600.0), True)])
            return
        if await self._write_out([session], release=True):
            self._moves.labels("handed_off").inc()

    async def _drop(self, key: SessionKey) -> None:
        """Another replica took this session over: forget the copy here, unwritten."""
        self._disown(key)
        session = self._sessions.local(*key)
        if session is None:
            return
        async with session.lock:
            if not session.closed:
                await self._sessions.forget(session)
                self._moves.labels("lost").inc()

    # ----- writing sessions out ----------------------------------------------------------------

    async def _snapshots(self) -> None:
        # Rounds start every interval, however long the last took (a slow round is followed at
        # once), so a push waits at most an interval plus one round to be captured and stored.
        due = self._monotonic() + self._interval
        while True:
            await asyncio.sleep(max(0.0, due - self._monotonic()))
            due = max(due + self._interval, self._monotonic())
            try:
                await self.save_changed()
            except Exception:
                logger.exception("periodic session snapshot failed")

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.store.heartbeat()
            except (RedisError, OSError) as e:
                logger.warning("session store heartbeat failed: %s", e)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def save_changed(self) -> int:
        """Write the sessions that changed since their last write."""
        changed = [
            s
            for s in self._sessions.live_sessions()
            if self._key(s) in self._epochs
            and self._saved.get(self._key(s)) != (s.position, s.last_used_at)
        ]
        # Free sessions are locked at once, together; a busy one is written alone once its
        # operation ends, so that no push waits behind another session's long one.
        free = [s for s in changed if not s.lock.locked()]
        busy = [s for s in changed if s.lock.locked()]
        written = 0
        for i in range(0, len(free), SAVE_CHUNK):
            written += await self._write_out(free[i : i + SAVE_CHUNK], release=False)
        for session in busy:
            written += await self._write_out([session], release=False)
        return written

    async def _write_out(self, sessions: list[Session], release: bool) -> int:
        """Snapshot sessions under their locks and write them, fenced. With `release` they are
        written while locked (no push may follow the snapshot) and then forgotten here."""
        locked: list[Session] = []
        held = False
        try:
            for session in sessions:
                # The operation in flight finishes first. No deadlock: nothing else waits for a
                # session's lock while it holds another's (push_many skips busy sessions).
                await session.lock.acquire()  # a free lock is taken without yielding
                if session.closed:
                    session.lock.release()
                    continue
                locked.append(session)
            held = True
            records = await self._capture(locked)
            # What this write stores: each session's pushes up to now (later ones start anew).
            self._write_seq += 1
            seq = self._write_seq
            for session in locked:
                key = self._key(session)
                self._writing.setdefault(key, {})[seq] = self._unsaved_since.pop(key, math.inf)
            if not release:  # the snapshot is taken: pushes may go on while it is written
                held = False
                for session in locked:
                    session.lock.release()
            # A session taken over meanwhile (its epoch is gone) gets a write that cannot apply.
            writes = [
                Write(
                    self._key(s),
                    self._epochs.get(self._key(s), -1),
                    r.encode(),
                    self._ttl_ms(s.ttl_s),
                    release,
                )
                for s, r in zip(locked, records, strict=True)
            ]
            try:
                applied = await self.store.save(writes)
            except (RedisError, OSError) as e:
                logger.warning("session store: %d snapshots not written: %s", len(writes), e)
                self._failed_writes.inc(len(writes))
                self._uncapture([self._key(s) for s in locked], seq)
                if release:
                    raise
                return 0
            written = 0
            for session, record, ok in zip(locked, records, applied, strict=True):
                key = self._key(session)
                if ok:
                    self._settle(key, seq)
                    written += 1
                    self._saved[key] = (record.position, session.last_used_at)
                if release:
                    self._disown(key)
                    await self._sessions.forget(session)
                elif not ok:  # fenced off: another replica owns it now
                    await self._drop(key)
            return written
        finally:
            if held:
                for session in locked:
                    session.lock.release()

    async def _capture(self, sessions: list[Session]) -> list[SessionRecord]:
        """Each session's record; one model call per model for all their input tails."""
        by_model: dict[str, list[int]] = {}
        for i, session in enumerate(sessions):
            by_model.setdefault(session.model, []).append(i)
        tails: list[np.ndarray | None] = [None] * len(sessions)
        for model, indices in by_model.items():
            slots = [sessions[i].slot for i in indices]
            rows = await self._registry.get(model).stream_histories(slots)
            for i, tail in zip(indices, rows, strict=True):
                tails[i] = tail
        return [
            SessionRecord(s.model, s.ttl_s, s.position, rows, s.last_push, s.embedding)
            for s, rows in zip(sessions, tails, strict=True)
        ]

    def _disown(self, key: SessionKey) -> None:
        """Forget what this replica knew of a session it no longer owns."""
        self._epochs.pop(key, None)
        self._saved.pop(key, None)
        self._unsaved_since.pop(key, None)
        self._writing.pop(key, None)

    def _settle(self, key: SessionKey, seq: int) -> None:
        """Write `seq` landed: it stored every push that it or an earlier write captured."""
        in_flight = self._writing.get(key)
        if in_flight is None:
            return
        for earlier in [n for n in in_flight if n <= seq]:
            del in_flight[earlier]
        if not in_flight:
            del self._writing[key]

    def _uncapture(self, keys: list[SessionKey], seq: int) -> None:
        """Write `seq` failed: what it captured is unstored again, since its oldest push, unless
        a later write has landed meanwhile and stored it."""
        for key in keys:
            in_flight = self._writing.get(key)
            if in_flight is None or seq not in in_flight:
                continue  # settled by a later write
            since = in_flight.pop(seq)
            if not in_flight:
                del self._writing[key]
            if key in self._epochs and since != math.inf:
                self._unsaved_since[key] = min(since, self._unsaved_since.get(key, math.inf))

    # ----- small pieces ------------------------------------------------------------------------

    async def _register(self, key: SessionKey, record: SessionRecord, ttl_s: float) -> bool:
        encoded = record.encode()
        earlier = self._unconfirmed.get(key)
        await self._stop_cleanup(key)
        if earlier is not None and earlier != encoded:
            # Another create of the id than the one whose answer was lost: that one's record
            # must go first, or it would stand in for this one.
            try:
                await self.store.delete(key, 1)
            except (RedisError, OSError) as e:
                self._arm_cleanup(key, earlier)
                raise self._unreachable(e) from None
        try:
            registered = await self.store.register(key, encoded, self._ttl_ms(ttl_s))
        except (RedisError, OSError) as e:
            # Applied or not, nobody can tell: refuse it here, and delete it once the store
            # answers again, unless a retry of the same create comes first.
            self._arm_cleanup(key, encoded)
            raise self._unreachable(e) from None
        self._unconfirmed.pop(key, None)
        if registered:
            self._epochs[key] = 1
        return registered

    def _arm_cleanup(self, key: SessionKey, record: bytes) -> None:
        self._unconfirmed[key] = record
        self._cleanups[key] = asyncio.create_task(
            self._clean_unconfirmed(key), name="store-unconfirmed"
        )

    async def _clean_unconfirmed(self, key: SessionKey) -> None:
        """Delete a record whose register failed, once the store answers: twice, a while
        apart, so that a register still queued on the dead connection is deleted too."""
        answered = 0
        delay = 0.1
        while answered < 2:
            await asyncio.sleep(delay)
            self._deleting.add(key)
            try:
                ok = await self._delete_unconfirmed(key)
            finally:
                self._deleting.discard(key)
            if key not in self._unconfirmed:  # a retry of the create came meanwhile
                return
            answered += ok
            delay = UNCONFIRMED_RECHECK_S if ok else min(delay * 2, 2.0)
        self._cleanups.pop(key, None)
        self._unconfirmed.pop(key, None)

    async def _stop_cleanup(self, key: SessionKey) -> None:
        """Before a register of `key`: no delete of an earlier failed try may follow it."""
        self._unconfirmed.pop(key, None)
        task = self._cleanups.pop(key, None)
        if task is None:
            return
        if key in self._deleting:  # its delete is on the wire: let it be answered first
            with contextlib.suppress(Exception):
                await task
        else:
            task.cancel()

    async def _delete_unconfirmed(self, key: SessionKey) -> bool:
        """Delete the record of a failed create if it is ours at epoch 1; whether the store
        answered (it may have held nothing)."""
        try:
            await self.store.delete(key, 1)
        except (RedisError, OSError):
            return False
        return True

    def _ttl_ms(self, ttl_s: float) -> int:
        """The store keeps a record a while past its TTL: the owner renews it every interval."""
        return int((ttl_s + 2 * self._interval + 60) * 1000)

    def _no_rows(self, model: str) -> np.ndarray:
        entry = self._registry.get(model)
        if entry.config.vocab_size is not None:
            return np.zeros(0, dtype=np.int64)
        return np.zeros((0, entry.config.in_channels), dtype=entry.input_dtype)

    def _unreachable(self, error: Exception) -> NotReady:
        logger.warning("session store unreachable: %s", error)
        return NotReady("the session store is unreachable; try again", self._retry_after)

    @staticmethod
    def _key(session: Session) -> SessionKey:
        return (session.owner, session.id)


def build_durability(
    settings: Settings, sessions: SessionManager, registry: ModelRegistry, metrics: Metrics
) -> SessionDurability | None:
    """The configured store's hooks on `sessions`; None for `memory` (no store)."""
    if settings.session_store == "memory":
        return None
    from service.store.redis_store import RedisStore  # only a Redis deployment needs its client

    return SessionDurability(
        RedisStore(settings.session_store, timeout_s=settings.store_timeout_s),
        sessions,
        registry,
        metrics,
        replica=settings.replica_id or default_replica_id(),
        snapshot_interval_s=settings.snapshot_interval_s,
        handoff_timeout_s=settings.handoff_timeout_s,
        retry_after_s=settings.retry_after_s,
        store_timeout_s=settings.store_timeout_s,
    )
