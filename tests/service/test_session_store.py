"""The session store's contract, on both stores (in-process and a real Redis): records as bytes,
atomic claims, fencing by epoch, handoff and takeover messages."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from service.sessions.record import RecordError, SessionRecord
from service.sessions.state import AppliedPush
from service.store.base import MemorySpace, MemoryStore, Stored, Write
from service.store.redis_store import RedisStore

KEY = ("key-0123456789ab", "session-0001")
TTL_MS = 60_000


def test_a_record_round_trips_as_raw_bytes():
    rows = np.arange(28 * 2, dtype=np.float32).reshape(28, 2) / 7
    outputs = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    digest = hashlib.blake2b(rows[-3:].tobytes(), digest_size=16).digest()
    record = SessionRecord("tiny", 600.0, 57, rows, AppliedPush(54, 3, digest, outputs))
    data = record.encode()
    assert rows.tobytes() in data  # float32 little-endian, not JSON numbers
    back = SessionRecord.decode(data)
    assert (back.model, back.ttl_s, back.position) == ("tiny", 600.0, 57)
    np.testing.assert_array_equal(back.rows, rows)
    assert back.rows.dtype == np.float32 and back.rows.flags.writeable
    assert back.last_push.offset == 54 and back.last_push.digest == digest
    np.testing.assert_array_equal(back.last_push.outputs, outputs)


def test_token_ids_and_empty_records_round_trip():
    tokens = SessionRecord("tokens", 5.0, 3, np.array([4, 0, 6], dtype=np.int64))
    back = SessionRecord.decode(tokens.encode())
    np.testing.assert_array_equal(back.rows, [4, 0, 6])
    assert back.rows.dtype == np.int64 and back.last_push is None
    empty = SessionRecord.decode(SessionRecord("tiny", 5.0, 0, np.zeros((0, 2), "f4")).encode())
    assert empty.rows.shape == (0, 2) and empty.position == 0


@pytest.mark.parametrize(
    "data", [b"", b"\x05\x00\x00\x00{}", b"\x02\x00\x00\x00{}"], ids=["empty", "short", "bad"]
)
def test_bytes_that_are_not_a_record_are_refused(data):
    with pytest.raises(RecordError):
        SessionRecord.decode(data)


def test_a_truncated_record_is_refused():
    data = SessionRecord("tiny", 5.0, 4, np.ones((4, 2), "f4")).encode()
    with pytest.raises(RecordError, match="truncated"):
        SessionRecord.decode(data[:-4])


@pytest.fixture(params=["memory", "redis"])
def stores(request):
    """A factory of stores that share one backend (one per replica)."""
    if request.param == "memory":
        space = MemorySpace()
        return lambda: MemoryStore(space)
    url = request.getfixturevalue("redis_url")
    return lambda: RedisStore(url)


class Inbox:
    """Messages a replica received, and a way to wait for the next ones."""

    def __init__(self):
        self.messages: list[tuple[str, str, str]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, kind: str, owner: str, session_id: str) -> None:
        self.messages.append((kind, owner, session_id))
        self.arrived.set()

    async def next(self) -> tuple[str, str, str]:
        await asyncio.wait_for(self.arrived.wait(), 10)
        self.arrived.clear()
        return self.messages[-1]


async def connected(make, name: str) -> tuple[object, Inbox]:
    store, inbox = make(), Inbox()
    await store.connect(name, inbox)
    return store, inbox


@pytest.mark.asyncio
async def test_register_claim_handoff_and_release(stores):
    a, a_inbox = await connected(stores, "replica-a")
    b, _ = await connected(stores, "replica-b")
    try:
        assert await a.register(KEY, b"v1", TTL_MS)
        assert not await b.register(KEY, b"other", TTL_MS)  # the id is taken
        assert (await b.claim(("key-0123456789ab", "no-such-session"))).status == "missing"
        # The owner is alive: it is asked to hand off, nothing changes hands.
        busy = await b.claim(KEY)
        assert (busy.status, busy.epoch) == ("busy", 1)
        assert await a_inbox.next() == ("handoff", *KEY)
        assert (await a.read(KEY)).replica == "replica-a"
        # It writes its last snapshot and releases: the next claim takes it at once.
        assert await a.save([Write(KEY, 1, b"v2", TTL_MS, release=True)]) == [True]
        assert (await a.read(KEY)).replica == ""
        taken = await b.claim(KEY)
        assert (taken.status, taken.epoch, taken.record) == ("taken", 2, b"v2")
        stored = await b.read(KEY)
        assert (stored.replica, stored.epoch) == ("replica-b", 2)
        # The old owner's writes are fenced off from now on.
        assert await a.save([Write(KEY, 1, b"stale", TTL_MS)]) == [False]
        assert not await a.delete(KEY, 1)
        assert (await b.read(KEY)).record == b"v2"
        assert await b.save([Write(KEY, 2, b"v3", TTL_MS), Write(KEY, 1, b"x", TTL_MS)]) == [
            True,
            False,
        ]
        assert await b.delete(KEY, 2) and await b.read(KEY) is None
        # A record the store lost is written again by its owner (a Redis restart loses all).
        assert await b.save([Write(KEY, 2, b"v4", TTL_MS)]) == [True]
        assert (await a.read(KEY)) == Stored("replica-b", 2, b"v4")
        assert await b.save([Write(("anonymous", "lost-0001"), 3, None, TTL_MS)]) == [False]
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_a_forced_takeover_fences_the_live_owner_and_tells_it(stores):
    a, a_inbox = await connected(stores, "replica-a")
    b, _ = await connected(stores, "replica-b")
    try:
        assert await a.register(KEY, b"v1", TTL_MS)
        taken = await b.claim(KEY, force=True)
        assert (taken.status, taken.epoch, taken.record) == ("taken", 2, b"v1")
        assert await a_inbox.next() == ("taken", *KEY)
        assert await a.save([Write(KEY, 1, b"late", TTL_MS)]) == [False]
        assert (await b.read(KEY)).record == b"v1"
        again = await b.claim(KEY)  # its own: no new epoch
        assert (again.status, again.epoch) == ("taken", 2)
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_sessions_of_a_gone_replica_are_taken_at_once(stores):
    a, _ = await connected(stores, "replica-a")
    b, _ = await connected(stores, "replica-b")
    try:
        assert await a.register(KEY, b"v1", TTL_MS)
        await a.close()  # gone: no heartbeat any more
        taken = await b.claim(KEY)
        assert (taken.status, taken.epoch, taken.record) == ("taken", 2, b"v1")
    finally:
        await b.close()


@pytest.mark.asyncio
async def test_concurrent_claims_have_one_winner(stores):
    a, _ = await connected(stores, "replica-a")
    a_key = ("anonymous", "contested-01")
    assert await a.register(a_key, b"v1", TTL_MS)
    await a.save([Write(a_key, 1, None, TTL_MS, release=True)])  # released, record kept
    others = [await connected(stores, f"replica-{i}") for i in range(4)]
    try:
        claims = await asyncio.gather(*(s.claim(a_key) for s, _ in others))
        taken = [c for c in claims if c.status == "taken"]
        # Released: the first claim takes it; the others find a live owner and get `busy`.
        assert len(taken) == 1 and taken[0].epoch == 2 and taken[0].record == b"v1"
        assert sorted(c.status for c in claims) == ["busy", "busy", "busy", "taken"]
    finally:
        await a.close()
        for s, _ in others:
            await s.close()
