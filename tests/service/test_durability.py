"""Sessions that move between replicas through the store: two apps in one process sharing one
store (in-process, or a real Redis). A session is served exactly wherever it is asked for, lives
in one replica at a time, and a takeover fences the old owner off."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from service.app import create_app
from service.sessions.record import SessionRecord
from service.store.base import MemorySpace, MemoryStore
from service.store.durability import SessionDurability
from tests.service.conftest import (
    TINY,
    assert_rows_close,
    async_serving,
    held,
    random_rows,
    runtime_of,
)

R = TINY.receptive_field
ROWS = random_rows(90, seed=11)


@contextlib.asynccontextmanager
async def replicas(
    make_settings, store: str, space: MemorySpace | None = None, **durability
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Two replicas of one deployment, each an app with its lifespan, sharing one store."""
    space = space if space is not None else MemorySpace()
    options = {"snapshot_interval_s": 3600.0, "handoff_timeout_s": 5.0, **durability}
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for name in ("replica-a", "replica-b"):
            if store == "memory":
                app = create_app(make_settings())
                rt = runtime_of(app)
                rt.durability = SessionDurability(
                    MemoryStore(space),
                    rt.sessions,
                    rt.registry,
                    rt.metrics,
                    replica=name,
                    retry_after_s=1,
                    store_timeout_s=2.0,
                    **options,
                )
            else:
                app = create_app(make_settings(session_store=store, replica_id=name, **options))
            clients.append(await stack.enter_async_context(async_serving(app)))
        yield clients


