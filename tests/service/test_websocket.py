"""WebSocket streaming: equivalence with /predict under concurrency, bound sessions, every error
path on the socket, close codes, slow readers and disconnects mid-push.

Protocol details are checked in-process (TestClient, injected clock); concurrency, backpressure
and disconnects against a real `tcnserve serve` process on loopback; micro-batching over real
sockets against uvicorn in a thread of the test, whose model worker the test holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from service.app import create_app
from service.protocol.wire import HEADER, decode_frame, encode_frame
from service.settings import Settings
from tests.service.conftest import (
    ROOT,
    TINY,
    FakeClock,
    assert_rows_close,
    held,
    held_worker,
    open_session,
    predict,
    random_rows,
    runtime_of,
    serve_process,
    serving,
    step_batches,
    until_queued_from_elsewhere,
    uvicorn_thread,
    wait_until,
)

OUT = TINY.output_size
MAX_TIMESTEPS = 64
KEY_A = "websocket-key-a-0123456789"
KEY_B = "websocket-key-b-0123456789"


# ----- in-process helpers (TestClient) ---------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tiny_dir: Path, tokens_dir: Path) -> Iterator[TestClient]:
    """One app for the tests that need no clock or settings of their own (each its own session)."""
    settings = Settings(
        models={"tiny": tiny_dir, "tokens": tokens_dir},
        max_sessions=64,  # one session per test, never closed: ample
        max_timesteps_per_request=MAX_TIMESTEPS,
        sweep_interval_s=3600,
    )
    with serving(create_app(settings, clock=FakeClock())) as c:
        yield c


def new_session(client: TestClient, **body: Any) -> str:
    return open_session(client, **body)["session_id"]


def keyed_session(client: TestClient, key: str) -> str:
    r = client.post("/v1/sessions", json={"model": "tiny"}, headers={"X-API-Key": key})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def position_of(client: TestClient, sid: str, **headers: str) -> int:
    r = client.get(f"/v1/sessions/{sid}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["position"]


def answer(ws: Any) -> Any:
    """The server's next message: JSON for a text frame, bytes for a binary one; never a close."""
    message = ws.receive()
    assert message["type"] == "websocket.send", message
    text = message.get("text")
    return json.loads(text) if text is not None else message["bytes"]


def push_text(ws: Any, rows: list, offset: int | None = None) -> dict:
    body: dict[str, Any] = {"inputs": rows}
    if offset is not None:
        body["offset"] = offset
    ws.send_text(json.dumps(body))
    reply = answer(ws)
    assert "outputs" in reply, reply
    return reply


def push_binary(ws: Any, rows: list, offset: int | None = None) -> tuple[int | None, list]:
    """One binary push; with an offset, framing=offset is assumed (header in and out)."""
    ws.send_bytes(encode_frame(np.asarray(rows, np.float32), offset))
    reply = answer(ws)
    assert isinstance(reply, bytes), reply
    header, outputs = decode_frame(reply, OUT, offset is not None)
    return header, outputs.tolist()


def error_of(ws: Any) -> dict:
    reply = answer(ws)
    assert isinstance(reply, dict) and "error" in reply, reply
    return reply["error"]


def server_close(client: TestClient, url: str, **kwargs: Any) -> WebSocketDisconnect:
    """Connect and probe with one push; the server must close the socket instead of answering."""
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect(url, **kwargs) as ws,
    ):
        ws.send_text(json.dumps({"inputs": [[0.0, 0.0]]}))
        ws.receive_text()
        ws.receive_text()  # /v1/stream answers a description first: the probe's answer is next
    return closed.value


# ----- error paths: an error message, the socket stays open, the session is unchanged ---------

