"""Service test fixtures: tiny seeded checkpoints, a fake clock, apps with their lifespan, and
`tcnserve serve` as a real process on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model import TCN, TCNConfig, save_model
from service.app import create_app
from service.cli import COMMANDS
from service.engine.runtime import Runtime
from service.models.worker import ModelWorker
from service.settings import Settings

TINY = TCNConfig(in_channels=2, channels=(6, 6, 5), kernel_size=3, out_channels=2)  # R = 29
TOKENS = TCNConfig(in_channels=4, channels=(5, 5), kernel_size=2, vocab_size=7)


class FakeClock:
    """Unix seconds that move only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_model(
    directory: Path, config: TCNConfig, seed: int, metadata: dict | None = None
) -> Path:
    """A checkpoint with every weight redrawn from N(0, 0.4), so outputs depend on every input."""
    torch.manual_seed(seed)
    net = TCN(config)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.4)
    return save_model(net, directory, metadata or {"task": "test", "trained": False})


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny"), TINY, seed=1)


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tokens"), TOKENS, seed=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_settings(tiny_dir: Path):
    def make(**overrides) -> Settings:
        values = {"models": {"tiny": tiny_dir}, "max_sessions": 32, "sweep_interval_s": 3600}
        return Settings(**{**values, **overrides})

    return make


def runtime_of(app: FastAPI) -> Runtime:
    return app.state.runtime


@contextlib.contextmanager
def serving(app: FastAPI, **client_kwargs) -> Iterator[TestClient]:
    """A TestClient with the lifespan run and the models loaded."""
    with TestClient(app, **client_kwargs) as client:
        assert runtime_of(app).loaded.wait(60), "models did not load"
        yield client


@pytest.fixture
def client(make_settings, clock: FakeClock) -> Iterator[TestClient]:
    with serving(create_app(make_settings(), clock=clock)) as c:
        yield c


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One served tiny model for a module's property tests (each test deletes its sessions)."""
    directory = write_model(tmp_path_factory.mktemp("shared"), TINY, seed=1)
    app = create_app(Settings(models={"tiny": directory}, max_sessions=8, sweep_interval_s=3600))
    with serving(app) as c:
        yield c


@contextlib.asynccontextmanager
async def async_serving(app: FastAPI, **client_kwargs) -> AsyncIterator[httpx.AsyncClient]:
    """An AsyncClient over ASGITransport, inside the app's lifespan, models loaded."""
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(runtime_of(app).loaded.wait, 60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", **client_kwargs
        ) as c:
            yield c


