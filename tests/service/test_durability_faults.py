"""The session store failing or hanging: the durability bound is enforced, not hoped for, and a
create is all or nothing whatever answer it got.

In-process stores that fail on cue (with an injected monotonic clock, so the bound is judged
without waiting), then the same against a real redis-server stopped with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from service.app import create_app
from service.store.base import MemoryStore, SessionKey, Write
from service.store.durability import SessionDurability
from tests.service.conftest import FakeClock, async_serving, random_rows, runtime_of

ROWS = random_rows(40, seed=11)
INTERVAL_S, STORE_TIMEOUT_S = 5.0, 2.0
BOUND_S = INTERVAL_S + STORE_TIMEOUT_S


class FaultyStore(MemoryStore):
    """A MemoryStore whose writes fail or hang, and whose registers lose their answer, on cue."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_saves = False
        self.hang_saves: asyncio.Event | None = None  # set: writes wait for it
        self.hanging = asyncio.Event()  # a write is waiting on hang_saves
        self.lose_register_answers = False

    async def save(self, writes: list[Write]) -> list[bool]:
        if self.fail_saves:
            raise RedisTimeout("Timeout reading from socket")
        if self.hang_saves is not None:
            self.hanging.set()
            await self.hang_saves.wait()
        return await super().save(writes)

    async def lose_the_answer(self, client: httpx.AsyncClient, body: dict) -> None:
        """POST a create whose register is applied here but answered with a timeout."""
        self.lose_register_answers = True
        try:
            r = await client.post("/v1/sessions", json=body)
        finally:
            self.lose_register_answers = False
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text

    async def register(self, key: SessionKey, record: bytes, ttl_ms: int) -> bool:
        registered = await super().register(key, record, ttl_ms)
        if self.lose_register_answers:  # applied in the store, but the answer never came
            raise RedisTimeout("Timeout reading from socket")
        return registered


@contextlib.asynccontextmanager
async def replica(
    make_settings, store: MemoryStore, clock: FakeClock, name: str = "replica-a"
) -> AsyncIterator:
    app = create_app(make_settings())
    rt = runtime_of(app)
    rt.durability = SessionDurability(
        store,
        rt.sessions,
        rt.registry,
        rt.metrics,
        replica=name,
        snapshot_interval_s=INTERVAL_S,
        handoff_timeout_s=5.0,
        retry_after_s=1,
        store_timeout_s=STORE_TIMEOUT_S,
        monotonic=clock,
    )
    async with async_serving(app) as client:
        # The periodic task would write on its own schedule: these tests call save_changed.
        for task in rt.durability._tasks:
            task.cancel()
        yield client, rt.durability


async def push(client, sid: str, start: int, stop: int) -> httpx.Response:
    body = {"inputs": ROWS[start:stop], "offset": start}
    return await client.post(f"/v1/sessions/{sid}/steps", json=body)