TOO_MANY = json.dumps({"inputs": [[0.5, 0.5]] * (MAX_TIMESTEPS + 1)})
TEXT_ERRORS = [
    pytest.param(
        '{"inputs": [[0.5, 0.5, 0.5]]}',
        "invalid_input",
        "inputs[0]: Expected `array` of length 2",
        id="wide",
    ),
    pytest.param(
        '{"inputs": [[0.5, 0.5], [0.5]]}',
        "invalid_input",
        "inputs[1]: Expected `array` of length 2",
        id="ragged",
    ),
    pytest.param('{"inputs": []}', "invalid_input", "inputs: give at least one row", id="no-rows"),
    pytest.param(
        '{"inputs": [[]]}',
        "invalid_input",
        "inputs[0]: Expected `array` of length 2",
        id="empty-row",
    ),
    pytest.param('{"inputs": [[NaN, 0.5]]}', "invalid_input", "finite", id="nan-literal"),
    pytest.param('{"inputs": [[0.5, Infinity]]}', "invalid_input", "finite", id="inf-literal"),
    pytest.param(
        '{"inputs": [[1e39, 0.5]]}', "invalid_input", "without overflowing", id="float32-overflow"
    ),
    pytest.param(
        '{"inputs": [["0.5", 0.5]]}', "invalid_input", "Expected `float`, got `str`", id="string"
    ),
    pytest.param('{"inputs": [[0.5, 0.5]], "offset": -1}', "invalid_input", "offset", id="neg"),
    pytest.param('{"inputs": [[0.5, 0.5]], "step": 1}', "invalid_input", "step", id="extra-key"),
    pytest.param("[[0.5, 0.5]]", "invalid_input", "object", id="not-an-object"),
    pytest.param("rows please", "invalid_input", "JSON is malformed", id="not-json"),
    pytest.param(TOO_MANY, "too_many_timesteps", f"at most {MAX_TIMESTEPS}", id="too-many"),
]
ROW_BYTES = TINY.in_channels * 4
NAN_ROW = np.array([[np.nan, 0.5]], np.float32)
INF_ROW = np.array([[0.5, -np.inf]], np.float32)
BINARY_ERRORS = [
    pytest.param(b"\0" * (ROW_BYTES + 4), "invalid_input", "whole number of rows", id="partial"),
    pytest.param(b"", "invalid_input", "whole number of rows", id="empty"),
    pytest.param(encode_frame(NAN_ROW), "invalid_input", "finite", id="nan"),
    pytest.param(encode_frame(INF_ROW), "invalid_input", "finite", id="inf"),
    pytest.param(
        encode_frame(np.zeros((MAX_TIMESTEPS + 1, 2))), "too_many_timesteps", "at most", id="many"
    ),
]
OFFSET_FRAMING_ERRORS = [  # the session is at position 6 when these arrive
    pytest.param(b"\0" * 4, "invalid_input", "no 8-byte offset header", id="short"),
    pytest.param(HEADER.pack(6), "invalid_input", "0 bytes", id="header-only"),
    pytest.param(encode_frame(np.ones((1, 2))), "invalid_input", "0 bytes", id="no-header-1-row"),
    pytest.param(encode_frame(np.ones((1, 2)), 5), "offset_conflict", "position 6", id="stale"),
    pytest.param(encode_frame(np.ones((1, 2)), 9), "offset_conflict", "position 6", id="ahead"),
    pytest.param(
        encode_frame(np.ones((1, 2)), -1),
        "invalid_input",
        "the offset header must be in [0, ",
        id="negative",
    ),
    pytest.param(
        encode_frame(np.ones((3, 2)), 3), "offset_conflict", "different inputs", id="replay-other"
    ),
    pytest.param(encode_frame(NAN_ROW, 6), "invalid_input", "finite", id="nan"),
]


def stream_around_a_bad_message(client: TestClient, framing: str, send_bad: Any, push: Any) -> dict:
    """Push 6 rows, send one bad message, push the rest: returns the error; checks that the
    socket stayed open, the position did not move and the outputs equal /predict."""
    rows = random_rows(14, seed=31)
    sid = new_session(client)
    with client.websocket_connect(f"/v1/sessions/{sid}/stream?framing={framing}") as ws:
        outputs = push(ws, rows[0:3], 0) + push(ws, rows[3:6], 3)
        send_bad(ws)
        error = error_of(ws)
        assert position_of(client, sid) == 6
        outputs += push(ws, rows[6:7], 6) + push(ws, rows[7:14], 7)
    assert_rows_close(outputs, predict(client, [rows])[0])
    return error


def text_push(ws: Any, rows: list, offset: int) -> list:
    reply = push_text(ws, rows, offset)
    assert reply["position"] == offset + len(rows)
    return reply["outputs"]


