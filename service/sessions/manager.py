"""SessionManager: streaming sessions (a pool slot plus a position), their TTLs and offsets.

A session belongs to the API key that created it: sessions are keyed by (owner, session id), so
another key's lookup simply finds nothing. One session never has two operations in flight (a
per-session asyncio lock), which keeps per-session order; across sessions, the model worker
batches. A push is recorded by the callback that receives the model's answer, on the event loop,
and only then releases the session's lock, whether or not its caller still waits: a client that
disconnects mid-push cannot leave the session half-updated, and its retry finds the stored
answer. (The rarer operations get the same guarantee from running as a shielded task.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from model import MAX_POSITION, PoolFullError
from service.metrics import Metrics
from service.models import inputs
from service.protocol.errors import (
    CapacityExceeded,
    InternalError,
    InvalidInput,
    KeyQuotaExceeded,
    OffsetConflict,
    ServiceError,
    SessionExists,
    SessionExpired,
    SessionNotFound,
)
from service.protocol.limits import SESSION_ID_PATTERN, check_timesteps
from service.sessions.hooks import SessionHooks
from service.sessions.state import AppliedPush, PushResult, RecentIds, Session, SessionHandle

if TYPE_CHECKING:  # the registry (and torch) load in the process that serves the models only
    from service.models.registry import ModelEntry, ModelRegistry

logger = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], float]
# Called with (result, None) or (None, error) once a push's outcome is recorded.
Reply = Callable[[PushResult | None, BaseException | None], None]
SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
NO_ROWS = np.zeros((0, 0), dtype=np.float32)


class SessionManager:
    """Creates, advances and retires sessions; every model call goes through a ModelEntry."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        clock: Clock,
        *,
        default_ttl_s: float,
        max_ttl_s: float,
        max_timesteps: int,
        expired_memory: int,
        retry_after_s: int,
        max_sessions_per_key: int | None = None,
    ):
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._default_ttl = default_ttl_s
        self._max_ttl = max_ttl_s
        self._max_timesteps = max_timesteps
        self._retry_after = retry_after_s
        self._max_per_key = max_sessions_per_key
        self._sessions: dict[tuple[str, str], Session] = {}
        self._per_owner: Counter[str] = Counter()  # sessions held (or being opened) per key
        self._expired = RecentIds(expired_memory)
        self._tasks: set[asyncio.Task] = set()
        self.hooks: SessionHooks | None = None  # a session store's (service/store/durability.py)

    def __len__(self) -> int:
        return len(self._sessions)

    def held_by(self, owner: str) -> int:
        """Sessions this key holds, counting those being opened."""
        return self._per_owner[owner]

    # ----- public operations -----------------------------------------------------------------

    async def create(
        self,
        owner: str,
        model: str,
        session_id: str | None = None,
        ttl_s: float | None = None,
        prefix: np.ndarray | None = None,
        snapshot: tuple[int, np.ndarray] | None = None,
        *,
        bound: bool = False,
        embedding: list[float] | np.ndarray | None = None,
    ) -> tuple[Session, np.ndarray]:
        """Open a session, optionally warmed by `prefix` rows; returns it and their outputs.

        `bound`: the session ends with the caller's connection (WS /v1/stream without keep).
        In-process the caller closes it itself; across the engine boundary the engine also
        closes it if the edge's connection ends first (service/engine/server.py).

        Rows are arrays already decoded for the model (service/models/inputs.py). With `snapshot` =
        (position, rows), the session is rebuilt at `position` from the last
        min(position, R - 1) inputs of another session (see `snapshot`), exactly. A model with
        embedding_dims conditions every session on an `embedding` given here (kept with the
        session, its snapshots and its record), and refuses a session without one.
        """
        entry = self._registry.get(model)
        embedding = inputs.embedding(embedding, entry.config.embedding_dims)
        ttl = self._default_ttl if ttl_s is None else float(ttl_s)
        if not 0 < ttl <= self._max_ttl:
            raise InvalidInput(f"ttl_s must be in (0, {self._max_ttl}], got {ttl_s}")
        if session_id is None:
            session_id = secrets.token_urlsafe(24)
        elif not SESSION_ID_RE.match(session_id):
            raise InvalidInput("session_id must be 8-128 characters of [A-Za-z0-9_-]")
        start = 0
        x = prefix if prefix is not None else NO_ROWS
        if snapshot is not None:
            position, rows = snapshot
            if not 0 <= position <= MAX_POSITION:
                raise InvalidInput(f"snapshot.position must be in [0, {MAX_POSITION}]")
            expected = min(position, entry.config.receptive_field - 1)
            if len(rows) != expected:
                raise InvalidInput(
                    f"snapshot.inputs: a snapshot at position {position} holds exactly the last "
                    f"{expected} input rows (min(position, receptive_field - 1)); got {len(rows)}"
                )
            x, start = rows, position - expected
        check_timesteps(len(x), self._max_timesteps)
        key = (owner, session_id)
        existing = self._sessions.get(key)
        expired = existing is not None and self._clock() >= existing.expires_at
        if expired and not existing.lock.locked():  # expired, not swept yet: the id is free
            await self._retire(existing, expired=True)
        if key in self._sessions:
            raise SessionExists(f"session {session_id!r} already exists")
        if self._max_per_key is not None and self._per_owner[owner] >= self._max_per_key:
            raise KeyQuotaExceeded(
                f"this API key holds {self._per_owner[owner]} sessions, its limit "
                "(max_sessions_per_key): close one first",
                self._retry_after,
            )
        now = self._clock()
        session = Session(session_id, owner, model, ttl, created_at=now, last_used_at=now)
        session.position, session.embedding = start, embedding
        self._reserve(session)  # the id and the key's quota, before the first await
        self._expired.discard(key)
        # Held from here, before any other task can run: a push racing the creation waits for
        # the opening (a fresh lock is taken without suspending). `_open` releases it.
        await session.lock.acquire()
        return await self._shielded(self._open(session, entry, x, snapshot is not None))

    async def resolve(self, owner: str, session_id: str) -> SessionHandle:
        """The session a push is for, looked up once (brought here from the session store when
        another replica held it), with the input spec its rows are decoded against: every edge
        decodes against the handle, and `push` takes it without a second lookup."""
        return self.handle(await self._find(owner, session_id))

    async def resolve_many(
        self, owner: str, session_ids: list[str]
    ) -> list[SessionHandle | ServiceError]:
        """`resolve` for each id: each its handle or its error. Sessions held here and live are
        resolved without suspending; only the others are looked up (in the store) together."""
        out: list[SessionHandle | ServiceError | None] = [None] * len(session_ids)
        slow: list[int] = []
        now = self._clock()
        for i, session_id in enumerate(session_ids):
            session = self._sessions.get((owner, session_id))
            if session is not None and not session.moved and now < session.expires_at:
                out[i] = self.handle(session)
            else:
                slow.append(i)
        if slow:
            found = await asyncio.gather(
                *(self._find(owner, session_ids[i]) for i in slow), return_exceptions=True
            )
            for i, session in zip(slow, found, strict=True):
                if isinstance(session, BaseException) and not isinstance(session, ServiceError):
                    raise session
                out[i] = session if isinstance(session, ServiceError) else self.handle(session)
        return out  # type: ignore[return-value]

    def handle(self, session: Session) -> SessionHandle:
        """The handle of a session this process holds (a stream keeps one for its life)."""
        spec = self._registry.get(session.model).inputs
        return SessionHandle(session.owner, session.id, session.model, spec, session)

    async def push(self, handle: SessionHandle, x: np.ndarray, offset: int | None) -> PushResult:
        """Apply rows at `offset` (default: the current position), or replay the last push.

        `x` holds rows decoded against `handle.spec` (service/models/inputs.py). The handle's
        session is used as it is unless it has been retired, has moved or has expired since:
        then the id is looked up again (and rows decoded for another model are refused).
        """
        session = await self._held(handle)
        entry = self._registry.get(session.model)
        self._check_rows(x, entry)
        await session.lock.acquire()
        if session.moved:  # handed to another replica while this waited: follow it, once
            session.lock.release()
            session = await self._find(handle.owner, handle.session_id)
            entry = self._registry.get(session.model)
            self._check_rows(x, entry)
            await session.lock.acquire()
        return await self._start_push(session, entry, x, offset)

    def push_now(
        self, owner: str, session_id: str, x: np.ndarray, offset: int | None, reply: Reply
    ) -> bool:
        """`push` started without suspending, when it can be: the session is held here,
        unexpired and free; its outcome goes to `reply(result, error)` (see `_start`).
        False when it cannot (the caller awaits `push`, which waits for what is needed). The
        engine's fast path: no task and no future per push (service/engine/server.py)."""
        return self._start_free(self._sessions.get((owner, session_id)), x, offset, reply)

    def start_push(
        self, handle: SessionHandle, x: np.ndarray, offset: int | None, reply: Reply
    ) -> bool:
        """`push_now` for a resolved handle (a WebSocket stream's direct path,
        service/ws/stream.py): False when its session must be looked up again or waited for
        (the caller awaits `push`). Raises, holding nothing, what `push` would raise at once."""
        return self._start_free(handle.session, x, offset, reply)

    def _start_free(
        self, session: Session | None, x: np.ndarray, offset: int | None, reply: Reply
    ) -> bool:
        if not self._take_free(session):
            return False
        assert session is not None
        try:
            entry = self._registry.get(session.model)
            self._check_rows(x, entry)
        except BaseException:
            session.lock.release()
            raise
        self._start(session, entry, x, offset, reply)
        return True

    async def push_many(
        self, items: list[tuple[SessionHandle, np.ndarray, int | None]]
    ) -> list[PushResult | ServiceError]:
        """`push` for many distinct sessions at once: (handle, rows, offset) each, answered
        in order, each its result or its error. Their rows reach the model workers together,
        so each model advances them in one batched call.

        The pushes go in rounds. A round takes every session that is free, without suspending,
        and hands each model's share to its worker as one batch, whose answers one callback
        records (`_start_batch`): no task, future or callback per item. A session that another
        operation holds (e.g. an overlapping request naming it too) is left for a later round:
        never wait for a lock while holding others (two requests naming the same sessions in
        another order would wait for each other forever). A round that finds every session
        busy waits for the first (holding nothing), then takes the others that came free. So
        the free ones never wait for a busy one, and the busy ones still advance together,
        not one model call each.
        """
        results: list[PushResult | BaseException | None] = [None] * len(items)
        todo: list[int] = []
        seen: set[str] = set()
        for i, (handle, _, _) in enumerate(items):
            session_id = handle.session_id
            if session_id in seen:  # its lock would be ours already: never wait on it
                results[i] = InvalidInput(f"session {session_id!r} is named more than once")
            else:
                seen.add(session_id)
                todo.append(i)
        answers: list[asyncio.Future[None]] = []
        moved: set[int] = set()
        while todo:
            started, todo = await self._round(items, todo, results, moved)
            answers += started
        for answer in answers:
            await answer
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ServiceError):
                raise result
        return results  # type: ignore[return-value]

    async def _round(
        self,
        items: list[tuple[SessionHandle, np.ndarray, int | None]],
        todo: list[int],
        results: list,
        moved: set[int],
    ) -> tuple[list[asyncio.Future[None]], list[int]]:
        """One round of `push_many`: start the pushes of `todo` whose sessions are free; if
        none is, wait for the first busy one (holding no lock), then take the others that came
        free meanwhile. -> (futures set once each batch started is recorded, the items left
        for the next round). Errors go into `results`; `moved` holds the items whose session
        has moved once already."""
        sessions: dict[int, Session] = {}
        for i in todo:  # first the lookups (a session store's), holding nothing
            session = self._live(items[i][0].session)
            if session is None:
                try:
                    session = await self._held(items[i][0])
                except ServiceError as e:
                    results[i] = e
                    continue
            sessions[i] = session
        batches: dict[str, _Batch] = {}  # by model: planned pushes, their sessions held
        busy: list[tuple[int, Session]] = []
        try:
            for i, session in sessions.items():
                if _acquire_free(session.lock):
                    self._plan_into(batches, i, session, items[i], results)
                else:
                    busy.append((i, session))  # never wait while holding: later
            if busy and not batches:  # every one busy: wait for the first, holding nothing
                (i, session), *waiting = busy
                busy = []
                await session.lock.acquire()
                if session.moved:  # handed to another replica: looked up again, once
                    session.lock.release()
                    if i in moved:
                        results[i] = self._open_error(session)  # moved twice: `push`'s error
                    else:
                        moved.add(i)
                        busy.append((i, session))
                else:
                    self._plan_into(batches, i, session, items[i], results)
                for j, other in waiting:  # and take those that came free meanwhile
                    if _acquire_free(other.lock):
                        self._plan_into(batches, j, other, items[j], results)
                    else:
                        busy.append((j, other))
        except BaseException:  # cancelled: nothing submitted; let go of every session taken
            for batch in batches.values():
                batch.release()
            raise
        started = [self._start_batch(batch, results) for batch in batches.values()]
        return [answer for answer in started if answer is not None], [i for i, _ in busy]

    def _plan_into(
        self,
        batches: dict[str, _Batch],
        i: int,
        session: Session,
        item: tuple[SessionHandle, np.ndarray, int | None],
        results: list,
    ) -> None:
        """Plan item i's push on its session, whose lock the caller has just taken: into its
        model's batch, or answered now (a replay, or an error), releasing the lock."""
        _, x, offset = item
        try:
            entry = self._registry.get(session.model)
            self._check_rows(x, entry)
            self._check_open(session)  # it may have been retired while the lock was awaited
            planned = self._plan(session, x, offset)
            if isinstance(planned, _Pending) and self.hooks is not None:
                self.hooks.check_push(session)  # the store may refuse it (durability)
        except BaseException as e:
            session.lock.release()
            if not isinstance(e, ServiceError):
                raise
            results[i] = e
            return
        if isinstance(planned, PushResult):  # a replay: nothing to compute
            session.lock.release()
            results[i] = planned
            return
        batch = batches.get(session.model)
        if batch is None:
            batch = batches[session.model] = _Batch(entry)
        batch.add(i, session, planned, x)

    def _take_free(self, session: Session | None) -> bool:
        """Take the lock of a session held here, open, unmoved, unexpired and free, without
        suspending; False (taking nothing) for any other."""
        live = self._live(session)  # a free one is live only unexpired
        return live is not None and _acquire_free(live.lock)

    def _start_batch(self, batch: _Batch, results: list) -> asyncio.Future[None] | None:
        """Hand a batch of planned pushes (their sessions' locks held) to their model's worker;
        one callback records every outcome into `results` and releases the locks, whether or
        not anyone still waits. -> a future set once they are recorded (None: refused whole)."""
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(outputs: list, errors: dict[int, BaseException]) -> None:
            try:
                for k, (i, session, planned) in enumerate(batch.pushes):
                    error = errors.get(k) if errors else None
                    if error is None:
                        try:
                            results[i] = self._commit(session, planned, outputs[k])
                        except Exception as e:  # never leave the caller waiting
                            logger.exception("recording a push failed")
                            results[i] = InternalError("internal server error")
                            results[i].__cause__ = e
                    else:
                        results[i] = error
                if not answer.done():  # the caller first, before the next operation
                    answer.set_result(None)
            finally:
                batch.release()

        try:
            batch.entry.submit_many(batch.slots, batch.rows, done)
        except BaseException as e:
            batch.release()
            if not isinstance(e, ServiceError):
                raise
            for i, _, _ in batch.pushes:
                results[i] = e
            return None
        return answer

    def _start_push(
        self,
        session: Session,
        entry: ModelEntry,
        x: np.ndarray,
        offset: int | None,
        release: bool = True,
    ) -> asyncio.Future[PushResult]:
        """`_start` with a future for its outcome (settled unless its caller gave up on it):
        for callers that await the push."""
        answer: asyncio.Future[PushResult] = asyncio.get_running_loop().create_future()

        def settle(result: PushResult | None, error: BaseException | None) -> None:
            if answer.done():  # cancelled by its caller: recorded all the same
                return
            if error is None:
                answer.set_result(result)  # type: ignore[arg-type]
            else:
                answer.set_exception(error)

        self._start(session, entry, x, offset, settle, release)
        return answer

    def _start(
        self,
        session: Session,
        entry: ModelEntry,
        x: np.ndarray,
        offset: int | None,
        reply: Reply,
        release: bool = True,
    ) -> None:
        """Start a push on a session whose lock the caller has just taken; `reply(result,
        None)` or `reply(None, error)` is called as its outcome is recorded.

        The hold of the lock passes to the push: it is released once the outcome is recorded,
        by the worker's answer, on the event loop, whether or not anyone still waits for it.
        The reply comes first, so a waiting caller runs before the next operation. With
        `release=False` the caller keeps the hold (and releases the lock itself).
        """
        try:
            self._check_open(session)  # it may have been retired while the lock was awaited
            planned = self._plan(session, x, offset)
            if isinstance(planned, PushResult):  # a replay: nothing to compute
                if release:
                    session.lock.release()
                    release = False  # released: a failing reply must not release it again
                reply(planned, None)
                return
            if self.hooks is not None:  # a new push: the store may refuse it (durability)
                self.hooks.check_push(session)

            def done(outputs: np.ndarray | None, error: BaseException | None) -> None:
                try:
                    result = None
                    if error is None:
                        try:
                            result = self._commit(session, planned, outputs)
                        except Exception as e:  # never leave the caller waiting
                            logger.exception("recording a push failed")
                            error = InternalError("internal server error")
                            error.__cause__ = e
                    reply(result, error)
                finally:
                    if release:
                        session.lock.release()

            entry.submit(session.slot, x, done)
        except BaseException:
            if release:
                session.lock.release()
            raise

    def _check_rows(self, x: np.ndarray, entry: ModelEntry) -> None:
        """Rows decoded for another model than the session's (it was deleted and re-created
        meanwhile) are refused, as are empty or too many rows."""
        if not len(x):
            raise InvalidInput("inputs: give at least one row")
        check_timesteps(len(x), self._max_timesteps)
        tokens = entry.config.vocab_size is not None
        if tokens != (x.ndim == 1) or (not tokens and x.shape[1] != entry.config.in_channels):
            raise InvalidInput(
                f"the session now serves model {entry.name!r}, whose rows have another shape; "
                "send the push again"
            )

    def _check_open(self, session: Session) -> None:
        """After the lock was taken: the session may have been retired while it waited."""
        if session.closed:
            raise self._open_error(session)

    def _open_error(self, session: Session) -> ServiceError:
        """What a push to a retired session is answered."""
        if (session.owner, session.id) in self._expired:
            return SessionExpired(f"session {session.id!r} expired after its TTL")
        return SessionNotFound(f"no session {session.id!r}")

    async def snapshot(self, owner: str, session_id: str) -> tuple[Session, np.ndarray]:
        """The session and its last min(position, R - 1) input rows, oldest first."""
        session = await self._find(owner, session_id)
        entry = self._registry.get(session.model)

        async def snapshot() -> tuple[Session, np.ndarray]:
            return session, await entry.stream_history(session.slot)

        # Shielded like every operation, so it queues behind a creation that reserved the id.
        return await self._shielded(self._locked(session, snapshot))

    async def get(self, owner: str, session_id: str) -> Session:
        return await self._find(owner, session_id)

    def local(self, owner: str, session_id: str) -> Session | None:
        """The session if this process holds it (no store lookup, no expiry check)."""
        return self._sessions.get((owner, session_id))

    def live_sessions(self) -> list[Session]:
        return list(self._sessions.values())

    async def list(
        self, owner: str, limit: int, after: str | None = None, model: str | None = None
    ) -> tuple[list[Session], str | None]:
        """The caller's own sessions held here and unexpired, by id, at most `limit` after the
        id `after`; -> (the page, the id to pass as `after` for the next page, or None)."""
        now = self._clock()
        ids = sorted(
            s.id
            for (o, _), s in self._sessions.items()
            if o == owner and not s.closed and now < s.expires_at
            and (model is None or s.model == model) and (after is None or s.id > after)
        )  # fmt: skip
        page = [self._sessions[(owner, i)] for i in ids[:limit]]
        return page, (page[-1].id if len(ids) > limit else None)

    async def delete_all(self, owner: str, model: str | None = None) -> int:
        """Delete every session of the caller held here (of `model`, if given); -> how many."""
        mine = [
            s for (o, _), s in list(self._sessions.items())
            if o == owner and (model is None or s.model == model)
        ]  # fmt: skip
        results = await asyncio.gather(*(self.close(s) for s in mine), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ServiceError):
                raise result
        return sum(1 for s in mine if s.closed)

    async def forget(self, session: Session) -> None:
        """Retire a session that moved to another replica (its lock held by the caller): its
        slot is freed here; the store keeps it."""
        await self._retire(session, expired=False, count=False, moved=True)

    async def reset(self, owner: str, session_id: str) -> Session:
        session = await self._find(owner, session_id)
        entry = self._registry.get(session.model)

        async def reset() -> Session:
            await entry.reset_stream(session.slot)
            session.position, session.last_push = 0, None
            session.last_used_at = self._clock()
            if self.hooks is not None:
                self.hooks.pushed(session)
            return session

        return await self._shielded(self._locked(session, reset))

    async def delete(self, owner: str, session_id: str) -> None:
        session = await self._find(owner, session_id)

        async def delete() -> None:
            await self._retire(session, expired=False)

        await self._shielded(self._locked(session, delete))

    async def close(self, session: Session) -> None:
        """Delete this very session, if it is still open: never a newer one under its id."""
        key = (session.owner, session.id)
        if session.closed or self._sessions.get(key) is not session:
            return

        async def close() -> None:
            await self._retire(session, expired=False)

        with contextlib.suppress(SessionNotFound, SessionExpired):  # retired meanwhile
            await self._shielded(self._locked(session, close))

    async def sweep(self) -> int:
        """Expire every idle session past its TTL; returns how many."""
        now = self._clock()
        due = [s for s in self._sessions.values() if now >= s.expires_at]
        expired = 0
        for session in due:
            # Re-checked at each turn: an earlier await may have let a push touch it.
            if not session.closed and not session.lock.locked() and now >= session.expires_at:
                await self._retire(session, expired=True)
                expired += 1
        return expired

    async def run_sweeper(self, interval_s: float) -> None:
        """The timer task: sweep every interval (the TTL itself is judged by the clock)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception:
                logger.exception("session sweep failed")

    # ----- internals -------------------------------------------------------------------------

    async def _held(self, handle: SessionHandle) -> Session:
        """The handle's session while it is still open, unmoved and unexpired; else the id's."""
        session = self._live(handle.session)
        if session is None:  # an expired one is retired there: 410
            return await self._find(handle.owner, handle.session_id)
        return session

    def _live(self, session: Session | None) -> Session | None:
        """A handle's session if it is open, unmoved and unexpired (or busy: its holder may
        push it on), else None."""
        if session is None or session.closed or session.moved:
            return None
        if self._clock() >= session.expires_at and not session.lock.locked():
            return None
        return session

    async def _find(self, owner: str, session_id: str) -> Session:
        key = (owner, session_id)
        session = self._sessions.get(key)
        if session is None and self.hooks is not None and key not in self._expired:
            session = await self.hooks.missing(owner, session_id)  # held by another replica?
        if session is None:
            if key in self._expired:
                raise SessionExpired(f"session {session_id!r} expired after its TTL")
            raise SessionNotFound(f"no session {session_id!r}")
        if self._clock() >= session.expires_at and not session.lock.locked():
            await self._retire(session, expired=True)
            raise SessionExpired(f"session {session_id!r} expired after its TTL")
        return session

    async def _locked(self, session: Session, op: Callable[[], Awaitable[T]]) -> T:
        async with session.lock:
            self._check_open(session)  # it may have been retired while this waited
            return await op()

    async def _open(
        self, session: Session, entry: ModelEntry, x: np.ndarray, restoring: bool
    ) -> tuple[Session, np.ndarray]:
        try:  # the caller holds the session's lock
            session.slot = await entry.open_stream(session.position, session.embedding)
        except PoolFullError:
            self._release(session)  # closed, for any push that queued on the lock meanwhile
            raise CapacityExceeded(
                f"model {entry.name!r} has all {entry.capacity} session slots in use "
                "(max_sessions): close sessions you no longer need (DELETE "
                "/v1/sessions/{id}, or DELETE /v1/sessions for all of yours; GET /v1/sessions "
                f"lists them); an idle session frees its slot after its TTL (session_ttl_s, "
                f"{self._default_ttl:g} s unless the session set ttl_s)",
                self._retry_after,
            ) from None
        except ValueError as e:  # the pool refused the position; no slot was taken
            self._release(session)
            raise InvalidInput(str(e)) from None
        except BaseException:
            self._release(session)
            raise
        finally:
            if session.closed:
                session.lock.release()
        self._metrics.active_sessions.labels(entry.name).inc()
        outputs = np.zeros((0, entry.config.output_size), dtype=np.float32)
        if len(x):
            try:  # the warm-up push, under the lock this opening keeps until it is done
                pushed = self._start_push(session, entry, x, session.position, release=False)
                outputs = (await pushed).outputs
            except BaseException:
                # Retired before any push that waited on the lock runs: it finds no session.
                try:
                    await self._retire(session, expired=False, count=False)
                finally:
                    session.lock.release()
                raise
            if restoring:  # the rows rebuilt state; they are not a push to replay
                session.last_push, outputs = None, outputs[:0]
        try:
            if self.hooks is not None:  # still locked: no push before the store knows it
                try:
                    await self.hooks.opened(session)
                except BaseException:
                    await self._retire(session, expired=False, count=False)
                    raise
        finally:
            session.lock.release()
        self._metrics.sessions_created.labels(entry.name).inc()
        return session, outputs

    def _plan(self, session: Session, x: np.ndarray, offset: int | None) -> PushResult | _Pending:
        """A replayed push's stored answer, or what applying it will record; raises a
        conflict. Holds the session's lock; changes nothing but the replay's last use."""
        digest = hashlib.blake2b(x.tobytes(), digest_size=16).digest()
        last = session.last_push
        if offset is not None and offset != session.position:
            if last is not None and (offset, len(x)) == (last.offset, last.length):
                if digest != last.digest:
                    raise OffsetConflict(
                        f"offset {offset} repeats the last push with different inputs; "
                        f"the session is at position {session.position}",
                        session.position,
                    )
                session.last_used_at = self._clock()
                return PushResult(last.outputs, last.offset + last.length)
            raise OffsetConflict(
                f"offset {offset} does not match the session's position {session.position}",
                session.position,
            )
        start = session.position
        if start + len(x) > MAX_POSITION:
            raise InvalidInput(
                f"this push would take the session past the largest position, {MAX_POSITION}"
            )
        return _Pending(start, len(x), digest)

    def _commit(self, session: Session, pending: _Pending, outputs: np.ndarray) -> PushResult:
        session.position = pending.start + pending.length
        session.last_push = AppliedPush(pending.start, pending.length, pending.digest, outputs)
        session.last_used_at = self._clock()
        if self.hooks is not None:
            self.hooks.pushed(session)
        return PushResult(outputs, session.position)

    async def _retire(
        self, session: Session, expired: bool, count: bool = True, moved: bool = False
    ) -> None:
        """Close a session: forget it (remembering expired ids for 410), free its slot."""
        if session.closed:  # retired already (e.g. by the sweep while a delete waited)
            return
        key = (session.owner, session.id)
        self._release(session)
        session.moved = moved
        if count:
            counter = self._metrics.sessions_expired if expired else self._metrics.sessions_deleted
            counter.labels(session.model).inc()
        self._metrics.active_sessions.labels(session.model).dec()
        if expired:
            self._expired.add(key)
        if session.slot >= 0:
            await self._registry.get(session.model).close_stream(session.slot)
        if self.hooks is not None and not moved:
            await self.hooks.retired(session, expired)

    def _reserve(self, session: Session) -> None:
        self._sessions[(session.owner, session.id)] = session
        self._per_owner[session.owner] += 1

    def _release(self, session: Session) -> None:
        """Forget a session (idempotent): its id and its place in its key's quota."""
        session.closed = True
        key = (session.owner, session.id)
        if self._sessions.get(key) is session:
            del self._sessions[key]
            self._per_owner[session.owner] -= 1
            if not self._per_owner[session.owner]:
                del self._per_owner[session.owner]

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        # Finish the operation even if the request is cancelled (client gone): a half-applied
        # push would desynchronise the session's position from its pool slot.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(_forget(self._tasks))
        return await asyncio.shield(task)


