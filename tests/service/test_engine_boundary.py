"""The engine boundary in one test process: an engine (EngineServer over a Runtime) on its own
thread and event loop, and edge apps connected to it over a real Unix socket, exactly as
`tcnserve serve --workers N` wires them, minus the processes. The same requests are answered
the same way in-process and across the boundary; what only the boundary has (an edge's
connection ending, the engine going away, quotas summed over edges) is tested here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.app import create_app
from service.engine.runtime import Runtime
from service.engine.server import EngineServer
from service.settings import Settings
from tests.service.conftest import (
    FakeClock,
    assert_rows_close,
    metric,
    random_rows,
    runtime_of,
    serving,
    wait_until,
)

KEY_A = "boundary-key-a-0123456789"
KEY_B = "boundary-key-b-0123456789"


class EngineThread:
    """An engine process's work, on a thread: its Runtime, models loaded, and its server."""

    def __init__(self, settings: Settings, clock: FakeClock, path: Path):
        self.settings, self.clock, self.path = settings, clock, path
        self.runtime: Runtime | None = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="engine-thread", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.runtime = Runtime(self.settings, self.clock)
        server = EngineServer(self.runtime)
        await self.runtime.start()
        await server.listen(str(self.path))
        await asyncio.to_thread(self.runtime.loaded.wait, 60)
        self._ready.set()
        await self._stop.wait()
        await server.close()
        await self.runtime.stop()

    def start(self) -> EngineThread:
        self._thread.start()
        assert self._ready.wait(60), "the engine did not load"
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
            self._thread.join(30)


@pytest.fixture
def engine_path(tmp_path: Path) -> Path:
    return tmp_path / "engine.sock"


@contextlib.contextmanager
def engine(settings: Settings, clock: FakeClock, path: Path) -> Iterator[EngineThread]:
    thread = EngineThread(settings, clock, path).start()
    try:
        yield thread
    finally:
        thread.stop()


@contextlib.contextmanager
def edge(settings: Settings, clock: FakeClock, path: Path) -> Iterator[TestClient]:
    app = create_app(settings, clock=clock, engine_socket=str(path))
    with serving(app) as client:
        wait_until(lambda: runtime_of(app).ready, "the edge to see a ready engine")
        yield client


@pytest.fixture(params=["in-process", "edge"])
def any_client(request, make_settings, clock, engine_path) -> Iterator[TestClient]:
    settings = make_settings()
    if request.param == "in-process":
        with serving(create_app(settings, clock=clock)) as c:
            yield c
        return
    with engine(settings, clock, engine_path), edge(settings, clock, engine_path) as c:
        yield c


def expected(c: TestClient, rows: list) -> list:
    r = c.post("/v1/models/tiny/predict", json={"inputs": [rows]})
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]


def test_sessions_are_answered_alike_on_both_sides_of_the_boundary(any_client, clock):
    c = any_client
    rows = random_rows(30, seed=3)
    r = c.post("/v1/sessions", json={"model": "tiny", "prefix": rows[:4]})
    assert r.status_code == 201, r.text
    sid, outputs = r.json()["session_id"], r.json()["outputs"]
    position = 4
    for size in (1, 3, 1, 7, 2):
        body = {"inputs": rows[position : position + size], "offset": position}
        r = c.post(f"/v1/sessions/{sid}/steps", json=body)
        assert r.status_code == 200, r.text
        assert c.post(f"/v1/sessions/{sid}/steps", json=body).json() == r.json()  # a replay
        outputs += r.json()["outputs"]
        position += size
    assert_rows_close(outputs, expected(c, rows[:position]))
    conflict = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": rows[:1], "offset": 2})
    assert conflict.status_code == 409 and conflict.json()["error"]["position"] == position
    assert c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[1.0]]}).status_code == 422
    snapshot = c.get(f"/v1/sessions/{sid}/snapshot").json()
    restored = c.post("/v1/sessions", json={"model": "tiny", "snapshot": snapshot}).json()
    tail = rows[position : position + 5]
    a = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": tail}).json()["outputs"]
    b = c.post(f"/v1/sessions/{restored['session_id']}/steps", json={"inputs": tail}).json()
    assert_rows_close(a, b["outputs"])
    info = c.get(f"/v1/sessions/{sid}").json()
    assert info["position"] == position + 5 and info["model"] == "tiny"
    assert c.post(f"/v1/sessions/{sid}/reset").json()["position"] == 0
    steps = c.post(
        "/v1/steps",
        json={"steps": [{"session_id": sid, "inputs": rows[:1]}, {"session_id": "nope-nope-nope",
                                                               "inputs": rows[:1]}]},
    ).json()["results"]  # fmt: skip
    assert steps[0]["position"] == 1 and steps[1]["error"]["code"] == "session_not_found"
    assert c.delete(f"/v1/sessions/{sid}").status_code == 204
    assert c.post(f"/v1/sessions/{sid}/steps", json={"inputs": rows[:1]}).status_code == 404
    rid = restored["session_id"]
    clock.advance(10_000)
    assert c.post(f"/v1/sessions/{rid}/steps", json={"inputs": rows[:1]}).status_code == 410
    assert c.post("/v1/sessions", json={"model": "nope"}).status_code == 404


