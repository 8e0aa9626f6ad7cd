"""The Python client against a real `tcnserve serve` process: outputs equal the checkpoint's,
sessions behave, keys separate callers, and a stream survives kill -9, TTL expiry and lost
replies with the same outputs as if nothing had happened. TTL expiry runs against uvicorn in this
process, on a fake clock the test advances."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.client import AsyncClient, Client, RetriesExhausted, RetryPolicy, ServerError
from tests.client.conftest import (
    KEY,
    MAX_BODY,
    OTHER_KEY,
    assert_outputs,
    rows_of,
    server_position,
)
from tests.service.conftest import wait_until

FAST = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=0.2)
# Covers a server restart (it imports torch and loads the models: seconds) with room to spare.
PATIENT = RetryPolicy(attempts=80, backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture
def client(live) -> Iterator[Client]:
    with Client(live.url, KEY, retry=FAST) as c:
        yield c


def session_status(url: str, session_id: str, key: str = KEY) -> int:
    headers = {"X-API-Key": key}
    return httpx.get(f"{url}/v1/sessions/{session_id}", headers=headers, timeout=10).status_code


def interrupted(rows: Iterable, at: int, action: Callable[[], None]) -> Iterator:
    """`rows`, calling `action` once all rows before index `at` have been answered."""
    for i, row in enumerate(rows):
        if i == at:
            action()
        yield row


# ----- the sync client on the shared server ---------------------------------------------------


def test_models_and_model_describe_what_is_served(client):
    assert {m["name"] for m in client.models()} == {"tiny", "tokens"}
    info = client.model("tiny")
    assert (info["in_channels"], info["out_channels"], info["receptive_field"]) == (2, 2, 29)
    assert client.model("tokens")["vocab_size"] == 7
    with pytest.raises(ServerError, match="404") as caught:
        client.model("nope")
    assert caught.value.status == 404


def test_predict_equals_the_checkpoint(client, reference):
    sequences = [rows_of(length, seed=length) for length in (1, 7, 29, 90)]
    outputs = client.predict("tiny", sequences)
    last = client.predict("tiny", sequences, outputs="last")
    for x, y, y_last in zip(sequences, outputs, last, strict=True):
        assert y.dtype == np.float32 and y.shape == (len(x), 2)
        assert_outputs(y, reference("tiny", x))
        assert y_last.shape == (1, 2)
        assert_outputs(y_last, reference("tiny", x)[-1:])


def test_open_session_with_and_without_prefix(client, live, reference):
    x = rows_of(60, seed=1)
    want = client.predict("tiny", [x])[0]
    with client.open_session("tiny", prefix=x[:35]) as session:
        assert session.position == 35 and session.model == "tiny"
        assert_outputs(session.prefix_outputs, want[:35])
        assert_outputs(session.push(x[35:]), want[35:])
        assert server_position(live.url, session.id) == 60
    with client.open_session("tiny") as session:
        assert session.position == 0 and len(session.prefix_outputs) == 0
        assert_outputs(session.push(x), reference("tiny", x))


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_stream_equals_predict_and_the_context_manager_closes(client, live, binary, chunk):
    x = rows_of(80, seed=2)
    want = client.predict("tiny", [x])[0]
    with client.open_session("tiny") as session:
        outputs = list(session.stream(x, chunk=chunk, binary=binary))
        assert all(y.shape == (2,) for y in outputs)
        assert_outputs(np.stack(outputs), want)
        assert session.position == server_position(live.url, session.id) == 80
    assert session_status(live.url, session.id) == 404
    session.close()  # closing a session already gone is fine


def test_push_step_and_stream_share_one_session(client, reference):
    x = rows_of(50, seed=3)
    with client.open_session("tiny", prefix=x[:5]) as session:
        parts = [session.prefix_outputs, session.push(x[5:15])]
        step = session.step(x[15])
        assert step.shape == (2,)
        parts.append(step[None])
        parts.append(np.stack(list(session.stream(x[16:40], chunk=7))))
        parts.append(session.push(x[40:]))
        assert session.position == 50
    assert_outputs(np.concatenate(parts), reference("tiny", x))


def test_snapshot_and_reset(client, live, reference):
    x = rows_of(50, seed=4)
    with client.open_session("tiny") as session:
        session.push(x[:10])
        snapshot = session.snapshot()
        assert (snapshot["session_id"], snapshot["model"]) == (session.id, "tiny")
        assert snapshot["position"] == 10
        assert_outputs(snapshot["inputs"], x[:10], atol=0)
        session.push(x[10:])
        snapshot = session.snapshot()
        assert snapshot["position"] == 50
        assert_outputs(snapshot["inputs"], x[-28:], atol=0)  # the last R - 1 rows

        session.reset()
        assert session.position == server_position(live.url, session.id) == 0
        assert session.snapshot() == {
            "session_id": session.id,
            "model": "tiny",
            "position": 0,
            "inputs": [],
        }
        again = np.stack(list(session.stream(x[:20], chunk=3)))
        assert_outputs(again, reference("tiny", x[:20]))  # from a clean state


def test_token_model_through_the_client(client, reference):
    ids = np.random.default_rng(5).integers(0, 7, size=40)
    want = reference("tokens", ids)
    assert_outputs(client.predict("tokens", [ids])[0], want)
    assert_outputs(client.predict("tokens", [ids.tolist()], outputs="last")[0], want[-1:])
    with client.open_session("tokens", prefix=ids[:5]) as session:
        parts = [session.prefix_outputs, session.push(ids[5:12]), session.step(ids[12])[None]]
        parts.append(np.stack(list(session.stream(ids[13:], chunk=4))))  # text frames
        assert_outputs(np.concatenate(parts), want)
        snapshot = session.snapshot()
        assert snapshot["position"] == 40
        assert snapshot["inputs"] == [[int(i)] for i in ids[-6:]]  # R - 1 = 6 token ids


def test_api_keys_authenticate_and_separate_sessions(live, client, reference):
    for key in (None, "wrong-key-0123456789abcdef"):
        with Client(live.url, key, retry=FAST) as stranger, pytest.raises(ServerError) as e:
            stranger.models()
        assert (e.value.status, e.value.code) == (401, "unauthorized")

    x, other_x = rows_of(30, seed=6), rows_of(30, seed=7)
    with (
        Client(live.url, OTHER_KEY, retry=FAST) as other,
        client.open_session("tiny", session_id="shared-session-id-1") as mine,
    ):
        first = mine.push(x[:10])
        assert session_status(live.url, mine.id, key=OTHER_KEY) == 404
        # The same id under another key is another session altogether.
        with other.open_session("tiny", session_id=mine.id) as theirs:
            assert_outputs(theirs.push(other_x), reference("tiny", other_x))
            assert_outputs(np.concatenate([first, mine.push(x[10:])]), reference("tiny", x))
            assert server_position(live.url, mine.id, KEY) == 30
            assert server_position(live.url, theirs.id, OTHER_KEY) == 30
        assert session_status(live.url, mine.id) == 200  # their close did not touch mine


# ----- the asyncio client ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_client_models_predict_and_keys(live, reference):
    sequences = [rows_of(length, seed=length) for length in (3, 40)]
    async with AsyncClient(live.url, KEY, retry=FAST) as c:
        assert {m["name"] for m in await c.models()} == {"tiny", "tokens"}
        assert (await c.model("tiny"))["receptive_field"] == 29
        outputs = await c.predict("tiny", sequences)
        last = await c.predict("tiny", sequences, outputs="last")
        for x, y, y_last in zip(sequences, outputs, last, strict=True):
            assert_outputs(y, reference("tiny", x))
            assert_outputs(y_last, reference("tiny", x)[-1:])
    async with AsyncClient(live.url, "wrong-key-0123456789abcdef", retry=FAST) as c:
        with pytest.raises(ServerError, match="401"):
            await c.models()


@pytest.mark.asyncio
@pytest.mark.parametrize(("binary", "chunk"), [(True, 7), (False, 1)], ids=["binary", "json"])
async def test_async_sessions_equal_predict(live, reference, binary, chunk):
    x = rows_of(70, seed=8)
    want = reference("tiny", x)
    async with AsyncClient(live.url, KEY, retry=FAST) as c:
        async with await c.open_session("tiny", prefix=x[:20]) as session:
            parts = [session.prefix_outputs, await session.push(x[20:30])]
            parts.append((await session.step(x[30]))[None])
            parts.append(np.stack([y async for y in session.stream(x[31:], chunk, binary)]))
            assert_outputs(np.concatenate(parts), want)
            snapshot = await session.snapshot()
            assert snapshot["position"] == 70
            assert_outputs(snapshot["inputs"], x[-28:], atol=0)
            await session.reset()
            assert session.position == server_position(live.url, session.id) == 0
            assert_outputs(await session.push(x[:10]), want[:10])
        assert session_status(live.url, session.id) == 404


@pytest.mark.asyncio
async def test_async_stream_cancelled_mid_push_reads_no_stale_answer(live, reference):
    # The stream is cancelled (as by asyncio.wait_for) after its push was sent and applied,
    # before the answer was read: the next stream must neither read that answer as its own nor
    # trust the server's position.
    x, cancelled, y = rows_of(20, seed=11), rows_of(5, seed=12), rows_of(5 * 3, seed=13)
    want = reference("tiny", np.concatenate([x, y]))
    client = AsyncClient(live.url, KEY, retry=FAST)
    async with client, await client.open_session("tiny", prefix=x) as session:
        socket = session._socket
        recv = socket.recv
        reading = asyncio.Event()

        async def unread_recv():
            reading.set()
            await asyncio.Future()  # never done: the answer stays unread until the cancel

        socket.recv = unread_recv
        push = asyncio.ensure_future(anext(session.stream(cancelled, chunk=5)))
        await reading.wait()

        def applied() -> bool:
            return server_position(live.url, session.id) == 25

        await asyncio.to_thread(wait_until, applied, "the server to apply the push")
        push.cancel()
        with pytest.raises(asyncio.CancelledError):
            await push
        socket.recv = recv
        assert session.position == 20
        got = np.stack([row async for row in session.stream(y, chunk=5)])
        assert_outputs(got, want[20:])
        assert server_position(live.url, session.id) == session.position == 35


# ----- resume by replay: kill -9 and restart --------------------------------------------------


def test_websocket_stream_survives_kill_and_restart(killable, reference):
    """The server dies (SIGKILL) 80 rows into a 200-row stream and comes back on the same port
    empty; the client re-creates its session from its kept inputs and goes on."""
    x = rows_of(200, seed=9)
    starts = killable.starts
    with ThreadPoolExecutor(1) as pool, Client(killable.url, retry=PATIENT) as client:
        restarted: list[Future] = []

        def kill_and_restart() -> None:
            killable.kill()
            restarted.append(pool.submit(killable.start))  # the client retries meanwhile

        with client.open_session("tiny", prefix=x[:20]) as session:
            streamed = list(session.stream(interrupted(x[20:], 60, kill_and_restart), chunk=1))
            restarted[0].result()
            assert killable.starts == starts + 1
            outputs = np.concatenate([session.prefix_outputs, np.stack(streamed)])
            assert_outputs(outputs, reference("tiny", x))
            assert server_position(killable.url, session.id) == 200


@pytest.mark.asyncio
async def test_http_pushes_survive_kill_and_restart(killable, reference):
    x = rows_of(200, seed=10)
    starts = killable.starts
    with ThreadPoolExecutor(1) as pool:
        restarted = None
        async with AsyncClient(killable.url, retry=PATIENT) as client:
            session = await client.open_session("tiny")
            parts = []
            for start in range(0, 200, 5):
                if start == 60:
                    killable.kill()
                    restarted = pool.submit(killable.start)
                parts.append(await session.push(x[start : start + 5]))
            restarted.result()
            assert killable.starts == starts + 1
            assert_outputs(np.concatenate(parts), reference("tiny", x))
            assert server_position(killable.url, session.id) == 200
            await session.close()


# ----- resume by replay: a session expired or deleted behind the client's back ---------------


def send_rows(session, transport: str, rows) -> np.ndarray:
    """Rows by HTTP pushes, or in chunks of 4 over the session's WebSocket (which stays open)."""
    if transport == "http":
        return session.push(rows)
    return np.stack(list(session.stream(rows, chunk=4)))


