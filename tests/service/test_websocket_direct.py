"""The WebSocket direct path (service/ws/protocol.py, `_DirectPushes` in service/ws/stream.py)
under a real uvicorn server with the protocol `tcnserve serve` uses: binary pushes started in
the callback that parsed them, everything else on the ASGI path, one at a time and in order
either way. The server runs in a thread of this process, so a test can hold the model worker
and see which path a push took (a spy on `SessionManager.start_push`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from service.app import create_app
from service.protocol.wire import decode_frame, encode_frame
from service.sessions.manager import SessionManager
from service.ws.protocol import ReleasingWebSocketProtocol
from tests.service.conftest import (
    TINY,
    assert_rows_close,
    held,
    random_rows,
    runtime_of,
    until_queued_from_elsewhere,
    uvicorn_thread,
    wait_until,
)

OUT = TINY.output_size
KEY = "direct-path-key-0123456789"
PROTOCOL = {"ws": ReleasingWebSocketProtocol, "ws_per_message_deflate": False}


@pytest.fixture
def started(monkeypatch) -> dict[str, int]:
    """How many pushes the direct path offered to `start_push`, and how many it started."""
    counts = {"offered": 0, "started": 0}
    original = SessionManager.start_push

    def spy(self, handle, x, offset, reply) -> bool:
        counts["offered"] += 1
        ok = original(self, handle, x, offset, reply)
        counts["started"] += ok
        return ok

    monkeypatch.setattr(SessionManager, "start_push", spy)
    return counts


@contextlib.contextmanager
def server(make_settings, **settings: Any) -> Iterator[tuple[str, Any]]:
    app = create_app(make_settings(**settings))
    with uvicorn_thread(app, **PROTOCOL) as (url, _):
        yield url, app


def ws(url: str, path: str, **kwargs: Any):
    return connect(url.replace("http://", "ws://") + path, proxy=None, compression=None, **kwargs)


def frame(rows: list, offset: int | None = None) -> bytes:
    return encode_frame(np.asarray(rows, np.float32), offset)


async def expected(http: httpx.AsyncClient, sequences: list) -> list:
    r = await http.post("/v1/models/tiny/predict", json={"inputs": sequences})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_the_protocol_offers_the_direct_path_with_this_uvicorn():
    # Feature-detected (another uvicorn may lack what it reads): with the pinned stack it must
    # be on, or every message silently takes the slower path.
    assert ReleasingWebSocketProtocol._direct_supported


@pytest.mark.asyncio
async def test_api_keys_in_upgrade_headers_open_direct_streams(make_settings):
    with server(make_settings, api_keys=[KEY]) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            r = await http.post("/v1/sessions", json={"model": "tiny"}, headers={"X-API-Key": KEY})
            sid = r.json()["session_id"]
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            async with ws(url, f"/v1/sessions/{sid}/stream", additional_headers=headers) as s:
                await s.send(frame([[0.1, 0.2]]))
                assert len(decode_frame(await s.recv(), OUT, False)[1]) == 1
        async with ws(url, f"/v1/sessions/{sid}/stream") as s:
            with pytest.raises(ConnectionClosed) as closed:
                await s.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def stream(url: str, http: httpx.AsyncClient, rows: list, chunks: list[int], seed: int):
    """One session's rows over one socket, in `chunks`, mixing binary frames (with and without
    offsets), text messages and, on the same session, HTTP pushes between them."""
    rng = random.Random(seed)
    sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
    outputs: list = []
    position = 0
    async with ws(url, f"/v1/sessions/{sid}/stream?framing=offset") as s:
        for size in chunks:
            chunk = rows[position : position + size]
            how = rng.choice(["binary", "binary", "binary", "text", "http"])
            if how == "binary":
                await s.send(frame(chunk, position))
                header, out = decode_frame(await s.recv(), OUT, True)
                assert header == position + size
                outputs += out.tolist()
            elif how == "text":
                await s.send(json.dumps({"inputs": chunk, "offset": position}))
                reply = json.loads(await s.recv())
                assert reply["position"] == position + size
                outputs += reply["outputs"]
            else:
                body = {"inputs": chunk, "offset": position}
                r = await http.post(f"/v1/sessions/{sid}/steps", json=body)
                assert r.status_code == 200, r.text
                outputs += r.json()["outputs"]
            position += size
    return outputs


@pytest.mark.asyncio
async def test_direct_pushes_mixed_with_text_and_http_equal_the_full_forward(
    make_settings, started
):
    rng = random.Random(11)
    sequences = [random_rows(rng.randint(10, 40), seed=1100 + i) for i in range(12)]
    plans = []
    for seq in sequences:
        sizes: list[int] = []
        while sum(sizes) < len(seq):
            sizes.append(min(rng.choice([1, 1, 1, 2, 3, 7]), len(seq) - sum(sizes)))
        plans.append(sizes)
    with server(make_settings) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            streamed = await asyncio.gather(
                *(
                    stream(url, http, seq, plan, seed=i)
                    for i, (seq, plan) in enumerate(zip(sequences, plans, strict=True))
                )
            )
            for got, want in zip(streamed, await expected(http, sequences), strict=True):
                assert_rows_close(got, want)
    assert started["started"] > 0  # the binary pushes did take the direct path


@pytest.mark.asyncio
async def test_pipelined_messages_on_a_busy_session_are_answered_in_order(make_settings, started):
    """Messages sent without waiting, while the worker is held: the first binary one starts
    directly, the rest wait (a text one among them goes to the ASGI path, and the binary ones
    after it follow it there); all are answered once, in order, and equal the full forward."""
    rows = random_rows(12, seed=1200)
    with server(make_settings) as (url, app):
        worker = runtime_of(app).registry.get("tiny").worker
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
            # No offsets: nothing but the order they are handled in puts the rows in place.
            async with ws(url, f"/v1/sessions/{sid}/stream") as s:
                gate, blocker = await held(worker)
                for t, row in enumerate(rows):
                    if t == 5:
                        await s.send(json.dumps({"inputs": [row]}))
                    else:
                        await s.send(frame([row]))
                await until_queued_from_elsewhere(worker, 1)
                assert started["started"] == 1  # one at a time: the rest wait their turn
                gate.set()
                await blocker
                outputs = []
                for t in range(len(rows)):
                    answer = await s.recv()
                    if t == 5:
                        reply = json.loads(answer)
                        assert reply["position"] == t + 1
                        outputs += reply["outputs"]
                    else:
                        outputs += decode_frame(answer, OUT, False)[1].tolist()
            assert_rows_close(outputs, (await expected(http, [rows]))[0])
            assert (await http.get(f"/v1/sessions/{sid}")).json()["position"] == len(rows)
        # Direct: the five before the text message, each as the one before it is answered.
        # Those after it were behind it in the app's queue: they follow it there.
        assert started["started"] == 5


@pytest.mark.asyncio
async def test_errors_on_the_direct_path_are_answered_and_change_nothing(make_settings):
    rows = random_rows(6, seed=1300)
    with server(make_settings) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
            async with ws(url, f"/v1/sessions/{sid}/stream?framing=offset") as s:
                await s.send(frame(rows[:2], 0))
                assert decode_frame(await s.recv(), OUT, True)[0] == 2
                bad = [
                    (frame([[0.1, 0.2, 0.3]], 2), "invalid_input"),  # a row of 3, not 2
                    (frame(rows[2:3], 7), "offset_conflict"),  # ahead of the position
                    (frame([[float("nan"), 0.0]], 2), "invalid_input"),
                    (b"\x01\x02\x03", "invalid_input"),  # not a frame
                ]
                for message, code in bad:
                    await s.send(message)
                    reply = json.loads(await s.recv())
                    assert reply["error"]["code"] == code, reply
                await s.send(frame(rows[:2], 0))  # the last push again: its stored answer
                header, replayed = decode_frame(await s.recv(), OUT, True)
                assert header == 2
                await s.send(frame(rows[2:], 2))
                header, out = decode_frame(await s.recv(), OUT, True)
                assert header == len(rows)
            want = (await expected(http, [rows]))[0]
            assert_rows_close(replayed.tolist(), want[:2])
            assert_rows_close(out.tolist(), want[2:])
            # Deleted while attached: the next push closes the socket with 4404.
            async with ws(url, f"/v1/sessions/{sid}/stream") as s:
                assert (await http.delete(f"/v1/sessions/{sid}")).status_code == 204
                await s.send(frame(rows[:1]))
                with pytest.raises(ConnectionClosed) as closed:
                    await s.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


@pytest.mark.asyncio
async def test_a_bound_stream_dropped_mid_push_ends_its_session(make_settings, started):
    with server(make_settings) as (url, app):
        runtime = runtime_of(app)
        worker = runtime.registry.get("tiny").worker
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            s = await ws(url, "/v1/stream?model=tiny")
            sid = json.loads(await s.recv())["session_id"]
            gate, blocker = await held(worker)
            await s.send(frame([[0.1, 0.2]]))
            await until_queued_from_elsewhere(worker, 1)
            assert started["started"] == 1
            s.transport.abort()  # the connection drops with the push in flight
            await asyncio.to_thread(  # the server has seen it: the stream's loop has ended
                wait_until,
                lambda: (
                    runtime.metrics.registry.get_sample_value("tcnserve_websocket_connections") == 0
                ),
                "the server to see the drop",
            )
            gate.set()
            await blocker
            await asyncio.to_thread(
                wait_until,
                lambda: httpx.get(f"{url}/v1/sessions/{sid}").status_code == 404,
                "the bound session to end with its socket",
            )
            held_bytes = runtime.inflight
            await asyncio.to_thread(
                wait_until, lambda: held_bytes.held == 0, "the message's bytes to be released"
            )
            # The server goes on serving.
            r = await http.post("/v1/sessions", json={"model": "tiny"})
            assert r.status_code == 201


@pytest.mark.asyncio
async def test_a_full_body_budget_answers_overloaded_on_the_direct_path(make_settings):
    with server(make_settings) as (url, app):
        runtime = runtime_of(app)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
            async with ws(url, f"/v1/sessions/{sid}/stream") as s:
                budget = runtime.inflight
                taken = budget.limit - budget.held
                assert budget.take(taken)  # someone else holds all of it
                try:
                    await s.send(frame([[0.1, 0.2]]))
                    assert json.loads(await s.recv())["error"]["code"] == "overloaded"
                finally:
                    budget.release(taken)
                await s.send(frame([[0.1, 0.2]]))
                assert len(decode_frame(await s.recv(), OUT, False)[1]) == 1
            assert (await http.get(f"/v1/sessions/{sid}")).json()["position"] == 1
