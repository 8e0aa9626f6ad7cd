"""ModelWorker: pushes of distinct streams are advanced by one pool call: step when every push
is one row, advance (a ragged batch) otherwise, push for a long chunk."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from model import TCN, StreamPool, TCNConfig
from service.metrics import Metrics
from service.models.worker import ModelWorker, WorkerStopped
from tests.service.conftest import held, until_queued


class RecordingPool:
    """Stands in for StreamPool: remembers each step/advance/push call, answers slot + row."""

    max_advance_rows = 8

    def __init__(self, open_streams: int = 64) -> None:
        self.open_streams = open_streams  # what len(StreamPool) says: the batcher's bound
        self.calls: list[list[int]] = []
        self.rows: list[list[float]] = []
        self.advanced: list[tuple[list[int], list[int]]] = []
        self.pushed: list[tuple[int, int]] = []
        self.fail = False

    def __len__(self) -> int:
        return self.open_streams

    def step(self, slots, x):
        if self.fail:
            raise ValueError("bad rows")
        self.calls.append(list(slots))
        self.rows.append(np.asarray(x)[:, 0].tolist())
        return torch.as_tensor(np.asarray(x)) + torch.tensor(slots, dtype=torch.float32)[:, None]

    def advance(self, slots, x, lengths):
        if self.fail:
            raise ValueError("bad rows")
        self.advanced.append((list(slots), list(lengths)))
        offsets = np.repeat(np.asarray(slots, dtype=np.float32), lengths)[:, None]
        return torch.as_tensor(np.asarray(x) + offsets)

    def push(self, slot, x):
        self.pushed.append((slot, len(x)))
        return torch.as_tensor(np.asarray(x) + slot)


@pytest.fixture
def worker():
    w = ModelWorker("m", Metrics(), max_batch_size=4, max_batch_delay_s=0.001)
    w.pool = RecordingPool()
    w.start()
    yield w
    asyncio.run(w.stop())


@pytest.mark.asyncio
async def test_queued_steps_become_one_call_up_to_max_batch(worker):
    gate, blocker = await held(worker)
    steps = [
        asyncio.ensure_future(worker.advance(s, np.array([[1.0]], np.float32))) for s in range(6)
    ]
    await until_queued(worker, 6)
    gate.set()
    results = await asyncio.gather(*steps)
    await blocker
    assert [r.ravel().tolist() for r in results] == [[1.0 + s] for s in range(6)]
    assert worker.pool.calls == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.asyncio
async def test_two_steps_of_one_stream_never_share_a_call(worker):
    gate, blocker = await held(worker)
    rows = [1.0, 5.0, 2.0, 3.0, 6.0, 4.0]
    slots = [7, 3, 7, 7, 3, 7]
    steps = [
        asyncio.ensure_future(worker.advance(s, np.array([[r]], np.float32)))
        for s, r in zip(slots, rows, strict=True)
    ]
    await until_queued(worker, len(steps))
    gate.set()
    results = await asyncio.gather(*steps)
    await blocker
    assert [x.ravel().tolist() for x in results] == [
        [r + s] for s, r in zip(slots, rows, strict=True)
    ]
    assert worker.pool.calls == [[7, 3], [7, 3], [7], [7]]
    assert worker.pool.rows == [[1.0, 5.0], [2.0, 6.0], [3.0], [4.0]]  # each stream in order


@pytest.mark.asyncio
async def test_calls_run_in_order_and_errors_reach_every_caller(worker):
    gate, blocker = await held(worker)
    worker.pool.fail = True
    steps = [
        asyncio.ensure_future(worker.advance(s, np.array([[0.0]], np.float32))) for s in range(3)
    ]
    call = asyncio.ensure_future(worker.call(lambda: "done", op="other"))
    await until_queued(worker, 4)
    gate.set()
    for step in steps:
        with pytest.raises(ValueError, match="bad rows"):
            await step
    assert await call == "done"
    await blocker


@pytest.mark.asyncio
async def test_a_cancelled_caller_does_not_break_the_batch(worker):
    gate, blocker = await held(worker)
    gone = asyncio.ensure_future(worker.advance(1, np.array([[0.0]], np.float32)))
    kept = asyncio.ensure_future(worker.advance(2, np.array([[0.0]], np.float32)))
    await until_queued(worker, 2)
    gone.cancel()
    gate.set()
    assert (await kept).ravel().tolist() == [2.0]
    await blocker
    assert worker.pool.calls == [[1, 2]]  # the step was still applied: sessions record it


@pytest.mark.asyncio
async def test_stopped_worker_refuses_new_work():
    w = ModelWorker("m", Metrics(), max_batch_size=4, max_batch_delay_s=0.0)
    w.pool = RecordingPool()
    w.start()
    assert await w.call(lambda: 5) == 5
    await w.stop()
    with pytest.raises(WorkerStopped):
        await w.call(lambda: 5)


def two_held_steps(open_streams: int, while_held=lambda: None) -> list[list[int]]:
    """Two one-row pushes (slots 0 and 1) queued behind a held call of a worker whose delay
    (30 s) a test would notice if it were waited out; `while_held()` runs before the release.
    -> the pool's step calls."""
    w = ModelWorker("m", Metrics(), max_batch_size=8, max_batch_delay_s=30.0)
    w.pool = RecordingPool(open_streams=open_streams)
    w.start()

    async def two_steps():
        gate, blocker = await held(w)
        steps = [asyncio.ensure_future(w.advance(s, np.array([[1.0]]))) for s in (0, 1)]
        await until_queued(w, 2)
        while_held()
        gate.set()
        await blocker
        return await asyncio.wait_for(asyncio.gather(*steps), timeout=10)

    try:
        assert len(asyncio.run(two_steps())) == 2
        return w.pool.calls
    finally:
        asyncio.run(w.stop())


