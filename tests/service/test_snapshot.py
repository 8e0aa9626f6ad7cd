"""Snapshots: a session's position and last min(position, R - 1) inputs rebuild it exactly, in
the same server or in a new one; invalid snapshots are refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import (
    TINY,
    TOKENS,
    assert_rows_close,
    open_session,
    predict,
    push,
    random_rows,
    serving,
)

R = TINY.receptive_field  # 29
CHUNKS = (1, 2, 1, 31, 5, 1, 3)  # single rows (the batched step) and a push longer than R - 1


def advance(client: TestClient, sid: str, rows: list, start: int) -> list:
    """Push rows[start:] in CHUNKS, cycling, with offsets; returns their outputs."""
    outputs, position, turn = [], start, 0
    while position < len(rows):
        chunk = rows[position : position + CHUNKS[turn % len(CHUNKS)]]
        r = push(client, sid, chunk, offset=position)
        assert r.status_code == 200, r.text
        outputs += r.json()["outputs"]
        position, turn = position + len(chunk), turn + 1
    return outputs


def snapshot_of(client: TestClient, sid: str) -> dict:
    r = client.get(f"/v1/sessions/{sid}/snapshot")
    assert r.status_code == 200, r.text
    return r.json()


def restore(client: TestClient, snapshot: dict, model: str = "tiny", **body) -> str:
    state = {"position": snapshot["position"], "inputs": snapshot["inputs"]}
    created = open_session(client, model=model, snapshot=state, **body)
    assert created["position"] == snapshot["position"] and "outputs" not in created
    return created["session_id"]


@pytest.fixture
def both_models(make_settings, tokens_dir) -> Iterator[TestClient]:
    models = {"tiny": make_settings().models["tiny"], "tokens": tokens_dir}
    with serving(create_app(make_settings(models=models))) as c:
        yield c


@pytest.mark.parametrize("position", [0, 1, 17, R - 1, R, 45, 100])
def test_snapshot_is_the_position_and_the_last_inputs(client, position):
    rows = random_rows(position, seed=position)
    sid = open_session(client)["session_id"]
    advance(client, sid, rows, 0)
    snapshot = snapshot_of(client, sid)
    assert (snapshot["session_id"], snapshot["model"]) == (sid, "tiny")
    assert snapshot["position"] == position
    kept = rows[max(0, position - (R - 1)) :]
    assert len(kept) == min(position, R - 1)
    assert snapshot["inputs"] == kept  # float32 rows come back exactly


def test_snapshot_after_reset_is_empty(client):
    sid = open_session(client, prefix=random_rows(12, seed=3))["session_id"]
    assert client.post(f"/v1/sessions/{sid}/reset").status_code == 200
    snapshot = snapshot_of(client, sid)
    assert (snapshot["position"], snapshot["inputs"]) == (0, [])


@pytest.mark.parametrize("position", [0, 5, R - 1, R, 70])
def test_restore_in_a_new_server_continues_like_the_uninterrupted_session(make_settings, position):
    rows = random_rows(position + 40, seed=100 + position)
    with serving(create_app(make_settings())) as first:
        created = open_session(first, session_id="kept-across-0001")
        advance(first, created["session_id"], rows[:position], 0)
        snapshot = snapshot_of(first, created["session_id"])
        # The never-interrupted session goes on in the first server.
        uninterrupted = advance(first, created["session_id"], rows, position)
        # And a copy, restored next to it under another id, follows it exactly.
        twin = restore(first, snapshot)
        assert_rows_close(advance(first, twin, rows, position), uninterrupted)
        whole = predict(first, [rows])[0]
    assert_rows_close(uninterrupted, whole[position:])
    # The first server is gone: a second one rebuilds the session under the same id.
    with serving(create_app(make_settings())) as second:
        sid = restore(second, snapshot, session_id="kept-across-0001")
        assert sid == "kept-across-0001"
        again = snapshot_of(second, sid)
        assert (again["position"], again["inputs"]) == (snapshot["position"], snapshot["inputs"])
        if position:  # the rows that rebuilt the state are not a push to replay
            r = push(second, sid, rows[position - 1 : position], offset=position - 1)
            assert r.status_code == 409 and r.json()["error"]["position"] == position
        assert_rows_close(advance(second, sid, rows, position), uninterrupted)


@pytest.mark.parametrize("position", [3, TOKENS.receptive_field - 1, 20])
def test_token_model_snapshot_restores_exactly(both_models, position):
    c = both_models
    tokens = [[(7 * t + 3) % TOKENS.vocab_size] for t in range(position + 12)]
    sid = open_session(c, model="tokens", prefix=tokens[:position])["session_id"]
    snapshot = snapshot_of(c, sid)
    assert snapshot["position"] == position
    assert snapshot["inputs"] == tokens[max(0, position - (TOKENS.receptive_field - 1)) : position]
    restored = restore(c, snapshot, model="tokens")
    outputs = push(c, restored, tokens[position:], offset=position).json()["outputs"]
    assert_rows_close(outputs, predict(c, [tokens], model="tokens")[0][position:])


# ----- invalid snapshots ------------------------------------------------------------------------

ROWS_40 = random_rows(40, seed=9)
INVALID = [
    pytest.param(
        {"snapshot": {"position": 10, "inputs": ROWS_40[:9]}},
        "exactly the last 10 input rows",
        id="too-few-rows",
    ),
    pytest.param(
        {"snapshot": {"position": 40, "inputs": ROWS_40[:29]}},
        "exactly the last 28 input rows",
        id="more-than-R-1-rows",
    ),
    pytest.param(
        {"snapshot": {"position": 40, "inputs": ROWS_40[:27]}},
        "exactly the last 28 input rows",
        id="too-few-past-R",
    ),
    pytest.param(
        {"snapshot": {"position": 0, "inputs": ROWS_40[:1]}},
        "exactly the last 0 input rows",
        id="rows-at-position-0",
    ),
    pytest.param(
        {"prefix": ROWS_40[:2], "snapshot": {"position": 2, "inputs": ROWS_40[:2]}},
        "either prefix or snapshot",
        id="prefix-and-snapshot",
    ),
    pytest.param(
        {"snapshot": {"position": -1, "inputs": []}},
        "Expected `int` >= 0",
        id="negative-position",
    ),
    pytest.param(
        {"snapshot": {"position": 2.5, "inputs": ROWS_40[:2]}},
        "Expected `int`, got `float`",
        id="fractional-position",
    ),
    pytest.param(
        {"snapshot": {"position": 2, "inputs": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}},
        "snapshot.inputs[0]: Expected `array` of length 2",
        id="wide-rows",
    ),
    pytest.param({"snapshot": {"position": 2}}, "inputs", id="no-inputs"),
    pytest.param(
        {"snapshot": {"position": 1, "inputs": [[0.5, 0.5]], "colour": "red"}},
        "colour",
        id="unknown-field",
    ),
    pytest.param(
        {"snapshot": {"position": 1, "inputs": [[0.5, 0.5]], "model": "other"}},
        "of model 'other'",
        id="another-model",
    ),
]


@pytest.mark.parametrize(("body", "match"), INVALID)
def test_invalid_snapshot_is_refused_with_422(client, body, match):
    r = client.post("/v1/sessions", json={"model": "tiny", "session_id": "not-made-0001", **body})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_input" and match in error["message"], error
    assert client.get("/v1/sessions/not-made-0001").status_code == 404


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e39"])
def test_snapshot_with_non_finite_rows_is_refused(client, literal):
    body = json.dumps({"position": 2, "inputs": [[0.5, 0.5], [0.5, 0.5]]})
    body = body.replace("0.5]]", f"{literal}]]", 1)
    content = f'{{"model": "tiny", "session_id": "not-made-0002", "snapshot": {body}}}'
    r = client.post("/v1/sessions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "finite" in message or "without overflowing" in message
    assert client.get("/v1/sessions/not-made-0002").status_code == 404


def test_token_snapshot_with_a_bad_id_is_refused(both_models):
    snapshot = {"position": 2, "inputs": [[1], [TOKENS.vocab_size]]}
    r = both_models.post("/v1/sessions", json={"model": "tokens", "snapshot": snapshot})
    assert r.status_code == 422 and "outside [0, 7)" in r.json()["error"]["message"]


def test_snapshot_of_unknown_or_expired_session(client, clock):
    assert client.get("/v1/sessions/no-such-session-01/snapshot").status_code == 404
    sid = open_session(client, ttl_s=5, prefix=random_rows(3, seed=1))["session_id"]
    clock.advance(6)
    r = client.get(f"/v1/sessions/{sid}/snapshot")
    assert r.status_code == 410 and r.json()["error"]["code"] == "session_expired"


@pytest.mark.asyncio
async def test_snapshots_taken_during_pushes_are_consistent(aclient):
    rows = random_rows(60, seed=11)
    sid = (await aclient.post("/v1/sessions", json={"model": "tiny"})).json()["session_id"]

    async def pushes() -> None:
        for t, row in enumerate(rows):
            r = await aclient.post(f"/v1/sessions/{sid}/steps", json={"inputs": [row], "offset": t})
            assert r.status_code == 200, r.text

    async def snapshots() -> list[dict]:
        taken = []
        for _ in range(20):
            taken.append((await aclient.get(f"/v1/sessions/{sid}/snapshot")).json())
        return taken

    _, taken = await asyncio.gather(pushes(), snapshots())
    for snapshot in taken:  # each one is the rows before its own position, never a torn read
        position = snapshot["position"]
        assert snapshot["inputs"] == rows[max(0, position - (R - 1)) : position]


def test_a_snapshot_body_posts_back_as_it_is(client):
    rows = random_rows(40, seed=41)
    sid = open_session(client)["session_id"]
    advance(client, sid, rows[:33], 0)
    snapshot = snapshot_of(client, sid)  # with its session_id and model fields
    created = open_session(client, snapshot=snapshot)
    assert created["position"] == 33 and created["session_id"] != sid
    restored = advance(client, created["session_id"], rows, 33)
    assert_rows_close(restored, advance(client, sid, rows, 33))
