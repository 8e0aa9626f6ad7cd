"""Sessions over HTTP: streaming equals /predict, offsets and replay, errors leave state alone."""

from __future__ import annotations

import pytest

from service.app import create_app
from tests.service.conftest import (
    assert_rows_close,
    open_session,
    predict,
    push,
    random_rows,
    runtime_of,
    serving,
)


def test_prefix_then_steps_and_chunks_equal_predict(client):
    rows = random_rows(70, seed=5)
    created = open_session(client, prefix=rows[:10])
    assert created["position"] == 10 and len(created["outputs"]) == 10
    sid, outputs = created["session_id"], list(created["outputs"])
    position = 10
    for size in (1, 1, 7, 1, 30, 1, 19):  # longer than the receptive field (29) in total
        r = push(client, sid, rows[position : position + size], offset=position)
        assert r.status_code == 200, r.text
        position += size
        assert r.json()["position"] == position
        outputs += r.json()["outputs"]
    assert_rows_close(outputs, predict(client, [rows])[0])


def test_session_info_and_generated_ids(client, clock):
    created = open_session(client, ttl_s=30)
    assert "outputs" not in created
    sid = created["session_id"]
    assert len(sid) >= 32 and created["expires_at"] == clock.now + 30
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info == {
        "session_id": sid,
        "model": "tiny",
        "position": 0,
        "created_at": clock.now,
        "last_used_at": clock.now,
        "expires_at": clock.now + 30,
        "ttl_s": 30.0,
    }
    assert open_session(client)["session_id"] != sid