@pytest.mark.parametrize(
    "transport",
    [
        "http",  # answered 410
        "websocket",  # closed with 4410
    ],
)
def test_expired_session_is_restored(clocked, reference, transport):
    x = rows_of(90, seed=11)
    with (
        Client(clocked.url, KEY, retry=FAST) as client,
        client.open_session("tiny", ttl_s=30) as session,
    ):
        first = send_rows(session, transport, x[:40])
        clocked.clock.advance(31)  # idle past its TTL
        assert session_status(clocked.url, session.id) == 410
        rest = send_rows(session, transport, x[40:])  # refused, restored from kept inputs, re-sent
        assert_outputs(np.concatenate([first, rest]), reference("tiny", x))
        assert server_position(clocked.url, session.id) == 90


@pytest.mark.parametrize(
    ("model", "transport"),
    [
        ("tiny", "http"),  # answered 404, restored from fewer than R - 1 rows
        ("tiny", "websocket"),  # closed with 4404
        ("tokens", "websocket"),  # token ids in the snapshot
    ],
)
def test_deleted_session_is_restored(client, live, reference, model, transport):
    if model == "tokens":
        x = np.random.default_rng(11).integers(0, 7, size=90)
    else:
        x = rows_of(90, seed=11)
    with client.open_session(model) as session:
        first = send_rows(session, transport, x[:10])
        r = httpx.delete(
            f"{live.url}/v1/sessions/{session.id}", headers={"X-API-Key": KEY}, timeout=10
        )
        assert r.status_code == 204
        rest = send_rows(session, transport, x[10:])  # refused, restored from kept inputs, re-sent
        assert_outputs(np.concatenate([first, rest]), reference(model, x))
        assert server_position(live.url, session.id) == 90


