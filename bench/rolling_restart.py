"""What the session store costs and buys: snapshot size, drain time, restore on first touch, and
a rolling restart of three replicas behind HAProxy (deploy/haproxy.cfg) under streaming load.

    python bench/rolling_restart.py                   # all four parts (a few minutes)
    python bench/rolling_restart.py --parts drain --drain-sessions 1000

Needs redis-server and haproxy on PATH (Debian packages). Uses the default model. Every server
is a real `tcnserve serve` process; clients are plain httpx with offsets. Nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import ROOT, environment, percentile, serve_command
from model import read_checkpoint_info
from service.sessions.record import SessionRecord
from service.sessions.state import AppliedPush
from tests.service.dns_responder import DnsResponder

DEFAULT_MODEL = ROOT / "service" / "default_model"
ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
CONFIG, _ = read_checkpoint_info(DEFAULT_MODEL)
TAIL = CONFIG.receptive_field - 1


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def shared_port() -> int:
    while True:
        port = free_port(ADDRESSES[0])
        try:
            for address in ADDRESSES[1:]:
                with socket.socket() as s:
                    s.bind((address, port))
            return port
        except OSError:
            continue


def wait_for(condition, what: str, limit_s: float = 180.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [shutil.which("redis-server"), *args, "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    try:
        wait_for(answers, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


class Replica:
    """`tcnserve serve` with the default model and the Redis store; its log in a file."""

    def __init__(self, address: str, port: int, store: str, log: Path, **env: str):
        self.url = f"http://{address}:{port}"
        self.address, self.port, self.log = address, port, log
        base = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
        self.env = {
            **base,
            "TCNSERVE_SESSION_STORE": store,
            "TCNSERVE_MAX_SESSIONS": "1024",
            "TCNSERVE_TORCH_THREADS": "1",
            **{f"TCNSERVE_{k.upper()}": v for k, v in env.items()},
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Replica:
        with self.log.open("a") as out:
            command = [*serve_command(), "--host", self.address, "--port", str(self.port)]
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise SystemExit(f"replica exited: {self.log.read_text()[-2000:]}")
            return ready(self.url)

        wait_for(up, f"{self.url} to be ready")

    def stop(self) -> float:
        """SIGTERM and wait: seconds until it exited."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)
        return time.perf_counter() - started


def snapshot_rows(seed: int) -> list:
    return np.random.default_rng(seed).standard_normal((TAIL, CONFIG.in_channels)).tolist()


def snapshot_part() -> None:
    rows = np.zeros((TAIL, CONFIG.in_channels), dtype=np.float32)
    bare = len(SessionRecord("default", 600.0, 10_000, rows).encode())
    last = AppliedPush(9_999, 1, bytes(16), np.zeros((1, CONFIG.output_size), np.float32))
    with_last = len(SessionRecord("default", 600.0, 10_000, rows, last).encode())
    print("\n## snapshot bytes per session (default model)\n")
    print(f"receptive field R = {CONFIG.receptive_field}, in_channels = {CONFIG.in_channels}")
    print("| record | bytes |\n|---|---|")
    print(f"| input tail only ({TAIL} rows x {CONFIG.in_channels} x float32) | {bare:,} |")
    print(f"| with the last push (1 row) kept for replay | {with_last:,} |")


def drain_part(directory: Path, sessions: int) -> None:
    with redis_server(directory) as store:
        replica = Replica("127.0.0.1", free_port(), store, directory / "drain.log", drain_s="0")
        replica.start().wait_ready()
        started = time.perf_counter()
        with httpx.Client(base_url=replica.url, timeout=120) as client:
            for i in range(sessions):
                body = {"model": "default", "snapshot": {"position": 10_000, "inputs": []}}
                body["snapshot"]["inputs"] = snapshot_rows(i % 16)
                r = client.post("/v1/sessions", json=body)
                if r.status_code != 201:
                    raise SystemExit(r.text)
                client.post(
                    f"/v1/sessions/{r.json()['session_id']}/steps",
                    json={"inputs": [[0.5, 1.0]], "offset": 10_000},
                )
        opened = time.perf_counter() - started
        exit_s = replica.stop()
        line = re.search(
            r"drain: (\d+) of (\d+) sessions written to the store in (\S+) s",
            replica.log.read_text(),
        )
        import redis

        r = redis.Redis.from_url(store)
        keys = [k for k in r.scan_iter("tcnserve:s:*", count=1000)]
        usage = [r.memory_usage(k) for k in keys[:50]]
        r.close()
    print(f"\n## drain: {sessions} live sessions written to Redis on SIGTERM\n")
    print("| what | value |\n|---|---|")
    print(f"| opening them (from snapshots) | {opened:.1f} s |")
    print(f"| sessions written at exit (log) | {line.group(1)} of {line.group(2)} |")
    print(
        f"| writing them (log: capture under locks + pipelined fenced writes) | "
        f"{float(line.group(3)):.3f} s |"
    )
    print(f"| SIGTERM to exit (drain_s=0: shutdown, write, close) | {exit_s:.2f} s |")
    print(f"| records in Redis | {len(keys)} |")
    print(f"| Redis MEMORY USAGE per record (median of 50) | {int(np.median(usage)):,} B |")


