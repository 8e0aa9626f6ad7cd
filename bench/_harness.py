"""What the service benchmarks share: a server subprocess, metrics scrapes, HTTP pushers, the
environment header and percentiles. Imported by bench/service_http.py and bench/ws_stream.py."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "service" / "default_model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """`tcnserve serve`, or its module while the CLI's other subcommands are missing."""
    sys.path.insert(0, str(ROOT))
    from service.cli import COMMANDS

    if all(importlib.util.find_spec(module) for module, _ in COMMANDS.values()):
        return [sys.executable, "-m", "service.cli", "serve"]
    return [sys.executable, "-m", "service.commands.serve"]


class Server:
    """A server subprocess on a free loopback port, stopped on exit."""

    def __init__(self, command: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit("server did not become ready in 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def histogram_totals(metrics_text: str, name: str, labels: str = "") -> tuple[float, float]:
    """(sum, count) of the histogram `name` over every series whose labels contain `labels`."""
    total = count = 0.0
    pattern = rf"^{re.escape(name)}_(sum|count)\{{(.*)\}} (\S+)$"  # label values may hold braces
    for field, series, value in re.findall(pattern, metrics_text, re.MULTILINE):
        if labels not in series:
            continue
        if field == "sum":
            total += float(value)
        else:
            count += float(value)
    return total, count


def batch_stats(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of tcnserve_step_batch_size over all models."""
    return histogram_totals(metrics_text, "tcnserve_step_batch_size")


def environment() -> str:
    """Two header lines: torch, CPUs, load; date and checkout."""
    import torch

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs ({cpu}), load average {load}\n"
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, checkout {rev}"
    )


def write_results(path: Path | str, bench: str, results: object) -> None:
    """`--json PATH`: one benchmark run, machine-readable, for bench/plot_service.py."""
    record = {
        "bench": bench,
        "argv": sys.argv[1:],
        "environment": environment(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


class HttpPushers:
    """Sessions that each push one row per POST /v1/sessions/{id}/steps, in lockstep.

    One client (one keep-alive connection) per session: a single httpx pool shared by 128
    connections spends more CPU on pool bookkeeping than the server spends on a push.
    """

    def __init__(self, url: str, sessions: int, in_channels: int, seed: int):
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        # One TLS context for all (unused on http://): each client loading the CA bundle
        # itself costs ~0.1 s, half a minute for 256 sessions on a busy machine.
        tls = ssl.create_default_context()
        self.clients = [
            httpx.AsyncClient(base_url=url, timeout=120, limits=one, verify=tls)
            for _ in range(sessions)
        ]
        self.session_ids: list[str] = []
        rng = np.random.default_rng(seed)
        self.bodies = [
            json.dumps({"inputs": [row]}).encode()
            for row in rng.standard_normal((64, in_channels)).round(4).tolist()
        ]

    async def open(self) -> None:
        """Create one session per client."""
        # Concurrently: no connection should idle past uvicorn's 5 s keep-alive timeout before
        # the pushes start (a connection closed under a request is an httpx.ReadError).

        async def create(c: httpx.AsyncClient) -> str:
            r = await c.post("/v1/sessions", json={"model": "default"})
            r.raise_for_status()
            return r.json()["session_id"]

        self.session_ids = list(await asyncio.gather(*(create(c) for c in self.clients)))

    async def run(
        self, count: int | None, end: float = 0.0, latencies: list[float] | None = None
    ) -> int:
        """Each session pushes `count` rows, or until perf_counter() passes `end`; -> pushes."""
        headers = {"content-type": "application/json"}
        bodies = self.bodies

        async def one(c: httpx.AsyncClient, sid: str) -> int:
            i = 0
            path = f"/v1/sessions/{sid}/steps"
            while i < count if count is not None else time.perf_counter() < end:
                start = time.perf_counter()
                r = await c.post(path, content=bodies[i % 64], headers=headers)
                r.raise_for_status()
                if latencies is not None:
                    latencies.append(time.perf_counter() - start)
                i += 1
            return i

        pairs = zip(self.clients, self.session_ids, strict=True)
        return sum(await asyncio.gather(*(one(c, sid) for c, sid in pairs)))

    async def close(self, delete: bool = True) -> None:
        try:
            if delete:
                # Not strict: after a failed open() fewer sessions than clients exist.
                pairs = zip(self.clients, self.session_ids, strict=False)
                await asyncio.gather(*(c.delete(f"/v1/sessions/{sid}") for c, sid in pairs))
        finally:
            for c in self.clients:
                await c.aclose()


def run_wrk(command: list[str], env: dict[str, str], duration: float) -> dict:
    """Run a wrk command whose Lua script prints `WRKRESULT requests errors p50 p99`:
    requests/s, errors, p50/p99 ms and wrk's CPU share of one core over its run."""
    before = os.times()
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    match = re.search(r"WRKRESULT (\d+) (\d+) (\S+) (\S+)", out)
    if not match:
        raise SystemExit(f"wrk said:\n{out}")
    count, errors, p50, p99 = match.groups()
    return {
        "rps": int(count) / duration,
        "errors": int(errors),
        "p50": float(p50),
        "p99": float(p99),
        "wrk_cpu": cpu / wall,
    }