# ----- lost replies: retried with the same offset, applied once -------------------------------


def test_lost_push_reply_is_retried_not_applied_twice(proxy, live, reference):
    x = rows_of(60, seed=12)
    with Client(proxy.url, KEY, retry=FAST) as client, client.open_session("tiny") as session:
        proxy.lose_reply_to("/steps", nth=3)
        outputs = [session.push(x[i : i + 6]) for i in range(0, 60, 6)]
        assert proxy.lost == [f"/v1/sessions/{session.id}/steps"]
        assert_outputs(np.concatenate(outputs), reference("tiny", x))
        assert session.position == server_position(live.url, session.id) == 60
    heads = [(h.method, h.path.rsplit("/", 1)[-1]) for h in proxy.heads]
    assert heads.count(("POST", "steps")) == 11  # ten pushes, one of them sent twice
    assert heads.count(("POST", "sessions")) == 1  # answered from the stored reply: no rebuild


def test_lost_create_reply_is_retried(proxy, live, reference):
    x = rows_of(40, seed=13)
    with Client(proxy.url, KEY, retry=FAST) as client:
        client.model("tiny")  # so the next request through the proxy is the create
        proxy.lose_reply_to("/v1/sessions", nth=1)
        with client.open_session("tiny", prefix=x[:25]) as session:
            assert proxy.lost == ["/v1/sessions"]
            outputs = np.concatenate([session.prefix_outputs, session.push(x[25:])])
            assert_outputs(outputs, reference("tiny", x))
            assert server_position(live.url, session.id) == 40


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_lost_websocket_answer_is_resent_not_applied_twice(proxy, live, reference, binary):
    x = rows_of(40, seed=14)
    with Client(proxy.url, KEY, retry=FAST) as client, client.open_session("tiny") as session:
        proxy.lose_websocket_answer(nth=4)
        outputs = np.stack(list(session.stream(x, chunk=3, binary=binary)))
        assert proxy.lost == [f"/v1/sessions/{session.id}/stream?framing=offset"]
        assert_outputs(outputs, reference("tiny", x))
        assert session.position == server_position(live.url, session.id) == 40
    upgrades = [h for h in proxy.heads if h.path.endswith("/stream?framing=offset")]
    assert len(upgrades) == 2  # reconnected once
    assert [h.method for h in proxy.heads].count("DELETE") == 1  # only the final close


