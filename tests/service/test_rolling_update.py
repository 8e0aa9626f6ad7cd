"""Three `tcnserve serve` processes behind the real HAProxy running deploy/haproxy.cfg as it is
deployed (found through a DNS server, as on a cluster), with a real Redis as the session store.
Plain HTTP clients stream with offsets while one replica is stopped (SIGTERM) or killed (-9)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from service.sessions.record import SessionRecord
from tests.service.conftest import (
    HAPROXY,
    ROOT,
    assert_rows_close,
    free_port,
    random_rows,
    serve_command,
    stop_process,
    wait_ready,
    wait_until,
)
from tests.service.dns_responder import DnsResponder

DEPLOY = ROOT / "deploy"
PODS = "tcnserve.test"  # the StatefulSet's pods are tcnserve-<n>.<PODS>, as on a cluster
ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
SPARE = "127.0.0.5"  # where a replaced pod comes back
ADDED = "127.0.0.6"  # a pod added by scaling up
SESSIONS = 18
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)"),
]


def pod_name(n: int) -> str:
    return f"tcnserve-{n}.{PODS}"


def proxy_env(bind: str, port: int, dns: str) -> dict[str, str]:
    """The only things a test sets: the variables deploy/haproxy.cfg expands."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
    return {
        **base,
        "TCNSERVE_PROXY_BIND": bind,
        "TCNSERVE_PODS": PODS,
        "TCNSERVE_POD_PORT": str(port),
        "TCNSERVE_DNS_SERVER": dns,
    }


def proxy_command() -> list[str]:
    """The proxy container's command (deploy/proxy.yaml), with this machine's haproxy."""
    return [
        str(DEPLOY / "haproxy-start.sh"),
        HAPROXY,
        "-W",
        "-db",
        "-f",
        str(DEPLOY / "haproxy.cfg"),
    ]