async def timed_push(client: httpx.AsyncClient, sid: str, offset: int) -> tuple[float, int]:
    started = time.perf_counter()
    r = await client.post(
        f"/v1/sessions/{sid}/steps", json={"inputs": [[0.25, 1.0]], "offset": offset}
    )
    return (time.perf_counter() - started) * 1000, r.status_code


def restore_part(directory: Path, sessions: int) -> None:
    with redis_server(directory) as store:
        a = Replica("127.0.0.1", free_port(), store, directory / "a.log", drain_s="0").start()
        b = Replica("127.0.0.1", free_port(), store, directory / "b.log", drain_s="0").start()
        a.wait_ready()
        b.wait_ready()

        out: dict[str, list[tuple[float, int]]] = {}
        sids: list[str] = []

        async def run() -> None:
            async with (
                httpx.AsyncClient(base_url=a.url, timeout=60) as ca,
                httpx.AsyncClient(base_url=b.url, timeout=60) as cb,
            ):
                for i in range(sessions):
                    body = {"model": "default", "snapshot": {"position": 10_000}}
                    body["snapshot"]["inputs"] = snapshot_rows(i % 16)
                    sids.append((await ca.post("/v1/sessions", json=body)).json()["session_id"])
                for name, client, offset in (
                    ("push to a session held here (A)", ca, 10_000),
                    ("first touch on B: A alive, hands it off", cb, 10_001),
                    ("push to it again on B (held there now)", cb, 10_002),
                ):
                    out[name] = [await timed_push(client, s, offset) for s in sids]

        async def after_drain() -> None:
            async with httpx.AsyncClient(base_url=a.url, timeout=60) as ca:
                name = "first touch on A after B drained (released: no handoff)"
                out[name] = [await timed_push(ca, s, 10_003) for s in sids]

        asyncio.run(run())
        b.stop()  # drained: every session it held is written and released
        asyncio.run(after_drain())
        a.stop()
    print(f"\n## restore on first touch ({sessions} sessions, default model, one push of 1 row)\n")
    print("| case | p50 ms | p99 ms | max ms | errors |\n|---|---|---|---|---|")
    for name, results in out.items():
        values = [ms for ms, status in results if status == 200]
        errors = len(results) - len(values)
        print(
            f"| {name} | {percentile(values, 50):.1f} | {percentile(values, 99):.1f} | "
            f"{max(values):.1f} | {errors} |"
        )