@pytest.mark.asyncio
async def test_async_lost_websocket_answer_is_resent(proxy, live, reference):
    x = rows_of(30, seed=15)
    async with (
        AsyncClient(proxy.url, KEY, retry=FAST) as client,
        await client.open_session("tiny") as session,
    ):
        proxy.lose_websocket_answer(nth=2)
        outputs = np.stack([y async for y in session.stream(x, chunk=4)])
        assert len(proxy.lost) == 1
        assert_outputs(outputs, reference("tiny", x))
        assert server_position(live.url, session.id) == 30


# ----- X-Session-ID ---------------------------------------------------------------------------


@pytest.mark.parametrize("chosen", [None, "chosen-session-id-1"])
def test_every_session_request_carries_x_session_id(proxy, chosen):
    x = rows_of(12, seed=16)
    with Client(proxy.url, KEY, retry=FAST) as client:
        with client.open_session("tiny", prefix=x[:2], session_id=chosen) as session:
            session.push(x[2:5])
            list(session.stream(x[5:], chunk=3))
            session.snapshot()
            session.reset()
        assert chosen is None or session.id == chosen
    session_heads = [h for h in proxy.heads if h.path.startswith("/v1/sessions")]
    kinds = {(h.method, h.path.split("?")[0].rsplit("/", 1)[-1]) for h in session_heads}
    assert kinds == {
        ("POST", "sessions"),
        ("POST", "steps"),
        ("GET", "stream"),
        ("GET", "snapshot"),
        ("POST", "reset"),
        ("DELETE", session.id),
    }
    assert {h.headers.get("x-session-id") for h in session_heads} == {session.id}


