"""Many sessions pushed through two edges in front of one engine, interleaved: every transport
(HTTP steps, POST /v1/steps with several sessions, WebSocket text frames), random chunks with
and without offsets, exact retries and conflicting pushes mixed in. However the pushes are
spread, each session's outputs equal /predict over its whole sequence, a retry is answered
again without advancing, and a conflict is a 409 with the position that changes nothing.

Pushes to one session racing from both edges apply exactly once. The engine and both edges run
in this process (tests/service/test_engine_boundary.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.conftest import assert_rows_close, random_rows
from tests.service.test_engine_boundary import edge, engine, expected

TRANSPORTS = ("http", "many", "ws")
EXAMPLES = settings(
    max_examples=10,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_EXTRAS = 15  # retries and conflicts per example: bounded, so that every example ends


@dataclass
class Stream:
    """What the test knows of one session: its sequence, what was applied and answered."""

    sid: str
    rows: list
    position: int = 0
    outputs: list = field(default_factory=list)
    # The last push that a retry may repeat: (offset, rows, its answer {outputs, position}).
    last: tuple[int, list, dict] | None = None

    @property
    def done(self) -> bool:
        return self.position == len(self.rows)


class Pushes:
    """One push through a chosen edge and transport (http, many: POST /v1/steps, ws: a text
    message on a socket kept open per edge and session); returns (status, answer), the answer
    a dict with `outputs` and `position`, or `error`."""

    def __init__(self, clients: list[TestClient], sockets: contextlib.ExitStack):
        self.clients, self._stack = clients, sockets
        self._sockets: dict[tuple[int, str], Any] = {}

    def one(self, where: int, how: str, sid: str, rows: list, offset: int | None) -> tuple:
        body: dict[str, Any] = {"inputs": rows}
        if offset is not None:
            body["offset"] = offset
        client = self.clients[where]
        if how == "http":
            r = client.post(f"/v1/sessions/{sid}/steps", json=body)
            return r.status_code, r.json()
        if how == "ws":
            key = (where, sid)
            if key not in self._sockets:
                url = f"/v1/sessions/{sid}/stream"
                self._sockets[key] = self._stack.enter_context(client.websocket_connect(url))
            ws = self._sockets[key]
            ws.send_text(json.dumps(body))
            reply = json.loads(ws.receive_text())
            return status_of(reply), reply
        ((status, reply),) = self.many(where, [(sid, rows, offset)])
        return status, reply

    def many(self, where: int, items: list[tuple[str, list, int | None]]) -> list[tuple]:
        steps = [
            {"session_id": sid, "inputs": rows, **({} if offset is None else {"offset": offset})}
            for sid, rows, offset in items
        ]
        r = self.clients[where].post("/v1/steps", json={"steps": steps})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["session_id"] for x in results] == [sid for sid, _, _ in items]
        answers = []
        for result in results:
            result = {k: v for k, v in result.items() if k != "session_id"}
            answers.append((status_of(result), result))
        return answers


def status_of(reply: dict) -> int:
    """The HTTP status a push answered on a socket or in /v1/steps stands for (500: other)."""
    if "error" not in reply:
        return 200
    return 409 if reply["error"]["code"] == "offset_conflict" else 500


def answer_of(reply: dict) -> dict:
    return {"outputs": reply["outputs"], "position": reply["position"]}


def check_applied(s: Stream, offset: int, rows: list, status: int, reply: dict) -> None:
    assert status == 200, reply
    assert reply["position"] == offset + len(rows), (reply["position"], offset, len(rows))
    assert len(reply["outputs"]) == len(rows)
    s.outputs += reply["outputs"]
    s.position += len(rows)
    s.last = (offset, rows, answer_of(reply))


def check_replayed(s: Stream, status: int, reply: dict) -> None:
    assert s.last is not None
    assert status == 200, reply
    assert answer_of(reply) == s.last[2]  # the very answer, bit for bit; nothing advanced


def check_conflict(s: Stream, status: int, reply: dict) -> None:
    assert status == 409, reply
    error = reply["error"]
    assert error["code"] == "offset_conflict" and error["position"] == s.position, error


def conflicting(draw: Callable, s: Stream) -> tuple[int, list]:
    """A push that is neither at the position nor the exact retry of the last push."""
    kinds = ["stale", "ahead"] + (["retry-other-rows", "retry-other-length"] if s.last else [])
    kind = draw(st.sampled_from(kinds))
    rows = [
        [v + 0.75, -v] for v, _ in random_rows(draw(st.integers(1, 4)), draw(st.integers(0, 2**16)))
    ]
    if kind == "ahead" or s.position == 0:
        return s.position + draw(st.integers(1, 50)), rows
    if kind == "stale":
        offset = draw(st.integers(0, s.position - 1))
        if s.last and (offset, len(rows)) == (s.last[0], len(s.last[1])):
            rows = rows + rows[:1]  # never the last push's shape at its offset
        return offset, rows
    assert s.last is not None
    offset, last_rows, _ = s.last
    if kind == "retry-other-rows":  # same offset and length, one value changed
        changed = [list(r) for r in last_rows]
        changed[-1][0] += 0.5
        return offset, changed
    longer = [*last_rows, [0.0, 0.0]]
    return offset, (longer if len(last_rows) == 1 or draw(st.booleans()) else last_rows[:-1])


def position_of(client: TestClient, sid: str) -> int:
    r = client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()["position"]


def run_interleaved(clients: list[TestClient], data: st.DataObject) -> None:
    streams: list[Stream] = []
    try:
        interleave(clients, data, streams)
    finally:  # a failed example leaves nothing open for the next one (or its replay)
        for s in streams:
            clients[0].delete(f"/v1/sessions/{s.sid}")


def interleave(clients: list[TestClient], data: st.DataObject, streams: list[Stream]) -> None:
    draw = data.draw
    n = draw(st.integers(2, 5), label="sessions")
    for _ in range(n):
        rows = random_rows(draw(st.integers(5, 40)), seed=draw(st.integers(0, 2**16)))
        r = clients[draw(st.integers(0, 1))].post("/v1/sessions", json={"model": "tiny"})
        assert r.status_code == 201, r.text
        streams.append(Stream(r.json()["session_id"], rows))
    extras = 0
    with contextlib.ExitStack() as sockets:
        pushes = Pushes(clients, sockets)

        def act(s: Stream) -> tuple[str, list, int | None]:
            """What to send for `s` next: a push, the exact retry, or a conflict."""
            nonlocal extras
            retry = ["retry"] if s.last else []
            if s.done:  # in a many-steps request: nothing left to push
                what = draw(st.sampled_from([*retry, "conflict"]))
            elif extras >= MAX_EXTRAS:
                what = "push"
            else:
                what = draw(st.sampled_from(["push"] * 4 + retry + ["conflict"]))
            if what == "retry":
                extras += 1
                offset, rows, _ = s.last  # type: ignore[misc]
                return what, rows, offset
            if what == "conflict":
                extras += 1
                offset, rows = conflicting(draw, s)
                return what, rows, offset
            size = min(draw(st.integers(1, 8)), len(s.rows) - s.position)
            offset = s.position if draw(st.booleans()) else None
            return what, s.rows[s.position : s.position + size], offset

        def check(s: Stream, what: str, rows: list, offset: int | None, outcome: tuple) -> None:
            if what == "push":
                check_applied(s, s.position, rows, *outcome)
            elif what == "retry":
                check_replayed(s, *outcome)
            else:
                check_conflict(s, *outcome)

        while not all(s.done for s in streams):
            open_ = [s for s in streams if not s.done]
            where, how = draw(st.integers(0, 1)), draw(st.sampled_from(TRANSPORTS))
            if how == "many":  # several sessions in one request, each with its own action
                pool = streams if extras < MAX_EXTRAS else open_
                picked = draw(
                    st.lists(st.sampled_from(range(len(pool))), min_size=1, max_size=n, unique=True)
                )
                chosen = [pool[k] for k in picked]
                if all(s.done for s in chosen):
                    chosen.append(open_[0])
                actions = [(s, *act(s)) for s in chosen]
                outcomes = pushes.many(where, [(s.sid, rows, off) for s, _, rows, off in actions])
                for (s, what, rows, off), outcome in zip(actions, outcomes, strict=True):
                    check(s, what, rows, off, outcome)
            else:
                s = open_[draw(st.integers(0, len(open_) - 1))]
                what, rows, offset = act(s)
                check(s, what, rows, offset, pushes.one(where, how, s.sid, rows, offset))
            if draw(st.integers(0, 4)) == 0:  # now and then, through the other edge
                s = streams[draw(st.integers(0, n - 1))]
                assert position_of(clients[1 - where], s.sid) == s.position
    for i, s in enumerate(streams):
        assert_rows_close(s.outputs, expected(clients[i % 2], s.rows))
        for c in clients:
            assert position_of(c, s.sid) == len(s.rows)


def test_interleaved_pushes_over_two_edges_equal_predict(make_settings, clock, tmp_path):
    config = make_settings()
    path = tmp_path / "engine.sock"
    with (
        engine(config, clock, path),
        edge(config, clock, path) as one,
        edge(config, clock, path) as two,
    ):
        # Given inside the test: the engine and its edges start once, not once per example.
        @EXAMPLES
        @given(st.data())
        def interleaved(data: st.DataObject) -> None:
            run_interleaved([one, two], data)

        interleaved()


# ----- the same session pushed from both edges at once ----------------------------------------


def at_once(calls: list[Callable[[], tuple]]) -> list[tuple]:
    """Run the calls on threads released together, so that both are in flight at once."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], tuple]) -> tuple:
        barrier.wait(30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_racing_pushes_to_one_session_from_both_edges_apply_once(make_settings, clock, tmp_path):
    """Each round sends two pushes at the same offset, one through each edge, at once: one of
    them applies; the other is the replay of it (identical rows: the identical answer) or a 409
    with the new position (other rows, or another length). The rows that applied make the
    sequence, and its outputs equal /predict over it."""
    config = make_settings()
    path = tmp_path / "engine.sock"
    rows = random_rows(60, seed=41)
    alt = random_rows(60, seed=42)  # the rival's rows where the pair differs
    # (size of edge one's push, size of edge two's, the same rows?, transports of one and two)
    rounds = [
        (3, 3, True, "http", "http"),
        (1, 1, True, "http", "many"),
        (2, 2, False, "many", "http"),
        (4, 2, True, "ws", "http"),
        (1, 1, True, "ws", "ws"),
        (2, 2, False, "http", "ws"),
        (5, 1, False, "many", "many"),
        (1, 3, True, "http", "http"),
    ] * 2
    with (
        engine(config, clock, path),
        edge(config, clock, path) as one,
        edge(config, clock, path) as two,
        contextlib.ExitStack() as sockets,
    ):
        sid = one.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        pushes = Pushes([one, two], sockets)
        # Both edges' sockets open before the race, not during it: the first row, then its retry.
        first = pushes.one(0, "ws", sid, rows[:1], 0)
        assert first[0] == 200 and pushes.one(1, "ws", sid, rows[:1], 0) == first
        applied, outputs, position = rows[:1], first[1]["outputs"], 1
        for size_one, size_two, same, how_one, how_two in rounds:
            mine = rows[position : position + size_one]
            theirs = (rows if same else alt)[position : position + size_two]
            sent = [mine, theirs]
            answers = at_once(
                [
                    functools.partial(pushes.one, 0, how_one, sid, mine, position),
                    functools.partial(pushes.one, 1, how_two, sid, theirs, position),
                ]
            )
            ok = [i for i, (status, _) in enumerate(answers) if status == 200]
            assert ok, answers
            # The one that applied: the other is a replay of the same push, or a 409.
            if len(ok) == 2:
                assert sent[0] == sent[1] and answers[0][1] == answers[1][1], answers
            winner = ok[0]
            reply = answers[winner][1]
            assert reply["position"] == position + len(sent[winner])
            for loser in {0, 1} - set(ok):
                assert answers[loser][0] == 409, answers
                error = answers[loser][1]["error"]
                assert error["code"] == "offset_conflict", error
                assert error["position"] == position + len(sent[winner]), error
            applied += sent[winner]
            outputs += reply["outputs"]
            position += len(sent[winner])
            assert position_of(two, sid) == position_of(one, sid) == position
        sockets.close()
        assert_rows_close(outputs, expected(one, applied))


# ----- found while writing these: an edge's cached model of a session goes stale ------------


def test_a_session_recreated_with_another_model_through_the_other_edge_takes_its_rows(
    make_settings, clock, tmp_path, tiny_dir, tokens_dir
):
    config = make_settings(models={"tiny": tiny_dir, "tokens": tokens_dir})
    path = tmp_path / "engine.sock"
    with (
        engine(config, clock, path),
        edge(config, clock, path) as one,
        edge(config, clock, path) as two,
    ):
        sid = "recreated-session-0001"
        created = one.post("/v1/sessions", json={"model": "tiny", "session_id": sid})
        assert created.status_code == 201, created.text
        assert two.delete(f"/v1/sessions/{sid}").status_code == 204
        again = two.post("/v1/sessions", json={"model": "tokens", "session_id": sid})
        assert again.status_code == 201, again.text
        assert two.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[3]]}).status_code == 200
        r = one.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[4]]})
        assert r.status_code == 200 and r.json()["position"] == 2, r.text
        steps = one.post("/v1/steps", json={"steps": [{"session_id": sid, "inputs": [[5]]}]})
        assert steps.json()["results"][0].get("position") == 3, steps.text