def test_client_chosen_id_and_conflict(client):
    assert open_session(client, session_id="stream-0001")["session_id"] == "stream-0001"
    r = client.post("/v1/sessions", json={"model": "tiny", "session_id": "stream-0001"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists"
    for bad in ("short", "has space-1", "x" * 129, "semi;colon!"):
        r = client.post("/v1/sessions", json={"model": "tiny", "session_id": bad})
        assert r.status_code == 422, bad


def test_session_id_from_the_x_session_id_header(client):
    r = client.post("/v1/sessions", json={"model": "tiny"}, headers={"X-Session-ID": "routed-0001"})
    assert r.status_code == 201 and r.json()["session_id"] == "routed-0001"
    same = {"model": "tiny", "session_id": "routed-0002"}
    r = client.post("/v1/sessions", json=same, headers={"X-Session-ID": "routed-0002"})
    assert r.status_code == 201
    other = {"model": "tiny", "session_id": "routed-0003"}
    r = client.post("/v1/sessions", json=other, headers={"X-Session-ID": "routed-0004"})
    assert r.status_code == 422 and "X-Session-ID" in r.json()["error"]["message"]
    r = client.post("/v1/sessions", json={"model": "tiny"}, headers={"X-Session-ID": "bad id"})
    assert r.status_code == 422


def test_replay_of_the_last_push_is_not_applied_twice(client):
    rows = random_rows(8, seed=9)
    sid = open_session(client)["session_id"]
    first = push(client, sid, rows[:3], offset=0).json()
    again = push(client, sid, rows[:3], offset=0)
    assert again.status_code == 200 and again.json() == first
    assert client.get(f"/v1/sessions/{sid}").json()["position"] == 3
    single = push(client, sid, rows[3:4], offset=3).json()
    assert push(client, sid, rows[3:4], offset=3).json() == single
    # Only the last applied push is replayable; older offsets conflict.
    r = push(client, sid, rows[:3], offset=0)
    assert r.status_code == 409 and r.json()["error"]["position"] == 4
    rest = push(client, sid, rows[4:], offset=4).json()["outputs"]
    assert_rows_close(first["outputs"] + single["outputs"] + rest, predict(client, [rows])[0])


def test_offset_conflicts_report_position_and_change_nothing(client):
    rows = random_rows(6, seed=11)
    sid = open_session(client, prefix=rows[:2])["session_id"]
    for offset, inputs in (
        (5, rows[2:3]),
        (1, rows[2:3]),
        (0, rows[2:4]),
        (0, rows[:1] + rows[:1]),
    ):
        r = push(client, sid, inputs, offset=offset)
        assert r.status_code == 409, (offset, r.text)
        error = r.json()["error"]
        assert error["code"] == "offset_conflict" and error["position"] == 2
    # Same offset and length as the last push but different rows: a conflict, not a replay.
    r = push(client, sid, [rows[1], rows[0]], offset=0)
    assert r.status_code == 409 and "different inputs" in r.json()["error"]["message"]
    out = push(client, sid, rows[2:], offset=2).json()["outputs"]
    assert_rows_close(out, predict(client, [rows])[0][2:])


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},
        {"inputs": [[1.0]]},
        {"inputs": [[1.0, 2.0, 3.0]]},
        {"inputs": [[1.0, 2.0], [1.0]]},
        {"inputs": [[1.0, "x"]]},
        {"inputs": [[1.0, 2.0]], "offset": -1},
        {"inputs": [[1.0, 2.0]], "offset": 1.5},
        {"inputs": [[1.0, 2.0]], "unknown": 1},
    ],
)
def test_invalid_pushes_are_422_and_leave_the_session_unchanged(client, body):
    rows = random_rows(5, seed=3)
    sid = open_session(client, prefix=rows[:2])["session_id"]
    before = client.get(f"/v1/sessions/{sid}").json()
    r = client.post(f"/v1/sessions/{sid}/steps", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    assert client.get(f"/v1/sessions/{sid}").json() == before
    nan = client.post(
        f"/v1/sessions/{sid}/steps",
        content=b'{"inputs": [[NaN, 1.0]]}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422
    out = push(client, sid, rows[2:], offset=2).json()["outputs"]
    assert_rows_close(out, predict(client, [rows])[0][2:])


def test_too_many_timesteps_in_a_push_is_413_and_changes_nothing(make_settings):
    # 30 >= the tiny model's R - 1 = 28, so its snapshots stay restorable (else no start)
    with serving(create_app(make_settings(max_timesteps_per_request=30))) as c:
        sid = open_session(c)["session_id"]
        r = push(c, sid, random_rows(31, seed=1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_timesteps"
        assert c.get(f"/v1/sessions/{sid}").json()["position"] == 0
        r = c.post("/v1/sessions", json={"model": "tiny", "prefix": random_rows(31, seed=1)})
        assert r.status_code == 413


def test_reset_and_delete(client):
    rows = random_rows(6, seed=2)
    sid = open_session(client, prefix=rows[:4])["session_id"]
    r = client.post(f"/v1/sessions/{sid}/reset")
    assert r.status_code == 200 and r.json()["position"] == 0
    out = push(client, sid, rows, offset=0).json()["outputs"]
    assert_rows_close(out, predict(client, [rows])[0])
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    for r in (
        client.get(f"/v1/sessions/{sid}"),
        push(client, sid, rows[:1]),
        client.post(f"/v1/sessions/{sid}/reset"),
        client.delete(f"/v1/sessions/{sid}"),
    ):
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_unknown_session_and_model(client):
    r = push(client, "never-existed", random_rows(1, seed=1))
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = client.post("/v1/sessions", json={"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for ttl in (0, -1, 10**9):
        assert client.post("/v1/sessions", json={"model": "tiny", "ttl_s": ttl}).status_code == 422


def test_capacity_is_429_with_retry_after_and_frees_on_delete(make_settings):
    with serving(create_app(make_settings(max_sessions=2, retry_after_s=3))) as c:
        first = open_session(c)["session_id"]
        open_session(c)
        r = c.post("/v1/sessions", json={"model": "tiny", "session_id": "third-one"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "capacity_exceeded"
        assert r.headers["retry-after"] == "3"
        # The refused id was not kept: once a slot is free, it can be created.
        assert c.delete(f"/v1/sessions/{first}").status_code == 204
        assert open_session(c, session_id="third-one")["position"] == 0


def test_ttl_expiry_with_an_injected_clock(make_settings, clock):
    app = create_app(make_settings(session_ttl_s=60, expired_memory=2), clock=clock)
    with serving(app) as c:
        kept = open_session(c)["session_id"]
        idle = open_session(c)["session_id"]
        short = open_session(c, ttl_s=5)["session_id"]
        clock.advance(6)
        r = c.get(f"/v1/sessions/{short}")
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_expired"
        clock.advance(50)
        assert push(c, kept, random_rows(1, seed=1)).status_code == 200  # refreshes its TTL
        clock.advance(10)  # idle is now 66 s old, kept 10 s
        swept = c.portal.call(runtime_of(app).sessions.sweep)
        assert swept == 1
        assert c.get(f"/v1/sessions/{kept}").status_code == 200
        r = push(c, idle, random_rows(1, seed=1))
        assert r.status_code == 410
        metrics = c.get("/metrics").text
        assert 'tcnserve_sessions_expired_total{model="tiny"} 2.0' in metrics
        assert 'tcnserve_active_sessions{model="tiny"} 1.0' in metrics
        assert runtime_of(app).registry.get("tiny").worker.pool.free == 31
        # Expired ids are remembered in a bounded memory (2 here): the oldest falls back to 404.
        clock.advance(61)
        c.portal.call(runtime_of(app).sessions.sweep)
        assert c.get(f"/v1/sessions/{short}").status_code == 404
        assert c.get(f"/v1/sessions/{kept}").status_code == 410
        # An expired id may be opened again.
        assert open_session(c, session_id=kept)["position"] == 0


def test_auth_isolates_sessions_between_keys(make_settings):
    key_a, key_b = "a" * 16 + "-alpha-key", "b" * 16 + "-bravo-key"
    with serving(create_app(make_settings(api_keys=[key_a, key_b]))) as c:
        a = {"Authorization": f"Bearer {key_a}"}
        b = {"X-API-Key": key_b}
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"X-API-Key": "x"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/v1/models", headers=a).status_code == 200
        sid = c.post("/v1/sessions", json={"model": "tiny"}, headers=a).json()["session_id"]
        for r in (
            c.get(f"/v1/sessions/{sid}", headers=b),
            c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 0.0]]}, headers=b),
            c.post(f"/v1/sessions/{sid}/reset", headers=b),
            c.delete(f"/v1/sessions/{sid}", headers=b),
        ):
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        assert c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 0.0]]}).status_code == 401
        assert c.get(f"/v1/sessions/{sid}", headers=a).json()["position"] == 0
        # Ids are per key: B may use the same id for its own session.
        r = c.post("/v1/sessions", json={"model": "tiny", "session_id": sid}, headers=b)
        assert r.status_code == 201