def binary_push(ws: Any, rows: list, offset: int) -> list:
    return push_binary(ws, rows)[1]


def framed_push(ws: Any, rows: list, offset: int) -> list:
    position, outputs = push_binary(ws, rows, offset)
    assert position == offset + len(rows)
    return outputs


@pytest.mark.parametrize(("message", "code", "match"), TEXT_ERRORS)
def test_bad_text_message_is_answered_and_changes_nothing(app_client, message, code, match):
    error = stream_around_a_bad_message(
        app_client, "none", lambda ws: ws.send_text(message), text_push
    )
    assert error["code"] == code and match in error["message"], error


@pytest.mark.parametrize(("frame", "code", "match"), BINARY_ERRORS)
def test_bad_binary_frame_is_answered_and_changes_nothing(app_client, frame, code, match):
    error = stream_around_a_bad_message(
        app_client, "none", lambda ws: ws.send_bytes(frame), binary_push
    )
    assert error["code"] == code and match in error["message"], error


@pytest.mark.parametrize(("frame", "code", "match"), OFFSET_FRAMING_ERRORS)
def test_bad_offset_frame_is_answered_and_changes_nothing(app_client, frame, code, match):
    error = stream_around_a_bad_message(
        app_client, "offset", lambda ws: ws.send_bytes(frame), framed_push
    )
    assert error["code"] == code and match in error["message"], error
    if code == "offset_conflict":
        assert error["position"] == 6


@pytest.mark.parametrize("offset", [2, 7], ids=["stale", "ahead"])
def test_text_offset_conflict_reports_the_position(app_client, offset):
    message = json.dumps({"inputs": [[0.5, 0.5]], "offset": offset})
    error = stream_around_a_bad_message(
        app_client, "none", lambda ws: ws.send_text(message), text_push
    )
    assert error["code"] == "offset_conflict" and error["position"] == 6
    assert "position 6" in error["message"]


def test_replaying_the_last_push_returns_its_outputs_and_does_not_advance(app_client):
    rows = random_rows(12, seed=32)
    sid = new_session(app_client)
    with app_client.websocket_connect(f"/v1/sessions/{sid}/stream?framing=offset") as ws:
        first = push_text(ws, rows[:4], 0)
        again = push_text(ws, rows[:4], 0)  # a text retry of the last push
        assert again == first and position_of(app_client, sid) == 4
        position, outputs = push_binary(ws, rows[4:5], 4)  # single row: the batched step
        assert push_binary(ws, rows[4:5], 4) == (position, outputs) == (5, outputs)
        position, more = push_binary(ws, rows[5:9], 5)
        assert push_binary(ws, rows[5:9], 5) == (9, more)
        assert position_of(app_client, sid) == 9
        rest = push_text(ws, rows[9:], 9)
    assert_rows_close(
        first["outputs"] + outputs + more + rest["outputs"], predict(app_client, [rows])[0]
    )


def test_token_model_refuses_binary_frames_and_streams_text(app_client):
    tokens = [[3], [1], [6], [0], [2], [5], [4], [1]]
    sid = new_session(app_client, model="tokens")
    with app_client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        outputs = push_text(ws, tokens[:3])["outputs"]
        ws.send_bytes(encode_frame(np.zeros((1, 4))))  # one row of the embedding width
        error = error_of(ws)
        assert error["code"] == "invalid_input" and "send text frames" in error["message"]
        ws.send_text(json.dumps({"inputs": [[7]]}))  # vocab_size is 7
        error = error_of(ws)
        assert error["code"] == "invalid_input" and "outside [0, 7)" in error["message"]
        ws.send_text(json.dumps({"inputs": [[0.5]]}))
        assert "integer token id" in error_of(ws)["message"]
        assert position_of(app_client, sid) == 3
        outputs += push_text(ws, tokens[3:4])["outputs"] + push_text(ws, tokens[4:])["outputs"]
    assert_rows_close(outputs, predict(app_client, [tokens], model="tokens")[0])


