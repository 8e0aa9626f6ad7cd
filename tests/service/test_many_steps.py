"""POST /v1/steps: many sessions in one request, each item with the /steps semantics."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from tests.service.conftest import (
    assert_rows_close,
    held_worker,
    metric,
    open_session,
    predict,
    random_rows,
    runtime_of,
    serving,
    step_batches,
)


def many(client, steps: list[dict], **kwargs):
    body = json.dumps({"steps": steps}, allow_nan=True)  # NaN: what a buggy client sends
    r = client.post("/v1/steps", content=body, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_many_sessions_advance_in_one_request_and_equal_predict(client):
    seqs = [random_rows(12, seed=s) for s in range(5)]
    sids = [open_session(client)["session_id"] for _ in seqs]
    outputs = [[] for _ in seqs]
    # Ragged: each request carries a different number of rows per session.
    plans = [[1, 3, 2, 5, 1], [4, 1, 1, 2, 6], [7, 8, 9, 5, 5]]
    fed = [0] * len(seqs)
    for plan in plans:
        steps = [
            {"session_id": sid, "inputs": seq[f : f + n], "offset": f}
            for sid, seq, f, n in zip(sids, seqs, fed, plan, strict=True)
        ]
        results = many(client, steps)
        assert [r["session_id"] for r in results] == sids
        for i, (r, n) in enumerate(zip(results, plan, strict=True)):
            assert r["position"] == fed[i] + n, r
            outputs[i] += r["outputs"]
            fed[i] += n
    for out, want in zip(outputs, predict(client, seqs), strict=True):
        assert_rows_close(out, want)


def test_items_of_one_request_join_one_batched_model_call(client):
    sids = [open_session(client)["session_id"] for _ in range(6)]
    before = client.get("/metrics").text
    steps = [
        {"session_id": sid, "inputs": random_rows(i + 1, seed=i)} for i, sid in enumerate(sids)
    ]
    with held_worker(client) as wait_queued:
        future = client.portal.start_task_soon(_post_async, client, {"steps": steps})
        wait_queued(6)
    results = future.result(30)
    assert all("outputs" in r for r in results)
    assert step_batches(before, client.get("/metrics").text) == (1, 6)


async def _post_async(client, body):
    import httpx

    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.post("/v1/steps", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_a_bad_item_fails_alone_and_changes_nothing(client):
    rows = random_rows(6, seed=1)
    good, other = open_session(client)["session_id"], open_session(client)["session_id"]
    results = many(
        client,
        [
            {"session_id": good, "inputs": rows[:2], "offset": 0},
            {"session_id": other, "inputs": [[0.5, 0.5, 0.5]]},  # wrong width
            {"session_id": "no-such-session", "inputs": [[0.5, 0.5]]},
            {"session_id": other, "inputs": [[0.5, 3e38]]},  # would overflow
            {"session_id": good, "inputs": rows[2:4], "offset": 2},  # named twice
            {"session_id": other, "inputs": [[0.5, 0.5]], "offset": 7},
        ],
    )
    assert results[0]["position"] == 2
    codes = [r.get("error", {}).get("code") for r in results]
    assert codes == [
        None,
        "invalid_input",
        "session_not_found",
        "invalid_input",
        "invalid_input",
        "invalid_input",  # named twice too: `other` appeared in item 1
    ]
    assert "more than once" in results[4]["error"]["message"]
    assert client.get(f"/v1/sessions/{other}").json()["position"] == 0
    # The good session's first item was applied once; a replay of it is answered again.
    again = many(client, [{"session_id": good, "inputs": rows[:2], "offset": 0}])[0]
    assert again["position"] == 2 and again["outputs"] == results[0]["outputs"]
    conflict = many(client, [{"session_id": good, "inputs": rows[:1], "offset": 5}])[0]
    assert conflict["error"]["code"] == "offset_conflict" and conflict["error"]["position"] == 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"steps": []}, 422, "invalid_input"),
        ({"steps": [{"inputs": [[0.5, 0.5]]}]}, 422, "invalid_input"),
        ({"items": []}, 422, "invalid_input"),
        (
            {"steps": [{"session_id": "x" * 9, "inputs": [[0.0, 0.0]]}] * 1025},
            413,
            "too_many_sequences",
        ),
    ],
)
def test_malformed_requests_are_refused_whole(client, body, status, code):
    r = client.post("/v1/steps", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_another_keys_sessions_are_not_found(make_settings):
    a, b = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
    with serving(create_app(make_settings(api_keys=[a, b]))) as client:
        sid = client.post("/v1/sessions", json={"model": "tiny"}, headers={"X-API-Key": a})
        sid = sid.json()["session_id"]
        results = many(
            client, [{"session_id": sid, "inputs": [[0.0, 0.0]]}], headers={"X-API-Key": b}
        )
        assert results[0]["error"]["code"] == "session_not_found"
        assert client.post("/v1/steps", json={"steps": []}).status_code == 401
        assert metric(client.get("/metrics").text, "tcnserve_active_sessions") == 1
        assert runtime_of(client.app).sessions.held_by("anonymous") == 0


@pytest.mark.asyncio
async def test_requests_naming_sessions_in_opposite_orders_never_wait_for_each_other(
    make_settings,
):
    import asyncio

    import numpy as np

    from tests.service.conftest import async_serving

    app = create_app(make_settings())
    async with async_serving(app):
        sessions = runtime_of(app).sessions
        a, _ = await sessions.create("anonymous", "tiny")
        b, _ = await sessions.create("anonymous", "tiny")
        x = np.zeros((1, 2), dtype=np.float32)
        await a.lock.acquire()  # another operation holds A for a moment
        first = asyncio.ensure_future(
            sessions.push_many([(sessions.handle(a), x, None), (sessions.handle(b), x, None)])
        )
        second = asyncio.ensure_future(
            sessions.push_many([(sessions.handle(b), x, None), (sessions.handle(a), x, None)])
        )
        for _ in range(50):
            await asyncio.sleep(0)
        a.lock.release()
        done = await asyncio.wait_for(asyncio.gather(first, second), timeout=20)
        assert all(r.position in (1, 2) for results in done for r in results)
        assert (a.position, b.position) == (2, 2)


@pytest.mark.asyncio
async def test_sessions_busy_in_an_overlapping_request_still_advance_together(make_settings):
    # Two requests name the same 40 sessions at once: the second finds them all held by the
    # first's pushes. It waits for the first of them (holding nothing), then takes the others
    # as they come free: a few model calls in all, never one call per session.
    import asyncio

    import numpy as np

    from tests.service.conftest import async_serving, held, step_batches, until_queued

    app = create_app(make_settings(max_sessions=64))
    async with async_serving(app):
        runtime = runtime_of(app)
        sessions = runtime.sessions
        opened = [(await sessions.create("anonymous", "tiny"))[0] for _ in range(40)]
        x = np.zeros((1, 2), dtype=np.float32)
        items = [(sessions.handle(s), x, None) for s in opened]
        worker = runtime.registry.get("tiny").worker
        before = runtime.metrics.render().decode()
        gate, blocker = await held(worker)
        first = asyncio.ensure_future(sessions.push_many(items))
        await until_queued(worker, 40)
        second = asyncio.ensure_future(sessions.push_many(list(reversed(items))))
        for _ in range(20):  # the second request is now waiting for a lock the first holds
            await asyncio.sleep(0)
        gate.set()
        await blocker
        done = await asyncio.wait_for(asyncio.gather(first, second), timeout=20)
        calls, streams = step_batches(before, runtime.metrics.render().decode())
        assert [r.position for r in done[0]] == [1] * 40
        assert [r.position for r in done[1]] == [2] * 40
        assert streams == 80 and calls <= 4, (calls, streams)


@pytest.mark.asyncio
async def test_a_busy_session_does_not_hold_back_the_free_ones(make_settings):
    # The first session named is held by another operation: the others' pushes start at once
    # (they reach the model worker while the busy one still waits), and the busy one follows.
    import numpy as np

    from tests.service.conftest import async_serving, held, until_queued

    app = create_app(make_settings())
    async with async_serving(app):
        runtime = runtime_of(app)
        sessions = runtime.sessions
        a, _ = await sessions.create("anonymous", "tiny")
        b, _ = await sessions.create("anonymous", "tiny")
        c, _ = await sessions.create("anonymous", "tiny")
        x = np.zeros((1, 2), dtype=np.float32)
        worker = runtime.registry.get("tiny").worker
        gate, blocker = await held(worker)
        await a.lock.acquire()  # another operation holds A
        items = [(sessions.handle(s), x, None) for s in (a, b, c)]
        task = asyncio.ensure_future(sessions.push_many(items))
        await until_queued(worker, 2)  # B's and C's pushes, while A is still busy
        a.lock.release()
        gate.set()
        await blocker
        results = await asyncio.wait_for(task, timeout=20)
        assert [r.position for r in results] == [1, 1, 1]


@pytest.mark.asyncio
async def test_items_of_two_models_advance_in_one_call_per_model_and_equal_predict(
    make_settings, tmp_path
):
    # The free sessions of a request go to each model's worker as one batch: one model call
    # per model, each session's outputs its model's own.
    import numpy as np

    from tests.service.conftest import TINY, async_serving, write_model

    other = write_model(tmp_path, TINY, seed=7)
    settings = make_settings()
    app = create_app(make_settings(models={**settings.models, "other": str(other)}))
    async with async_serving(app) as c:
        runtime = runtime_of(app)
        sessions = runtime.sessions
        opened = [
            (await sessions.create("anonymous", model))[0]
            for model in ("tiny", "other", "tiny", "other", "tiny")
        ]
        rows = [random_rows(3, seed=i) for i in range(len(opened))]
        items = [
            (sessions.handle(s), np.asarray(r, dtype=np.float32), None)
            for s, r in zip(opened, rows, strict=True)
        ]
        before = runtime.metrics.render().decode()
        results = await sessions.push_many(items)
        after = runtime.metrics.render().decode()
        for model, streams in (("tiny", 3), ("other", 2)):
            calls = [
                _series(page, f"tcnserve_step_batch_size_{part}", model)
                for page in (before, after)
                for part in ("count", "sum")
            ]
            assert (calls[2] - calls[0], calls[3] - calls[1]) == (1, streams), model
        for session, r, result in zip(opened, rows, results, strict=True):
            answer = await c.post(f"/v1/models/{session.model}/predict", json={"inputs": [r]})
            assert result.position == 3
            assert_rows_close(result.outputs.tolist(), answer.json()["outputs"][0])
        assert all(not s.lock.locked() for s in opened)


def _series(page: str, name: str, model: str) -> float:
    import re

    match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', page, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@contextlib.asynccontextmanager
async def _opened(make_settings, count: int):
    """A served tiny model and `count` sessions opened on it: (runtime, the sessions)."""
    from tests.service.conftest import async_serving

    app = create_app(make_settings())
    async with async_serving(app):
        runtime = runtime_of(app)
        create = runtime.sessions.create
        yield runtime, [(await create("anonymous", "tiny"))[0] for _ in range(count)]


async def _push_zeros(sessions, opened: list) -> list:
    """One zero row pushed to each session, in one push_many."""
    import numpy as np

    x = np.zeros((1, 2), dtype=np.float32)
    return await sessions.push_many([(sessions.handle(s), x, None) for s in opened])


@pytest.mark.asyncio
async def test_a_push_the_pool_refuses_fails_alone_in_its_batch(make_settings, monkeypatch):
    # One stream of a batch is refused by the pool (which then changed nothing): the worker
    # runs the others again without it; only that item fails, and its session stays as it was.
    import numpy as np

    async with _opened(make_settings, 4) as (runtime, opened):
        sessions = runtime.sessions
        pool = runtime.registry.get("tiny").worker.pool
        refused = opened[2].slot
        step = pool.step

        def refusing(slots, x):
            if refused in np.asarray(slots).tolist():
                raise ValueError("step: refused for the test")
            return step(slots, x)

        monkeypatch.setattr(pool, "step", refusing)
        results = await _push_zeros(sessions, opened)
        assert [getattr(r, "position", None) for r in results] == [1, 1, None, 1]
        assert results[2].code == "invalid_input" and "refused for the test" in str(results[2])
        assert [s.position for s in opened] == [1, 1, 0, 1]
        assert all(not s.lock.locked() for s in opened)


@pytest.mark.asyncio
async def test_a_stopped_worker_answers_each_item_draining_and_holds_no_session(make_settings):
    async with _opened(make_settings, 3) as (runtime, opened):
        await runtime.registry.get("tiny").worker.stop()
        results = await _push_zeros(runtime.sessions, opened)
        assert [r.code for r in results] == ["draining"] * 3
        assert [s.position for s in opened] == [0, 0, 0]
        assert all(not s.lock.locked() for s in opened)


def test_an_items_errors_are_those_of_a_single_push(client):
    # Each item is judged as POST /v1/sessions/{id}/steps judges its body: the same error, on
    # the same field, for the same rows and offset, the offset first.
    sids = [open_session(client)["session_id"] for _ in range(3)]
    bodies = [
        {"inputs": [[0.5, 0.5, 0.5]], "offset": -1},  # both wrong: the offset is named
        {"inputs": [[0.5, 0.5, 0.5]]},
        {"inputs": [[0.5, 0.5]], "offset": "one"},
    ]
    results = many(client, [{"session_id": s, **b} for s, b in zip(sids, bodies, strict=True)])
    for sid, body, result in zip(sids, bodies, results, strict=True):
        single = client.post(f"/v1/sessions/{sid}/steps", json=body).json()
        got, want = result["error"], single["error"]
        assert got["code"] == want["code"], (body, got, want)
        assert got["message"].split(":")[0] == want["message"].split(":")[0], (body, got, want)
    assert "offset" in results[0]["error"]["message"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_grouping_of_chunks_into_requests_equals_predict(shared_client, data):
    # Sessions advance by random chunks, grouped into /v1/steps requests at random (any subset
    # of the sessions, in any item order), some items repeating their session's last push
    # (answered from the replay record, not applied again): each session's outputs are the
    # full forward's.
    client = shared_client
    lengths = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=5), label="lengths")
    sequences = [random_rows(n, seed=n * 11 + i) for i, n in enumerate(lengths)]
    sids = [open_session(client)["session_id"] for _ in lengths]
    positions = [0] * len(lengths)
    last: list[dict | None] = [None] * len(lengths)
    outputs: list[list] = [[] for _ in lengths]
    try:
        while any(p < len(s) for p, s in zip(positions, sequences, strict=True)):
            left = [i for i, s in enumerate(sequences) if positions[i] < len(s)]
            chosen = data.draw(st.lists(st.sampled_from(left), min_size=1, unique=True))
            steps, applied = [], []
            for i in chosen:
                if last[i] is not None and data.draw(st.booleans(), label="replay"):
                    steps.append(last[i])
                    applied.append((i, None))
                    continue
                size = data.draw(st.integers(1, 12), label="chunk")
                chunk = sequences[i][positions[i] : positions[i] + size]
                step = {"session_id": sids[i], "inputs": chunk, "offset": positions[i]}
                steps.append(step)
                applied.append((i, len(chunk)))
            results = many(client, steps)
            for step, (i, n), result in zip(steps, applied, results, strict=True):
                assert "outputs" in result, result
                if n is None:  # the replay: the stored answer, the position unchanged
                    assert result["position"] == positions[i]
                    assert result["outputs"] == outputs[i][-len(result["outputs"]) :]
                    continue
                outputs[i] += result["outputs"]
                positions[i] += n
                last[i] = step
                assert result["position"] == positions[i]
        for got, want in zip(outputs, predict(client, sequences), strict=True):
            assert_rows_close(got, want)
    finally:
        for sid in sids:
            client.delete(f"/v1/sessions/{sid}")