def rolling_part(directory: Path, sessions: int, rate_hz: float) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    with redis_server(directory) as store:
        port = shared_port()
        replicas = [
            Replica(address, port, store, directory / f"r{i}.log", drain_s="3")
            for i, address in enumerate(ADDRESSES)
        ]
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        pods = {f"tcnserve-{i}.tcnserve.bench": [a] for i, a in enumerate(ADDRESSES)}
        with DnsResponder(pods) as dns:
            proxy_port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
            env.update(
                TCNSERVE_PROXY_BIND=f"127.0.0.1:{proxy_port}",
                TCNSERVE_PODS="tcnserve.bench",
                TCNSERVE_POD_PORT=str(port),
                TCNSERVE_DNS_SERVER=dns.address,
            )
            with (directory / "haproxy.log").open("w") as out:
                proxy = subprocess.Popen(
                    [
                        str(ROOT / "deploy" / "haproxy-start.sh"),
                        haproxy,
                        "-W",
                        "-db",
                        "-f",
                        str(ROOT / "deploy" / "haproxy.cfg"),
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            url = f"http://127.0.0.1:{proxy_port}"

            def servers_seen() -> int:
                seen = set()
                for _ in range(30):
                    with contextlib.suppress(httpx.TransportError):
                        r = httpx.get(
                            f"{url}/v1/models",
                            timeout=5,
                            headers={"X-Session-ID": uuid.uuid4().hex},
                        )
                        if r.status_code == 200:
                            seen.add(r.headers["x-tcnserve-server"])
                return len(seen)

            try:
                wait_for(lambda: servers_seen() == 3, "the proxy to see three replicas")
                log = asyncio.run(stream_through(url, sessions, rate_hz, replicas))
            finally:
                proxy.terminate()
                proxy.wait(10)
                for r in replicas:
                    r.stop()
    report_rolling(log, sessions, rate_hz)
    logs = "".join(r.log.read_text() for r in replicas)
    forced = logs.count("took a session over without its owner's handoff")
    drained = [int(n) for n in re.findall(r"drain: (\d+) of", logs)]
    print(
        f"\nforced takeovers (owner did not hand off within handoff_timeout_s): {forced}; "
        f"sessions written at each replica's exit: {drained}"
    )


async def stream_through(url: str, sessions: int, rate_hz: float, replicas: list[Replica]):
    """Each session pushes one row at `rate_hz` through the proxy while the replicas restart
    one after another. Returns (start time, latency ms, status, phase) per push."""
    log: list[tuple[float, float, int, str]] = []
    phase = "steady"
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=sessions, max_keepalive_connections=sessions)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        sids = []
        for _ in range(sessions):
            r = await client.post("/v1/sessions", json={"model": "default"})
            sids.append(r.json()["session_id"])

        async def stream(sid: str) -> None:
            position = 0
            while not stop.is_set():
                started = time.perf_counter()
                r = await client.post(
                    f"/v1/sessions/{sid}/steps",
                    json={"inputs": [[0.1, 1.0]], "offset": position},
                )
                elapsed = time.perf_counter() - started
                log.append((started, elapsed * 1000, r.status_code, phase))
                if r.status_code == 200:
                    position = r.json()["position"]
                await asyncio.sleep(max(0.0, 1 / rate_hz - elapsed))

        tasks = [asyncio.create_task(stream(s)) for s in sids]
        await asyncio.sleep(10)
        phase = "rolling"
        for replica in replicas:  # one at a time, as the Deployment's RollingUpdate does
            await asyncio.to_thread(replica.stop)
            replica.start()
            await asyncio.to_thread(replica.wait_ready)
            await asyncio.sleep(3)  # the proxy's rise 2 x inter 1s, then the keys come back
        phase = "after"
        await asyncio.sleep(10)
        stop.set()
        await asyncio.gather(*tasks)
    return log


def report_rolling(log, sessions: int, rate_hz: float) -> None:
    print(
        f"\n## rolling restart of 3 replicas behind HAProxy: {sessions} sessions, each pushing "
        f"1 row at {rate_hz:g} Hz (default model)\n"
    )
    print("| phase | pushes | errors | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
    for phase in ("steady", "rolling", "after"):
        rows = [x for x in log if x[3] == phase]
        ok = [ms for _, ms, status, _ in rows if status == 200]
        errors = len(rows) - len(ok)
        codes = sorted({status for _, _, status, _ in rows if status != 200})
        print(
            f"| {phase} | {len(rows)} | {errors}{' ' + str(codes) if codes else ''} | "
            f"{percentile(ok, 50):.1f} | {percentile(ok, 99):.1f} | {max(ok):.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="snapshot,drain,restore,rolling")
    parser.add_argument("--drain-sessions", type=int, default=1000)
    parser.add_argument("--restore-sessions", type=int, default=200)
    parser.add_argument("--rolling-sessions", type=int, default=60)
    parser.add_argument("--rate-hz", type=float, default=20.0)
    args = parser.parse_args()
    print(f"$ python bench/rolling_restart.py {' '.join(sys.argv[1:])}")
    print(environment())
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="tcnserve-bench-") as tmp:
        directory = Path(tmp)
        if "snapshot" in parts:
            snapshot_part()
        if "drain" in parts:
            drain_part(directory, args.drain_sessions)
        if "restore" in parts:
            restore_part(directory, args.restore_sessions)
        if "rolling" in parts:
            rolling_part(directory, args.rolling_sessions, args.rate_hz)


if __name__ == "__main__":
    main()