def websocket_series(text: str) -> dict[str, float]:
    """The tcnserve_websocket_* samples of a /metrics page, by their name and labels."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("tcnserve_websocket_") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_websocket_metrics_count_connections_and_outcomes(client):
    ok = 'tcnserve_websocket_messages_total{kind="text",outcome="ok"}'
    bad = 'tcnserve_websocket_messages_total{kind="binary",outcome="invalid_input"}'
    sid = new_session(client)
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        push_text(ws, [[0.1, 0.2]])
        ws.send_bytes(b"\0" * 3)
        error_of(ws)
        during = websocket_series(client.get("/metrics").text)
        assert during["tcnserve_websocket_connections"] == 1
        assert during[ok] == 1 and during[bad] == 1
    wait_until(
        lambda: (
            websocket_series(client.get("/metrics").text)["tcnserve_websocket_connections"] == 0
        ),
        "the connection gauge to drop",
    )


# ----- WS /v1/stream: a session bound to the connection ----------------------------------------


def test_bound_stream_describes_its_session_and_deletes_it_on_close(client, clock):
    rows = random_rows(9, seed=33)
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        created = answer(ws)
        assert created["model"] == "tiny" and created["position"] == 0
        assert created["expires_at"] == pytest.approx(clock.now + 600)
        sid = created["session_id"]
        outputs = push_text(ws, rows[:4])["outputs"] + push_text(ws, rows[4:])["outputs"]
        assert position_of(client, sid) == 9
    assert_rows_close(outputs, predict(client, [rows])[0])
    # The server deletes it once it sees the close: poll for that, not for time.
    wait_until(lambda: client.get(f"/v1/sessions/{sid}").status_code == 404, "the delete")
    assert client.get(f"/v1/sessions/{sid}").json()["error"]["code"] == "session_not_found"


def test_bound_stream_with_keep_survives_its_socket_until_its_ttl(client, clock):
    rows = random_rows(10, seed=34)
    sid = "kept-stream-0001"
    url = f"/v1/stream?model=tiny&keep=true&session_id={sid}&ttl_s=30&framing=offset"
    with client.websocket_connect(url) as ws:
        created = answer(ws)
        assert created["session_id"] == sid
        assert created["expires_at"] == pytest.approx(clock.now + 30)
        position, outputs = push_binary(ws, rows[:6], 0)
        assert position == 6
    info = client.get(f"/v1/sessions/{sid}")
    assert info.status_code == 200 and info.json()["position"] == 6 and info.json()["ttl_s"] == 30
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        outputs += push_text(ws, rows[6:])["outputs"]
    assert_rows_close(outputs, predict(client, [rows])[0])
    clock.advance(31)
    assert client.get(f"/v1/sessions/{sid}").status_code == 410


def test_bound_stream_takes_its_id_from_x_session_id(client):
    with client.websocket_connect(
        "/v1/stream?model=tiny&keep=true", headers={"X-Session-ID": "routed-id-0001"}
    ) as ws:
        assert answer(ws)["session_id"] == "routed-id-0001"
    assert client.get("/v1/sessions/routed-id-0001").status_code == 200
    closed = server_close(
        client,
        "/v1/stream?model=tiny&session_id=other-id-0001",
        headers={"X-Session-ID": "routed-id-0002"},
    )
    assert closed.code == 4400 and "X-Session-ID" in closed.reason


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("session_id=short", "session_id must be"),
        ("ttl_s=1e9", "ttl_s must be"),
        ("ttl_s=-1", "ttl_s must be"),
        ("session_id=taken-id-0001", "already exists"),
    ],
)
def test_bound_stream_that_cannot_start_closes_4400(client, query, match):
    new_session(client, session_id="taken-id-0001")
    closed = server_close(client, f"/v1/stream?model=tiny&{query}")
    assert closed.code == 4400 and match in closed.reason


# ----- close codes -----------------------------------------------------------------------------


def test_unknown_session_closes_4404(client):
    closed = server_close(client, "/v1/sessions/no-such-session-01/stream")
    assert closed.code == 4404 and "no-such-session-01" in closed.reason
    assert server_close(client, "/v1/stream?model=nope").code == 4404


def test_expired_session_closes_4410_on_attach_and_mid_stream(client, clock):
    expired, active = new_session(client, ttl_s=10), new_session(client, ttl_s=10)
    with client.websocket_connect(f"/v1/sessions/{active}/stream") as ws:
        push_text(ws, [[0.1, 0.2]])
        clock.advance(11)
        ws.send_text(json.dumps({"inputs": [[0.1, 0.2]]}))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 4410
    assert server_close(client, f"/v1/sessions/{expired}/stream").code == 4410


def test_session_deleted_while_attached_closes_4404(client):
    sid = new_session(client)
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        push_text(ws, [[0.1, 0.2]])
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204
        ws.send_text(json.dumps({"inputs": [[0.1, 0.2]]}))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 4404


@pytest.fixture
def keyed_client(make_settings) -> Iterator[TestClient]:
    with serving(create_app(make_settings(api_keys=[KEY_A, KEY_B]))) as c:
        yield c


def test_api_key_by_header_or_token_parameter_else_4401(keyed_client):
    c = keyed_client
    sid = keyed_session(c, KEY_A)
    url = f"/v1/sessions/{sid}/stream"
    for how in (
        {"headers": {"Authorization": f"Bearer {KEY_A}"}},
        {"headers": {"X-API-Key": KEY_A}},
        {"url": f"{url}?token={KEY_A}"},
    ):
        with c.websocket_connect(how.get("url", url), headers=dict(how.get("headers", {}))) as ws:
            assert push_text(ws, [[0.1, 0.2]])["outputs"]
    assert position_of(c, sid, **{"X-API-Key": KEY_A}) == 3
    for how in (
        {},
        {"headers": {"Authorization": "Bearer not-the-key-0123456789"}},
        {"headers": {"X-API-Key": "not-the-key-0123456789"}},
        {"url": f"{url}?token=not-the-key-0123456789"},
    ):
        closed = server_close(c, how.get("url", url), headers=dict(how.get("headers", {})))
        assert closed.code == 4401, how
    assert server_close(c, "/v1/stream?model=tiny").code == 4401
    with c.websocket_connect(f"/v1/stream?model=tiny&token={KEY_B}") as ws:
        assert answer(ws)["position"] == 0


def test_another_keys_session_closes_4404(keyed_client):
    sid = keyed_session(keyed_client, KEY_A)
    closed = server_close(keyed_client, f"/v1/sessions/{sid}/stream?token={KEY_B}")
    assert closed.code == 4404
    assert position_of(keyed_client, sid, **{"X-API-Key": KEY_A}) == 0


def test_no_free_slot_closes_bound_stream_4429(make_settings):
    with serving(create_app(make_settings(max_sessions=2))) as c:
        sids = [new_session(c), new_session(c)]
        closed = server_close(c, "/v1/stream?model=tiny")
        assert closed.code == 4429 and "session slots" in closed.reason
        c.delete(f"/v1/sessions/{sids[0]}")
        with c.websocket_connect("/v1/stream?model=tiny") as ws:
            assert answer(ws)["position"] == 0


def test_not_ready_closes_1013_and_draining_refuses_only_new_streams(client):
    sid = new_session(client)
    entry = runtime_of(client.app).registry.get("tiny")
    entry.ready = False  # as while the models are still loading
    try:
        assert server_close(client, f"/v1/sessions/{sid}/stream").code == 1013
        assert server_close(client, "/v1/stream?model=tiny").code == 1013
    finally:
        entry.ready = True
    runtime_of(client.app).start_draining()
    assert server_close(client, "/v1/stream?model=tiny").code == 1001
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:  # still served
        assert push_text(ws, [[0.1, 0.2]])["position"] == 1


# ----- micro-batching: WebSocket and HTTP pushes share the model's step batches ---------------


def test_websocket_and_http_single_rows_join_one_step_batch(make_settings):
    rows = [random_rows(1, seed=40 + i) for i in range(16)]
    with serving(create_app(make_settings())) as c:
        sids = [new_session(c) for _ in rows]
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(8) as pool:
            sockets = [
                stack.enter_context(c.websocket_connect(f"/v1/sessions/{sid}/stream"))
                for sid in sids[:8]
            ]
            before = c.get("/metrics").text
            with held_worker(c) as wait_queued:
                sockets[0].send_text(json.dumps({"inputs": rows[0]}))
                for ws, row in zip(sockets[1:], rows[1:8], strict=True):
                    ws.send_bytes(encode_frame(np.asarray(row, np.float32)))
                posts = [
                    pool.submit(c.post, f"/v1/sessions/{sid}/steps", json={"inputs": row})
                    for sid, row in zip(sids[8:], rows[8:], strict=True)
                ]
                wait_queued(16)  # 8 WebSocket and 8 HTTP steps wait behind the held call
            got = [answer(sockets[0])["outputs"]]
            got += [decode_frame(answer(ws), OUT, False)[1].tolist() for ws in sockets[1:]]
            got += [post.result().json()["outputs"] for post in posts]
        assert step_batches(before, c.get("/metrics").text) == (1, 16)
        for outputs, want in zip(got, predict(c, rows), strict=True):
            assert_rows_close(outputs, want)


# ----- a real server: concurrency, slow readers, disconnects, message size ---------------------

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def live_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(base url, log file) of one `tcnserve serve` process for this module."""
    args = ["--model", f"tiny={tiny_dir}", "--device", "cpu", "--torch-threads", "1"]
    args += ["--max-sessions", "64", "--max-body-bytes", str(MAX_BODY)]
    log = tmp_path_factory.mktemp("ws-server") / "server.log"
    with serve_process(args, log) as (url, _):
        yield url, log