async def until(condition, what: str, limit_s: float = 30.0) -> None:
    """Let the event loop run until `condition` holds (another task gets there): each turn
    yields to the loop, which also polls the store's sockets; the limit only bounds a bug."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


def durability_of(client: httpx.AsyncClient) -> SessionDurability:
    return client._transport.app.state.runtime.durability


def held_here(client: httpx.AsyncClient) -> int:
    return len(client._transport.app.state.runtime.sessions)


async def push(client, sid: str, start: int, stop: int) -> httpx.Response:
    body = {"inputs": ROWS[start:stop], "offset": start}
    return await client.post(f"/v1/sessions/{sid}/steps", json=body)


async def whole(client) -> list:
    r = await client.post("/v1/models/tiny/predict", json={"inputs": [ROWS]})
    return r.json()["outputs"][0]


@pytest.mark.asyncio
async def test_a_session_follows_its_requests_exactly(make_settings, store):
    async with replicas(make_settings, store) as (a, b):
        r = await a.post("/v1/sessions", json={"model": "tiny", "prefix": ROWS[:5]})
        sid, outputs = r.json()["session_id"], r.json()["outputs"]
        last = await push(a, sid, 5, 40)
        outputs += last.json()["outputs"]
        # B does not hold it: it asks A to hand it off, rebuilds it, and serves the push.
        r = await push(b, sid, 40, 47)
        assert r.status_code == 200, r.text
        outputs += r.json()["outputs"]
        assert (held_here(a), held_here(b)) == (0, 1)
        # The retry of the push A applied last is a replay on B too (it moved with the session).
        again = await push(b, sid, 40, 47)
        assert again.json() == r.json()
        # And back: A takes it from B the same way.
        r = await push(a, sid, 47, 90)
        assert r.status_code == 200, r.text
        outputs += r.json()["outputs"]
        assert (held_here(a), held_here(b)) == (1, 0)
        assert_rows_close(outputs, await whole(a))
        info = (await b.get(f"/v1/sessions/{sid}")).json()
        assert info["position"] == 90 and (held_here(a), held_here(b)) == (0, 1)
        # The replay across a move: B applied nothing twice.
        assert (await push(b, sid, 47, 90)).json()["position"] == 90


@pytest.mark.asyncio
async def test_drain_writes_every_session_for_another_replica(make_settings, store):
    async with replicas(make_settings, store) as (a, b):
        sids = []
        for i in range(6):
            sid = f"drained-session-{i}"
            r = await a.post("/v1/sessions", json={"model": "tiny"}, headers={"X-Session-ID": sid})
            assert r.status_code == 201
            assert (await push(a, sid, 0, 10 + i)).status_code == 200
            sids.append(sid)
        assert await durability_of(a).drain() == 6
        assert held_here(a) == 0
        want = await whole(b)
        for i, sid in enumerate(sids):
            r = await push(b, sid, 10 + i, 60)
            assert r.status_code == 200, r.text
            assert_rows_close(r.json()["outputs"], want[10 + i : 60])
        # The last push's retry survived the move too: answered, not applied again.
        retry = await push(b, sids[0], 0, 10)
        assert retry.status_code == 409 and retry.json()["error"]["position"] == 60


@pytest.mark.asyncio
async def test_ids_are_unique_across_replicas_and_delete_is_everywhere(make_settings):
    async with replicas(make_settings, "memory") as (a, b):
        headers = {"X-Session-ID": "one-id-everywhere"}
        assert (await a.post("/v1/sessions", json={"model": "tiny"}, headers=headers)).is_success
        r = await b.post("/v1/sessions", json={"model": "tiny"}, headers=headers)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists"
        assert held_here(b) == 0
        assert (await b.delete("/v1/sessions/one-id-everywhere")).status_code == 204
        for client in (a, b):
            r = await client.get("/v1/sessions/one-id-everywhere")
            assert r.status_code == 404
        r = await a.get("/v1/sessions/never-created-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


@pytest.mark.asyncio
async def test_batched_pushes_bring_their_sessions_along(make_settings):
    async with replicas(make_settings, "memory") as (a, b):
        sids = [(await a.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]]
        sids.append((await b.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"])
        steps = [{"session_id": s, "inputs": ROWS[:8], "offset": 0} for s in sids]
        r = await a.post("/v1/steps", json={"steps": steps})
        assert r.status_code == 200, r.text
        want = await whole(a)
        for result in r.json()["results"]:
            assert result["position"] == 8, result
            assert_rows_close(result["outputs"], want[:8])
        assert (held_here(a), held_here(b)) == (2, 0)


@pytest.mark.asyncio
async def test_an_owner_that_does_not_hand_off_is_taken_over_and_fenced(make_settings, store):
    """A's worker is held, so it cannot write the session out: B takes it over from its last
    durable snapshot after handoff_timeout_s. A is told, and drops its copy unwritten."""
    async with replicas(make_settings, store, handoff_timeout_s=0.2) as (a, b):
        r = await a.post("/v1/sessions", json={"model": "tiny", "prefix": ROWS[:4]})
        sid = r.json()["session_id"]
        assert (await push(a, sid, 4, 20)).status_code == 200
        assert await durability_of(a).save_changed() == 1  # durable at 20
        assert (await push(a, sid, 20, 30)).status_code == 200  # not durable yet
        worker = a._transport.app.state.runtime.registry.get("tiny").worker
        gate, blocker = await held(worker)
        try:
            r = await push(b, sid, 30, 40)
        finally:
            gate.set()
            await blocker
        # B holds it at the last durable position: the client learns where to replay from.
        assert r.status_code == 409, r.text
        assert r.json()["error"]["position"] == 20
        await until(lambda: held_here(a) == 0, "A to drop its copy")  # it heard of the takeover
        assert held_here(b) == 1
        r = await push(b, sid, 20, 90)
        assert r.status_code == 200, r.text
        want = await whole(b)
        assert_rows_close(r.json()["outputs"], want[20:90])


@pytest.mark.asyncio
async def test_a_gone_replica_loses_only_what_followed_its_last_snapshot(make_settings):
    space = MemorySpace()
    async with replicas(make_settings, "memory", space) as (a, b):
        sid = (await a.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        assert (await push(a, sid, 0, 33)).status_code == 200
        assert await durability_of(a).save_changed() == 1
        assert await durability_of(a).save_changed() == 0  # nothing changed since
        assert (await push(a, sid, 33, 40)).status_code == 200
        await durability_of(a).store.close()  # A is gone (as after kill -9): no handoff
        r = await push(b, sid, 40, 50)
        assert r.status_code == 409 and r.json()["error"]["position"] == 33
        r = await push(b, sid, 33, 90)
        assert_rows_close(r.json()["outputs"], (await whole(b))[33:90])


@pytest.mark.asyncio
async def test_a_session_is_durable_from_its_creation(make_settings):
    async with replicas(make_settings, "memory") as (a, b):
        r = await a.post("/v1/sessions", json={"model": "tiny", "prefix": ROWS[:45]})
        sid = r.json()["session_id"]
        await durability_of(a).store.close()  # gone before any periodic snapshot
        r = await push(b, sid, 45, 60)
        assert r.status_code == 200, r.text
        assert_rows_close(r.json()["outputs"], (await whole(b))[45:60])


@pytest.mark.asyncio
async def test_a_draining_replica_still_opens_sessions_and_writes_them_out(make_settings):
    async with replicas(make_settings, "memory") as (a, b):
        a._transport.app.state.runtime.start_draining()
        assert (await a.get("/readyz")).status_code == 503
        r = await a.post("/v1/sessions", json={"model": "tiny", "prefix": ROWS[:3]})
        assert r.status_code == 201, r.text
        assert await durability_of(a).drain() == 1
        r = await push(b, r.json()["session_id"], 3, 9)
        assert_rows_close(r.json()["outputs"], (await whole(b))[3:9])


@pytest.mark.asyncio
async def test_a_busy_session_is_snapshotted_after_its_push_not_skipped(make_settings):
    space = MemorySpace()
    async with replicas(make_settings, "memory", space) as (a, _):
        sid = (await a.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        assert (await push(a, sid, 0, 5)).status_code == 200
        worker = a._transport.app.state.runtime.registry.get("tiny").worker
        gate, blocker = await held(worker)
        pushing = asyncio.ensure_future(push(a, sid, 5, 12))  # holds the session's lock
        session = a._transport.app.state.runtime.sessions.local("anonymous", sid)
        await until(session.lock.locked, "the push to take the session's lock")
        saving = asyncio.ensure_future(durability_of(a).save_changed())
        gate.set()
        await blocker
        assert (await pushing).status_code == 200
        assert await saving == 1
        record = SessionRecord.decode(space.sessions[("anonymous", sid)].record)
        assert record.position == 12 and record.last_push.offset == 5


@pytest.mark.asyncio
async def test_a_push_waiting_through_a_hand_off_follows_the_session(make_settings):
    # A push queued on the session's lock behind the hand-off to another replica does not
    # answer 404 when it finally runs: it follows the session (pulls it back) and is applied.
    async with replicas(make_settings, "memory") as (a, b):
        sid = (await a.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        url = f"/v1/sessions/{sid}/steps"
        worker = runtime_of(a._transport.app).registry.get("tiny").worker
        gate, blocker = await held(worker)
        first = asyncio.ensure_future(a.post(url, json={"inputs": ROWS[:2]}))
        await until(lambda: worker.queued >= 1, "the first push queued")
        moving = asyncio.ensure_future(b.post(url, json={"inputs": ROWS[2:4]}))
        await until(lambda: durability_of(a)._handoffs, "the hand-off asked of replica a")
        follower = asyncio.ensure_future(a.post(url, json={"inputs": ROWS[4:6]}))
        for _ in range(20):  # let the follower reach the lock, behind the hand-off
            await asyncio.sleep(0)
        gate.set()
        await blocker
        answers = await asyncio.gather(first, moving, follower)
        assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
        assert sorted(r.json()["position"] for r in answers) == [2, 4, 6]
