"""Client test fixtures: `tcnserve serve` processes (one shared, one that tests kill and restart
on the same port), a loopback proxy that records request heads and can lose a reply, and
in-process reference outputs."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model import load_model
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import (
    ROOT,
    TINY,
    TOKENS,
    FakeClock,
    free_port,
    serve_command,
    stop_process,
    uvicorn_thread,
    wait_ready,
    write_model,
)

KEY = "client-test-key-aaaaaaaaaaaa"
OTHER_KEY = "client-test-key-bbbbbbbbbbbb"
MAX_BODY = 65536  # the shared server's max_body_bytes
assert TINY.receptive_field == 29  # streams of 200 rows reach far past it


class LiveServer:
    """One `tcnserve serve` process on a fixed loopback port; restartable on the same port."""

    def __init__(
        self,
        models: dict[str, Path],
        log_path: Path,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self._command = [*serve_command(), "--port", str(self.port), "--device", "cpu", *args]
        for name, directory in models.items():
            self._command += ["--model", f"{name}={directory}"]
        # This shell's TCNSERVE_ settings (an API key, say) must not leak into the server.
        base = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
        self._env = {**base, "TCNSERVE_TORCH_THREADS": "1", **(env or {})}
        self._log_path = log_path
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process (again, on the same port) and wait until /readyz answers 200."""
        assert not self.running, "already running"
        with self._log_path.open("a") as log:
            log.write(f"----- start {self.starts + 1}\n")
            log.flush()
            self._process = subprocess.Popen(
                self._command, cwd=ROOT, env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        try:
            wait_ready(self.url, self._process)
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{self.log()[-3000:]}") from None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup; every session in memory is lost."""
        if self.running:
            self._process.kill()
            self._process.wait(30)

    def stop(self) -> None:
        """SIGTERM (then SIGKILL if it hangs); safe to call when already stopped."""
        if self._process is not None:
            stop_process(self._process)

    def log(self) -> str:
        return self._log_path.read_text() if self._log_path.exists() else ""


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client-models")
    return {
        "tiny": write_model(root / "tiny", TINY, seed=11),
        "tokens": write_model(root / "tokens", TOKENS, seed=12),
    }


@pytest.fixture(scope="session")
def live(model_dirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server shared by every test that does not kill it (two API keys, 64 KiB bodies)."""
    log = tmp_path_factory.mktemp("live") / "server.log"
    env = {"TCNSERVE_API_KEYS": f"{KEY},{OTHER_KEY}", "TCNSERVE_SWEEP_INTERVAL_S": "0.2"}
    args = ("--max-sessions", "16", "--max-body-bytes", str(MAX_BODY))
    with LiveServer(model_dirs, log, args=args, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def _killable(model_dirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("killable") / "server.log"
    with LiveServer({"tiny": model_dirs["tiny"]}, log) as server:
        yield server


@pytest.fixture
def killable(_killable: LiveServer) -> LiveServer:
    """A running server (no API keys) that only the tests which kill and restart it use."""
    if not _killable.running:  # an earlier test failed before restarting it
        _killable.start()
    return _killable


@dataclass
class ClockedServer:
    """A server whose session TTLs run on `clock`, which moves only when a test says so."""

    url: str
    clock: FakeClock


@pytest.fixture(scope="module")
def clocked(model_dirs) -> Iterator[ClockedServer]:
    """The app under uvicorn on loopback, in a thread of this process so that it can take a fake
    clock: a TTL expires when a test advances the clock, not after waiting it out (one API key)."""
    clock = FakeClock()
    settings = Settings(
        models=model_dirs, device="cpu", api_keys=[KEY], max_sessions=16, sweep_interval_s=3600
    )
    with uvicorn_thread(create_app(settings, clock=clock)) as (url, _):
        yield ClockedServer(url, clock)


class Reference:
    """Outputs of the checkpoints run in this process: the ground truth for every stream."""

    def __init__(self, model_dirs: dict[str, Path]):
        self._nets = {name: load_model(d) for name, d in model_dirs.items()}

    @torch.inference_mode()
    def __call__(self, model: str, rows: np.ndarray) -> np.ndarray:
        """(T, in) floats, or (T,) / (T, 1) token ids -> (T, out) float32."""
        if model == "tokens":
            x = torch.as_tensor(np.asarray(rows).reshape(1, -1), dtype=torch.long)  # (1, T)
        else:
            x = torch.as_tensor(np.asarray(rows, np.float32).T[None])  # (1, C, T)
        return self._nets[model](x)[0].T.numpy()  # (T, out)


@pytest.fixture(scope="session")
def reference(model_dirs) -> Reference:
    return Reference(model_dirs)


def rows_of(length: int, seed: int, channels: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(length, channels)).astype(np.float32)


def assert_outputs(actual, expected, atol: float = 1e-5) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    np.testing.assert_allclose(actual, np.asarray(expected, np.float64), rtol=0, atol=atol)


def server_position(url: str, session_id: str, key: str = KEY) -> int:
    """The session's position as the server reports it (straight to the server, no proxy)."""
    r = httpx.get(f"{url}/v1/sessions/{session_id}", headers={"X-API-Key": key}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["position"]


# ----- a loopback proxy ----------------------------------------------------------------------

REQUEST_LINE = re.compile(rb"^(GET|POST|PUT|DELETE|PATCH|HEAD|OPTIONS) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class RequestHead:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class _Connection:
    client: socket.socket
    upstream: socket.socket
    path: str = ""
    lose_reply: bool = False
    websocket: bool = False
    server_messages: int = field(default=0)


class LoopbackProxy:
    """A TCP proxy in front of a server that records request heads and can lose one reply.

    `lose_reply_to(path_part, nth)`: the nth HTTP request whose path contains `path_part` reaches
    the server, which answers it, but the proxy drops the connection instead of passing the
    answer on. `lose_websocket_answer(nth)`: the same for the nth server message on a WebSocket.
    It reads requests at TCP-chunk granularity, which is what loopback clients produce.
    """

    def __init__(self, target_port: int):
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.heads: list[RequestHead] = []
        self.lost: list[str] = []
        self._lock = threading.Lock()
        self._http_rule: tuple[str, int] | None = None
        self._http_seen = 0
        self._ws_rule: int | None = None
        self._ws_seen = 0
        self._connections: list[_Connection] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, path_part: str, nth: int) -> None:
        with self._lock:
            self._http_rule, self._http_seen = (path_part, nth), 0

    def lose_websocket_answer(self, nth: int) -> None:
        with self._lock:
            self._ws_rule, self._ws_seen = nth, 0

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _close(conn)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            conn = _Connection(client, upstream)
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._requests, args=(conn,), daemon=True).start()
            threading.Thread(target=self._replies, args=(conn,), daemon=True).start()

    def _requests(self, conn: _Connection) -> None:
        """Client -> server: record each request head, decide whether its reply is lost."""
        while data := _recv(conn.client):
            match = None if conn.websocket else REQUEST_LINE.match(data)
            if match:
                head = _parse_head(data)
                conn.path = head.path
                conn.websocket = head.headers.get("upgrade", "").lower() == "websocket"
                with self._lock:
                    self.heads.append(head)
                    if self._http_rule and self._http_rule[0] in head.path:
                        self._http_seen += 1
                        if self._http_seen == self._http_rule[1]:
                            conn.lose_reply, self._http_rule = True, None
            try:
                conn.upstream.sendall(data)
            except OSError:
                break
        _close(conn)

    def _replies(self, conn: _Connection) -> None:
        """Server -> client: pass answers on, except the one to lose."""
        while data := _recv(conn.upstream):
            if conn.websocket and not data.startswith(b"HTTP/1.1 101"):
                with self._lock:
                    conn.server_messages += 1
                    if self._ws_rule is not None:
                        self._ws_seen += 1
                        if self._ws_seen == self._ws_rule:
                            conn.lose_reply, self._ws_rule = True, None
            if conn.lose_reply:
                self.lost.append(conn.path)
                break
            try:
                conn.client.sendall(data)
            except OSError:
                break
        _close(conn)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(conn: _Connection) -> None:
    for sock in (conn.client, conn.upstream):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _parse_head(data: bytes) -> RequestHead:
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RequestHead(method, path, headers)


@pytest.fixture
def proxy(live: LiveServer) -> Iterator[LoopbackProxy]:
    """A loopback proxy in front of the shared server."""
    p = LoopbackProxy(live.port)
    try:
        yield p
    finally:
        p.close()