# ----- known client bugs ----------------------------------------------------------------------


def test_websocket_message_too_big_is_a_server_error(client, live):
    too_many = MAX_BODY // 8 + 1  # rows of 2 float32: one more than fits
    with client.open_session("tiny") as session:
        with pytest.raises(ServerError):
            list(session.stream(rows_of(too_many, seed=17), chunk=too_many))
        assert server_position(live.url, session.id) == 0


def test_a_full_quota_says_so_when_retries_run_out(live):
    refusing = RetryPolicy(attempts=2, backoff_s=0.01, max_backoff_s=0.01)  # ignores Retry-After
    with Client(live.url, KEY, retry=refusing) as client:
        sessions = []
        try:
            # The shared server has 16 slots and two keys: each key may hold 3/4 of them.
            with pytest.raises(RetriesExhausted, match="key_quota_exceeded"):
                for _ in range(13):
                    sessions.append(client.open_session("tiny"))
        finally:
            for session in sessions:
                session.close()


def test_a_client_closes_the_sessions_it_opened_unless_told_to_keep_them(live):
    with Client(live.url, KEY, retry=FAST) as c:
        gone = [c.open_session("tiny").id for _ in range(3)]
        closed = c.open_session("tiny")
        closed.close()  # closed already: not closed twice
    assert [session_status(live.url, s) for s in gone] == [404, 404, 404]
    with Client(live.url, KEY, retry=FAST, keep_sessions=True) as c:
        kept = c.open_session("tiny").id
    assert session_status(live.url, kept) == 200
    httpx.delete(f"{live.url}/v1/sessions/{kept}", headers={"X-API-Key": KEY})

    async def main() -> str:
        async with AsyncClient(live.url, KEY, retry=FAST) as ac:
            return (await ac.open_session("tiny")).id

    assert session_status(live.url, asyncio.run(main())) == 404
