"""`tcnserve serve --workers N`: N edge processes on one port in front of one engine process.

Real processes on loopback. Any edge serves any session; the engine batches every edge's pushes;
an edge killed with SIGKILL loses no acknowledged push and is replaced; an engine killed leaves
the edges answering 503 `engine_unavailable` (never a hang) until it is back; /metrics sums every
process; `uvicorn --workers` against the app is refused.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect as ws_connect

from service.protocol.wire import decode_frame, encode_frame
from tests.service.conftest import (
    ROOT,
    assert_rows_close,
    free_port,
    metric,
    random_rows,
    serve_process,
    stop_process,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.slow
KEY = "engine-process-key-0123456789"
HEADERS = {"X-API-Key": KEY}
OUT = 2  # the tiny model's outputs per row


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`: {pid: 'engine' or 'edge'}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"service.engine.process" in cmdline:
            found[int(entry.name)] = cmdline[cmdline.index(b"service.engine.process") + 1].decode()
    return found


def value(page: str, series: str) -> float | None:
    """One series (name and labels exactly as rendered) of a /metrics page; None when absent (an
    edge's series reach another edge's page with its next status report)."""
    for line in page.splitlines():
        name, _, number = line.rpartition(" ")
        if name == series:
            return float(number)
    return None


def of_kind(pid: int, kind: str) -> list[int]:
    return [p for p, k in children(pid).items() if k == kind]


@pytest.fixture
def server(tiny_dir, tmp_path):
    args = ["--model", f"tiny={tiny_dir}", "--device", "cpu", "--workers", "2"]
    env = {"TCNSERVE_API_KEYS": KEY, "TCNSERVE_MAX_SESSIONS": "64"}
    with serve_process(args, tmp_path / "server.log", env) as (url, process):
        wait_until(lambda: len(of_kind(process.pid, "edge")) == 2, "two edges")
        yield url, process


def fresh(url: str) -> httpx.Client:
    """A client whose every request opens a new connection (any edge may take it)."""
    return httpx.Client(
        base_url=url, headers=HEADERS, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    )


def every_edge_ready(c: httpx.Client) -> bool:
    """/readyz 200 on 10 fresh connections in a row: on every edge, in all likelihood."""
    return all(c.get("/readyz").status_code == 200 for _ in range(10))


def expected(c: httpx.Client, rows: list) -> list:
    r = c.post("/v1/models/tiny/predict", json={"inputs": [rows]})
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]


def test_any_edge_serves_any_session_exactly_once(server):
    """Sessions pushed over new connections (spread over both edges by the kernel), in random
    chunks and interleaved, equal the full-sequence forward; a retried push is answered again
    and never applied twice."""
    url, _ = server
    rng = random.Random(7)
    sequences = [random_rows(rng.randint(10, 30), seed=40 + i) for i in range(6)]
    with fresh(url) as c:
        ids = [
            c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"] for _ in sequences
        ]
        streamed: list[list] = [[] for _ in sequences]
        positions = [0] * len(sequences)
        while any(p < len(s) for p, s in zip(positions, sequences, strict=True)):
            i = rng.choice([j for j, s in enumerate(sequences) if positions[j] < len(s)])
            size = rng.choice([1, 1, 2, 5])
            chunk = sequences[i][positions[i] : positions[i] + size]
            body = {"inputs": chunk, "offset": positions[i]}
            r = c.post(f"/v1/sessions/{ids[i]}/steps", json=body)
            assert r.status_code == 200, r.text
            again = c.post(f"/v1/sessions/{ids[i]}/steps", json=body)  # a retry: same answer
            assert again.json() == r.json()
            streamed[i] += r.json()["outputs"]
            positions[i] += len(chunk)
            assert r.json()["position"] == positions[i]
        for seq, out in zip(sequences, streamed, strict=True):
            assert_rows_close(out, expected(c, seq))
        r = c.post(
            "/v1/steps", json={"steps": [{"session_id": s, "inputs": [[0.5, 0.5]]} for s in ids]}
        )
        assert [x["position"] for x in r.json()["results"]] == [len(s) + 1 for s in sequences]


def test_websocket_sessions_on_every_edge_and_metrics_of_every_process(server):
    url, _ = server
    ws_url = url.replace("http", "ws")
    seqs = [np.asarray(random_rows(8, seed=90 + i), np.float32) for i in range(6)]
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(ws_connect(f"{ws_url}/v1/stream?model=tiny&token={KEY}"))
            for _ in seqs
        ]
        for ws in sockets:
            ws.recv(timeout=30)  # the created message
        outs: list[list] = [[] for _ in seqs]
        for t in range(8):
            for ws, seq in zip(sockets, seqs, strict=True):
                ws.send(encode_frame(seq[t : t + 1]))
            for ws, out in zip(sockets, outs, strict=True):
                out += decode_frame(ws.recv(timeout=30), OUT, False)[1].tolist()
        with fresh(url) as c:
            for seq, out in zip(seqs, outs, strict=True):
                assert_rows_close(out, expected(c, seq.tolist()))
            # Any edge's page sums every process; other edges' series are at most one status
            # interval old (service/engine/client.py).
            answered = 'tcnserve_websocket_messages_total{kind="binary",outcome="ok"}'

            def summed_page_is_complete() -> bool:
                page = c.get("/metrics").text
                return (
                    value(page, answered) == 48
                    and value(page, "tcnserve_websocket_connections") == len(seqs)
                    and metric(page, "tcnserve_active_sessions") == len(seqs)
                )

            wait_until(summed_page_is_complete, "every process's series on one page")
    with fresh(url) as c:  # the sockets' sessions end with them (keep=false)
        wait_until(
            lambda: metric(c.get("/metrics").text, "tcnserve_active_sessions") == 0,
            "the streams' sessions to close",
        )


def test_an_edge_killed_loses_no_acknowledged_push_and_is_replaced(server):
    url, process = server
    with fresh(url) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        rows = random_rows(12, seed=5)
        outs = []
        for t in range(6):
            outs += c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [rows[t]]}).json()[
                "outputs"
            ]
        victim = of_kind(process.pid, "edge")[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in children(process.pid) and len(of_kind(process.pid, "edge")) == 2,
            "the killed edge to be replaced",
        )
        for t in range(6, 12):
            answers: list[httpx.Response] = []

            def pushed(t: int = t, answers: list = answers) -> bool:
                # A connection the dead edge had accepted is refused: sent again, with its
                # offset, until an edge answers.
                try:
                    body = {"inputs": [rows[t]], "offset": t}
                    answers.append(c.post(f"/v1/sessions/{sid}/steps", json=body))
                except httpx.TransportError:
                    return False
                return True

            wait_until(pushed, f"push {t} to be answered")
            assert answers[-1].status_code == 200, answers[-1].text
            outs += answers[-1].json()["outputs"]
        assert_rows_close(outs, expected(c, rows))


def test_the_engine_killed_answers_engine_unavailable_until_it_is_back(server):
    url, process = server
    with fresh(url) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        (engine,) = of_kind(process.pid, "engine")
        os.kill(engine, signal.SIGKILL)
        wait_until(lambda: engine not in children(process.pid), "the engine to die")
        started = time.monotonic()
        r = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1, 0.2]]})
        assert time.monotonic() - started < 5  # an answer, not a hang
        assert r.status_code == 503
        assert r.json()["error"]["code"] in ("engine_unavailable", "not_ready")
        assert "Retry-After" in r.headers
        assert c.get("/readyz").status_code == 503
        wait_until(lambda: every_edge_ready(c), "the engine to be back", 90)
        # Without a session store the sessions died with the engine, as in one process.
        assert c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1, 0.2]]}).status_code == 404
        assert c.post("/v1/sessions", json={"model": "tiny"}).status_code == 201


def test_sigterm_stops_every_process(tiny_dir, tmp_path):
    args = ["--model", f"tiny={tiny_dir}", "--device", "cpu", "--workers", "2"]
    with serve_process(args, tmp_path / "server.log") as (_, process):
        wait_until(lambda: len(children(process.pid)) == 3, "three processes")
        kids = list(children(process.pid))
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        for pid in kids:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )


def test_uvicorn_workers_are_refused_with_a_pointer_to_tcnserve_workers(tmp_path):
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
         "--workers", "2", "--port", str(port)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "tcnserve serve --workers N" in result.stderr  # and uvicorn stopped: run returned


def test_an_engine_killed_with_a_store_brings_its_sessions_back(tiny_dir, tmp_path, redis_url):
    """With a session store, a session outlives its engine: after the restart it is found in
    the store, at its last durable position (pushes after it answer 409 with that position,
    and the client replays from there), and its outputs stay exact."""
    import redis

    from service.sessions.record import SessionRecord

    args = ["--model", f"tiny={tiny_dir}", "--device", "cpu", "--workers", "2"]
    env = {
        "TCNSERVE_API_KEYS": KEY,
        "TCNSERVE_SESSION_STORE": redis_url,
        "TCNSERVE_SNAPSHOT_INTERVAL_S": "0.2",
    }
    rows = random_rows(16, seed=11)
    with serve_process(args, tmp_path / "server.log", env) as (url, process), fresh(url) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        outputs = []
        for t in range(8):
            r = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [rows[t]], "offset": t})
            outputs += r.json()["outputs"]
        store = redis.Redis.from_url(redis_url)
        (engine,) = of_kind(process.pid, "engine")
        keys = store.keys(f"tcnserve:s:*:{sid}")
        assert len(keys) == 1
        wait_until(
            lambda: SessionRecord.decode(store.hget(keys[0], "record")).position == 8,
            "the snapshot of all 8 rows",
        )
        os.kill(engine, signal.SIGKILL)
        wait_until(lambda: engine not in children(process.pid), "the engine to die")
        # A new engine first: until then an edge that has not yet seen the loss still reads
        # ready from its last status, and a push sent then meets the dead engine (503).
        wait_until(lambda: of_kind(process.pid, "engine"), "the supervisor to start a new engine")
        wait_until(lambda: every_edge_ready(c), "the engine to be back", 90)
        for t in range(8, 16):
            r = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [rows[t]], "offset": t})
            assert r.status_code == 200, r.text
            outputs += r.json()["outputs"]
        assert_rows_close(outputs, expected(c, rows))
        store.close()


def _pid_namespaces() -> bool:
    try:
        return (
            subprocess.run(["unshare", "-pf", "--mount-proc", "true"], timeout=10).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _pid_namespaces(), reason="needs unshare into a PID namespace (root)")
def test_the_supervisor_as_pid_1_starts_its_processes(tiny_dir, tmp_path):
    """In a container the supervisor is PID 1 (the image's entrypoint): its children must not
    take their parent's pid of 1 for an orphan's."""
    port = free_port()
    command = [
        "unshare", "-pf", "--mount-proc", "--kill-child=SIGTERM",
        sys.executable, "-m", "service.cli", "serve",
        "--model", f"tiny={tiny_dir}", "--device", "cpu", "--workers", "1", "--port", str(port),
    ]  # fmt: skip
    with (tmp_path / "server.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process)
            assert httpx.post(f"{url}/v1/sessions", json={"model": "tiny"}).status_code == 201
        finally:
            stop_process(process)


def test_a_stuck_engine_fails_requests_and_is_replaced(server):
    """An engine that is alive but does nothing (SIGSTOP): the edges stop waiting on it after
    ENGINE_SILENT_S (503, never a hang) and the supervisor kills and restarts it."""
    from service.engine.client import ENGINE_SILENT_S
    from service.engine.supervisor import ENGINE_STUCK_S

    url, process = server
    with httpx.Client(base_url=url, headers=HEADERS, timeout=ENGINE_SILENT_S + 20) as c:
        (engine,) = of_kind(process.pid, "engine")
        os.kill(engine, signal.SIGSTOP)
        started = time.monotonic()
        r = c.post("/v1/sessions", json={"model": "tiny"})  # waits, then is failed
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - started < ENGINE_SILENT_S + 5
        wait_until(
            lambda: engine not in children(process.pid),
            "the stuck engine to go",
            ENGINE_STUCK_S + 10,
        )
        wait_until(lambda: every_edge_ready(c), "a new engine", 90)
        assert c.post("/v1/sessions", json={"model": "tiny"}).status_code == 201