def test_a_batch_of_every_open_stream_goes_without_waiting():
    # With two open streams and both in the batch, the worker must not wait for a third that
    # cannot come.
    assert two_held_steps(open_streams=2) == [[0, 1]]


def test_the_batch_delay_counts_from_the_first_pushs_submission(monkeypatch):
    # Two pushes queue behind a long call, of three open streams: by the time the worker takes
    # them, the first has already waited longer than max_batch_delay_s, so they go at once
    # instead of waiting for a third that never comes.
    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr("service.models.worker.time", clock)

    def the_held_call_outlasts_the_delay() -> None:
        clock.now = 31.0

    assert two_held_steps(3, the_held_call_outlasts_the_delay) == [[0, 1]]


@pytest.mark.asyncio
async def test_one_bad_step_does_not_fail_its_batch(worker):
    refused = {2}
    real_step = worker.pool.step

    def step(slots, x):
        if refused & set(slots):
            raise ValueError("slot 2 is not an open stream")  # refused before any change
        return real_step(slots, x)

    worker.pool.step = step
    gate, blocker = await held(worker)
    steps = [
        asyncio.ensure_future(worker.advance(s, np.array([[1.0]], np.float32))) for s in (1, 2, 3)
    ]
    await until_queued(worker, 3)
    gate.set()
    results = await asyncio.gather(*steps, return_exceptions=True)
    assert results[0].ravel().tolist() == [2.0] and results[2].ravel().tolist() == [4.0]
    assert isinstance(results[1], ValueError)
    assert worker.pool.calls == [[1], [3]]  # the batch was refused, then each ran alone
    await blocker


@pytest.mark.asyncio
async def test_pushes_of_several_rows_join_one_ragged_call(worker):
    gate, blocker = await held(worker)
    sizes = {1: 3, 2: 1, 3: 2}
    jobs = {
        s: asyncio.ensure_future(worker.advance(s, np.full((n, 1), float(s), np.float32)))
        for s, n in sizes.items()
    }
    await until_queued(worker, 3)
    gate.set()
    for s, job in jobs.items():
        assert (await job).ravel().tolist() == [2.0 * s] * sizes[s]
    await blocker
    assert worker.pool.advanced == [([1, 2, 3], [3, 1, 2])]
    assert worker.pool.calls == []


@pytest.mark.asyncio
async def test_a_ragged_batch_stops_at_max_advance_rows(worker):
    gate, blocker = await held(worker)
    jobs = [
        asyncio.ensure_future(worker.advance(s, np.zeros((3, 1), np.float32))) for s in range(4)
    ]
    await until_queued(worker, 4)
    gate.set()
    await asyncio.gather(*jobs)
    await blocker
    # 8 rows at most per call (RecordingPool.max_advance_rows): 3 + 3, then 3 + 3.
    assert worker.pool.advanced == [([0, 1], [3, 3]), ([2, 3], [3, 3])]


@pytest.mark.asyncio
async def test_a_long_chunk_is_one_push_of_its_own(worker):
    from model.streaming import CHUNKED_PUSH_ROWS as MAX_BATCHED_ROWS

    rows = np.zeros((MAX_BATCHED_ROWS + 1, 1), np.float32)
    out = await worker.advance(5, rows)
    assert out.shape == rows.shape and worker.pool.pushed == [(5, MAX_BATCHED_ROWS + 1)]
    assert worker.pool.advanced == []


