"""ModelWorker: single-row steps of distinct streams are advanced by one pool call."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from service.batcher import ModelWorker, WorkerStopped
from service.metrics import Metrics
from tests.service.conftest import held, until_queued


class RecordingPool:
    """Stands in for StreamPool: remembers each step call, answers slot + row."""

    def __init__(self, open_streams: int = 64) -> None:
        self.open_streams = open_streams  # what len(StreamPool) says: the batcher's bound
        self.calls: list[list[int]] = []
        self.rows: list[list[float]] = []
        self.fail = False

    def __len__(self) -> int:
        return self.open_streams

    def step(self, slots, x):
        if self.fail:
            raise ValueError("bad rows")
        self.calls.append(list(slots))
        self.rows.append(np.asarray(x)[:, 0].tolist())
        return torch.as_tensor(np.asarray(x)) + torch.tensor(slots, dtype=torch.float32)[:, None]


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
    steps = [asyncio.ensure_future(worker.step(s, np.array([1.0], np.float32))) for s in range(6)]
    await until_queued(worker, 6)
    gate.set()
    results = await asyncio.gather(*steps)
    await blocker
    assert [r.tolist() for r in results] == [[1.0 + s] for s in range(6)]
    assert worker.pool.calls == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.asyncio
async def test_two_steps_of_one_stream_never_share_a_call(worker):
    gate, blocker = await held(worker)
    rows = [1.0, 5.0, 2.0, 3.0, 6.0, 4.0]
    slots = [7, 3, 7, 7, 3, 7]
    steps = [
        asyncio.ensure_future(worker.step(s, np.array([r], np.float32)))
        for s, r in zip(slots, rows, strict=True)
    ]
    await until_queued(worker, len(steps))
    gate.set()
    results = await asyncio.gather(*steps)
    await blocker
    assert [x.tolist() for x in results] == [[r + s] for s, r in zip(slots, rows, strict=True)]
    assert worker.pool.calls == [[7, 3], [7, 3], [7], [7]]
    assert worker.pool.rows == [[1.0, 5.0], [2.0, 6.0], [3.0], [4.0]]  # each stream in order


@pytest.mark.asyncio
async def test_calls_run_in_order_and_errors_reach_every_caller(worker):
    gate, blocker = await held(worker)
    worker.pool.fail = True
    steps = [asyncio.ensure_future(worker.step(s, np.array([0.0], np.float32))) for s in range(3)]
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
    gone = asyncio.ensure_future(worker.step(1, np.array([0.0], np.float32)))
    kept = asyncio.ensure_future(worker.step(2, np.array([0.0], np.float32)))
    await until_queued(worker, 2)
    gone.cancel()
    gate.set()
    assert (await kept).tolist() == [2.0]
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


def test_a_batch_of_every_open_stream_goes_without_waiting():
    # A long delay that the test would notice if it were waited out: with two open streams
    # and both in the batch, the worker must not wait for a third that cannot come.
    w = ModelWorker("m", Metrics(), max_batch_size=8, max_batch_delay_s=30.0)
    w.pool = RecordingPool(open_streams=2)
    w.start()

    async def two_steps():
        gate, blocker = await held(w)
        steps = [asyncio.ensure_future(w.step(s, np.array([1.0]))) for s in (0, 1)]
        await until_queued(w, 2)
        gate.set()
        await blocker
        return await asyncio.wait_for(asyncio.gather(*steps), timeout=10)

    try:
        assert len(asyncio.run(two_steps())) == 2
        assert w.pool.calls == [[0, 1]]
    finally:
        asyncio.run(w.stop())


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
    steps = [asyncio.ensure_future(worker.step(s, np.array([1.0], np.float32))) for s in (1, 2, 3)]
    await until_queued(worker, 3)
    gate.set()
    results = await asyncio.gather(*steps, return_exceptions=True)
    assert results[0].tolist() == [2.0] and results[2].tolist() == [4.0]
    assert isinstance(results[1], ValueError)
    assert worker.pool.calls == [[1], [3]]  # the batch was refused, then each ran alone
    await blocker