def test_sessions_are_listed_and_deleted_alike_on_both_sides(any_client, clock):
    c = any_client
    ids = sorted(
        c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"] for _ in range(3)
    )
    clock.advance(2)
    page = c.get("/v1/sessions", params={"limit": 2}).json()
    assert [s["session_id"] for s in page["sessions"]] == ids[:2] and page["next"] == ids[1]
    assert page["sessions"][0]["idle_s"] == 2
    rest = c.get("/v1/sessions", params={"after": page["next"]}).json()
    assert [s["session_id"] for s in rest["sessions"]] == ids[2:] and rest["next"] is None
    assert c.delete("/v1/sessions").json() == {"deleted": 3}
    assert c.get("/v1/sessions").json() == {"sessions": [], "next": None}


def test_websocket_streams_alike_on_both_sides(any_client):
    c = any_client
    rows = random_rows(12, seed=8)
    with c.websocket_connect("/v1/stream?model=tiny") as ws:
        created = ws.receive_json()
        outputs = []
        for t in range(12):
            ws.send_json({"inputs": [rows[t]], "offset": t})
            outputs += ws.receive_json()["outputs"]
    assert_rows_close(outputs, expected(c, rows))
    # The socket's session ends with it (its handler closes it as it finishes).
    path = f"/v1/sessions/{created['session_id']}"
    wait_until(lambda: c.get(path).status_code == 404, "the socket's session to close")


def test_an_edge_whose_connection_ends_leaves_nothing_bound_to_it(
    make_settings, clock, engine_path
):
    settings = make_settings()
    with engine(settings, clock, engine_path) as e, edge(settings, clock, engine_path) as c:
        kept = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        with c.websocket_connect("/v1/stream?model=tiny") as ws:
            bound = ws.receive_json()["session_id"]
            assert e.runtime is not None and len(e.runtime.sessions) == 2
            client = runtime_of(c.app).engine
            assert client is not None
            # The edge's connection drops (as when its process is killed) with the socket open.
            c.portal.call(lambda: client._transport.close())
            wait_until(lambda: len(e.runtime.sessions) == 1, "the bound session to close")
            assert e.runtime.sessions.local("anonymous", bound) is None
            assert e.runtime.streams.open == {}
        wait_until(lambda: runtime_of(c.app).ready, "the edge to reconnect")
        r = c.post(f"/v1/sessions/{kept}/steps", json={"inputs": [[0.1, 0.2]]})
        assert r.status_code == 200 and r.json()["position"] == 1


def test_the_engine_away_is_answered_at_once_and_its_return_is_noticed(
    make_settings, clock, engine_path
):
    settings = make_settings()
    e = EngineThread(settings, clock, engine_path).start()
    with edge(settings, clock, engine_path) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        e.stop()
        wait_until(lambda: not runtime_of(c.app).engine.connected, "the edge to notice")
        r = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1, 0.2]]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert r.headers["Retry-After"] == str(settings.retry_after_s)
        assert c.get("/readyz").status_code == 503
        with c.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 1013
        with engine(settings, clock, engine_path):
            wait_until(lambda: runtime_of(c.app).ready, "the edge to reconnect")
            assert c.post("/v1/sessions", json={"model": "tiny"}).status_code == 201


