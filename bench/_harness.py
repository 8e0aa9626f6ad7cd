"""What the service benchmarks share: a server subprocess, metrics scrapes, HTTP pushers, the
environment header, percentiles and the CPU time of a server's whole process tree. Imported by
bench/service_http.py, bench/ws_stream.py, bench/edge_http.py and bench/scaling.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from dataclasses import dataclass
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
    """A server subprocess on a free loopback port, stopped on exit.

    With `tcnserve serve --workers N` (N >= 1) the subprocess is a supervisor and the server is
    its children (an engine and N edges): ready means /readyz answers and every edge listens on
    the port, so that long-lived connections opened next spread over all of them."""

    def __init__(self, command: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
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
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            self.__exit__()
            raise SystemExit("server did not become ready in 120 s")
        if not self._edges_ready(deadline):
            self.__exit__()
            raise SystemExit("the server's edge processes did not all become ready in 120 s")
        return self

    def _edges_ready(self, deadline: float) -> bool:
        """Every edge process listens on the port and fresh connections (which the kernel
        hashes over the listeners) are all answered ready."""
        edges = self.edges()
        if not edges:
            return True
        while time.monotonic() < deadline:
            if listening_sockets(self.port) >= len(edges):
                break
            time.sleep(0.2)
        else:
            return False
        ready = 0
        while time.monotonic() < deadline and ready < 4 * len(edges):
            try:  # a new client each time: a new connection, a new source port
                ok = httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200
            except httpx.TransportError:
                ok = False
            ready = ready + 1 if ok else 0
            if not ok:
                time.sleep(0.2)
        return ready >= 4 * len(edges)

    def edges(self) -> list[int]:
        """The pids of the server's edge processes (none: one process serving everything)."""
        return [p.pid for p in process_tree(self.process.pid) if p.role == "edge"]

    def describe(self) -> str:
        """How many processes serve, as counted now (the workers count in force)."""
        tree = process_tree(self.process.pid)
        edges = sum(p.role == "edge" for p in tree)
        if not edges:
            return "workers 0: one process"
        engines = sum(p.role == "engine" for p in tree)
        return f"workers {edges}: {edges} edge + {engines} engine processes under a supervisor"

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is not None:
            return
        children = [p for p in process_tree(self.process.pid) if p.pid != self.process.pid]
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)  # a supervisor stops its edges, then its engine
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for child in children:  # left behind by a supervisor that was killed
            if process_start(child.pid) == child.start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)


# ----- CPU time of a process tree -----------------------------------------------------------
#
# A server's CPU is the sum over its process tree: the process the bench started (with
# --workers N a supervisor) and every descendant, found by ppid in /proc/<pid>/stat, re-found
# at each reading so that a child replaced during a window is counted. Each process contributes
# utime + stime + cutime + cstime: its own CPU and that of its children it has reaped. Over a
# window, server CPU = total(end) - total(start), so a child that ran at the start and was
# replaced counts its CPU up to its death (its times move into its parent's cutime/cstime when
# the supervisor reaps it), and its replacement counts all of its own. What this misses or
# blurs: a child that died and is not yet reaped at the end (a zombie still shows its times,
# so only its reaping parent's count can jump after the window), a descendant re-parented out
# of the tree (its parent died first), a process that exits between the scan of /proc and the
# reading of its stat (its last tick), and the resolution: 1/CLK_TCK (10 ms) per process per
# reading, so with 10 processes a 5 s window is good to about +-2% of one core.

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessCpu:
    pid: int
    ppid: int
    start: int  # start time in ticks after boot: tells a pid apart from its reuse
    role: str  # "engine" or "edge" (service/engine/process.py), "supervisor", "server"
    own: float  # utime + stime, seconds
    reaped: float  # cutime + cstime: the reaped children's CPU, seconds


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (comm)" (state is [0], ppid [1]); None if
    the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    if b"service.engine.process" in argv:
        following = argv[argv.index(b"service.engine.process") + 1 :]
        if following and following[0] in (b"engine", b"edge"):
            return following[0].decode()
    return "server"


def process_tree(root: int) -> list[ProcessCpu]:
    """`root` and all its descendants (by ppid), with their CPU times; [] if root is gone."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                stats[int(entry)] = fields
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    if root not in stats:
        return []
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        f = stats[pid]
        tree.append(
            ProcessCpu(
                pid,
                int(f[1]),
                int(f[19]),
                _role(pid),
                (int(f[11]) + int(f[12])) / CLOCK_TICK,
                (int(f[13]) + int(f[14])) / CLOCK_TICK,
            )
        )
    if any(p.role in ("engine", "edge") for p in tree):
        tree[0] = dataclasses.replace(tree[0], role="supervisor")
    return tree


@dataclass(frozen=True)
class TreeCpu:
    """One reading of a server's process tree."""

    at: float  # perf_counter()
    processes: tuple[ProcessCpu, ...]
    threads: dict[int, float]  # the root's threads (tid -> CPU seconds): the one-process split

    @property
    def total(self) -> float:
        return sum(p.own + p.reaped for p in self.processes)


def read_tree_cpu(root: int) -> TreeCpu:
    return TreeCpu(time.perf_counter(), tuple(process_tree(root)), thread_cpu_seconds(root))


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, from /proc."""
    result = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
        result[int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime + stime
    return result


@dataclass(frozen=True)
class CpuWindow:
    """A server's CPU between two readings, in seconds and as fractions of one core."""

    wall: float
    seconds: float  # all processes
    by_role: dict[str, float]  # seconds per role ("edge" summed over the edges)
    loop: float  # one process only (no edges): its main thread (the event loop), seconds
    other_threads: float  # and its other threads (the model worker), seconds
    processes: int  # processes at the end of the window
    single: bool  # one process serving (no edge processes)

    def share(self, seconds: float) -> float:
        return seconds / self.wall if self.wall > 0 else float("nan")


def cpu_window(before: TreeCpu, after: TreeCpu) -> CpuWindow:
    """What the tree used between `before` and `after` (see the comment above ProcessCpu)."""
    then = {(p.pid, p.start): p for p in before.processes}
    by_role: dict[str, float] = {}
    for p in after.processes:
        old = then.get((p.pid, p.start))
        used = p.own - old.own if old else p.own  # a new process ran only in the window
        by_role[p.role] = by_role.get(p.role, 0.0) + used
    single = not any(p.role == "edge" for p in after.processes)
    root = after.processes[0].pid if after.processes else -1
    threads = {t: s - before.threads.get(t, 0.0) for t, s in after.threads.items()}
    loop = threads.get(root, 0.0) if single else float("nan")
    other = sum(v for t, v in threads.items() if t != root) if single else float("nan")
    return CpuWindow(
        wall=after.at - before.at,
        seconds=after.total - before.total,
        by_role=by_role,
        loop=loop,
        other_threads=other,
        processes=len(after.processes),
        single=single,
    )


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN on `port` (SO_REUSEPORT: one per edge process), from /proc/net."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                count += 1
    return count


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


def best_us(fn, repeats: int, inner: int) -> float:
    """The fastest of `repeats` timings of `inner` calls of fn(), per call, in microseconds
    (one untimed call first)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best * 1e6


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
