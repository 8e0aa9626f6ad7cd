"""ModelWorker: the one thread that runs a model, micro-batching the pushes of many streams.

Every model call (StreamPool and TCN.forward alike) runs on the model's worker thread, so the
pool, which is not thread-safe, has exactly one user and the event loop never runs model code.
Other modules reach the pool only through the worker's typed operations (`open`, `close`,
`reset`, `history`, `submit`, `submit_many`), never directly.

Pushes of distinct streams are advanced together by one call, a batch's first push waiting at
most `max_batch_delay_s` from its submission for others to join (a push that queued behind a
long call has waited already, and goes with what queued meanwhile): `StreamPool.step` when
every push is one row, `StreamPool.advance` (a ragged batch, model/ragged.py) when some carry
more. A push longer than `CHUNKED_PUSH_ROWS` is a chunk for
`StreamPool.push` (a conv over its window, cheaper for long chunks), one call on its own.

Crossing threads is paid per batch, not per push: jobs submitted during one turn of an event
loop travel to the worker as one delivery (one queue put, one wake-up of the thread), and each
batch's results travel back with one `call_soon_threadsafe` per loop, where each job's `done`
callback runs (no future or task per push unless the caller wants one).

Callers keep at most one job per stream in flight (the SessionManager's per-session lock); on
top of that, the worker never puts two steps of one stream into one call and keeps their order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from model import NonFiniteOutputError
from model.streaming import CHUNKED_PUSH_ROWS
from service.metrics import Metrics
from service.protocol.errors import Draining

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Called on the submitting event loop with (result, None) or (None, error).
Done = Callable[[Any, BaseException | None], None]

# Pushes up to CHUNKED_PUSH_ROWS rows join ragged batches of many streams; a longer one runs as
# the pool's chunked push (one conv per layer over the window and the chunk).
# max_batch_size unset: the most streams per step call is every stream, unless one such call
# takes longer than this on this machine (a push waits at most about two calls).
STEP_BUDGET_S = 0.010

_STOP = object()


class _Job:
    __slots__ = ("done", "enqueued", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, done: Done):
        self.loop = loop
        self.done = done
        self.enqueued = time.perf_counter()


class _Call(_Job):
    """Run `fn()` on the worker thread, alone."""

    __slots__ = ("fn", "op")

    def __init__(self, loop: asyncio.AbstractEventLoop, done: Done, fn: Callable, op: str):
        super().__init__(loop, done)
        self.fn = fn
        self.op = op


class _Step(_Job):
    """Advance one stream by `rows` (T, C) floats or (T,) ids, T <= CHUNKED_PUSH_ROWS."""

    __slots__ = ("rows", "slot")

    def __init__(self, loop: asyncio.AbstractEventLoop, done: Done, slot: int, rows: np.ndarray):
        self.loop = loop  # _Job's fields, set here: one of these is made per push
        self.done = done
        self.enqueued = time.perf_counter()
        self.slot = slot
        self.rows = rows


class WorkerStopped(Draining):
    """The model worker has shut down; no more model calls are taken (503 draining)."""

    def __init__(self, message: str):
        super().__init__(message, retry_after_s=1)


class ModelWorker:
    """A dedicated thread owning one model's pool; async callers await its results."""

    def __init__(
        self, name: str, metrics: Metrics, max_batch_size: int | None, max_batch_delay_s: float
    ):
        self.name = name
        self.pool: Any = None  # the StreamPool: touched on the worker thread only, once started
        self._metrics = metrics
        self._max_batch = max_batch_size
        self._delay = max_batch_delay_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # deliveries: lists of jobs
        self._outboxes: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._delivered = 0  # jobs put on the thread's queue (event loop side)
        self._taken = 0  # jobs the thread has taken out of the queue (worker side)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"tcnserve-{name}", daemon=True)

    @property
    def queued(self) -> int:
        """Jobs delivered to the thread's queue that it has not taken up yet (a job still in
        its loop's outbox, waiting for the turn to end, is not counted)."""
        return self._delivered - self._taken

    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Finish queued work, then end the thread."""
        if self._stopped:
            return
        self._flush(asyncio.get_running_loop())  # what this loop submitted goes first
        self._stopped = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join, timeout_s)

    # ----- typed operations ------------------------------------------------------------------

    async def install(self, build: Callable[[], Any]) -> None:
        """Run `build()` on the worker thread; the pool it returns is the worker's from now on."""

        def install() -> None:
            self.pool = build()

        await self.call(install, op="load")

    async def warm(self, rows: np.ndarray) -> None:
        """Run each kind of pool call once on a scratch stream, so the first push pays no
        set-up: a step, a ragged advance and a chunked push (`rows`: at least 4 of them); and,
        when a larger batch takes another step kernel (`pool.kernel_for`), one step of that
        many scratch streams."""

        def warm() -> None:
            slot = self._scratch_stream()
            try:
                # the worker's own layout (`_step`), so that the kernel it runs is compiled now
                self.pool.step(np.array([slot], dtype=np.int64), np.ascontiguousarray(rows[:1]))
                self.pool.advance([slot], rows[:3], [3])
                self.pool.push(slot, rows[:4])
            finally:
                self.pool.close(slot)
            if self._max_batch is None:
                self._max_batch = self._derive_max_batch(rows)
            wide = min(self._max_batch, self.pool.free)
            if self.pool.kernel_for(wide) != self.pool.kernel_for(1):
                self._time_step(wide, rows)

        await self.call(warm, op="warmup")

    @property
    def max_batch(self) -> int | None:
        """Most streams one step call advances (derived while warming when not set)."""
        return self._max_batch

    def _time_step(self, width: int, rows: np.ndarray, repeats: int = 1) -> float:
        """Seconds one step of `width` scratch streams takes (the best of `repeats`)."""
        slots = np.array([self._scratch_stream() for _ in range(width)], dtype=np.int64)
        try:
            x = np.repeat(rows[:1], width, axis=0)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                self.pool.step(slots, x)
                best = min(best, time.perf_counter() - start)
            return best
        finally:
            for slot in reversed(slots.tolist()):  # the pool hands out the lowest free slot
                self.pool.close(slot)

    def _derive_max_batch(self, rows: np.ndarray) -> int:
        """max_batch_size unset: every open stream in one call (a split adds a call and waits
        no less on the whole), unless a step of that many takes more than STEP_BUDGET_S on
        this machine: then the largest power of two under the budget. Measured on the worker
        thread at load."""
        width = self.pool.free
        while width > 1 and self._time_step(width, rows, repeats=3) > STEP_BUDGET_S:
            width = 1 << ((width - 1).bit_length() - 1)  # the power of two below
        logger.info("model %s: at most %d streams per step call", self.name, width)
        return width

    def _scratch_stream(self) -> int:
        """A stream for warming and timing (a conditioned model's with a zero embedding)."""
        width = self.pool.config.embedding_width
        return self.pool.open(embedding=np.zeros(width) if width else None)

    async def open(self, position: int = 0, embedding: np.ndarray | None = None) -> int:
        """A fresh stream slot at `position`, conditioned on `embedding` where the model takes
        one (the pool's PoolFullError when none is free; ValueError for a bad embedding)."""
        return await self.call(lambda: self.pool.open(position, embedding=embedding), op="open")

    async def close(self, slot: int) -> None:
        await self.call(lambda: self.pool.close(slot), op="close")

    async def reset(self, slot: int) -> None:
        await self.call(lambda: self.pool.reset(slot), op="reset")

    async def history(self, slot: int) -> Any:
        """The stream's last min(position, R - 1) inputs, oldest first (a tensor on the CPU)."""
        return await self.call(lambda: self.pool.history(slot), op="history")

    async def histories(self, slots: list[int]) -> list[Any]:
        """`history` of many streams in one call."""
        return await self.call(lambda: [self.pool.history(slot) for slot in slots], op="history")

    async def call(self, fn: Callable[[], T], op: str = "call") -> T:
        """Run fn() on the worker thread, in submission order, and return its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submit(_Call(loop, _setter(future), fn, op))
        return await future

    def submit(self, slot: int, rows: np.ndarray, done: Done) -> None:
        """Advance one stream by T rows, batched with other streams' pushes; `done` gets the
        (T, out) float32 outputs or the error, on this event loop. Raises WorkerStopped."""
        self._submit(self._advance_job(asyncio.get_running_loop(), slot, rows, done))

    def submit_many(
        self, slots: list[int], rows: list[np.ndarray], done: Callable[[int, Any, Any], None]
    ) -> None:
        """`submit` for many distinct streams at once: the k-th's outcome goes to
        `done(k, outputs, error)`. The jobs are the same as `submit`'s (batched, split and
        isolated from each other's failures alike), delivered in one go. Raises WorkerStopped,
        having taken none of them."""
        loop = asyncio.get_running_loop()
        job = self._advance_job
        self._submit_all(
            loop,
            [
                job(loop, slot, x, functools.partial(done, k))
                for k, (slot, x) in enumerate(zip(slots, rows, strict=True))
            ],
        )

    def _advance_job(
        self, loop: asyncio.AbstractEventLoop, slot: int, rows: np.ndarray, done: Done
    ) -> _Job:
        if len(rows) > CHUNKED_PUSH_ROWS:
            return _Call(
                loop, done, lambda: self.pool.push(slot, rows).float().cpu().numpy(), "push"
            )
        return _Step(loop, done, slot, rows)

    async def advance(self, slot: int, rows: np.ndarray) -> np.ndarray:
        """`submit`, awaited."""
        future = asyncio.get_running_loop().create_future()
        self.submit(slot, rows, _setter(future))
        return await future

    def _submit(self, job: _Job) -> None:
        self._submit_all(job.loop, (job,))

    def _submit_all(self, loop: asyncio.AbstractEventLoop, jobs: Sequence[_Job]) -> None:
        if self._stopped:
            raise WorkerStopped(f"model {self.name!r} is shutting down")
        box = self._outboxes.get(loop)
        if box is None:
            box = self._outboxes[loop] = []
        first = not box
        box.extend(jobs)
        if first and box:  # the first of this turn: deliver them all when the turn ends
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = self._outboxes.pop(loop, None)
        if not jobs:
            return
        if self._stopped:  # `stop` delivered its own loop's jobs first: these came too late
            stopped = WorkerStopped(f"model {self.name!r} shut down")
            _settle(loop, [(job.done, None, stopped) for job in jobs])
            return
        self._queue.put(jobs)
        # Counted once on the queue, never before: a caller that sees n queued can rely on the
        # thread finding all n there.
        self._delivered += len(jobs)

    # ----- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        # Overflow is refused by the pool (non-finite outputs), not worth a warning per step.
        np.seterr(over="ignore", invalid="ignore")
        # Jobs in arrival order, not yet run: deferred steps first, then newer deliveries.
        pending: deque = deque()
        stopping = False
        while not stopping:
            if not pending:
                delivery = self._queue.get()
                if delivery is _STOP:
                    break
                self._take(pending, delivery)
            job = pending.popleft()
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch, later, deferred = [job], [], []
            slots = {job.slot}
            rows = len(job.rows)
            most_rows = self.pool.max_advance_rows
            deadline = job.enqueued + self._delay  # its first push waits at most this long
            # A batch holds distinct open streams: once it has them all, waiting adds nothing
            # (a lone session never waits for company).
            limit = min(self._max_batch or len(self.pool), len(self.pool))
            while len(batch) < limit:
                if not pending:
                    delivery = self._next_until(deadline)
                    if delivery is None:
                        break
                    if delivery is _STOP:
                        stopping = True
                        break
                    self._take(pending, delivery)
                nxt = pending.popleft()
                if isinstance(nxt, _Step) and nxt.slot not in slots:
                    if rows + len(nxt.rows) > most_rows:  # the next batch's first job
                        deferred.append(nxt)
                        break
                    batch.append(nxt)
                    slots.add(nxt.slot)
                    rows += len(nxt.rows)
                elif isinstance(nxt, _Step):  # never two steps of one stream in one call
                    deferred.append(nxt)
                else:
                    later.append(nxt)  # other streams' calls; no ordering between them
            # Deferred steps are older than what is still pending: each stream keeps its order.
            pending.extendleft(reversed(deferred))
            self._run_steps(batch)
            for call in later:
                self._run_call(call)
        self._fail_remaining(pending)

    def _take(self, pending: deque, delivery: list[_Job]) -> None:
        pending.extend(delivery)
        self._taken += len(delivery)

    def _next_until(self, deadline: float) -> Any:
        timeout = deadline - time.perf_counter()
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run_call(self, job: _Call) -> None:
        start = time.perf_counter()
        self._metrics.queue_delay.labels(self.name, job.op).observe(start - job.enqueued)
        try:
            result, error = job.fn(), None
        except BaseException as e:  # handed to the caller, which decides
            result, error = None, e
        self._metrics.compute.labels(self.name, job.op).observe(time.perf_counter() - start)
        _settle(job.loop, [(job.done, result, error)])

    def _run_steps(self, batch: list[_Step]) -> None:
        start = time.perf_counter()
        # One observation per call, as for any other call: the wait of its oldest push.
        oldest = min(job.enqueued for job in batch)
        self._metrics.queue_delay.labels(self.name, "step").observe(start - oldest)
        try:
            outcomes = self._step(batch)
        except NonFiniteOutputError as e:
            # Nothing was applied: fail the streams named, run the others again together.
            bad = set(e.rows)
            failed = [(job.done, None, e) for i, job in enumerate(batch) if i in bad]
            rest = [job for i, job in enumerate(batch) if i not in bad]
            outcomes = failed + self._step_each(rest)
            batch = [job for i, job in enumerate(batch) if i in bad] + rest
        except Exception as e:
            if len(batch) == 1:
                outcomes = [(batch[0].done, None, e)]
            else:
                # One bad push must not fail its neighbours. The pool validates a call before
                # it changes anything, so the refused call left every stream as it was.
                outcomes = [self._step_alone(job) for job in batch]
        self._metrics.compute.labels(self.name, "step").observe(time.perf_counter() - start)
        self._metrics.step_batch_size.labels(self.name).observe(len(batch))
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(job.loop, []).append(outcome)
        for loop, items in by_loop.items():
            _settle(loop, items)

    def _step(self, batch: list[_Step]) -> list[tuple]:
        # int64 slots and float rows of the pool's dtype: the fused step checks them in place.
        slots = np.fromiter((job.slot for job in batch), np.int64, len(batch))
        lengths = [len(job.rows) for job in batch]
        x = np.concatenate([job.rows for job in batch])
        if lengths.count(1) == len(lengths):  # one row each: the step kernel
            out = self.pool.step(slots, x).float().cpu().numpy()  # (N, out) float32
            parts = list(out[:, None, :])  # iterating (N, 1, out) yields each caller's view
        else:
            out = self.pool.advance(slots, x, lengths).float().cpu().numpy()  # (rows, out)
            parts = np.split(out, np.cumsum(lengths)[:-1])
        return [(job.done, part, None) for job, part in zip(batch, parts, strict=True)]

    def _step_each(self, batch: list[_Step]) -> list[tuple]:
        if not batch:
            return []
        try:
            return self._step(batch)
        except Exception:
            return [self._step_alone(job) for job in batch]

    def _step_alone(self, job: _Step) -> tuple:
        try:
            return self._step([job])[0]
        except Exception as e:
            return job.done, None, e

    def _fail_remaining(self, pending: deque) -> None:
        leftovers = list(pending)
        while True:
            try:
                delivery = self._queue.get_nowait()
            except queue.Empty:
                break
            if delivery is not _STOP:
                leftovers.extend(delivery)
        for job in leftovers:
            _settle(job.loop, [(job.done, None, WorkerStopped(f"model {self.name!r} shut down"))])


def _setter(future: asyncio.Future) -> Done:
    """A `done` that settles `future` (unless its awaiter gave up on it)."""

    def done(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    return done


def _settle(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_settle_on_loop, items)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        logger.debug("dropped %d results for a closed event loop", len(items))


def _settle_on_loop(items: list) -> None:
    for done, result, error in items:
        try:
            done(result, error)
        except Exception:  # one caller's bookkeeping must not cost the others their answers
            logger.exception("settling a model job failed")