def test_per_key_quotas_hold_over_every_edge(make_settings, clock, engine_path):
    settings = make_settings(api_keys=[KEY_A, KEY_B], max_streams_per_key=1, max_sessions_per_key=2)
    with (
        engine(settings, clock, engine_path) as e,
        edge(settings, clock, engine_path) as one,
        edge(settings, clock, engine_path) as two,
    ):
        a = {"X-API-Key": KEY_A}
        assert one.post("/v1/sessions", json={"model": "tiny"}, headers=a).status_code == 201
        assert two.post("/v1/sessions", json={"model": "tiny"}, headers=a).status_code == 201
        third = one.post("/v1/sessions", json={"model": "tiny"}, headers=a)
        assert third.status_code == 429 and third.json()["error"]["code"] == "key_quota_exceeded"
        b = {"X-API-Key": KEY_B}
        assert two.post("/v1/sessions", json={"model": "tiny"}, headers=b).status_code == 201
        with (
            one.websocket_connect(f"/v1/streams?token={KEY_B}"),
            two.websocket_connect(f"/v1/streams?token={KEY_B}") as ws,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            ws.receive_text()
        assert closed.value.code == 4429
        wait_until(lambda: e.runtime.streams.open == {}, "the streams to be released")


def test_the_metrics_page_sums_the_engine_and_every_edge(make_settings, clock, engine_path):
    settings = make_settings()
    with (
        engine(settings, clock, engine_path),
        edge(settings, clock, engine_path) as one,
        edge(settings, clock, engine_path) as two,
    ):
        for c in (one, two, two):
            sid = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
            assert c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1, 0.2]]}).is_success
        created = 'tcnserve_requests_total{method="POST",route="/v1/sessions",status="201"}'

        def total(page: str) -> float:
            return sum(
                float(line.rpartition(" ")[2])
                for line in page.splitlines()
                if line.startswith(created)
            )

        wait_until(lambda: total(one.get("/metrics").text) == 3, "both edges' requests")
        page = one.get("/metrics").text
        assert metric(page, "tcnserve_active_sessions") == 3
        assert page.count("# TYPE tcnserve_requests_total counter") == 1  # one family, summed
        (stats,) = two.get("/v2/models/tiny/stats").json()["model_stats"]  # the same sums
        assert stats["inference_count"] == 3  # one timestep each, on the engine


def test_the_docs_name_every_message_and_the_sizes_of_a_push():
    import typing

    import msgspec
    import numpy as np

    from service.engine import messages as m

    text = (Path(__file__).resolve().parents[2] / "docs" / "scaling.md").read_text()
    boundary = text.split("## The boundary", 1)[1].split("\n## ", 1)[0]
    for union in (m.Request, m.Answer):
        for cls in typing.get_args(union):
            if True:
                assert f"`{cls.__name__}`" in boundary, cls.__name__
    encode = msgspec.msgpack.Encoder().encode
    push = encode(m.Push(17, "anonymous", "x" * 32, m.Rows.of(np.zeros((1, 2), np.float32)), None))
    answer = encode(m.Pushed(17, m.Rows.of(np.zeros((1, 1), np.float32)), 42))
    assert f"{len(push)} bytes of MessagePack" in boundary
    assert f"({len(push) + m.HEADER.size} framed)" in boundary
    assert f"{len(answer)} ({len(answer) + m.HEADER.size})" in boundary


def test_open_streams_end_when_the_engine_connection_drops(make_settings, clock, engine_path):
    """A stream's count and bound session live on the engine's side of the edge's connection:
    when it drops, every stream of that edge closes (1013), idle ones included, and the new
    engine counts only the streams opened since."""
    settings = make_settings(max_streams_per_key=1)
    e = EngineThread(settings, clock, engine_path).start()
    with edge(settings, clock, engine_path) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        with c.websocket_connect(f"/v1/sessions/{sid}/stream") as idle:
            e.stop()
            with pytest.raises(WebSocketDisconnect) as closed:
                idle.receive_text()  # nothing was sent: closed by the edge, not by a push
            assert closed.value.code == 1013
        with engine(settings, clock, engine_path) as again:
            wait_until(lambda: runtime_of(c.app).ready, "the edge to reconnect")
            fresh = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
            with c.websocket_connect(f"/v1/sessions/{fresh}/stream") as ws:
                ws.send_json({"inputs": [[0.1, 0.2]]})
                assert ws.receive_json()["position"] == 1
                assert again.runtime is not None and again.runtime.streams.open == {"anonymous": 1}
