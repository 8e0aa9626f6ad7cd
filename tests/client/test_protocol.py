"""The client's session protocol, driven by scripted replies: no server, no sockets."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from service.client import protocol as p
from service.protocol.wire import decode_frame, encode_frame

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
        if isinstance(op, p.WsClose):  # the client drops its socket: nothing to answer
            calls.append(op)
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


def test_first_offset_conflict_resyncs_and_rebuilds_at_the_clients_position():
    # The server is a push ahead (one cancelled after it was sent): the client is the only
    # writer of its session, so it rebuilds it at its own position and retries.
    ref = ref_at(1)
    script = [
        err(409, "offset_conflict"),
        ok({"position": 2}),  # GET
        p.Reply(204, None),  # DELETE
        ok({}, 201),  # restore at position 1
        ok({"outputs": [[3.0]], "position": 2}),
    ]
    outputs, calls = drive(p.push(ref, np.ones((1, 2), np.float32), POLICY), script)
    methods = [c.method for c in calls if isinstance(c, p.Call)]
    assert methods == ["POST", "GET", "DELETE", "POST", "POST"]
    assert calls[3].json["snapshot"]["position"] == 1
    assert [c.json["offset"] for c in calls if c.path.endswith("/steps")] == [1, 1]
    assert outputs == [[3.0]] and ref.tracker.position == 2


def test_first_offset_conflict_at_the_same_position_retries_without_rebuilding():
    ref = ref_at(1)
    script = [err(409, "offset_conflict"), ok({"position": 1}), ok({"outputs": [[3.0]]})]
    _, calls = drive(p.push(ref, np.ones((1, 2), np.float32), POLICY), script)
    assert [c.method for c in calls if isinstance(c, p.Call)] == ["POST", "GET", "POST"]
    assert ref.tracker.position == 2


def test_offset_conflict_that_survives_a_rebuild_raises():
    ref = ref_at(1)
    script = [
        err(409, "offset_conflict"),
        ok({"position": 5}),
        p.Reply(204, None),
        ok({}, 201),
        err(409, "offset_conflict"),  # someone else writes this session
    ]
    with pytest.raises(p.ServerError, match="offset_conflict"):
        drive(p.push(ref, np.ones((1, 2), np.float32), POLICY), script)
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


def rebuild_script(server_position):
    """A GET finding the server at `server_position`, then the rebuild it leads to."""
    return [ok({"position": server_position}), p.Reply(204, None), ok({}, 201)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_stream_push_answer_for_another_push_is_dropped_and_resynced(binary):
    # The socket still carried the answer to a cancelled 2-row push at offset 2: it says
    # position 4, not 3. Its outputs must not be returned nor our row recorded.
    ref = ref_at(2)
    rows = np.ones((1, 2), np.float32)

    def answer(outputs, position):
        if binary:
            return encode_frame(np.array(outputs, np.float32), header=position)
        return json.dumps({"outputs": outputs, "position": position})

    script = [
        None,  # send
        answer([[5.0, 5.0], [6.0, 6.0]], 4),  # the stale answer
        *rebuild_script(4),  # GET: 4 is neither 2 nor 3 -> rebuild at 2
        None,  # resend on a fresh socket, same offset
        answer([[9.0, 8.0]], 3),
    ]
    outputs, calls = drive(p.stream_push(ref, rows, binary, POLICY), script)
    ops = [c for c in calls if not isinstance(c, tuple)]
    assert [type(c).__name__ for c in ops] == [
        "WsSend", "WsRecv", "WsClose", "Call", "Call", "Call", "WsSend", "WsRecv",
    ]  # fmt: skip
    assert ops[5].json["snapshot"]["position"] == 2
    np.testing.assert_array_equal(outputs, [[9.0, 8.0]])
    assert ref.tracker.position == 3


def test_stream_push_stale_frame_of_another_size_is_resynced_not_misdecoded():
    ref = ref_at(2)
    rows = np.ones((3, 2), np.float32)
    stale = encode_frame(np.ones((5, 2), np.float32), header=7)  # 40 bytes: not 3 rows of ours
    script = [None, stale, *rebuild_script(7), None, encode_frame(np.ones((3, 2)), header=5)]
    outputs, _ = drive(p.stream_push(ref, rows, True, POLICY), script)
    assert outputs.shape == (3, 2) and ref.tracker.position == 5


def test_stream_push_json_answer_without_position_is_not_trusted():
    ref = ref_at(2)
    rows = np.ones((1, 2), np.float32)
    script = [
        None,
        json.dumps({"outputs": [[1.0]]}),
        ok({"position": 2}),  # GET: nothing applied; resend
        None,
        json.dumps({"outputs": [[2.0]], "position": 3}),
    ]
    outputs, calls = drive(p.stream_push(ref, rows, False, POLICY), script)
    assert any(isinstance(c, p.WsClose) for c in calls)
    np.testing.assert_array_equal(outputs, [[2.0]])
    assert ref.tracker.position == 3


def test_stream_push_mismatched_answers_are_bounded_and_never_recorded():
    ref = ref_at(2)
    stale = encode_frame(np.ones((1, 2), np.float32), header=9)
    script = []
    for _ in range(POLICY.attempts):
        script += [None, stale, *rebuild_script(9)]
    with pytest.raises(p.RetriesExhausted):
        drive(p.stream_push(ref, np.ones((1, 2), np.float32), True, POLICY), script)
    assert ref.tracker.position == 2


def test_stream_push_first_offset_conflict_rebuilds_and_retries():
    ref = ref_at(1)
    conflict = json.dumps({"error": {"code": "offset_conflict", "message": "m"}, "position": 3})
    script = [
        None,
        conflict,
        *rebuild_script(3),
        None,
        json.dumps({"outputs": [[4.0]], "position": 2}),
    ]
    outputs, _ = drive(p.stream_push(ref, np.ones((1, 2), np.float32), False, POLICY), script)
    np.testing.assert_array_equal(outputs, [[4.0]])
    assert ref.tracker.position == 2


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


def test_parse_body_json_empty_and_proxy_pages():
    assert p.parse_body(200, "application/json", b'{"a": 1}') == {"a": 1}
    assert p.parse_body(200, "application/json; charset=utf-8", b"[1]") == [1]
    assert p.parse_body(204, None, b"") is None
    page = b"<html><head><title>502 Bad Gateway</title></head>" + b" " * 500 + b"</html>"
    body = p.parse_body(502, "text/html", page)
    assert body["error"]["code"] == "http_502"
    assert body["error"]["message"].startswith("<html><head><title>502 Bad Gateway")
    assert len(body["error"]["message"]) <= 200
    # JSON by its header but not by its content (a truncated reply): described, not raised
    assert p.parse_body(504, "application/json", b'{"err')["error"]["code"] == "http_504"
    error = p.ServerError.from_reply(p.Reply(500, p.parse_body(500, "text/plain", b"oops")))
    assert (error.code, error.message) == ("http_500", "oops")


def test_proxy_html_502_is_retried():
    page = p.parse_body(502, "text/html", b"<html>502 Bad Gateway</html>")
    script = [p.Reply(502, page), ok({"models": []})]
    reply, calls = drive(p.request(p.Call("GET", "/v1/models"), POLICY), script)
    assert reply.body == {"models": []} and ("wait", POLICY.delay(0)) in calls
    with pytest.raises(p.RetriesExhausted, match="http_502: <html>502 Bad Gateway"):
        drive(p.request(p.Call("GET", "/v1/models"), POLICY), [p.Reply(502, page)] * 4)


class FakeSocket:
    """A socket whose answer never comes (or whose wait is interrupted)."""

    def __init__(self, interrupt: BaseException | None = None):
        self.sent, self.aborted, self.interrupt = [], False, interrupt

    def send(self, data):
        self.sent.append(data)

    def recv(self):
        raise self.interrupt

    def abort(self):
        self.aborted = True


class AsyncFakeSocket(FakeSocket):
    async def send(self, data):
        self.sent.append(data)

    async def recv(self):
        await asyncio.sleep(60)


def test_sync_client_drops_the_socket_when_interrupted_mid_push():
    from service.client.sync import Client

    ref, socket = ref_at(2), FakeSocket(KeyboardInterrupt())
    client = Client("http://127.0.0.1:9", retry=POLICY)
    with pytest.raises(KeyboardInterrupt):
        client.run(p.stream_push(ref, np.ones((1, 2), np.float32), True, POLICY), socket)
    client.close()
    assert socket.sent and socket.aborted and ref.tracker.position == 2


def test_async_client_drops_the_socket_when_cancelled_mid_push():
    from service.client.aio import AsyncClient

    ref, socket = ref_at(2), AsyncFakeSocket()

    async def main():
        async with AsyncClient("http://127.0.0.1:9", retry=POLICY) as client:
            flow = p.stream_push(ref, np.ones((1, 2), np.float32), True, POLICY)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.run(flow, socket), 0.05)

    asyncio.run(main())
    assert socket.sent and socket.aborted and ref.tracker.position == 2


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