def test_the_deployed_proxy_config_is_valid():
    env = proxy_env("127.0.0.1:18080", 8000, "127.0.0.1:53")
    result = subprocess.run(
        [*proxy_command(), "-c"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_start_script_finds_the_cluster_dns_and_namespace(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "search shop.svc.k8s.example shop.svc svc.k8s.example\nnameserver 10.0.0.10\n"
        "options ndots:5\n"
    )
    env = {"PATH": os.environ["PATH"], "TCNSERVE_RESOLV_CONF": str(resolv)}
    result = subprocess.run(
        [str(DEPLOY / "haproxy-start.sh"), "env"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "TCNSERVE_DNS_SERVER=10.0.0.10:53" in result.stdout
    assert "TCNSERVE_PODS=tcnserve.shop.svc.k8s.example" in result.stdout
    assert "TCNSERVE_POD_PORT=8000" in result.stdout
    assert "TCNSERVE_PROXY_BIND=:8080" in result.stdout


@dataclass
class Replica:
    address: str
    url: str
    process: subprocess.Popen
    log: Path


@dataclass
class Cluster:
    url: str
    replicas: list[Replica]
    redis_url: str
    proxy_log: Path
    dns: DnsResponder
    start_replica: Callable[[str], Replica]  # another pod, on this address
    start_proxy: Callable[[str], str]  # another proxy, logging to this file: its URL

    def explain(self, r: httpx.Response) -> str:
        """A reply a test did not expect, with what the proxy logged for its request (its
        termination state and retries say which side failed, and how)."""
        request_id = r.request.headers.get("x-request-id", "")

        def logged() -> list[str]:
            return [x for x in self.proxy_log.read_text().splitlines() if request_id in x]

        # The proxy writes a request's line once it has answered: it may come a moment later.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: bool(logged()), "the proxy to log the request", 5)
        return f"{r.status_code} {r.text!r}; the proxy logged: {logged()}"

    def moves(self, kind: str) -> int:
        """Sessions the live replicas took from the store, by `kind` (restored, taken_over)."""
        total = 0
        for replica in self.replicas:
            if replica.process.poll() is None:
                text = httpx.get(f"{replica.url}/metrics", timeout=10).text
                prefix = f'tcnserve_session_moves_total{{kind="{kind}"}} '
                total += int(
                    float(next(x for x in text.splitlines() if x.startswith(prefix))[len(prefix) :])
                )
        return total

    def sessions_per_replica(self) -> list[int]:
        counts = []
        for replica in self.replicas:
            if replica.process.poll() is not None:
                counts.append(0)
                continue
            text = httpx.get(f"{replica.url}/metrics", timeout=10).text
            line = next(x for x in text.splitlines() if x.startswith("tcnserve_active_sessions{"))
            counts.append(int(float(line.split()[-1])))
        return counts


def shared_free_port() -> int:
    """A TCP port free on every replica address."""
    return free_port((*ADDRESSES, SPARE, ADDED))


@contextlib.contextmanager
def cluster(tmp_path: Path, tiny_dir: Path, redis_url: str) -> Iterator[Cluster]:
    """Pod n at ADDRESSES[n], named pod_name(n) in the DNS, and one proxy in front."""
    port = shared_free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
    env = {
        **base,
        "TCNSERVE_SESSION_STORE": redis_url,
        "TCNSERVE_DRAIN_S": "3",  # longer than the proxy needs to see /readyz fail twice
        "TCNSERVE_SNAPSHOT_INTERVAL_S": "0.2",
        "TCNSERVE_HANDOFF_TIMEOUT_S": "2",
        "TCNSERVE_MAX_SESSIONS": "64",
        "TCNSERVE_TORCH_THREADS": "1",
    }
    processes: list[subprocess.Popen] = []

    def start_replica(address: str) -> Replica:
        log = tmp_path / f"tcnserve-{address}.log"
        with log.open("w") as out:
            command = [*serve_command(), "--host", address, "--port", str(port)]
            command += ["--model", f"tiny={tiny_dir}", "--device", "cpu"]
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        processes.append(process)
        return Replica(address, f"http://{address}:{port}", process, log)

    try:
        replicas = [start_replica(address) for address in ADDRESSES]
        for replica in replicas:
            wait_ready(replica.url, replica.process)
        records = {pod_name(n): [address] for n, address in enumerate(ADDRESSES)}
        with DnsResponder(records) as dns:

            def start_proxy(log_name: str) -> str:
                proxy_port = shared_free_port()
                log = tmp_path / log_name
                with log.open("w") as out:
                    proxy = subprocess.Popen(
                        proxy_command(),
                        env=proxy_env(f"127.0.0.1:{proxy_port}", port, dns.address),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                processes.append(proxy)
                url = f"http://127.0.0.1:{proxy_port}"
                seen: set[str] = set()

                def every_replica_serves() -> bool:
                    assert proxy.poll() is None, log.read_text()
                    with contextlib.suppress(httpx.TransportError):
                        headers = {"X-Session-ID": uuid.uuid4().hex}
                        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=5)
                        if r.status_code == 200:
                            seen.add(r.headers["x-tcnserve-server"])
                    return len(seen) == len(ADDRESSES)

                wait_until(every_replica_serves, "the proxy to route to every replica", 60)
                return url

            url = start_proxy("haproxy.log")
            yield Cluster(
                url, replicas, redis_url, tmp_path / "haproxy.log", dns, start_replica, start_proxy
            )
    finally:
        for process in reversed(processes):
            stop_process(process)


@dataclass
class Stream:
    """One client's session: its own rows, the outputs it got, where it is."""

    rows: list
    session_id: str = ""
    outputs: list = field(default_factory=list)
    position: int = 0
    replays: int = 0

    def push(self, client: httpx.Client, length: int) -> httpx.Response:
        body = {"inputs": self.rows[self.position : self.position + length]}
        body["offset"] = self.position
        path = f"/v1/sessions/{self.session_id}/steps"
        headers = {"X-Request-ID": uuid.uuid4().hex}  # to find the request in the proxy's log
        try:
            return client.post(path, json=body, headers=headers)
        except httpx.RemoteProtocolError:
            # A kept-alive connection to the proxy closed under the request (no answer, nothing
            # in the proxy's log): sent again with its offset, as the Python client does; the
            # server applies it at most once.
            return client.post(path, json=body, headers=headers)


def proxy_client(url: str) -> httpx.Client:
    """A client of the proxy that lets an idle connection go before the proxy closes it
    (haproxy.cfg's `timeout http-keep-alive 4s`): reusing one it is closing is a lost request."""
    return httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(keepalive_expiry=2))


def open_streams(client: httpx.Client, rows: int) -> list[Stream]:
    streams = []
    for i in range(SESSIONS):
        stream = Stream(random_rows(rows, seed=100 + i))
        headers = {"X-Session-ID": f"client-chosen-{i:04d}"} if i % 2 else {}
        r = client.post("/v1/sessions", json={"model": "tiny"}, headers=headers)
        assert r.status_code == 201, r.text
        stream.session_id = r.json()["session_id"]
        streams.append(stream)
    return streams


def check_outputs(client: httpx.Client, streams: list[Stream]) -> None:
    sequences = [s.rows[: s.position] for s in streams]
    r = client.post("/v1/models/tiny/predict", json={"inputs": sequences})
    assert r.status_code == 200, r.text
    for stream, want in zip(streams, r.json()["outputs"], strict=True):
        assert len(stream.outputs) == stream.position
        assert_rows_close(stream.outputs, want)


def stream_v2_sequences(client: httpx.Client, count: int) -> None:
    """/v2 sequences (docs/oip.md) through the proxy, routed by their X-Session-ID: outputs
    equal /v1 predict of each whole sequence."""
    for n in range(1, count + 1):
        rows = random_rows(12, seed=300 + n)
        outputs, route = [], {"X-Session-ID": f"oip-int-{n}"}
        for start in range(0, 12, 3):
            flags = {"sequence_start": start == 0, "sequence_end": start == 9}
            data = [v for row in rows[start : start + 3] for v in row]
            tensor = {"name": "input", "shape": [1, 3, len(rows[0])], "datatype": "FP32"}
            body = {"parameters": {"sequence_id": n, **flags}, "inputs": [{**tensor, "data": data}]}
            r = client.post("/v2/models/tiny/infer", json=body, headers=route)
            assert r.status_code == 200, r.text
            outputs += np.reshape(r.json()["outputs"][0]["data"], (3, -1)).tolist()
        want = client.post("/v1/models/tiny/predict", json={"inputs": [rows]}).json()["outputs"]
        assert_rows_close(outputs, want[0])


def durable_positions(cluster: Cluster, streams: list[Stream]) -> list[int]:
    store = redis.Redis.from_url(cluster.redis_url)
    try:
        positions = []
        for s in streams:
            record = store.hget(f"tcnserve:s:anonymous:{s.session_id}", "record")
            positions.append(SessionRecord.decode(record).position if record else -1)
        return positions
    finally:
        store.close()


def test_sigterm_moves_every_session_with_no_error_and_exact_outputs(tmp_path, tiny_dir, redis_url):
    with (
        cluster(tmp_path, tiny_dir, redis_url) as c,
        proxy_client(c.url) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        streams = open_streams(client, rows=600)
        # What the proxy answers itself carries the request id too, and says how it ended.
        r = client.get("/metrics", headers={"X-Request-ID": "proxy-answer-1"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "proxy-answer-1"
        assert '"GET /metrics HTTP/1.1" 404' in c.explain(r)

        def step(stream: Stream) -> None:
            r = stream.push(client, 2)
            assert r.status_code == 200, c.explain(r)  # no error, ever
            assert r.json()["position"] == stream.position + 2  # applied once, in order
            stream.outputs += r.json()["outputs"]
            stream.position += 2

        for _ in range(3):
            list(pool.map(step, streams))
        stream_v2_sequences(client, 4)  # opened and closed again: not counted below
        counts = c.sessions_per_replica()
        assert sum(counts) == SESSIONS
        assert c.moves("restored") == 0  # every push reached the replica holding its session
        victim = c.replicas[counts.index(max(counts))]
        victim.process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{victim.url}/readyz").status_code == 503, "the drain")
        # Creates the proxy sends to the draining replica (503 draining) go to the next one.
        for i in range(12):
            headers = {"X-Session-ID": f"created-while-draining-{i}"}
            r = client.post("/v1/sessions", json={"model": "tiny"}, headers=headers)
            assert r.status_code == 201, r.text
            streams.append(Stream(streams[0].rows, r.json()["session_id"]))
            streams[-1].outputs, streams[-1].position = [], 0
        rounds_after_exit = 0
        while rounds_after_exit < 3:  # streaming through the drain, the exit and beyond
            if victim.process.poll() is not None:
                rounds_after_exit += 1
            assert streams[0].position + 2 <= len(streams[0].rows), "the drain took too long"
            list(pool.map(step, streams))
        assert victim.process.wait(30) == 0
        check_outputs(client, streams)
        assert sum(c.sessions_per_replica()) == SESSIONS + 12
        # Every session of the victim moved: handed off while it drained, or written at exit.
        assert c.moves("restored") >= max(counts) and c.moves("taken_over") == 0
        assert "drain:" in victim.log.read_text()


def test_kill_9_loses_at_most_the_pushes_since_the_last_snapshot(tmp_path, tiny_dir, redis_url):
    with (
        cluster(tmp_path, tiny_dir, redis_url) as c,
        proxy_client(c.url) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        streams = open_streams(client, rows=200)
        floors: dict[str, int] = {}

        def step(stream: Stream) -> None:
            r = stream.push(client, 3)
            if r.status_code == 409 and r.json()["error"]["code"] == "offset_conflict":
                # Restored from its last durable snapshot: never older than the one seen in the
                # store before the kill. Replay from there, as the Python client does.
                durable = r.json()["error"]["position"]
                assert floors[stream.session_id] <= durable < stream.position, r.text
                del stream.outputs[durable:]
                stream.position, stream.replays = durable, stream.replays + 1
                r = stream.push(client, 3)
            assert r.status_code == 200, c.explain(r)
            stream.outputs += r.json()["outputs"]
            stream.position += len(r.json()["outputs"])

        for _ in range(4):
            list(pool.map(step, streams))
        wait_until(
            lambda: durable_positions(c, streams) == [s.position for s in streams],
            "the periodic snapshots to catch up",
        )
        floors.update({s.session_id: s.position for s in streams})
        list(pool.map(step, streams))  # a round that may or may not be durable yet
        counts = c.sessions_per_replica()
        victim = c.replicas[counts.index(max(counts))]
        victim.process.kill()
        victim.process.wait(10)
        for _ in range(6):
            list(pool.map(step, streams))
        check_outputs(client, streams)
        assert sum(s.replays for s in streams) <= max(counts)
        assert sum(c.sessions_per_replica()) == SESSIONS
        assert c.moves("restored") + c.moves("taken_over") >= max(counts)


def routes(url: str, session_ids: list[str]) -> dict[str, str | None]:
    """The pod a proxy sends each session id to (None: no pod answered)."""
    out: dict[str, str | None] = {}
    with httpx.Client(base_url=url, timeout=10) as client:
        for sid in session_ids:
            with contextlib.suppress(httpx.TransportError):
                r = client.get("/v1/models", headers={"X-Session-ID": sid})
                out[sid] = r.headers.get("x-tcnserve-server") if r.status_code == 200 else None
    return out


def test_every_proxy_routes_a_session_to_the_same_pod_after_a_pod_is_replaced(
    tmp_path, tiny_dir, redis_url
):
    with cluster(tmp_path, tiny_dir, redis_url) as c, proxy_client(c.url) as first:
        ids = [f"ring-key-{i:03d}" for i in range(40)]
        before = routes(c.url, ids)
        assert set(before.values()) == {f"tcnserve-{n}" for n in range(len(ADDRESSES))}
        # tcnserve-1 is replaced as a StatefulSet replaces a pod: it leaves the DNS (not ready),
        # stops, and a new pod comes up under its name at another address.
        old = c.replicas[1]
        c.dns.records[pod_name(1)] = []
        old.process.send_signal(signal.SIGTERM)
        assert old.process.wait(60) == 0
        new = c.start_replica(SPARE)
        wait_ready(new.url, new.process)
        c.replicas[1] = new
        c.dns.records[pod_name(1)] = [SPARE]
        # The proxy that saw the churn and one started after it: the same ring, the one from
        # before (the new pod takes its predecessor's place).
        second_url = c.start_proxy("haproxy-2.log")
        wait_until(lambda: routes(c.url, ids) == before, "the first proxy to route to the new pod")
        assert routes(second_url, ids) == before
        # Scaled up: tcnserve-3 joins both rings at the same place.
        added = c.start_replica(ADDED)
        wait_ready(added.url, added.process)
        c.replicas.append(added)
        c.dns.records[pod_name(3)] = [ADDED]

        def both_route_to_the_new_pod() -> bool:
            one, other = routes(c.url, ids), routes(second_url, ids)
            return one == other and "tcnserve-3" in one.values()

        wait_until(both_route_to_the_new_pod, "both proxies to route to the added pod")
        after = routes(c.url, ids)
        moved = {sid for sid in ids if after[sid] != before[sid]}
        assert all(after[sid] == "tcnserve-3" for sid in moved)  # only keys to the new pod move
        # A client whose requests alternate between the proxies: its sessions never move.
        streams = open_streams(first, rows=12)
        with proxy_client(second_url) as second:
            for round_ in range(6):
                for stream in streams:
                    r = stream.push(second if round_ % 2 else first, 2)
                    assert r.status_code == 200, c.explain(r)
                    stream.outputs += r.json()["outputs"]
                    stream.position += 2
        check_outputs(first, streams)
        assert c.moves("restored") + c.moves("taken_over") == 0
        assert sum(c.sessions_per_replica()) == SESSIONS
