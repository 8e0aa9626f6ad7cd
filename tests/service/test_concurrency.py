"""Many sessions at once: order per session, micro-batching across sessions, safe cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.models.worker import ModelWorker
from service.sessions.manager import SessionManager
from service.sessions.state import Session
from tests.service.conftest import (
    assert_rows_close,
    async_serving,
    held,
    random_rows,
    runtime_of,
    step_batches,
    until_queued,
)


@dataclass
class HeldWorker:
    """Sessions of a served app whose model worker is held until `release` (jobs queue up)."""

    client: httpx.AsyncClient
    sessions: SessionManager
    opened: list[Session]
    worker: ModelWorker
    gate: threading.Event
    blocker: asyncio.Future

    async def release(self) -> None:
        self.gate.set()
        await self.blocker


@contextlib.asynccontextmanager
async def held_worker_sessions(make_settings, count: int = 1) -> AsyncIterator[HeldWorker]:
    app = create_app(make_settings())
    async with async_serving(app) as c:
        runtime = runtime_of(app)
        opened = [(await runtime.sessions.create("anonymous", "tiny"))[0] for _ in range(count)]
        worker = runtime.registry.get("tiny").worker
        gate, blocker = await held(worker)
        yield HeldWorker(c, runtime.sessions, opened, worker, gate, blocker)


async def expected_outputs(client, sequences: list) -> list:
    r = await client.post("/v1/models/tiny/predict", json={"inputs": sequences})
    assert r.status_code == 200
    return r.json()["outputs"]


@pytest.mark.asyncio
async def test_interleaved_concurrent_sessions_equal_predict(make_settings):
    rng = random.Random(0)
    sequences = [random_rows(rng.randint(20, 45), seed=100 + i) for i in range(12)]
    async with async_serving(create_app(make_settings())) as c:

        async def stream(seq: list) -> list:
            split = rng.randint(0, 5)
            r = await c.post("/v1/sessions", json={"model": "tiny", "prefix": seq[:split]})
            body = r.json()
            outputs, position = list(body["outputs"]), split
            while position < len(seq):
                size = rng.choice([1, 1, 1, 1, 2, 3, 8])
                chunk = seq[position : position + size]
                r = await c.post(
                    f"/v1/sessions/{body['session_id']}/steps",
                    json={"inputs": chunk, "offset": position},
                )
                assert r.status_code == 200, r.text
                outputs += r.json()["outputs"]
                position += len(chunk)
            return outputs

        streamed = await asyncio.gather(*(stream(seq) for seq in sequences))
        for got, want in zip(streamed, await expected_outputs(c, sequences), strict=True):
            assert_rows_close(got, want)


@pytest.mark.asyncio
async def test_queued_single_steps_of_distinct_sessions_run_as_one_model_call(make_settings):
    app = create_app(make_settings())
    rows = [random_rows(1, seed=i) for i in range(16)]
    async with async_serving(app) as c:
        sids = []
        for _ in rows:
            sids.append((await c.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"])
        worker = runtime_of(app).registry.get("tiny").worker
        before = (await c.get("/metrics")).text
        gate, blocker = await held(worker)
        pushes = [
            asyncio.ensure_future(c.post(f"/v1/sessions/{sid}/steps", json={"inputs": row}))
            for sid, row in zip(sids, rows, strict=True)
        ]
        # All 16 steps wait behind the held call, so the worker finds them queued together:
        # one call advances every open stream, whatever the batch delay.
        await until_queued(worker, len(rows))
        gate.set()
        await blocker
        responses = await asyncio.gather(*pushes)
        after = (await c.get("/metrics")).text
        assert step_batches(before, after) == (1, 16)
        want = await expected_outputs(c, rows)
        for r, expected in zip(responses, want, strict=True):
            assert r.status_code == 200
            assert_rows_close(r.json()["outputs"], expected)


@pytest.mark.asyncio
async def test_concurrent_pushes_to_one_session_apply_one_at_a_time(make_settings):
    rows = random_rows(6, seed=4)
    async with async_serving(create_app(make_settings())) as c:
        sid = (await c.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        url = f"/v1/sessions/{sid}/steps"
        # Without offsets both apply, one after the other.
        a, b = await asyncio.gather(
            c.post(url, json={"inputs": rows[:1]}), c.post(url, json={"inputs": rows[:1]})
        )
        assert sorted([a.json()["position"], b.json()["position"]]) == [1, 2]
        # The same push sent twice at once (a retry racing its original) applies once.
        a, b = await asyncio.gather(
            c.post(url, json={"inputs": rows[2:4], "offset": 2}),
            c.post(url, json={"inputs": rows[2:4], "offset": 2}),
        )
        assert a.status_code == b.status_code == 200 and a.json() == b.json()
        assert (await c.get(f"/v1/sessions/{sid}")).json()["position"] == 4


@pytest.mark.asyncio
async def test_a_push_whose_client_vanished_is_recorded_for_its_retry(make_settings):
    rows = random_rows(3, seed=8)
    x = np.asarray(rows, dtype=np.float32)
    async with held_worker_sessions(make_settings) as h:
        c, sessions, (session,) = h.client, h.sessions, h.opened
        lost = asyncio.ensure_future(sessions.push(sessions.handle(session), x[:2], 0))
        await until_queued(h.worker, 1)
        lost.cancel()  # the client disconnected while its push waited for the model
        await h.release()
        retry = await sessions.push(sessions.handle(session), x[:2], 0)
        assert retry.position == 2
        rest = await sessions.push(sessions.handle(session), x[2:], 2)
        want = await expected_outputs(c, [rows])
        assert_rows_close(retry.outputs.tolist() + rest.outputs.tolist(), want[0])


@pytest.mark.asyncio
async def test_a_push_queued_behind_a_cancelled_one_sees_it_applied(make_settings):
    # The lock passes from the cancelled push to the model's answer, not to its caller: the
    # next push of the session waits until the first is recorded, then follows it.
    rows = random_rows(4, seed=9)
    x = np.asarray(rows, dtype=np.float32)
    async with held_worker_sessions(make_settings) as h:
        c, sessions, (session,) = h.client, h.sessions, h.opened
        lost = asyncio.ensure_future(sessions.push(sessions.handle(session), x[:2], 0))
        await until_queued(h.worker, 1)
        follower = asyncio.ensure_future(sessions.push(sessions.handle(session), x[2:], 2))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not follower.done() and h.worker.queued == 1  # waits for the lock, not queued
        lost.cancel()
        await h.release()
        rest = await follower
        assert rest.position == 4
        replay = await sessions.push(sessions.handle(session), x[2:], 2)  # the stored answer
        assert replay.position == 4
        want = await expected_outputs(c, [rows])
        assert_rows_close(rest.outputs.tolist(), want[0][2:])


@pytest.mark.asyncio
async def test_a_push_racing_its_sessions_creation_waits_for_it(make_settings):
    app = create_app(make_settings())
    rows = random_rows(1, seed=11)
    async with async_serving(app) as c:
        sessions = runtime_of(app).sessions
        x = np.asarray(rows, dtype=np.float32)
        creating = asyncio.ensure_future(sessions.create("anonymous", "tiny", "race-id-1"))
        await asyncio.sleep(0)  # the id is reserved; the opening has not run yet
        pushed = await sessions.push(await sessions.resolve("anonymous", "race-id-1"), x, 0)
        await creating
        assert pushed.position == 1
        assert_rows_close(pushed.outputs.tolist(), (await expected_outputs(c, [rows]))[0])
        for i in range(6):  # the same over HTTP: create and push sent together
            sid = f"http-race-{i:03d}"
            create = asyncio.ensure_future(
                c.post("/v1/sessions", json={"model": "tiny", "session_id": sid})
            )
            for _ in range(i):
                await asyncio.sleep(0)
            push = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": rows})
            created, answer = await asyncio.gather(create, push)
            assert created.status_code == 201
            assert answer.status_code in (200, 404), answer.text  # after, or before the create


@pytest.mark.asyncio
async def test_push_many_cancelled_mid_flight_records_every_push(make_settings):
    rows = random_rows(3, seed=10)
    x = np.asarray(rows, dtype=np.float32)
    async with held_worker_sessions(make_settings, count=3) as h:
        items = [(h.sessions.handle(s), x, 0) for s in h.opened]
        lost = asyncio.ensure_future(h.sessions.push_many(items))
        await until_queued(h.worker, 3)
        lost.cancel()
        await h.release()
        replays = await h.sessions.push_many(items)  # each push's stored answer
        want = await expected_outputs(h.client, [rows])
        for replay in replays:
            assert replay.position == 3
            assert_rows_close(replay.outputs.tolist(), want[0])
        assert all(not s.lock.locked() for s in h.opened)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_chunking_and_interleaving_equals_predict(shared_client, data):
    client = shared_client
    lengths = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=4), label="lengths")
    plans = [
        data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=length), label="chunks")
        for length in lengths
    ]
    order = data.draw(st.permutations([i for i, p in enumerate(plans) for _ in p]), label="order")
    sequences = [random_rows(n, seed=n * 7 + i) for i, n in enumerate(lengths)]
    sids = [client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"] for _ in plans]
    positions = [0] * len(plans)
    outputs: list[list] = [[] for _ in plans]
    progress = [0] * len(plans)
    try:
        for i in order:
            size = plans[i][progress[i]]
            progress[i] += 1
            chunk = sequences[i][positions[i] : positions[i] + size]
            if not chunk:
                continue
            r = client.post(
                f"/v1/sessions/{sids[i]}/steps", json={"inputs": chunk, "offset": positions[i]}
            )
            assert r.status_code == 200, r.text
            outputs[i] += r.json()["outputs"]
            positions[i] += len(chunk)
        for i, seq in enumerate(sequences):
            if positions[i] < len(seq):
                r = client.post(
                    f"/v1/sessions/{sids[i]}/steps", json={"inputs": seq[positions[i] :]}
                )
                outputs[i] += r.json()["outputs"]
        r = client.post("/v1/models/tiny/predict", json={"inputs": sequences})
        for got, want in zip(outputs, r.json()["outputs"], strict=True):
            assert_rows_close(got, want)
    finally:
        for sid in sids:
            client.delete(f"/v1/sessions/{sid}")
