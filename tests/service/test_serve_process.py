"""`tcnserve serve` as a real process on loopback: start, serve, refuse bad settings, stop."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.cli import COMMANDS
from tests.service.conftest import assert_rows_close, random_rows

ROOT = Path(__file__).resolve().parents[2]
KEY = "process-test-key-0123456789"


def serve_command() -> list[str]:
    """`tcnserve serve`; the dispatcher imports every subcommand, so while one of them is not
    written yet, run the serve module directly (the same add_arguments/run)."""
    if all(importlib.util.find_spec(module) for module, _ in COMMANDS.values()):
        return [sys.executable, "-m", "service.cli", "serve"]
    return [sys.executable, "-m", "service.commands.serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, limit_s: float = 90.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


@pytest.fixture
def server(tiny_dir, tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "TCNSERVE_API_KEYS": KEY, "TCNSERVE_MAX_SESSIONS": "8"}
    process = subprocess.Popen(
        [*serve_command(), "--port", str(port), "--model", f"tiny={tiny_dir}", "--device", "cpu"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        log.close()


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
