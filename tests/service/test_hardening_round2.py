"""Hardening round 2, in process: strict numeric headers, JSON shape bounded before parsing,
an empty X-API-Key, WebSocket messages in the shared budget and per-key stream limits.

(Memory and header limits against a real process are in test_hardening_live.py; the session
store's faults in test_durability_faults.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect

from service.app import create_app
from service.protocol import json_bounds
from service.protocol.limits import MAX_HEADER_DIGITS, InflightBudget, header_int
from service.protocol.wire import encode_frame
from tests.service.conftest import open_session, random_rows, runtime_of, serving

DEEP = b"[" * 970 + b"]" * 970  # a 1.9 KB body that used to raise RecursionError
KEY, OTHER_KEY = "round-two-key-0123456789", "round-two-other-key-0123456789"


def position_of(client, sid: str) -> int:
    return client.get(f"/v1/sessions/{sid}").json()["position"]


# ----- numeric headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["\u00b2", "\uff11", "9" * 5000, "9" * (MAX_HEADER_DIGITS + 1), "+1", " 1", "1_0", ""]
)
def test_header_int_takes_only_short_ascii_decimals(value):
    assert header_int(value) is None
    assert header_int(value.encode("utf-8")) is None


def test_header_int_reads_plain_decimals():
    assert header_int("0") == 0 and header_int(b"123") == 123
    assert header_int("9" * MAX_HEADER_DIGITS) == int("9" * MAX_HEADER_DIGITS)


@pytest.mark.parametrize("value", ["\u00b2".encode(), b"9" * 5000, b"12a", b"-3"])
def test_a_bad_inference_header_length_is_a_400_not_a_500(client, value):
    r = client.post(
        "/v2/models/tiny/infer",
        content=b'{"inputs": []}',
        headers=[(b"inference-header-content-length", value)],
    )
    assert r.status_code == 400, r.text
    assert "Inference-Header-Content-Length" in r.json()["error"]
    assert len(r.json()["error"]) < 300  # a 5,000-digit value is not echoed whole


def test_a_huge_content_length_is_refused_without_a_crash(client):
    r = client.post(
        "/v1/models/tiny/predict",
        content=b"{}",
        headers=[(b"content-length", b"9" * 5000), (b"content-type", b"application/json")],
    )
    assert r.status_code < 500


# ----- JSON shape --------------------------------------------------------------------------------


def _deep_bodies(sid: str) -> dict[str, tuple[str, bytes]]:
    item = b'{"session_id": "%s", "inputs": ' % sid.encode()
    return {
        "predict": ("/v1/models/tiny/predict", b'{"inputs": ' + DEEP + b"}"),
        "push": (f"/v1/sessions/{sid}/steps", b'{"inputs": ' + DEEP + b"}"),
        "create prefix": ("/v1/sessions", b'{"model": "tiny", "prefix": ' + DEEP + b"}"),
        "create snapshot": (
            "/v1/sessions",
            b'{"model": "tiny", "snapshot": {"position": 1, "inputs": ' + DEEP + b"}}",
        ),
        "steps": ("/v1/steps", b'{"steps": [' + item + DEEP + b"}]}"),
        "steps offset": (
            "/v1/steps",
            b'{"steps": [' + item + b'[[1, 1]], "offset": ' + DEEP + b"}]}",
        ),
        "v2": (
            "/v2/models/tiny/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 1, 2], "datatype": "FP32", "data": '
            + DEEP
            + b"}]}",
        ),
    }


def test_deeply_nested_json_is_a_clear_4xx_on_every_route_and_changes_nothing(client):
    sid = open_session(client, prefix=random_rows(3, seed=1))["session_id"]
    before = client.get("/metrics").text.count("tcnserve_active_sessions")
    for name, (url, body) in _deep_bodies(sid).items():
        r = client.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), (name, r.status_code, r.text)
        message = r.json()["error"] if url.startswith("/v2") else r.json()["error"]["message"]
        assert f"nested more than {json_bounds.MAX_DEPTH} levels" in message, (name, message)
    assert position_of(client, sid) == 3
    assert client.get("/metrics").text.count("tcnserve_active_sessions") == before


def test_deeply_nested_websocket_messages_are_answered_and_the_socket_goes_on(client):
    sid = open_session(client)["session_id"]
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        ws.send_text(DEEP.decode())
        assert ws.receive_json()["error"]["code"] == "invalid_input"
        ws.send_text(json.dumps({"inputs": [[0.5, 0.5]]}))
        assert ws.receive_json()["position"] == 1
    with client.websocket_connect("/v1/streams") as ws:  # the gateway's socket survives it
        deep_item = f'{{"session_id": "{sid}", "inputs": {DEEP.decode()}}}'
        ws.send_text(f'{{"steps": [{deep_item}]}}')
        assert "nested more than" in ws.receive_json()["error"]["message"]
        ws.send_text(json.dumps({"steps": [{"session_id": sid, "inputs": [[0.1, 0.2]]}]}))
        assert ws.receive_json()["results"][0]["position"] == 2


def test_too_many_sequences_are_refused_before_any_is_parsed(client):
    body = b'{"inputs": [' + b",".join([b"[[0, 0]]"] * 200_000) + b"]}"
    r = client.post("/v1/models/tiny/predict", content=body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_sequences"
    assert "more than 1024 sequences" in r.json()["error"]["message"]


def test_too_many_rows_are_refused_before_any_is_parsed(make_settings):
    with serving(create_app(make_settings(max_timesteps_per_request=50))) as client:
        sid = open_session(client)["session_id"]
        rows = b"[" + b",".join([b"[0, 0]"] * 51) + b"]"
        for url, body in (
            ("/v1/models/tiny/predict", b'{"inputs": [' + rows + b"]}"),
            (f"/v1/sessions/{sid}/steps", b'{"inputs": ' + rows + b"}"),
            ("/v1/sessions", b'{"model": "tiny", "prefix": ' + rows + b"}"),
        ):
            r = client.post(url, content=body)
            assert r.status_code == 413, (url, r.text)
            assert r.json()["error"]["code"] == "too_many_timesteps"
        assert position_of(client, sid) == 0


def test_steps_items_are_counted_before_parsing_and_long_items_fail_alone(make_settings):
    settings_ = make_settings(max_sequences_per_request=4, max_timesteps_per_request=50)
    with serving(create_app(settings_)) as client:
        sids = [open_session(client)["session_id"] for _ in range(2)]
        many = {"steps": [{"session_id": sids[0], "inputs": [[0, 0]]}] * 5}
        r = client.post("/v1/steps", json=many)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_sequences"
        assert "more than 4 items" in r.json()["error"]["message"]
        body = {
            "steps": [
                {"session_id": sids[0], "inputs": [[0, 0]] * 51},
                {"session_id": sids[1], "inputs": [[0.5, 0.5]]},
            ]
        }
        results = client.post("/v1/steps", json=body).json()["results"]
        assert results[0]["error"]["code"] == "too_many_timesteps"
        assert results[1]["position"] == 1
        assert position_of(client, sids[0]) == 0


def _containers(value, depth: int, counts: dict[int, int]) -> int:
    """Reference: the deepest nesting of a decoded JSON value, counting containers per depth."""
    if isinstance(value, (list, dict)):
        counts[depth + 1] = counts.get(depth + 1, 0) + 1
        children = value.values() if isinstance(value, dict) else value
        return max([depth + 1] + [_containers(v, depth + 1, counts) for v in children])
    return depth


_strings = st.text(alphabet='[]{}"\\ab\u00e9\n', max_size=6)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_strings, inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=_json, pick=st.integers(0, 20))
def test_the_shape_scan_agrees_with_a_real_parser(value, pick):
    """Depth and per-depth counts, strings with brackets, quotes and escapes inside."""
    data = json.dumps(value, ensure_ascii=pick % 2 == 0).encode()
    counts: dict[int, int] = {}
    depth = _containers(value, 0, counts)
    expected_deep = depth > json_bounds.MAX_DEPTH
    assert (json_bounds.check(data) is not None) == expected_deep
    if counts and not expected_deep:
        at = sorted(counts)[pick % len(counts)]
        tight = json_bounds.Count(at, counts[at], "x")
        assert json_bounds.check(data, (tight,)) is None
        over = json_bounds.Count(at, counts[at] - 1, "x")
        assert json_bounds.check(data, (over,)) == json_bounds.Exceeded(over)


def test_the_shape_scan_counts_nothing_inside_strings():
    data = json.dumps({"a": "[[[[" * 40, "b": ["]]]]" * 40, [1]]}).encode()
    assert json_bounds.check(data, (json_bounds.Count(3, 1, "x"),)) is None
    escaped = b'["\\"[[[[[[[[[[[[[[[[[[[[", [1]]'
    assert json_bounds.check(escaped, (json_bounds.Count(2, 1, "x"),)) is None
    assert json_bounds.check(b"[" * 17 + b"]" * 17) == json_bounds.Exceeded(None)


# ----- API keys ----------------------------------------------------------------------------------


def test_an_empty_x_api_key_does_not_hide_the_bearer_key(make_settings):
    with serving(create_app(make_settings(api_keys=KEY))) as client:
        bearer = {"Authorization": f"Bearer {KEY}"}
        for blank in ("", "  "):
            r = client.get("/v1/models", headers={**bearer, "X-API-Key": blank})
            assert r.status_code == 200, (blank, r.text)
        r = client.get("/v1/models", headers={"X-API-Key": ""})
        assert r.status_code == 401


# ----- WebSocket budget and per-key streams ------------------------------------------------------


def test_inflight_budget_refuses_without_holding():
    budget = InflightBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.held == 6
    budget.release(6)
    assert budget.take(10) and budget.held == 10


def test_a_websocket_message_over_the_shared_budget_is_refused_and_the_socket_goes_on(client):
    sid = open_session(client)["session_id"]
    budget = runtime_of(client.app).inflight
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        budget.held = budget.limit  # every byte held by other requests
        ws.send_bytes(encode_frame(np.zeros((1, 2), dtype=np.float32)))
        answer = ws.receive_json()
        assert answer["error"]["code"] == "overloaded", answer
        budget.held = 0
        ws.send_bytes(encode_frame(np.zeros((1, 2), dtype=np.float32)))
        assert len(ws.receive_bytes()) == 8  # one row of two float32 outputs
    assert position_of(client, sid) == 1
    assert budget.held == 0  # every message released its bytes


def test_a_key_holds_at_most_max_streams_per_key_streams(make_settings):
    app = create_app(make_settings(api_keys=f"{KEY},{OTHER_KEY}", max_streams_per_key=2))
    with serving(app) as client:
        headers = {"X-API-Key": KEY}
        sid = client.post("/v1/sessions", json={"model": "tiny"}, headers=headers).json()
        url = f"/v1/sessions/{sid['session_id']}/stream"
        with (
            client.websocket_connect(url, headers=headers),
            client.websocket_connect("/v1/streams", headers=headers),
        ):
            for third in (url, "/v1/streams", "/v1/stream?model=tiny"):
                with client.websocket_connect(third, headers=headers) as ws:
                    with pytest.raises(WebSocketDisconnect) as closed:
                        ws.receive_text()
                    assert closed.value.code == 4429
                    assert "max_streams_per_key" in closed.value.reason
            # Another key is not affected.
            with client.websocket_connect("/v1/streams", headers={"X-API-Key": OTHER_KEY}) as ws:
                ws.send_text(json.dumps({"steps": []}))
                assert ws.receive_json()["error"]["code"] == "invalid_input"
        # Closed streams free their places.
        assert runtime_of(app).streams.open == {}
        with client.websocket_connect(url, headers=headers) as ws:
            ws.send_text(json.dumps({"inputs": [[0.5, 0.5]]}))
            assert ws.receive_json()["position"] == 1


# ----- the docs state the facts the code holds ---------------------------------------------------


def test_every_setting_is_documented_with_its_default():
    import re
    from pathlib import Path

    from service.settings import Settings

    text = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n\n**Shutdown", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \|[^|]*\| ([^|]*) \|", table, re.MULTILINE))
    assert set(Settings.model_fields) <= set(rows), set(Settings.model_fields) - set(rows)
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None or not isinstance(default, (bool, int, float, str)):
            continue
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        if isinstance(default, float) and default.is_integer():
            shown = str(int(default))
        assert rows[name].strip().startswith(f"`{shown}`"), (name, shown, rows[name])


def test_the_docs_state_the_json_depth_limit():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    assert f"JSON nested more than {json_bounds.MAX_DEPTH} levels deep" in text
    assert f"at most {json_bounds.MAX_DEPTH} levels deep" in text


def test_an_oversized_websocket_handshake_in_one_read_is_a_clean_431(make_settings, caplog):
    import logging
    import socket

    from service.http.protocol import deadline_protocol
    from service.ws.protocol import ReleasingWebSocketProtocol
    from tests.service.conftest import uvicorn_thread

    protocols = {"http": deadline_protocol(30.0, 2000), "ws": ReleasingWebSocketProtocol}
    with uvicorn_thread(create_app(make_settings()), **protocols) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        request = (
            b"GET /v1/streams HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Big: " + b"a" * 3000 + b"\r\n\r\n"
        )
        with caplog.at_level(logging.ERROR), socket.create_connection((host, int(port))) as s:
            s.sendall(request)  # one write, one read: the headers complete in one feed
            s.settimeout(10)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