@pytest.fixture
def live(live_server: tuple) -> str:
    return live_server[0]


def ws_url(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://", 1) + path


def ws_connect(base_url: str, path: str, **kwargs: Any) -> connect:
    return connect(ws_url(base_url, path), proxy=None, compression=None, **kwargs)


async def expected(http: httpx.AsyncClient, sequences: list) -> list:
    r = await http.post("/v1/models/tiny/predict", json={"inputs": sequences})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


async def recv_json(ws: ClientConnection) -> dict:
    message = await ws.recv()
    assert isinstance(message, str), message
    return json.loads(message)


async def stream_session(
    base_url: str, http: httpx.AsyncClient, kind: str, rows: list, chunks: list[int]
) -> list:
    """Stream `rows` in `chunks` through one session of `kind`; returns the outputs.

    Kinds: "http" (POST steps), "text", "binary", "framed" (binary, framing=offset) attached
    to a session made over HTTP, and "bound" (binary, framing=offset, on /v1/stream).
    """
    outputs: list = []
    position = 0
    if kind == "bound":
        path = "/v1/stream?model=tiny&framing=offset"
    else:
        sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        path = f"/v1/sessions/{sid}/stream" + ("?framing=offset" if kind == "framed" else "")
    if kind == "http":
        for size in chunks:
            body = {"inputs": rows[position : position + size], "offset": position}
            r = await http.post(f"/v1/sessions/{sid}/steps", json=body)
            assert r.status_code == 200, r.text
            outputs += r.json()["outputs"]
            position += size
        return outputs
    framed = kind in ("framed", "bound")
    async with ws_connect(base_url, path) as ws:
        if kind == "bound":
            assert (await recv_json(ws))["position"] == 0
        for i, size in enumerate(chunks):
            chunk = rows[position : position + size]
            if kind == "text":  # offsets on every other push: both forms are accepted
                offset = {"offset": position} if i % 2 else {}
                await ws.send(json.dumps({"inputs": chunk, **offset}))
                reply = await recv_json(ws)
                assert reply["position"] == position + size
                outputs += reply["outputs"]
            else:
                frame = encode_frame(np.asarray(chunk, np.float32), position if framed else None)
                await ws.send(frame)
                data = await ws.recv()
                assert isinstance(data, bytes), data
                header, out = decode_frame(data, OUT, framed)
                assert header == (position + size if framed else None)
                outputs += out.tolist()
            position += size
    return outputs


def chunking(rng: random.Random, length: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < length:
        sizes.append(min(rng.choice([1, 1, 1, 1, 2, 3, 5, 9]), length - sum(sizes)))
    return sizes


@pytest.mark.asyncio
async def test_many_websocket_sessions_with_http_pushes_equal_predict(live):
    rng = random.Random(7)
    kinds = ["text", "binary", "framed", "bound", "http", "http"] * 5  # 20 WS, 10 HTTP
    sequences = [random_rows(rng.randint(12, 36), seed=700 + i) for i in range(len(kinds))]
    plans = [chunking(rng, len(seq)) for seq in sequences]
    async with httpx.AsyncClient(base_url=live, timeout=60) as http:
        streamed = await asyncio.gather(
            *(
                stream_session(live, http, kind, seq, plan)
                for kind, seq, plan in zip(kinds, sequences, plans, strict=True)
            )
        )
        for got, want in zip(streamed, await expected(http, sequences), strict=True):
            assert_rows_close(got, want)


@pytest.mark.asyncio
async def test_single_rows_over_many_sockets_are_micro_batched(make_settings):
    """Round after round, one row from each of 16 real sockets queues behind the held worker:
    uvicorn hands all 16 over, and one model call advances them together."""
    sequences = [random_rows(4, seed=800 + i) for i in range(16)]
    app = create_app(make_settings())
    # In a thread of this process rather than a `tcnserve serve` process: the test holds the
    # worker, which is what makes the batch size certain instead of a matter of timing.
    with uvicorn_thread(app) as (url, _):
        worker = runtime_of(app).registry.get("tiny").worker
        async with contextlib.AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
            sockets = []
            for _ in sequences:
                r = await http.post("/v1/sessions", json={"model": "tiny"})
                path = f"/v1/sessions/{r.json()['session_id']}/stream"
                sockets.append(await stack.enter_async_context(ws_connect(url, path)))
            before = (await http.get("/metrics")).text
            streamed: list[list] = [[] for _ in sequences]
            for t in range(4):
                gate, blocker = await held(worker)
                for ws, seq in zip(sockets, sequences, strict=True):
                    await ws.send(encode_frame(np.asarray(seq[t : t + 1], np.float32)))
                await until_queued_from_elsewhere(worker, len(sockets))
                gate.set()
                await blocker
                for ws, outputs in zip(sockets, streamed, strict=True):
                    outputs += decode_frame(await ws.recv(), OUT, False)[1].tolist()
            assert step_batches(before, (await http.get("/metrics")).text) == (4, 4 * 16)
            for got, want in zip(streamed, await expected(http, sequences), strict=True):
                assert_rows_close(got, want)


@pytest.mark.asyncio
async def test_a_client_that_does_not_read_holds_up_no_one_and_gets_every_answer(live):
    singles = random_rows(1000, seed=90)
    block = random_rows(1024, seed=91)  # R = 29: every repeat of it after the first is
    others = random_rows(30, seed=92)  # answered with the same outputs
    messages = [json.dumps({"inputs": [row], "offset": t}) for t, row in enumerate(singles)]
    block_json = json.dumps(block)
    messages += [
        f'{{"offset": {len(singles) + k * len(block)}, "inputs": {block_json}}}' for k in range(150)
    ]
    async with httpx.AsyncClient(base_url=live, timeout=60) as http:
        slow_sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        other_sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        # max_queue=1: the client soon stops reading its socket. The 150 answers of ~45 kB
        # outgrow the socket buffers (on this machine the server stalls about halfway), so the
        # server blocks sending and stops reading this connection; the pushes it has not read
        # wait in TCP buffers, not in server memory. Nothing here depends on when that happens.
        async with ws_connect(live, f"/v1/sessions/{slow_sid}/stream", max_queue=1) as slow:

            async def send_all() -> None:
                for message in messages:
                    await slow.send(message)

            sender = asyncio.create_task(send_all())
            other_outputs = []
            async with ws_connect(live, f"/v1/sessions/{other_sid}/stream") as other:
                for row in others:
                    await other.send(encode_frame(np.asarray([row], np.float32)))
                    other_outputs += decode_frame(await other.recv(), OUT, False)[1].tolist()
            r = await http.post(f"/v1/sessions/{other_sid}/steps", json={"inputs": others[:2]})
            assert r.status_code == 200 and r.json()["position"] == 32
            answers = [await recv_json(slow) for _ in messages]  # now read: all, in order
            await sender
        position = len(singles) + 150 * len(block)
        assert [a["position"] for a in answers] == [
            *range(1, len(singles) + 1),
            *range(len(singles) + len(block), position + 1, len(block)),
        ]
        assert (await http.get(f"/v1/sessions/{slow_sid}")).json()["position"] == position
        want = await expected(http, [singles + block + block, others])
        n, m = len(singles), len(block)
        assert_rows_close([a["outputs"][0] for a in answers[:n]], want[0][:n])
        assert_rows_close(answers[n]["outputs"], want[0][n : n + m])
        for reply in answers[n + 1 :]:  # the block after itself: the same outputs every time
            assert_rows_close(reply["outputs"], want[0][n + m :])
        assert_rows_close(other_outputs, want[1])


@pytest.mark.asyncio
@pytest.mark.parametrize("frames", ["binary", "text"])
async def test_disconnect_mid_push_leaves_the_session_consistent(live, frames):
    rows = random_rows(40, seed=95 if frames == "binary" else 96)
    async with httpx.AsyncClient(base_url=live, timeout=60) as http:
        r = await http.post("/v1/sessions", json={"model": "tiny", "prefix": rows[:4]})
        sid, outputs = r.json()["session_id"], r.json()["outputs"]
        position = 4
        path = f"/v1/sessions/{sid}/stream?framing=offset"
        for size, how in [(1, "close"), (6, "close"), (1, "abort"), (5, "abort"), (3, "close")]:
            chunk = rows[position : position + size]
            ws = await ws_connect(live, path)
            if frames == "binary":
                await ws.send(encode_frame(np.asarray(chunk, np.float32), position))
            else:
                await ws.send(json.dumps({"inputs": chunk, "offset": position}))
            if how == "close":
                await ws.close()  # without reading the answer
            else:
                ws.transport.abort()  # the connection drops
            seen = (await http.get(f"/v1/sessions/{sid}")).json()["position"]
            assert seen in (position, position + size)
            # The retry with the same offset applies the push, or answers it again if it was.
            r = await http.post(
                f"/v1/sessions/{sid}/steps", json={"inputs": chunk, "offset": position}
            )
            assert r.status_code == 200, r.text
            assert r.json()["position"] == position + size
            outputs += r.json()["outputs"]
            position += size
        r = await http.post(f"/v1/sessions/{sid}/steps", json={"inputs": rows[position:]})
        outputs += r.json()["outputs"]
        assert r.json()["position"] == len(rows)
        assert_rows_close(outputs, (await expected(http, [rows]))[0])


@pytest.mark.asyncio
async def test_message_over_max_body_bytes_closes_the_socket(live):
    async with httpx.AsyncClient(base_url=live, timeout=60) as http:
        sid = (await http.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]
        async with ws_connect(live, f"/v1/sessions/{sid}/stream") as ws:
            await ws.send(encode_frame(np.zeros((MAX_BODY // ROW_BYTES + 1, 2))))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009  # RFC 6455 "message too big"
        assert (await http.get(f"/v1/sessions/{sid}")).json()["position"] == 0


def documented_close_code(meaning: str) -> int:
    """The close code docs/streaming.md gives for the table row that mentions `meaning`."""
    rows = (ROOT / "docs" / "streaming.md").read_text().splitlines()
    row = next(line for line in rows if line[:3] in ("| 1", "| 4") and meaning in line)
    return int(row.split("|")[1])


def test_docs_give_the_close_code_of_an_oversized_message():
    assert documented_close_code("larger than `max_body_bytes`") == 1009


def test_streams_open_at_shutdown_close_with_the_documented_code(make_settings):
    # uvicorn in a thread: a process start would cost seconds.
    with (
        uvicorn_thread(create_app(make_settings())) as (url, server),
        sync_connect(ws_url(url, "/v1/stream?model=tiny"), proxy=None) as ws,
    ):
        assert json.loads(ws.recv())["position"] == 0
        server.should_exit = True  # what SIGTERM does once the drain is over
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == documented_close_code("shutting down")


@pytest.mark.asyncio
async def test_an_api_key_in_the_token_parameter_stays_out_of_the_log(live_server):
    url, log = live_server
    secret = "token-that-must-not-be-logged-0123"
    async with ws_connect(url, f"/v1/stream?model=tiny&token={secret}") as ws:
        assert (await recv_json(ws))["position"] == 0  # keys are off here: any token passes
    text = log.read_text()
    assert secret not in text
    assert "token=***" in text  # the line was logged, redacted (not dropped)