@pytest_asyncio.fixture
async def aclient(make_settings, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    async with async_serving(create_app(make_settings(), clock=clock)) as c:
        yield c


def predict(client: TestClient, inputs: list, model: str = "tiny", outputs: str = "all") -> list:
    r = client.post(f"/v1/models/{model}/predict", json={"inputs": inputs, "outputs": outputs})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def open_session(client: TestClient, **body) -> dict:
    """POST /v1/sessions (model tiny unless given); the 201 body."""
    r = client.post("/v1/sessions", json={"model": "tiny", **body})
    assert r.status_code == 201, r.text
    return r.json()


def push(client: TestClient, sid: str, rows: list, offset: int | None = None) -> httpx.Response:
    body = {"inputs": rows} if offset is None else {"inputs": rows, "offset": offset}
    return client.post(f"/v1/sessions/{sid}/steps", json=body)


def assert_rows_close(actual: list, expected: list, atol: float = 1e-5) -> None:
    a, e = torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    torch.testing.assert_close(a, e, atol=atol, rtol=0)


def metric(text: str, name: str) -> float:
    """One series of the tiny model from a /metrics page."""
    match = re.search(rf'^{name}{{model="tiny"}} (\S+)$', text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def step_batches(before: str, after: str) -> tuple[float, float]:
    """(model step calls, streams they advanced) of the tiny model between two /metrics pages."""
    calls, streams = (
        metric(after, f"tcnserve_step_batch_size_{part}")
        - metric(before, f"tcnserve_step_batch_size_{part}")
        for part in ("count", "sum")
    )
    return calls, streams


def random_rows(length: int, seed: int, channels: int = 2) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(length, channels, generator=gen).tolist()


# ----- a worker held busy, so that pushes queue up and join one micro-batch ---------------------


@contextlib.contextmanager
def held_worker(client: TestClient, model: str = "tiny") -> Iterator[Callable[[int], None]]:
    """Occupy the model's worker thread until the block ends; yields `wait_queued(n)`, which
    returns once n more jobs are queued behind the held call."""
    worker = runtime_of(client.app).registry.get(model).worker
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(30)

    blocker = client.portal.start_task_soon(worker.call, hold)
    assert entered.wait(30), "the worker did not take the held call"

    def wait_queued(n: int) -> None:
        wait_until(lambda: worker.queued >= n, what=f"{n} queued model jobs")

    try:
        yield wait_queued
    finally:
        gate.set()
        blocker.result(30)


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    """Poll for a state another thread or process reaches (never a wait for time to pass)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


# ----- `tcnserve serve` as a real process ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def serve_command() -> list[str]:
    """`tcnserve serve`; the dispatcher imports every subcommand, so while one of them is not
    written yet, run the serve module directly (the same add_arguments/run)."""
    if all(importlib.util.find_spec(module) for module, _ in COMMANDS.values()):
        return [sys.executable, "-m", "service.cli", "serve"]
    return [sys.executable, "-m", "service.commands.serve"]


def free_port(addresses: tuple[str, ...] = ("127.0.0.1",)) -> int:
    """A TCP port free on `addresses` now, below the kernel's ephemeral range: a port from
    that range can become some connection's source port before the server started later binds
    it (a proxy failed so once: "cannot bind socket (Address already in use)")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        try:
            for address in addresses:
                with socket.socket() as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no free port below {low} on {addresses}")


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


@contextlib.contextmanager
def serve_process(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`tcnserve serve ARGS` on a free loopback port, ready; yields (base url, process).

    `env` replaces every TCNSERVE_ variable of this environment. On exit: SIGTERM, then kill.
    """
    port = free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*serve_command(), "--port", str(port), *args],
            cwd=ROOT,
            env={**base_env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            yield url, process
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (then SIGKILL if it hangs); nothing if it has already exited."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


async def held(worker: ModelWorker):
    """Occupy the worker until the returned event is set, so later jobs queue up."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(30)

    blocker = asyncio.ensure_future(worker.call(hold))
    await asyncio.to_thread(entered.wait, 30)
    return gate, blocker


async def until_queued(worker: ModelWorker, n: int) -> None:
    for _ in range(100_000):
        if worker.queued >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{n} jobs never queued")


async def until_queued_from_elsewhere(worker: ModelWorker, n: int) -> None:
    """Wait (off this event loop, which keeps running) until n jobs are queued on the worker:
    for jobs submitted by another thread's loop, such as a server running in a thread."""
    await asyncio.to_thread(wait_until, lambda: worker.queued >= n, what=f"{n} queued model jobs")


@contextlib.contextmanager
def uvicorn_thread(app: FastAPI, **config_kwargs) -> Iterator[tuple[str, uvicorn.Server]]:
    """`app` under a real uvicorn server on a free loopback port, run in a thread of this process
    so that a test can reach its runtime (hold its worker, move its clock); yields (base url,
    server), the models loaded. On exit the server shuts down as on SIGTERM. `config_kwargs`
    go to uvicorn.Config (e.g. the protocols `tcnserve serve` uses)."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", **config_kwargs
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-in-thread", daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: (server.started and runtime_of(app).ready) or not thread.is_alive(),
            "the server to be ready",
        )
        assert thread.is_alive(), "the server thread ended before it was ready"
        yield f"http://127.0.0.1:{config.port}", server
    finally:
        server.should_exit = True
        thread.join(30)


# ----- a real redis-server on loopback (the session store) -------------------------------------

REDIS_SERVER = shutil.which("redis-server")
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
)
# .ci/run installs both and sets this, so that in CI a missing one is an error, not a skip.
NEED_SYSTEM_SERVERS = os.environ.get("TCNSERVE_TESTS_NEED_SYSTEM_SERVERS") == "1"


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [name for name, path in (("redis-server", REDIS_SERVER), ("haproxy", HAPROXY))
               if path is None]  # fmt: skip
    if NEED_SYSTEM_SERVERS and missing:
        raise pytest.UsageError(
            f"TCNSERVE_TESTS_NEED_SYSTEM_SERVERS=1 but {', '.join(missing)} not installed "
            "(apt-get install redis-server haproxy)"
        )


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """redis-server on a free loopback port, nothing persisted; yields its redis:// URL."""
    assert REDIS_SERVER is not None
    port = free_port()
    with (directory / "redis.log").open("w") as log:
        process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def answers() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"redis-server exited with {process.returncode}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(b"PING\r\n")
                        return s.recv(16).startswith(b"+PONG")
                except OSError:
                    return False

            wait_until(answers, "redis-server to answer")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_process(process)


@pytest.fixture(params=["memory", "redis"])
def store(request) -> str:
    """A session store for `replicas` (tests/service/test_durability.py): in-process, or Redis."""
    return "memory" if request.param == "memory" else request.getfixturevalue("redis_url")


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