@pytest.mark.asyncio
async def test_non_finite_outputs_fail_only_the_streams_named(worker):
    from model import NonFiniteOutputError

    real_advance = worker.pool.advance

    def advance(slots, x, lengths):
        if 2 in slots:
            raise NonFiniteOutputError("not finite", [list(slots).index(2)])
        return real_advance(slots, x, lengths)

    worker.pool.advance = advance
    gate, blocker = await held(worker)
    jobs = [
        asyncio.ensure_future(worker.advance(s, np.zeros((2, 1), np.float32))) for s in (1, 2, 3)
    ]
    await until_queued(worker, 3)
    gate.set()
    results = await asyncio.gather(*jobs, return_exceptions=True)
    await blocker
    assert isinstance(results[1], NonFiniteOutputError)
    assert [r.ravel().tolist() for r in (results[0], results[2])] == [[1.0, 1.0], [3.0, 3.0]]
    assert worker.pool.advanced == [([1, 3], [2, 2])]  # the others, again, together


def test_pushes_of_one_loop_turn_travel_together():
    # No held worker and no batching delay: the pushes still share one call, because everything
    # submitted during one turn of the event loop reaches the worker as one delivery.
    w = ModelWorker("m", Metrics(), max_batch_size=8, max_batch_delay_s=0.0)
    w.pool = RecordingPool()
    w.start()

    async def three_pushes():
        steps = [w.advance(s, np.array([[1.0]], np.float32)) for s in (4, 5, 6)]
        return await asyncio.gather(*steps)

    try:
        results = asyncio.run(three_pushes())
        assert [r.ravel().tolist() for r in results] == [[5.0], [6.0], [7.0]]
        assert w.pool.calls == [[4, 5, 6]]
    finally:
        asyncio.run(w.stop())


@pytest.mark.asyncio
async def test_a_failing_completion_does_not_cost_the_others_their_answers(worker):
    gate, blocker = await held(worker)
    answers, answered = [], asyncio.Event()

    def broken(result, error):
        raise RuntimeError("a caller's bookkeeping failed")

    def kept(result, error):
        answers.append(result.ravel().tolist())
        answered.set()

    worker.submit(1, np.array([[0.0]], np.float32), broken)
    worker.submit(2, np.array([[0.0]], np.float32), kept)
    await until_queued(worker, 2)
    gate.set()
    await blocker
    await asyncio.wait_for(answered.wait(), timeout=30)
    assert answers == [[2.0]]


@pytest.mark.asyncio
async def test_a_batch_with_an_empty_push_is_not_stepped_as_one_row_pushes(worker):
    gate, blocker = await held(worker)
    empty = asyncio.ensure_future(worker.advance(1, np.zeros((0, 1), np.float32)))
    two = asyncio.ensure_future(worker.advance(2, np.zeros((2, 1), np.float32)))
    await until_queued(worker, 2)
    gate.set()
    await asyncio.gather(empty, two, return_exceptions=True)
    await blocker
    assert worker.pool.calls == []  # the ragged call, which checks the lengths, got them
    assert worker.pool.advanced == [([1, 2], [0, 2])]


@pytest.mark.asyncio
@pytest.mark.parametrize("channels, wide_step", [((64, 64), True), ((4, 4), False)])
async def test_warm_up_also_steps_a_full_batch_when_it_takes_another_kernel(channels, wide_step):
    # 64-channel kernel-7 layers run fused up to a few streams and "blas" above: the warm-up
    # steps a full batch too, so that the first one served does not pay the kernel's set-up.
    net = TCN(TCNConfig(in_channels=2, channels=channels, kernel_size=7)).fold_weight_norm()
    pool = StreamPool(net, 40)
    sizes = []
    step = pool.step
    pool.step = lambda slots, x: sizes.append(len(slots)) or step(slots, x)
    assert (pool.kernel_for(32) != pool.kernel_for(1)) is wide_step
    w = ModelWorker("m", Metrics(), max_batch_size=32, max_batch_delay_s=0.0)
    w.pool = pool
    w.start()
    try:
        await w.warm(np.ones((4, 2), np.float32))
    finally:
        await w.stop()
    assert sizes == ([1, 32] if wide_step else [1])
    assert pool.free == 40 and pool.open() == 0  # as if the warm-up had never opened a slot


def test_an_unset_max_batch_size_is_every_stream_within_the_step_budget(make_settings, monkeypatch):
    """max_batch_size unset: every open stream in one call on a fast model; on a machine where
    such a step passes the budget, the largest power of two that does not (here: none does)."""
    import service.models.worker
    from service.app import create_app
    from tests.service.conftest import runtime_of, serving

    with serving(create_app(make_settings(max_sessions=24))) as c:
        assert runtime_of(c.app).registry.get("tiny").worker.max_batch == 24
    monkeypatch.setattr(service.models.worker, "STEP_BUDGET_S", 0.0)
    with serving(create_app(make_settings(max_sessions=24))) as c:
        assert runtime_of(c.app).registry.get("tiny").worker.max_batch == 1
