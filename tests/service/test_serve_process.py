"""`tcnserve serve` as a real process on loopback: start, serve, refuse bad settings, stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.commands.serve import DrainingServer
from service.gc_tuning import FULL_COLLECTION_EVERY, TUNE_COLLECTOR, YOUNG_COLLECTION_EVERY
from tests.service.conftest import (
    ROOT,
    assert_rows_close,
    free_port,
    random_rows,
    runtime_of,
    serve_command,
    serve_process,
    serving,
    wait_ready,
    wait_until,
)

KEY = "process-test-key-0123456789"


@pytest.fixture
def server(tiny_dir, tmp_path):
    args = ["--model", f"tiny={tiny_dir}", "--device", "cpu"]
    env = {"TCNSERVE_API_KEYS": KEY, "TCNSERVE_MAX_SESSIONS": "8"}
    with serve_process(args, tmp_path / "server.log", env) as (url, process):
        yield url, process


def test_real_server_streams_like_predict(server):
    url, process = server
    rows = random_rows(40, seed=21)
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-ID": "proc-1"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = c.post("/v1/sessions", json={"model": "tiny", "prefix": rows[:5]})
        assert r.status_code == 201 and r.headers["x-request-id"] == "proc-1"
        sid, outputs = r.json()["session_id"], r.json()["outputs"]
        for position in range(5, 40, 5):
            chunk = rows[position : position + 5]
            outputs += c.post(
                f"/v1/sessions/{sid}/steps", json={"inputs": chunk, "offset": position}
            ).json()["outputs"]
        want = c.post("/v1/models/tiny/predict", json={"inputs": [rows]}).json()["outputs"][0]
        assert_rows_close(outputs, want)
        assert "tcnserve_step_batch_size" in httpx.get(f"{url}/metrics").text
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) in (0, -signal.SIGTERM)


def test_unsafe_settings_exit_with_a_clear_message():
    result = subprocess.run(
        [*serve_command(), "--max-batch-size", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "refusing to start: max_batch_size must be >= 1" in result.stderr


def test_a_busy_port_is_refused_before_the_models_load(tiny_dir):
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [*serve_command(), "--model", f"tiny={tiny_dir}", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_sigterm_drains_then_exits(tiny_dir, tmp_path):
    port = free_port()
    with (tmp_path / "server.log").open("w") as log:
        process = subprocess.Popen(
            [
                *serve_command(),
                "--port",
                str(port),
                "--model",
                f"tiny={tiny_dir}",
                "--drain-s",
                "2",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            sid = httpx.post(f"{url}/v1/sessions", json={"model": "tiny"}).json()["session_id"]
            process.send_signal(signal.SIGTERM)
            for _ in range(100):  # the signal is handled asynchronously: wait for it
                ready = httpx.get(f"{url}/readyz")
                if ready.status_code == 503:
                    break
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
            r = httpx.post(f"{url}/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 1.0]]})
            assert r.status_code == 200  # its sessions are still served while draining
            assert httpx.post(f"{url}/v1/sessions", json={"model": "tiny"}).status_code == 503
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_once_the_models_load_the_collector_freezes_them_and_collects_less_often(make_settings):
    """`tcnserve serve`'s garbage-collector settings (serve.py: on_tick), restored afterwards."""
    app = create_app(make_settings())
    runtime = runtime_of(app)
    server = DrainingServer(uvicorn.Config(app), runtime, drain_s=0)
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    want = (YOUNG_COLLECTION_EVERY, before[1], FULL_COLLECTION_EVERY) if TUNE_COLLECTOR else before
    try:
        asyncio.run(server.on_tick(1))  # not loaded yet: nothing changes
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        with serving(app):  # its lifespan loads the models
            asyncio.run(server.on_tick(2))
            frozen = gc.get_freeze_count()
            assert gc.get_threshold() == want and frozen > 0
            gc.set_threshold(*before)
            _ = [[] for _ in range(100)]  # objects a second freeze would take
            asyncio.run(server.on_tick(3))  # once only: no second freeze, no second setting
            # (a frozen object another thread lets go of leaves the count: it may only shrink)
            assert gc.get_freeze_count() <= frozen and gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # a process that just ended
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["the children are importing", "serving"])
def test_ctrl_c_while_starting_stops_every_process_without_a_traceback(tiny_dir, moment):
    """Ctrl-C goes to the terminal's whole process group: the supervisor, and children that may
    still be importing. None of them prints a traceback."""
    port = free_port()
    process = subprocess.Popen(
        [*serve_command(), "--model", f"tiny={tiny_dir}", "--workers", "2", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        if moment == "serving":
            wait_ready(f"http://127.0.0.1:{port}", process)
        else:  # the moment the first child exists: it has its modules still to import
            wait_until(lambda: children_of(process.pid) or process.poll() is not None, "a child")
        os.killpg(process.pid, signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, 130), out.decode()
    assert b"Traceback" not in out and b"KeyboardInterrupt" not in out, out.decode()


def test_ctrl_c_while_a_command_imports_ends_quietly_with_130():
    """Raised inside an import, Ctrl-C's KeyboardInterrupt can come out as another error
    (pydantic's schema builder wraps it: seen in CI); `tcnserve` still exits 130 quietly."""
    script = (
        "import os, signal, sys\n"
        "import service.cli as cli\n"
        "def importing(name, module):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        module = module.upper()  # Python runs the signal's handler here\n"
        "    except KeyboardInterrupt as e:\n"
        "        raise RuntimeError('a schema error') from e\n"
        "cli._import_command = importing\n"
        "sys.exit(cli.main(['serve']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (run.returncode, run.stderr) == (130, "interrupted\n")
