"""WS /v1/streams: one socket, many sessions per message, binary and JSON frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from service.protocol.wire import decode_answers, encode_pushes
from tests.service.conftest import assert_rows_close, open_session, predict, random_rows

PLANS = [[2, 1, 3], [1, 4, 2], [5, 1, 1]]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_many_sessions_over_one_socket_equal_predict(client, binary):
    seqs = [np.asarray(random_rows(8, seed=90 + i), dtype=np.float32) for i in range(3)]
    sids = [open_session(client)["session_id"] for _ in seqs]
    fed, outputs = [0, 0, 0], [[], [], []]
    with client.websocket_connect("/v1/streams") as ws:
        for plan in PLANS:
            chunks = [seq[f : f + n] for seq, f, n in zip(seqs, fed, plan, strict=True)]
            if binary:
                ws.send_bytes(encode_pushes(list(zip(sids, fed, chunks, strict=True))))
                answers = decode_answers(ws.receive_bytes())
                got = [(a.session_id, a.position, a.outputs) for a in answers]
            else:
                steps = [
                    {"session_id": sid, "inputs": c.tolist(), "offset": f}
                    for sid, c, f in zip(sids, chunks, fed, strict=True)
                ]
                ws.send_text(json.dumps({"steps": steps}))
                results = json.loads(ws.receive_text())["results"]
                got = [(r["session_id"], r["position"], r["outputs"]) for r in results]
            for i, (sid, position, out) in enumerate(got):
                assert (sid, position) == (sids[i], fed[i] + plan[i])
                outputs[i] += np.asarray(out).tolist()
                fed[i] += plan[i]
    fed_rows = [seq[:f].tolist() for seq, f in zip(seqs, fed, strict=True)]
    for out, want in zip(outputs, predict(client, fed_rows), strict=True):
        assert_rows_close(out, want)
    assert client.get(f"/v1/sessions/{sids[0]}").json()["position"] == fed[0]  # sessions stay


def test_a_bad_push_fails_alone_in_a_binary_frame(client):
    good, other = open_session(client)["session_id"], open_session(client)["session_id"]
    with client.websocket_connect("/v1/streams") as ws:
        frame = encode_pushes(
            [
                (good, 0, np.zeros((2, 2))),
                ("no-such-session", None, np.zeros((1, 2))),
                (other, None, np.zeros((1, 3))),  # wrong width
                (other, 4, np.zeros((1, 2))),  # named twice
            ]
        )
        ws.send_bytes(frame)
        answers = decode_answers(ws.receive_bytes())
        assert [a.position for a in answers] == [2, -1, -1, -1]
        codes = [json.loads(a.error)["error"]["code"] for a in answers[1:]]
        assert codes == ["session_not_found", "invalid_input", "invalid_input"]
        ws.send_bytes(frame[:-3])  # a frame that does not parse: one error message
        error = json.loads(ws.receive_text())["error"]
        assert error["code"] == "invalid_input" and "binary frame" in error["message"]
        ws.send_text('{"steps": "nope"}')
        assert json.loads(ws.receive_text())["error"]["code"] == "invalid_input"
    assert client.get(f"/v1/sessions/{other}").json()["position"] == 0


def test_a_wrong_key_closes_with_4401(make_settings):
    from service.app import create_app
    from tests.service.conftest import serving

    key = "multiplex-key-0123456789"
    with (
        serving(create_app(make_settings(api_keys=[key]))) as client,
        client.websocket_connect("/v1/streams?token=wrong-key-0123456789") as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_bytes()
    assert closed.value.code == 4401