class _Batch:
    """The pushes of one `push_many` for one model: planned, their sessions' locks held."""

    __slots__ = ("entry", "pushes", "rows", "slots")

    def __init__(self, entry: ModelEntry):
        self.entry = entry
        self.pushes: list[tuple[int, Session, _Pending]] = []  # (item index, session, plan)
        self.slots: list[int] = []
        self.rows: list[np.ndarray] = []

    def add(self, i: int, session: Session, planned: _Pending, x: np.ndarray) -> None:
        self.pushes.append((i, session, planned))
        self.slots.append(session.slot)
        self.rows.append(x)

    def release(self) -> None:
        for _, session, _ in self.pushes:
            session.lock.release()


class _Pending(NamedTuple):
    """A push about to be applied: where it starts, its length and its inputs' digest."""

    start: int
    length: int
    digest: bytes


def _acquire_free(lock: asyncio.Lock) -> bool:
    """Take `lock` if that needs no wait (it is free and nobody queues for it): its acquire
    then completes without suspending. Otherwise take nothing and return False."""
    if lock.locked():  # held: no need to join and leave its queue to know
        return False
    acquiring = lock.acquire()
    try:
        acquiring.send(None)
    except StopIteration:
        return True
    acquiring.close()  # it would have waited: leave the queue it joined, holding nothing
    return False


def _forget(tasks: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned failure is not "never retrieved"

    return done