@pytest.mark.asyncio
async def test_pushes_are_refused_once_they_would_pass_the_bound_unstored(make_settings):
    store, clock = FaultyStore(), FakeClock(1000.0)
    async with replica(make_settings, store, clock) as (client, durability):
        assert durability.bound_s == BOUND_S
        sid = (await client.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        other = (await client.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        assert (await push(client, sid, 0, 3)).status_code == 200  # unstored from t = 1000
        store.fail_saves = True
        assert await durability.save_changed() == 0
        clock.advance(BOUND_S - 0.5)
        assert (await push(client, sid, 3, 5)).status_code == 200
        assert await durability.save_changed() == 0
        clock.advance(1.0)  # the push at t = 1000 is now unstored for longer than the bound
        r = await push(client, sid, 5, 6)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "durability_unavailable"
        assert r.headers["retry-after"] == "1"
        assert (await client.get(f"/v1/sessions/{sid}")).json()["position"] == 5  # unchanged
        replay = await push(client, sid, 3, 5)  # the last push's retry is still answered
        assert replay.status_code == 200 and replay.json()["position"] == 5
        # A session with nothing unstored is not affected.
        assert (await push(client, other, 0, 1)).status_code == 200
        # The store answers again: the next round stores both, and pushes go on.
        store.fail_saves = False
        assert await durability.save_changed() == 2
        assert (await push(client, sid, 5, 6)).status_code == 200
        stored = await store.read(("anonymous", sid))
        assert stored is not None and stored.epoch == 1
        metrics = (await client.get("/metrics")).text
        assert "tcnserve_durability_refusals_total 1.0" in metrics
        assert "tcnserve_store_write_failures_total 2.0" in metrics


@pytest.mark.asyncio
async def test_a_write_that_hangs_counts_as_unstored(make_settings):
    store, clock = FaultyStore(), FakeClock(1000.0)
    async with replica(make_settings, store, clock) as (client, durability):
        sid = (await client.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        assert (await push(client, sid, 0, 2)).status_code == 200
        store.hang_saves = asyncio.Event()
        writing = asyncio.create_task(durability.save_changed())
        await store.hanging.wait()  # captured, now waiting on the store
        assert not writing.done()
        # Pushes after the capture go on, but the captured one's age still counts.
        assert (await push(client, sid, 2, 3)).status_code == 200
        clock.advance(BOUND_S + 0.1)
        r = await push(client, sid, 3, 4)
        assert r.status_code == 503 and r.json()["error"]["code"] == "durability_unavailable"
        store.hang_saves.set()
        assert await writing == 1
        # The write stored position 2; the push after its capture is unstored since then,
        # past the bound too.
        r = await push(client, sid, 3, 4)
        assert r.status_code == 503
        store.hang_saves = None
        assert await durability.save_changed() == 1
        assert (await push(client, sid, 3, 4)).status_code == 200


class GatedStore(MemoryStore):
    """A MemoryStore whose next writes each wait for their own gate, then land or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[tuple[asyncio.Event, bool]] = []  # (opens it, it fails)
        self.waiting = 0

    def gate(self, fails: bool) -> asyncio.Event:
        opened = asyncio.Event()
        self.gates.append((opened, fails))
        return opened

    async def save(self, writes: list[Write]) -> list[bool]:
        if not self.gates:
            return await super().save(writes)
        opened, fails = self.gates.pop(0)
        self.waiting += 1
        await opened.wait()
        self.waiting -= 1
        if fails:
            raise RedisTimeout("Timeout reading from socket")
        return await super().save(writes)


async def until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_write_that_fails_after_a_later_one_landed_gives_nothing_back(make_settings):
    store, clock = GatedStore(), FakeClock(1000.0)
    async with replica(make_settings, store, clock) as (client, durability):
        sid = (await client.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        assert (await push(client, sid, 0, 2)).status_code == 200  # unstored from t = 1000
        first = store.gate(fails=True)
        slow = asyncio.create_task(durability.save_changed())
        await until(lambda: store.waiting == 1)  # captured, waiting on the store
        assert await durability.save_changed() == 1  # a later write stores position 2
        first.set()
        assert await slow == 0  # the earlier one fails: what it held is stored already
        clock.advance(BOUND_S + 1.0)
        assert (await push(client, sid, 2, 3)).status_code == 200


@pytest.mark.asyncio
async def test_an_earlier_write_landing_leaves_a_later_ones_pushes_counted(make_settings):
    store, clock = GatedStore(), FakeClock(1000.0)
    async with replica(make_settings, store, clock) as (client, durability):
        sid = (await client.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        assert (await push(client, sid, 0, 2)).status_code == 200
        first, second = store.gate(fails=False), store.gate(fails=False)
        earlier = asyncio.create_task(durability.save_changed())
        await until(lambda: store.waiting == 1)
        clock.advance(1.0)
        assert (await push(client, sid, 2, 3)).status_code == 200  # unstored from t = 1001
        later = asyncio.create_task(durability.save_changed())
        await until(lambda: store.waiting == 2)
        first.set()
        assert await earlier == 1  # position 2 stored; position 3 is still in flight
        clock.advance(BOUND_S + 0.5)  # the push at t = 1001 is past the bound, unstored
        r = await push(client, sid, 3, 4)
        assert r.status_code == 503 and r.json()["error"]["code"] == "durability_unavailable"
        second.set()
        assert await later == 1
        assert (await push(client, sid, 3, 4)).status_code == 200


@pytest.mark.asyncio
async def test_a_create_whose_answer_was_lost_exists_nowhere(make_settings):
    store, clock = FaultyStore(), FakeClock(1000.0)
    async with replica(make_settings, store, clock) as (client, durability):
        body = {"model": "tiny", "session_id": "lost-answer-1", "prefix": ROWS[:3]}
        await store.lose_the_answer(client, body)
        assert await store.read(("anonymous", "lost-answer-1")) is not None  # applied there
        # It does not exist here, however it is asked for...
        assert (await client.get("/v1/sessions/lost-answer-1")).status_code == 404
        # ...and a retry of the same create succeeds, once, with the same outputs.
        again = await client.post("/v1/sessions", json=body)
        assert again.status_code == 201, again.text
        assert again.json()["position"] == 3
        assert (await client.post("/v1/sessions", json=body)).status_code == 409

        # Not retried: the record is deleted once the store answers.
        other = {**body, "session_id": "lost-answer-2"}
        await store.lose_the_answer(client, other)
        cleanup = durability._cleanups[("anonymous", "lost-answer-2")]
        await asyncio.wait_for(cleanup, 30)  # two answered deletes, a second apart
        assert not durability._cleanups
        assert await store.read(("anonymous", "lost-answer-2")) is None
        assert (await client.get("/v1/sessions/lost-answer-2")).status_code == 404


@pytest.mark.asyncio
async def test_registers_are_idempotent_for_the_same_record_only():
    store = MemoryStore()
    await store.connect("replica-a", _ignore)
    key = ("owner", "session-0001")
    assert await store.register(key, b"record", 1000)
    assert await store.register(key, b"record", 1000)  # a retry of the same register
    assert not await store.register(key, b"other record", 1000)
    elsewhere = MemoryStore(store.space)
    await elsewhere.connect("replica-b", _ignore)
    assert not await elsewhere.register(key, b"record", 1000)  # another replica's


async def _ignore(kind: str, owner: str, session_id: str) -> None:
    pass


# ----- against a real redis-server, stopped with SIGSTOP -----------------------------------------


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_stalled_redis_never_loses_more_than_the_bound(make_settings, tmp_path):
    from tests.service.conftest import REDIS_SERVER, redis_server

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with redis_server(tmp_path) as url:
        pid = int(_redis_pid(url))
        settings = make_settings(
            session_store=url, snapshot_interval_s=0.5, store_timeout_s=0.3, replica_id="r-a"
        )
        app = create_app(settings)
        async with async_serving(app) as client:
            durability = runtime_of(app).durability
            bound = 0.8
            # Registered before the create answers: durable from here.
            sid = (await client.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
            acked: list[float] = []
            os.kill(pid, signal.SIGSTOP)
            try:
                position, refused = 0, None
                stopped = time.monotonic()
                # As fast as pushes are answered: what stops them is the bound, in real time
                # (the point here is a real Redis that does not answer).
                while time.monotonic() - stopped < 10:
                    r = await one_row(client, sid, position)
                    if r.status_code == 503:
                        refused = r
                        break
                    assert r.status_code == 200, r.text
                    acked.append(time.monotonic())
                    position += 1
                assert refused is not None, "pushes were never refused while Redis was stopped"
                assert refused.json()["error"]["code"] == "durability_unavailable"
                # Every push acknowledged while nothing reached the store falls in one bound.
                assert acked[-1] - acked[0] <= bound + 0.2, (acked[0], acked[-1])
                before = (await client.get(f"/v1/sessions/{sid}")).json()["position"]
                assert before == position  # the refused push changed nothing

                # A create during the stall: 503, and then it exists nowhere.
                body = {"model": "tiny", "session_id": "created-during-stall"}
                assert (await client.post("/v1/sessions", json=body)).status_code == 503
            finally:
                os.kill(pid, signal.SIGCONT)
            assert (await client.get("/v1/sessions/created-during-stall")).status_code == 404
            # Pushes are taken again once a round stores the session.
            assert await durability.save_changed() >= 1
            r = await one_row(client, sid, position)
            assert r.status_code == 200, r.text
            # The create's retry succeeds whether or not Redis applied the first try.
            assert (await client.post("/v1/sessions", json=body)).status_code == 201


async def one_row(client, sid: str, position: int) -> httpx.Response:
    body = {"inputs": [[0.25, 0.5]], "offset": position}
    return await client.post(f"/v1/sessions/{sid}/steps", json=body)


def _redis_pid(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return client.info("server")["process_id"]
    except RedisError as e:  # pragma: no cover - the fixture checked it answers
        raise AssertionError(f"redis-server does not answer: {e}") from None
    finally:
        client.close()


@pytest.mark.asyncio
async def test_a_session_that_moves_away_and_back_starts_its_bound_afresh(make_settings):
    from service.store.base import MemorySpace

    space, clock = MemorySpace(), FakeClock(1000.0)
    async with (
        replica(make_settings, MemoryStore(space), clock, "replica-a") as (a, a_durability),
        replica(make_settings, MemoryStore(space), clock, "replica-b") as (b, b_durability),
    ):
        sid = (await a.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        assert (await push(a, sid, 0, 2)).status_code == 200  # unstored on A from t = 1000
        assert (await push(b, sid, 2, 4)).status_code == 200  # handed off: stored, moved to B
        clock.advance(BOUND_S + 1)
        assert await b_durability.save_changed() == 1  # B stores its push
        r = await push(a, sid, 4, 6)  # back to A: what A knew of it before must not count
        assert r.status_code == 200, r.text
        assert set(a_durability._unsaved_since) == {("anonymous", sid)}
        assert not b_durability._unsaved_since and not b_durability._writing
        # Taken over without a handoff (what a forced takeover tells the old owner): A forgets
        # the session's unstored pushes with it.
        await a_durability._on_message("taken", "anonymous", sid)
        assert not a_durability._unsaved_since and not a_durability._writing


@pytest.mark.asyncio
async def test_another_create_of_a_lost_id_replaces_the_unanswered_one(make_settings):
    store, clock = FaultyStore(), FakeClock(1000.0)
    async with replica(make_settings, store, clock) as (client, durability):
        first = {"model": "tiny", "session_id": "lost-then-other", "prefix": ROWS[:3]}
        await store.lose_the_answer(client, first)
        other = {**first, "prefix": ROWS[:5]}
        r = await client.post("/v1/sessions", json=other)
        assert r.status_code == 201, r.text
        assert r.json()["position"] == 5
        assert not durability._unconfirmed and not durability._cleanups
        info = (await client.get("/v1/sessions/lost-then-other")).json()
        assert info["position"] == 5


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


@pytest.mark.asyncio
async def test_a_store_that_never_answers_stops_the_start_in_one_line_without_its_password(
    make_settings, monkeypatch, caplog
):
    import service.store.durability as durability

    monkeypatch.setattr(durability, "STORE_CONNECT_TIMEOUT_S", 0.3)
    port = _closed_port()
    app = create_app(make_settings(session_store=f"redis://user:s3cret@127.0.0.1:{port}/0"))
    async with app.router.lifespan_context(app):
        rt = runtime_of(app)
        await asyncio.to_thread(rt.loaded.wait, 60)
        error = rt.load_error
        assert error.startswith(
            f"the session store at redis://127.0.0.1:{port}/0 did not answer for 0.3 s (Error 111"
        ), error
        assert error.endswith("): start it, or name another with --session-store / "
                              "TCNSERVE_SESSION_STORE"), error  # fmt: skip
    assert "s3cret" not in caplog.text
    assert not any(r.exc_info for r in caplog.records), "a deployment fault is not a traceback"
    assert "retrying for up to 0.3 s" in caplog.text
