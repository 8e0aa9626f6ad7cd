"""The client's session protocol, driven by scripted replies: no server, no sockets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.client import protocol as p
from service.wire import decode_frame, encode_frame

POLICY = p.RetryPolicy(attempts=4, backoff_s=0.01)


def drive(flow, script):
    """Run a flow against a scripted server: a list of (expected call check, reply)."""
    calls, value, error = [], None, None
    script = list(script)
    while True:
        try:
            op = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            assert not script, f"unused replies: {script}"
            return stop.value, calls
        value, error = None, None
        if isinstance(op, p.Wait):
            calls.append(("wait", op.seconds))
            continue
        calls.append(op)
        outcome = script.pop(0)
        if isinstance(outcome, Exception):
            error = outcome
        else:
            value = outcome


def ok(body, status=200):
    return p.Reply(status, body)


def err(status, code="x"):
    return p.Reply(status, {"error": {"code": code, "message": "m"}})


def ref_at(position=0, keep=3):
    tracker = p.Tracker(keep)
    if position:
        tracker.record(np.arange(position * 2, dtype=np.float32).reshape(position, 2))
    return p.SessionRef("sess-abcdefgh", "default", tracker)


def test_tracker_keeps_last_inputs():
    tracker = p.Tracker(keep=3)
    tracker.record(np.array([[1.0], [2.0]], np.float32))
    tracker.record(np.array([[3.0], [4.0]], np.float32))
    assert tracker.position == 4
    assert tracker.snapshot() == {"position": 4, "inputs": [[2.0], [3.0], [4.0]]}
    tracker.record(np.array([[5.0]] * 5, np.float32))
    assert tracker.position == 9 and len(tracker.tail) == 3


def test_push_sends_offset_and_session_header():
    ref = ref_at(2)
    rows = np.ones((1, 2), np.float32)
    outputs, calls = drive(p.push(ref, rows, POLICY), [ok({"outputs": [[7.0]], "position": 3})])
    assert outputs == [[7.0]] and ref.tracker.position == 3
    assert calls[0].json == {"inputs": [[1.0, 1.0]], "offset": 2}
    assert calls[0].session_id == ref.id


def test_push_retries_transport_failure_with_same_offset():
    ref = ref_at(5)
    rows = np.ones((2, 2), np.float32)
    script = [p.TransportFailure("reset"), ok({"outputs": [[1.0], [2.0]], "position": 7})]
    _, calls = drive(p.push(ref, rows, POLICY), script)
    pushes = [c for c in calls if isinstance(c, p.Call)]
    assert [c.json["offset"] for c in pushes] == [5, 5]
    assert ref.tracker.position == 7


def test_push_restores_a_lost_session_from_kept_inputs():
    ref = ref_at(4, keep=3)
    rows = np.ones((1, 2), np.float32)
    script = [err(410, "session_expired"), ok({}, 201), ok({"outputs": [[0.5]], "position": 5})]
    _, calls = drive(p.push(ref, rows, POLICY), script)
    restore = calls[1]
    assert restore.method == "POST" and restore.path == "/v1/sessions"
    assert restore.json["session_id"] == ref.id
    assert restore.json["snapshot"] == {
        "position": 4,
        "inputs": [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]],
    }
    assert ref.tracker.position == 5


def test_first_offset_conflict_is_the_callers_problem():
    ref = ref_at(1)
    with pytest.raises(p.ServerError, match="offset_conflict"):
        drive(p.push(ref, np.ones((1, 2), np.float32), POLICY), [err(409, "offset_conflict")])
    assert ref.tracker.position == 1


def test_conflict_after_an_uncertain_retry_rebuilds_at_the_clients_position():
    ref = ref_at(3)
    script = [
        p.TransportFailure("timeout"),
        err(409, "offset_conflict"),
        p.Reply(204, None),  # DELETE
        ok({}, 201),  # restore
        ok({"outputs": [[1.0]], "position": 4}),
    ]
    _, calls = drive(p.push(ref, np.ones((1, 2), np.float32), POLICY), script)
    methods = [c.method for c in calls if isinstance(c, p.Call)]
    assert methods == ["POST", "POST", "DELETE", "POST", "POST"]
    assert ref.tracker.position == 4


def test_retry_after_is_honoured_and_retries_are_bounded():
    ref = ref_at(0)
    busy = p.Reply(429, {"error": {"code": "capacity_exceeded"}}, {"retry-after": "0.5"})
    with pytest.raises(p.RetriesExhausted):
        drive(p.push(ref, np.ones((1, 2), np.float32), POLICY), [busy] * POLICY.attempts)
    assert ref.tracker.position == 0


def test_other_errors_raise_without_retry():
    with pytest.raises(p.ServerError) as info:
        drive(p.push(ref_at(), np.ones((1, 2), np.float32), POLICY), [err(422, "invalid_input")])
    assert info.value.status == 422 and info.value.code == "invalid_input"


def test_open_session_retry_after_lost_reply_starts_over():
    prefix = np.ones((2, 2), np.float32)
    script = [
        p.TransportFailure("reset"),
        err(409, "session_exists"),  # the first try was applied
        p.Reply(204, None),
        ok({"session_id": "s", "outputs": [[1.0], [2.0]]}, 201),
    ]
    (ref, outputs), calls = drive(p.open_session("m", prefix, None, None, 3, POLICY), script)
    posts = [c for c in calls if isinstance(c, p.Call) and c.method == "POST"]
    assert len({c.json["session_id"] for c in posts}) == 1  # the same client-chosen id
    assert outputs == [[1.0], [2.0]] and ref.tracker.position == 2


def test_stream_push_binary_round_trip_and_resync_after_drop():
    ref = ref_at(2)
    rows = np.ones((1, 2), np.float32)
    answer = encode_frame(np.array([[9.0, 8.0]], np.float32), header=3)
    script = [
        None,  # send
        p.SocketClosed(1006, "abnormal"),  # recv: dropped mid-push
        ok({"position": 3}),  # GET: our push was applied
        None,  # resend with the same offset
        answer,
    ]
    outputs, calls = drive(p.stream_push(ref, rows, True, POLICY), script)
    sends = [c for c in calls if isinstance(c, p.WsSend)]
    assert [decode_frame(s.data, 2, True)[0] for s in sends] == [2, 2]
    np.testing.assert_array_equal(outputs, [[9.0, 8.0]])
    assert ref.tracker.position == 3


def test_stream_push_restores_after_session_lost_close_code():
    ref = ref_at(1)
    rows = np.ones((1, 2), np.float32)
    script = [
        None,
        p.SocketClosed(p.CLOSE_NOT_FOUND, "no session"),
        ok({}, 201),  # restore
        None,
        json.dumps({"outputs": [[4.0]], "position": 2}),
    ]
    outputs, calls = drive(p.stream_push(ref, rows, False, POLICY), script)
    assert any(isinstance(c, p.Call) and "snapshot" in (c.json or {}) for c in calls)
    np.testing.assert_array_equal(outputs, [[4.0]])


def test_stream_push_unauthorized_close_raises():
    with pytest.raises(p.ServerError, match="unauthorized"):
        drive(
            p.stream_push(ref_at(), np.ones((1, 2), np.float32), True, POLICY),
            [None, p.SocketClosed(p.CLOSE_UNAUTHORIZED, "bad key")],
        )


def test_model_shape_rows():
    shape = p.ModelShape("m", width=2, tokens=False, receptive_field=5)
    assert shape.rows([[1, 2]]).dtype == np.float32
    with pytest.raises(ValueError, match="rows of 2 values"):
        shape.rows([[1, 2, 3]])
    tokens = p.ModelShape("t", width=1, tokens=True, receptive_field=5)
    assert tokens.rows([3, 4]).shape == (2, 1)


def test_websocket_url():
    assert (
        p.websocket_url("https://h:1/", "abc") == "wss://h:1/v1/sessions/abc/stream?framing=offset"
    )
