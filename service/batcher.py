"""ModelWorker: the one thread that runs a model, micro-batching the pushes of many streams.

Every model call (StreamPool and TCN.forward alike) runs on the model's worker thread, so the
pool, which is not thread-safe, has exactly one user and the event loop never runs model code.
Pushes of distinct streams queued within `max_batch_delay_s` of each other are advanced together
by one call: `StreamPool.step` when every push is one row, `StreamPool.advance` (a ragged batch,
model/ragged.py) when some carry more. A push longer than `MAX_BATCHED_ROWS` is a chunk for
`StreamPool.push` (a conv over its window, cheaper for long chunks), one call on its own.
Results travel back to the event loop with one `call_soon_threadsafe` per batch.

Callers keep at most one job per stream in flight (the SessionManager's per-session lock); on
top of that, the worker never puts two steps of one stream into one call and keeps their order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from model import NonFiniteOutputError
from service.metrics import Metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Call(_Job):
    fn: Callable[[], Any] = lambda: None
    op: str = "call"


@dataclass
class _Step(_Job):
    """Advance one stream by `rows` (T, C) floats or (T,) ids, T <= MAX_BATCHED_ROWS."""

    slot: int = -1
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0))


# Pushes up to this many rows join ragged batches; longer ones run as a chunked push, which
# costs O(L + T) per layer against the ragged batch's O(k T) (they cross near 200-300 rows for
# the reference config).
MAX_BATCHED_ROWS = 128


_STOP = object()


class WorkerStopped(RuntimeError):
    """The model worker has shut down; no more model calls are taken."""


class ModelWorker:
    """A dedicated thread owning one model's pool; async callers await its results."""

    def __init__(self, name: str, metrics: Metrics, max_batch_size: int, max_batch_delay_s: float):
        self.name = name
        self.pool: Any = None  # the StreamPool, set on the worker thread by `load`
        self._metrics = metrics
        self._max_batch = max_batch_size
        self._delay = max_batch_delay_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"tcnserve-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Finish queued work, then end the thread."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join, timeout_s)

    async def call(self, fn: Callable[[], T], op: str = "call") -> T:
        """Run fn() on the worker thread, in queue order, and return its result."""
        loop = asyncio.get_running_loop()
        job = _Call(loop, loop.create_future(), fn=fn, op=op)
        self._submit(job)
        return await job.future

    async def advance(self, slot: int, rows: np.ndarray) -> np.ndarray:
        """Advance one stream by T rows, batched with other streams' pushes: (T, out) float32."""
        return await self.submit(slot, rows)

    def submit(self, slot: int, rows: np.ndarray) -> asyncio.Future:
        """`advance` without the coroutine: the future of its outputs (many of them can be
        awaited with one gather, which wraps futures in no task)."""
        loop = asyncio.get_running_loop()
        if len(rows) > MAX_BATCHED_ROWS:
            job: _Job = _Call(
                loop,
                loop.create_future(),
                fn=lambda: self.pool.push(slot, rows).float().cpu().numpy(),
                op="push",
            )
        else:
            job = _Step(loop, loop.create_future(), slot=slot, rows=rows)
        self._submit(job)
        return job.future

    def _submit(self, job: _Job) -> None:
        if self._stopped:
            raise WorkerStopped(f"model {self.name!r} is shutting down")
        self._queue.put(job)

    # ----- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        # Overflow is refused by the pool (non-finite outputs), not worth a warning per step.
        np.seterr(over="ignore", invalid="ignore")
        carried: deque = deque()  # steps deferred because their stream was already in a batch
        stopping = False
        while not stopping:
            pending, carried = carried, deque()
            job = pending.popleft() if pending else self._queue.get()
            if job is _STOP:
                break
            if isinstance(job, _Call):
                self._run_call(job)
                carried = pending
                continue
            batch, later = [job], []
            slots = {job.slot}
            rows = len(job.rows)
            most_rows = self.pool.max_advance_rows
            deferred_old: list = []  # from earlier rounds: older than anything still pending
            deferred_new: list = []  # fresh from the queue: newer than everything pending
            deadline = time.perf_counter() + self._delay
            # A batch holds distinct open streams: once it has them all, waiting adds nothing
            # (a lone session never waits for company).
            limit = min(self._max_batch, len(self.pool))
            while len(batch) < limit:
                from_pending = bool(pending)
                nxt = pending.popleft() if from_pending else self._next_until(deadline)
                if nxt is None:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                if isinstance(nxt, _Step) and nxt.slot not in slots:
                    if rows + len(nxt.rows) > most_rows:  # the next batch's first job
                        (deferred_old if from_pending else deferred_new).append(nxt)
                        break
                    batch.append(nxt)
                    slots.add(nxt.slot)
                    rows += len(nxt.rows)
                elif isinstance(nxt, _Step):  # never two steps of one stream in one call
                    (deferred_old if from_pending else deferred_new).append(nxt)
                else:
                    later.append(nxt)  # other streams' calls; no ordering between them
            # Deferred steps keep their arrival order, so each stream keeps its order.
            carried = deque([*deferred_old, *pending, *deferred_new])
            self._run_steps(batch)
            for call in later:
                self._run_call(call)
        self._fail_remaining(carried)

    def _next_until(self, deadline: float) -> Any:
        timeout = deadline - time.perf_counter()
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run_call(self, job: _Call) -> None:
        start = time.perf_counter()
        self._metrics.queue_delay.labels(self.name).observe(start - job.enqueued)
        try:
            result, error = job.fn(), None
        except BaseException as e:  # handed to the awaiting coroutine, which decides
            result, error = None, e
        self._metrics.compute.labels(self.name, job.op).observe(time.perf_counter() - start)
        _settle(job.loop, [(job.future, result, error)])

    def _run_steps(self, batch: list[_Step]) -> None:
        start = time.perf_counter()
        delay = self._metrics.queue_delay.labels(self.name)
        for job in batch:
            delay.observe(start - job.enqueued)
        try:
            outcomes = self._step(batch)
        except NonFiniteOutputError as e:
            # Nothing was applied: fail the streams named, run the others again together.
            bad = set(e.rows)
            failed = [(job.future, None, e) for i, job in enumerate(batch) if i in bad]
            rest = [job for i, job in enumerate(batch) if i not in bad]
            outcomes = failed + self._step_each(rest)
            batch = [job for i, job in enumerate(batch) if i in bad] + rest
        except Exception as e:
            if len(batch) == 1:
                outcomes = [(batch[0].future, None, e)]
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
        slots = [job.slot for job in batch]
        lengths = [len(job.rows) for job in batch]
        x = np.concatenate([job.rows for job in batch])
        if all(n == 1 for n in lengths):  # one row each: the step kernel
            y = self.pool.step(slots, x)
        else:
            y = self.pool.advance(slots, x, lengths)
        out = y.float().cpu().numpy()  # (rows, out) float32; each caller gets its rows
        parts = np.split(out, np.cumsum(lengths)[:-1])
        return [(job.future, part, None) for job, part in zip(batch, parts, strict=True)]

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
            return job.future, None, e

    def _fail_remaining(self, carried: deque) -> None:
        leftovers = list(carried)
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftovers:
            if isinstance(job, _Job):
                error = WorkerStopped(f"model {self.name!r} shut down")
                _settle(job.loop, [(job.future, None, error)])


def _settle(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_settle_on_loop, items)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        logger.debug("dropped %d results for a closed event loop", len(items))


def _settle_on_loop(items: list) -> None:
    for future, result, error in items:
        if future.done():  # the caller was cancelled; its outcome is recorded elsewhere
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
