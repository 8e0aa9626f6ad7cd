"""Hostile and buggy clients, in process: overflow, non-finite outputs, absurd positions, slot
leaks, per-key quotas, bound-stream cleanup, stream parameters and the documented error table.

(Findings that need a real server process, such as memory, slow clients and logs, are in
test_hardening_live.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.websockets import WebSocketDisconnect

from model import MAX_POSITION, TCN, save_model
from service.app import create_app
from service.http import errors as http_errors
from service.http import protocol as http_protocol
from service.protocol import error_codes, errors
from service.protocol.wire import decode_frame, encode_frame
from tests.service.conftest import (
    TINY,
    assert_rows_close,
    metric,
    open_session,
    predict,
    push,
    random_rows,
    runtime_of,
    serving,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
HUGE = 3.4e38  # finite in float32, overflows any product


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""

    def refuse(literal: str):
        raise AssertionError(f"non-JSON literal {literal} in an answer")

    return json.loads(text, parse_constant=refuse)


def position_of(client, sid: str) -> int:
    r = client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()["position"]


def active(client) -> float:
    return metric(client.get("/metrics").text, "tcnserve_active_sessions")


# ----- finite inputs that would overflow ----------------------------------------------------------


def test_overflowing_rows_are_refused_on_every_path_and_change_nothing(client):
    rows = random_rows(12, seed=3)
    sid = open_session(client, prefix=rows[:4])["session_id"]
    huge = [[HUGE, HUGE]] * 50

    r = push(client, sid, huge)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", r.text
    assert "without overflowing" in r.json()["error"]["message"]
    assert position_of(client, sid) == 4

    r = client.post("/v1/models/tiny/predict", json={"inputs": [huge]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"

    before = active(client)
    r = client.post("/v1/sessions", json={"model": "tiny", "prefix": huge, "session_id": "x" * 9})
    assert r.status_code == 422
    assert client.get(f"/v1/sessions/{'x' * 9}").status_code == 404
    assert active(client) == before

    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        ws.send_text(json.dumps({"inputs": huge}))
        answer = strict_json(ws.receive_text())
        assert answer["error"]["code"] == "invalid_input"
        ws.send_bytes(encode_frame(np.full((3, 2), HUGE, dtype=np.float32)))
        answer = strict_json(ws.receive_text())
        assert answer["error"]["code"] == "invalid_input"
    assert position_of(client, sid) == 4

    # The session goes on exactly as if the refused pushes never happened.
    r = push(client, sid, rows[4:], offset=4)
    assert r.status_code == 200, r.text
    assert_rows_close(r.json()["outputs"], predict(client, [rows])[0][4:])


@pytest.fixture
def exploding_dir(tmp_path) -> Path:
    """A model whose weights are so large that no useful input bound exists, so inputs of a
    1e30 overflow it: what the output check is there for."""
    torch.manual_seed(5)
    net = TCN(TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 1e5)
    return save_model(net, tmp_path / "exploding", {"task": "test", "trained": False})


def test_non_finite_outputs_are_refused_on_every_path_and_change_nothing(
    make_settings, exploding_dir
):
    settings = make_settings(models={"tiny": exploding_dir})
    with serving(create_app(settings)) as client:
        assert client.get("/v1/models/tiny").json()["max_input_abs"] is None
        calm = (np.random.default_rng(0).standard_normal((6, 2)) * 1e-30).tolist()
        sid = open_session(client, prefix=calm[:3])["session_id"]
        snapshot = client.get(f"/v1/sessions/{sid}/snapshot").json()
        loud = [[1e30, -1e30]] * 4

        for rows in (loud[:1], loud):  # a batched step, and a chunked push
            r = push(client, sid, rows, offset=3)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "non_finite_output"
            assert client.get(f"/v1/sessions/{sid}/snapshot").json() == snapshot

        r = client.post("/v1/models/tiny/predict", json={"inputs": [loud]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_output"

        before = active(client)
        r = client.post("/v1/sessions", json={"model": "tiny", "prefix": loud})
        assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_output"
        assert active(client) == before

        with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            ws.send_bytes(encode_frame(np.array(loud, dtype=np.float32)))
            assert strict_json(ws.receive_text())["error"]["code"] == "non_finite_output"
            ws.send_text(json.dumps({"inputs": loud[:1]}))
            assert strict_json(ws.receive_text())["error"]["code"] == "non_finite_output"
            ws.send_bytes(encode_frame(np.array(calm[3:], dtype=np.float32)))
            _, outputs = decode_frame(ws.receive_bytes(), 2, False)
        assert np.isfinite(outputs).all()
        np.testing.assert_allclose(outputs, predict(client, [calm])[0][3:], rtol=1e-5)


# ----- positions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [2**64, 2**63 - 1, 2**63, MAX_POSITION + 1, -1])
def test_absurd_snapshot_positions_are_refused_before_a_slot_is_taken(client, position):
    before = active(client)
    snapshot = {"position": position, "inputs": random_rows(28, seed=1)}
    r = client.post("/v1/sessions", json={"model": "tiny", "snapshot": snapshot})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_input"
    assert active(client) == before
    assert runtime_of(client.app).registry.get("tiny").worker.pool.free == 32


def test_a_session_at_the_largest_position_refuses_to_pass_it(client):
    snapshot = {"position": MAX_POSITION, "inputs": random_rows(28, seed=1)}
    sid = client.post("/v1/sessions", json={"model": "tiny", "snapshot": snapshot}).json()[
        "session_id"
    ]
    assert position_of(client, sid) == MAX_POSITION
    r = push(client, sid, [[0.0, 0.0]])
    assert r.status_code == 422 and "largest position" in r.json()["error"]["message"]
    assert position_of(client, sid) == MAX_POSITION
    for offset in (2**64, MAX_POSITION + 1):
        r = push(client, sid, [[0.0, 0.0]], offset=offset)
        assert r.status_code == 422, r.text


def test_no_failing_path_takes_a_slot_and_loses_it(make_settings, exploding_dir):
    """Fill and drain a 4-slot pool after every way a create or push can fail, many times."""
    settings = make_settings(max_sessions=4, models={"tiny": exploding_dir})
    with serving(create_app(settings)) as client:
        rows = [[0.0, 0.0]] * 28
        failing = [
            {"snapshot": {"position": 2**64, "inputs": rows}},
            {"snapshot": {"position": MAX_POSITION + 1, "inputs": rows}},
            {"snapshot": {"position": 40, "inputs": rows[:3]}},
            {"snapshot": {"position": 5, "inputs": [[float("nan")] * 2] * 5}},
            {"prefix": [[1e30, 1e30]] * 3},  # non-finite outputs
            {"prefix": [[1.0, 2.0, 3.0]]},
            {"prefix": [[HUGE, 0.0]]},
            {"ttl_s": -1},
            {"session_id": "bad id!"},
            {"model": "nope"},
        ]
        for _ in range(3):
            for body in failing:
                content = json.dumps({"model": "tiny", **body}, allow_nan=True)
                r = client.post(
                    "/v1/sessions", content=content, headers={"content-type": "application/json"}
                )
                assert 400 <= r.status_code < 500 and r.status_code != 429, (body, r.text)
            sids = [open_session(client)["session_id"] for _ in range(4)]
            for sid in sids:  # failing pushes on live sessions leak nothing either
                assert push(client, sid, [[1e30, 1e30]] * 2).status_code == 422
            r = client.post("/v1/sessions", json={"model": "tiny"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "capacity_exceeded"
            for sid in sids:
                assert client.delete(f"/v1/sessions/{sid}").status_code == 204
            assert active(client) == 0
        assert runtime_of(client.app).registry.get("tiny").worker.pool.free == 4


# ----- per-key quotas -----------------------------------------------------------------------------

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"


@pytest.mark.parametrize("per_key", [None, 2])
def test_a_key_at_its_quota_gets_429_and_other_keys_are_served(make_settings, per_key):
    settings = make_settings(api_keys=[KEY_A, KEY_B], max_sessions=4, max_sessions_per_key=per_key)
    cap = per_key or 3  # unset with two keys: 3/4 of the slots
    a, b = {"X-API-Key": KEY_A}, {"Authorization": f"Bearer {KEY_B}"}
    with serving(create_app(settings)) as client:
        sids = []
        for _ in range(cap):
            r = client.post("/v1/sessions", json={"model": "tiny"}, headers=a)
            assert r.status_code == 201, r.text
            sids.append(r.json()["session_id"])
        r = client.post("/v1/sessions", json={"model": "tiny"}, headers=a)
        assert r.status_code == 429 and r.json()["error"]["code"] == "key_quota_exceeded"
        assert r.headers["Retry-After"] == "1"
        with (
            client.websocket_connect("/v1/stream?model=tiny", headers=a) as ws,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            ws.receive_text()
        assert closed.value.code == 4429
        r = client.post("/v1/sessions", json={"model": "tiny"}, headers=b)
        assert r.status_code == 201, r.text
        assert client.delete(f"/v1/sessions/{sids[0]}", headers=a).status_code == 204
        r = client.post("/v1/sessions", json={"model": "tiny"}, headers=a)
        assert r.status_code == 201, r.text


def test_one_key_alone_may_take_every_slot(make_settings):
    settings = make_settings(api_keys=[KEY_A], max_sessions=3)
    with serving(create_app(settings)) as client:
        for _ in range(3):
            r = client.post("/v1/sessions", json={"model": "tiny"}, headers={"X-API-Key": KEY_A})
            assert r.status_code == 201
        r = client.post("/v1/sessions", json={"model": "tiny"}, headers={"X-API-Key": KEY_A})
        assert r.json()["error"]["code"] == "capacity_exceeded"


# ----- WebSocket streams --------------------------------------------------------------------------


def test_a_bound_stream_closing_deletes_its_own_session_only(client):
    with client.websocket_connect("/v1/stream?model=tiny&session_id=bound-0001") as ws:
        assert strict_json(ws.receive_text())["session_id"] == "bound-0001"
        assert client.delete("/v1/sessions/bound-0001").status_code == 204
        newer = open_session(client, session_id="bound-0001", prefix=[[0.5, 0.5]])
        assert newer["position"] == 1
    assert position_of(client, "bound-0001") == 1  # the newer session outlived the socket


@pytest.mark.parametrize(
    "query", ["framing=bogus", "keep=maybe", "ttl_s=soon"], ids=["framing", "keep", "ttl"]
)
def test_invalid_stream_parameters_close_with_1008(client, query):
    sid = open_session(client)["session_id"]
    for url in (f"/v1/sessions/{sid}/stream?{query}", f"/v1/stream?model=tiny&{query}"):
        with client.websocket_connect(url) as ws, pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
        assert closed.value.code == 1008, url
        assert query.split("=")[0] in closed.value.reason


# ----- the documented error table -----------------------------------------------------------------


def documented_errors() -> dict[str, int]:
    """code -> status from the table under '### Errors' in docs/service.md."""
    text = (DOCS / "service.md").read_text()
    table = text.split("### Errors", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    found = {}
    for status, code in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", "|" + table, re.MULTILINE):
        found[code] = int(status)
    return found


def test_every_error_code_is_documented_with_its_status():
    documented = documented_errors()
    raised = {cls.code for cls in _subclasses(errors.ServiceError)}
    raised |= set(http_errors.HTTP_CODES.values()) | {"internal", *http_protocol.CODES}
    assert raised == set(error_codes.STATUS)  # the table covers every code, nothing more
    assert documented == error_codes.STATUS


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_malformed_json_and_wrong_methods_answer_their_documented_codes(client):
    documented = documented_errors()
    r = client.post(
        "/v1/sessions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (
        documented["invalid_input"],
        "invalid_input",
    )
    r = client.put("/v1/sessions")
    code = r.json()["error"]["code"]
    assert (r.status_code, code) == (documented["method_not_allowed"], "method_not_allowed")
    r = client.post("/v1/models/tiny/predict", json={"inputs": [[[0.0, 0.0]]] * 1025})
    assert (r.status_code, r.json()["error"]["code"]) == (
        documented["too_many_sequences"],
        "too_many_sequences",
    )


def test_routes_outside_v1_take_no_body(client):
    for path in ("/healthz", "/no-such-route"):
        r = client.post(path, content=b"x" * 5000)
        assert r.status_code == 413 and "takes no request body" in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200