def test_the_capacity_refusal_says_how_to_free_slots(make_settings):
    with serving(create_app(make_settings(max_sessions=1, session_ttl_s=600))) as c:
        open_session(c)
        message = c.post("/v1/sessions", json={"model": "tiny"}).json()["error"]["message"]
        for hint in ("max_sessions", "DELETE /v1/sessions", "GET /v1/sessions", "600 s"):
            assert hint in message, (hint, message)


def test_list_your_sessions_by_page_and_delete_them_all(make_settings, tokens_dir, tiny_dir, clock):
    key_a, key_b = "a" * 16 + "-alpha-key", "b" * 16 + "-bravo-key"
    settings = make_settings(
        api_keys=[key_a, key_b], models={"tiny": tiny_dir, "tokens": tokens_dir}
    )
    with serving(create_app(settings, clock=clock)) as c:
        a, b = {"X-API-Key": key_a}, {"X-API-Key": key_b}

        def opened(headers: dict, model: str = "tiny") -> str:
            r = c.post("/v1/sessions", json={"model": model}, headers=headers)
            assert r.status_code == 201, r.text
            return r.json()["session_id"]

        mine = sorted(opened(a) for _ in range(5))
        token = opened(a, "tokens")
        theirs = opened(b)
        clock.advance(7)
        seen, after = [], None
        while True:  # pages of two, in id order
            params = {"limit": 2, "model": "tiny"} | ({"after": after} if after else {})
            page = c.get("/v1/sessions", params=params, headers=a).json()
            seen += page["sessions"]
            after = page["next"]
            if after is None:
                break
        assert [s["session_id"] for s in seen] == mine
        assert all(s["model"] == "tiny" and s["position"] == 0 and s["idle_s"] == 7 for s in seen)
        everything = c.get("/v1/sessions", headers=a).json()
        assert {s["session_id"] for s in everything["sessions"]} == {*mine, token}
        assert everything["next"] is None
        assert [s["session_id"] for s in c.get("/v1/sessions", headers=b).json()["sessions"]] == [
            theirs
        ]  # never another key's
        assert c.get("/v1/sessions", params={"limit": 0}, headers=a).status_code == 422
        assert c.delete("/v1/sessions", params={"model": "tokens"}, headers=a).json() == {
            "deleted": 1
        }
        assert c.delete("/v1/sessions", headers=a).json() == {"deleted": 5}
        assert c.get("/v1/sessions", headers=a).json() == {"sessions": [], "next": None}
        assert c.get(f"/v1/sessions/{theirs}", headers=b).status_code == 200
