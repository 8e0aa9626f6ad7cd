"""WebSocket streaming benchmark: one row per message, binary and JSON frames, against HTTP pushes.

Starts its own `tcnserve serve` (the built-in model, torch threads 1) on loopback. For each
number of concurrent sessions N (1, 64, 256) and each transport, opens N sessions and has each
push one row per message in lockstep (send, await the answer, repeat) for `--seconds`:
  * ws-binary: `WS /v1/sessions/{id}/stream?framing=offset`, int64 offset header + float32 row,
    from a client that frames its messages itself (RawWsPushers: an asyncio protocol per socket
    that sends the next frame from the callback that read the answer), so the client is not
    what limits the rate: the websockets library costs a client ~45 us of CPU per message;
  * ws-json: the same socket with text frames `{"inputs": [row], "offset": n}`;
  * http: `POST /v1/sessions/{id}/steps`, one keep-alive client per session (bench/_harness.py's
    HttpPushers, the code path of bench/service_http.py);
  * ws-multi: one `WS /v1/streams` socket per client process, each binary message carrying one
    push for every session of that process (service/protocol/wire.py's multi-session frame); its
    p50/p99 are per message.
All sessions of a client process run in one asyncio loop; `--client-procs` splits them over
several processes. Reported per case: aggregate timesteps/s, client-side p50/p99 latency per push
(send -> answer), the mean step batch size and the model's step compute time (server /metrics
deltas), and the CPU used by the server (all of its processes: with `--workers N` a supervisor,
an engine and N edges), split into its event-loop thread and its other threads (the model
worker) when it is one process, or into its edges and its engine otherwise, and by the clients,
each in % of one core over the measured window, and per timestep.
Before timing, one session per frame kind streams rows over a warmed state and its outputs are
checked against /predict over the same rows.
The clients run on the same machine as the server and compete with it for the CPU.
Run: python bench/ws_stream.py [--seconds 5] [--sessions 1,64,256] [--client-procs 1] [--quick]
     [--workers N] (passed to `tcnserve serve`; unset: the server's default)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import numpy as np
from _harness import (
    DEFAULT_MODEL,
    ROOT,
    HttpPushers,
    Server,
    TreeCpu,
    cpu_window,
    environment,
    free_port,
    histogram_totals,
    percentile,
    read_tree_cpu,
    serve_command,
    write_results,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.speedups import apply_mask

from service.protocol.wire import HEADER, decode_answers, decode_frame, encode_frame, encode_pushes

TRANSPORTS = ("ws-binary", "ws-json", "http", "ws-multi")
WARMUP_PUSHES = 5  # per session, untimed (1 with --quick): first-message costs on both sides
CHECK_ROWS = 200  # rows streamed one per message in the correctness check
CLIENT_TIMEOUT_S = 300.0


class WsPushers:
    """Sessions that each push one row per WebSocket message, in lockstep, with offset framing."""

    def __init__(
        self, url: str, sessions: int, in_channels: int, seed: int, binary: bool, rows: int = 1
    ):
        self.url = url
        self.sessions = sessions
        self.binary = binary
        self.rows = rows  # rows per message
        self.session_ids: list[str] = []
        self.sockets: list[ClientConnection] = []
        self.positions: list[int] = []
        shape = (64, rows, in_channels)
        chunks = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        self.chunks = chunks  # (64, rows, in_channels): the pushes cycle through them
        # Binary frames are HEADER.pack(offset) + payload: encode_frame's bytes, built per push.
        self.payloads = [encode_frame(chunk) for chunk in chunks]
        self.texts = [json.dumps(chunk)[1:-1] for chunk in chunks.tolist()]  # JSON: its rows

    async def open(self) -> None:
        await self.create_sessions()
        ws_url = self.url.replace("http://", "ws://", 1)
        self.sockets = list(
            await asyncio.gather(
                *(
                    connect(
                        f"{ws_url}/v1/sessions/{sid}/stream?framing=offset",
                        compression=None,
                        ping_interval=None,  # no keepalive pings competing with the pushes
                        proxy=None,
                        open_timeout=60,
                    )
                    for sid in self.session_ids
                )
            )
        )

    async def create_sessions(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as c:

            async def create() -> str:
                r = await c.post("/v1/sessions", json={"model": "default"})
                r.raise_for_status()
                return r.json()["session_id"]

            self.session_ids = list(await asyncio.gather(*(create() for _ in range(self.sessions))))
        self.positions = [0] * self.sessions

    async def run(
        self, count: int | None, end: float = 0.0, latencies: list[float] | None = None
    ) -> int:
        """Each session pushes `count` rows, or until perf_counter() passes `end`; -> pushes."""
        push = self._push_binary if self.binary else self._push_json

        async def one(k: int) -> int:
            ws, i = self.sockets[k], 0
            while i < count if count is not None else time.perf_counter() < end:
                start = time.perf_counter()
                await push(ws, self.positions[k], i % 64)
                if latencies is not None:
                    latencies.append(time.perf_counter() - start)
                self.positions[k] += self.rows
                i += 1
            return i * self.rows  # timesteps

        return sum(await asyncio.gather(*(one(k) for k in range(self.sessions))))

    async def _push_binary(self, ws: ClientConnection, position: int, row: int) -> None:
        await ws.send(HEADER.pack(position) + self.payloads[row])
        answer = await ws.recv()
        if isinstance(answer, str):
            raise RuntimeError(f"push refused: {answer}")
        if HEADER.unpack_from(answer)[0] != position + self.rows:
            raise RuntimeError(f"answer at position {HEADER.unpack_from(answer)[0]}")

    async def _push_json(self, ws: ClientConnection, position: int, row: int) -> None:
        await ws.send(f'{{"inputs": [{self.texts[row]}], "offset": {position}}}')
        answer = json.loads(await ws.recv())
        if answer.get("position") != position + self.rows:
            raise RuntimeError(f"push refused or misplaced: {answer}")

    async def close(self, delete: bool = True) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        if delete:
            async with httpx.AsyncClient(base_url=self.url, timeout=120) as c:
                await asyncio.gather(*(c.delete(f"/v1/sessions/{sid}") for sid in self.session_ids))


class _RawSocket(asyncio.Protocol):
    """One session's stream: the upgrade, then one masked binary frame per push, the next sent
    from the callback that read the answer (lockstep, as WsPushers, without a task per push)."""

    def __init__(self, request: bytes, pushers: RawWsPushers, k: int):
        self.request = request
        self.pushers, self.k = pushers, k
        self.mask = os.urandom(4)
        self.opened = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future | None = None
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        error = RuntimeError(f"the server closed a stream ({exc})")
        for future in (self.opened, self.done):
            if future is not None and not future.done():
                future.set_exception(error)

    def run(self, count: int | None, end: float, latencies: list[float] | None) -> asyncio.Future:
        self.count, self.end, self.latencies, self.i = count, end, latencies, 0
        self.done = asyncio.get_running_loop().create_future()
        self._send()
        return self.done

    def _send(self) -> None:
        p = self.pushers
        payload = HEADER.pack(p.positions[self.k]) + p.payloads[self.i % 64]
        self.sent_at = time.perf_counter()
        self._write(0x82, payload)

    def _write(self, first: int, payload: bytes) -> None:
        """One final masked client frame (payloads under 126 bytes)."""
        frame = bytes((first, 0x80 | len(payload))) + self.mask + apply_mask(payload, self.mask)
        self.transport.write(frame)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.opened.done():
            head, sep, buffer = buffer.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(f"upgrade refused: {head[:200]!r}"))
                return
            self.opened.set_result(None)
        while len(buffer) >= 2:
            n, head = buffer[1], 2  # server frames are unmasked
            if n == 126:
                n, head = int.from_bytes(buffer[2:4], "big"), 4
            elif n == 127:
                n, head = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < head + n:
                break
            opcode, answer, buffer = buffer[0] & 0x0F, buffer[head : head + n], buffer[head + n :]
            self._answered(opcode, answer)
        self.buffer = buffer

    def _answered(self, opcode: int, answer: bytes) -> None:
        if opcode == 0x9:  # the server's keepalive ping: pong it
            self._write(0x8A, answer)
            return
        if opcode == 0xA:
            return
        done, p = self.done, self.pushers
        if done is None or done.done():
            return
        if opcode != 0x2:
            done.set_exception(RuntimeError(f"push refused: opcode {opcode}: {answer[:200]!r}"))
            return
        now = time.perf_counter()
        if self.latencies is not None:
            self.latencies.append(now - self.sent_at)
        position = p.positions[self.k] + p.rows
        if HEADER.unpack_from(answer)[0] != position:
            done.set_exception(RuntimeError(f"answer at position {HEADER.unpack_from(answer)[0]}"))
            return
        p.positions[self.k] = position
        self.i += 1
        if self.i < self.count if self.count is not None else now < self.end:
            self._send()
        else:
            done.set_result(self.i * p.rows)


class RawWsPushers(WsPushers):
    """WsPushers' binary pushes from a client that frames its messages itself (_RawSocket)."""

    async def open(self) -> None:
        await self.create_sessions()
        host, port = self.url.removeprefix("http://").split(":")
        loop = asyncio.get_running_loop()

        async def one(k: int, sid: str) -> _RawSocket:
            request = (
                f"GET /v1/sessions/{sid}/stream?framing=offset HTTP/1.1\r\nHost: {host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {os.urandom(16).hex()[:22]}==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
            _, socket = await loop.create_connection(
                lambda: _RawSocket(request, self, k), host, int(port)
            )
            await asyncio.wait_for(socket.opened, 60)
            return socket

        self.raw = list(await asyncio.gather(*(one(k, s) for k, s in enumerate(self.session_ids))))

    async def run(
        self, count: int | None, end: float = 0.0, latencies: list[float] | None = None
    ) -> int:
        return sum(await asyncio.gather(*(s.run(count, end, latencies) for s in self.raw)))

    async def close(self, delete: bool = True) -> None:
        raw: list[_RawSocket] = getattr(self, "raw", [])  # none if open() failed early
        for s in raw:
            if s.transport is not None and not s.transport.is_closing():
                s._write(0x88, (1000).to_bytes(2, "big"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.closed for s in raw)), 10)
        for s in raw:
            if s.transport is not None:
                s.transport.close()
        if delete:
            async with httpx.AsyncClient(base_url=self.url, timeout=120) as c:
                await asyncio.gather(*(c.delete(f"/v1/sessions/{sid}") for sid in self.session_ids))


class MultiPushers(WsPushers):
    """The same sessions pushing over one multiplexed socket (`WS /v1/streams`): each message
    carries one push of `rows` rows for every session of this client, in lockstep."""

    async def open(self) -> None:
        await self.create_sessions()
        ws_url = self.url.replace("http://", "ws://", 1)
        multiplexed = await connect(
            f"{ws_url}/v1/streams",
            compression=None,
            ping_interval=None,
            proxy=None,
            open_timeout=60,
            max_size=None,
        )
        self.sockets = [multiplexed]

    async def run(
        self, count: int | None, end: float = 0.0, latencies: list[float] | None = None
    ) -> int:
        ws, i = self.sockets[0], 0
        while i < count if count is not None else time.perf_counter() < end:
            rows = self.chunks[i % 64]
            frame = encode_pushes(
                [(sid, p, rows) for sid, p in zip(self.session_ids, self.positions, strict=True)]
            )
            start = time.perf_counter()
            await ws.send(frame)
            answer = await ws.recv()
            if latencies is not None:
                latencies.append(time.perf_counter() - start)
            if isinstance(answer, str):
                raise RuntimeError(f"frame refused: {answer}")
            for k, got in enumerate(decode_answers(answer)):
                if got.position != self.positions[k] + self.rows:
                    raise RuntimeError(f"answer at position {got.position}: {got.error!r}")
                self.positions[k] = got.position
            i += 1
        return i * self.rows * self.sessions  # timesteps


# ----- client processes ---------------------------------------------------------------------


@dataclass
class ClientResult:
    pushes: int
    elapsed: float
    cpu_s: float
    latencies: np.ndarray


def client_process(
    conn: Connection,
    url: str,
    transport: str,
    sessions: int,
    in_channels: int,
    seed: int,
    warmup: int,
    rows: int = 1,
) -> None:
    """One client process: open its sessions, report ready, push when told, report, close."""
    try:
        asyncio.run(_client(conn, url, transport, sessions, in_channels, seed, warmup, rows))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


async def _client(
    conn: Connection,
    url: str,
    transport: str,
    sessions: int,
    in_channels: int,
    seed: int,
    warmup: int,
    rows: int = 1,
) -> None:
    if transport == "http":
        pushers: HttpPushers | WsPushers = HttpPushers(url, sessions, in_channels, seed)
    elif transport == "ws-multi":
        pushers = MultiPushers(url, sessions, in_channels, seed, binary=True, rows=rows)
    elif transport == "ws-binary" and rows == 1:
        pushers = RawWsPushers(url, sessions, in_channels, seed, binary=True, rows=rows)
    else:
        binary = transport == "ws-binary"
        pushers = WsPushers(url, sessions, in_channels, seed, binary=binary, rows=rows)
    try:
        await pushers.open()
        await pushers.run(warmup)
        conn.send(("ready", None))
        seconds = conn.recv()  # blocks the loop, which has nothing else to do meanwhile
        latencies: list[float] = []
        cpu = time.process_time()
        started = time.perf_counter()
        pushes = await pushers.run(None, started + seconds, latencies)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        conn.send(("done", ClientResult(pushes, elapsed, cpu, np.asarray(latencies))))
        conn.recv()  # tear down only after the server's counters are read
    finally:
        await pushers.close()


def _receive(conn: Connection, process: multiprocessing.process.BaseProcess, what: str) -> object:
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while not conn.poll(0.5):
        if not process.is_alive() or time.monotonic() > deadline:
            raise SystemExit(f"a client process died or hung before {what}")
    kind, payload = conn.recv()
    if kind == "error":
        raise SystemExit(f"a client process failed:\n{payload}")
    return payload


# ----- server-side counters -----------------------------------------------------------------


@dataclass
class ServerCounters:
    """Cumulative server counters at one instant."""

    at: float
    batch: tuple[float, float]  # tcnserve_step_batch_size (sum, count)
    step_compute: tuple[float, float]  # tcnserve_model_compute_seconds{op="step"} (sum, count)
    cpu: TreeCpu  # every process of the server (bench/_harness.py)


def read_counters(server: Server) -> ServerCounters:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return ServerCounters(
        time.perf_counter(),
        histogram_totals(text, "tcnserve_step_batch_size"),
        histogram_totals(text, "tcnserve_model_compute_seconds", 'op="step"'),
        read_tree_cpu(server.process.pid),
    )


# ----- one case -----------------------------------------------------------------------------


@dataclass
class Case:
    sessions: int
    transport: str
    procs: int
    rate: float  # timesteps/s, all sessions together
    p50_ms: float
    p99_ms: float
    batch: float  # mean streams per step call
    loop_cpu: float  # one-process server: its event-loop thread, fraction of one core (else nan)
    other_cpu: float  # one-process server: its other threads (the model worker) (else nan)
    step_busy: float  # step compute seconds per second
    client_cpu: float  # all client processes, fraction of one core
    server_us: float  # server CPU (all processes) per timestep served, microseconds
    client_us: float  # client CPU per timestep, microseconds
    server_cpu: float = float("nan")  # all server processes, fraction of one core
    edge_cpu: float = float("nan")  # --workers N: the edge processes together (else nan)
    engine_cpu: float = float("nan")  # --workers N: the engine process (else nan)
    server_procs: int = 1  # processes of the server at the end of the window
    workers: int = 0  # edge processes of the server (0: one process)
    rows: int = 1  # rows per message
    ratio: float = float("nan")  # rate / the same N's HTTP rate
    stack: str = "tcnserve"  # or "no-work": bench/noop_app.py, the --echo floor


def run_case(
    server: Server,
    transport: str,
    sessions: int,
    in_channels: int,
    seconds: float,
    procs: int,
    warmup: int,
    rows: int = 1,
) -> Case:
    context = multiprocessing.get_context("spawn")
    shares = [sessions // procs + (k < sessions % procs) for k in range(procs)]
    links = []
    for k, share in enumerate(shares):
        ours, theirs = context.Pipe()
        process = context.Process(
            target=client_process,
            args=(
                *(theirs, server.url, transport, share, in_channels),
                *(1000 * sessions + k, warmup, rows),
            ),
            daemon=True,
        )
        process.start()
        links.append((ours, process))
    try:
        for conn, process in links:
            _receive(conn, process, "opening its sessions")
        before = read_counters(server)
        for conn, _ in links:
            conn.send(seconds)
        results: list[ClientResult] = [
            _receive(conn, process, "the end of its run")  # type: ignore[misc]
            for conn, process in links
        ]
        after = read_counters(server)
        for conn, _ in links:
            conn.send("close")
        for _, process in links:
            process.join(60)
    finally:
        for _, process in links:
            if process.is_alive():
                process.terminate()
                process.join()
    wall = after.at - before.at
    calls = after.batch[1] - before.batch[1]
    cpu = cpu_window(before.cpu, after.cpu)  # one-process split: the loop is the main thread
    latencies = np.concatenate([r.latencies for r in results])
    batched = after.batch[0] - before.batch[0]  # pushes the server applied in the window
    pushes = sum(r.pushes for r in results)
    # Their timesteps; a server without the batch histogram (bench/noop_app.py): the clients'.
    served = batched * rows if calls else pushes
    multi = not cpu.single
    return Case(
        sessions=sessions,
        transport=transport,
        procs=procs,
        rate=sum(r.pushes / r.elapsed for r in results),
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        batch=batched / calls if calls else float("nan"),
        loop_cpu=cpu.share(cpu.loop),
        other_cpu=cpu.share(cpu.other_threads),
        step_busy=(after.step_compute[0] - before.step_compute[0]) / wall,
        client_cpu=sum(r.cpu_s for r in results) / max(r.elapsed for r in results),
        server_us=cpu.seconds / served * 1e6 if served else float("nan"),
        client_us=sum(r.cpu_s for r in results) / pushes * 1e6 if pushes else float("nan"),
        rows=rows,
        server_cpu=cpu.share(cpu.seconds),
        edge_cpu=cpu.share(cpu.by_role.get("edge", 0.0)) if multi else float("nan"),
        engine_cpu=cpu.share(cpu.by_role.get("engine", 0.0)) if multi else float("nan"),
        server_procs=cpu.processes,
    )


# ----- correctness --------------------------------------------------------------------------


async def check_outputs(url: str, in_channels: int, receptive_field: int) -> dict[str, float]:
    """Max |WS output - /predict output| per frame kind, over rows streamed past a warm state."""
    rng = np.random.default_rng(7)
    # A prefix longer than the receptive field wraps the ring buffers before the checked rows.
    prefix = rng.standard_normal((receptive_field + 100, in_channels)).astype(np.float32)
    rows = rng.standard_normal((CHECK_ROWS, in_channels)).astype(np.float32)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        r = await c.post(
            "/v1/models/default/predict",
            json={"inputs": [np.concatenate([prefix, rows]).tolist()]},
        )
        r.raise_for_status()
        expected = np.asarray(r.json()["outputs"][0], dtype=np.float64)[len(prefix) :]
        diffs = {}
        for kind in ("ws-binary", "ws-json", "ws-multi"):
            r = await c.post("/v1/sessions", json={"model": "default", "prefix": prefix.tolist()})
            r.raise_for_status()
            sid = r.json()["session_id"]
            got = []
            ws_url = url.replace("http://", "ws://", 1)
            path = "/v1/streams" if kind == "ws-multi" else f"/v1/sessions/{sid}/stream"
            async with connect(
                f"{ws_url}{path}?framing=offset", compression=None, proxy=None
            ) as ws:
                for i, row in enumerate(rows):
                    offset = len(prefix) + i
                    if kind == "ws-multi":
                        await ws.send(encode_pushes([(sid, offset, row[None, :])]))
                        (answer,) = decode_answers(await ws.recv())
                        if answer.position != offset + 1:
                            raise SystemExit(f"check: answer {answer}")
                        got.append(answer.outputs[0])
                    elif kind == "ws-binary":
                        await ws.send(encode_frame(row[None, :], offset))
                        answer = await ws.recv()
                        if isinstance(answer, str):
                            raise SystemExit(f"check: push refused: {answer}")
                        position, outputs = decode_frame(answer, len(expected[0]), True)
                        if position != offset + 1:
                            raise SystemExit(f"check: answer at position {position}")
                        got.append(outputs[0])
                    else:
                        await ws.send(json.dumps({"inputs": [row.tolist()], "offset": offset}))
                        got.append(np.asarray(json.loads(await ws.recv())["outputs"][0]))
            await c.delete(f"/v1/sessions/{sid}")
            diffs[kind] = float(np.abs(np.asarray(got, dtype=np.float64) - expected).max())
    return diffs


# ----- output -------------------------------------------------------------------------------


def table(cases: list[Case], multi: bool = False) -> str:
    """One line per case; `multi` (a --workers N server): split the server's CPU into its edges
    and its engine, not into a single process's event loop and other threads."""
    split = ("edges", "engine") if multi else ("loop", "worker")
    lines = [
        f"{'sessions':>8} {'transport':<9} {'rows':>4} {'procs':>5} {'steps/s':>9} {'x http':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'batch':>6} {'server':>6} {split[0]:>6} {split[1]:>6} "
        f"{'step':>5} {'client':>6} {'srv us':>6} {'cli us':>6}"
    ]
    for c in cases:
        ratio = "-" if np.isnan(c.ratio) else f"{c.ratio:.2f}x"
        parts = (c.edge_cpu, c.engine_cpu) if multi else (c.loop_cpu, c.other_cpu)
        a, b = ("-" if np.isnan(x) else f"{x:.0%}" for x in parts)
        lines.append(
            f"{c.sessions:>8} {c.transport:<9} {c.rows:>4} {c.procs:>5} {c.rate:>9,.0f} {ratio:>6} "
            f"{c.p50_ms:>7.2f} {c.p99_ms:>7.2f} {c.batch:>6.1f} {c.server_cpu:>6.0%} {a:>6} "
            f"{b:>6} {c.step_busy:>5.0%} {c.client_cpu:>6.0%} {c.server_us:>6.0f} "
            f"{c.client_us:>6.0f}"
        )
    return "\n".join(lines)


LEGEND = """\
rows: rows per message (HTTP pushes: always 1)
steps/s: timesteps/s over all sessions; x http: / the same N's one-row HTTP rate
p50/p99: per push, client side, send -> answer; batch: mean streams per step call (/metrics)
server: CPU of every server process (with --workers N: supervisor, engine and edges; /proc,
  process tree by ppid, read at both ends of the window), in % of one core
loop / worker (one process): its event-loop thread / its other threads (the model worker);
  edges / engine (--workers N): the edge processes together / the engine process
client: all client processes; every CPU column is in % of one core over the measured window
step: model step compute time per second (/metrics); wall time on the worker thread, so it
  includes its waits for the GIL and for a CPU
srv us / cli us: CPU microseconds per timestep, of the server (all processes) / of the clients
  (with one row per message: per message answered)
The clients share the machine's CPUs with the server."""


def run_cases(
    server: Server, args: argparse.Namespace, in_channels: int, warmup: int, multi: bool = False
) -> list:
    """Every (sessions, transport, rows per message) case against one server, each printed as it
    ends (HTTP pushes once per N, with one row)."""
    cases = []
    for n in args.sessions:
        procs = max(1, min(args.client_procs, n))
        for transport in args.transports:
            for rows in [1] if transport == "http" else args.rows_per_message:
                case = run_case(
                    server, transport, n, in_channels, args.seconds, procs, warmup, rows
                )
                cases.append(case)
                print(table([case], multi).splitlines()[1], flush=True)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case")
    parser.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        help="concurrent sessions, comma-separated (default 1,64,256; 1,64 with --quick)",
    )
    parser.add_argument(
        "--transports",
        type=lambda s: s.split(","),
        default=list(TRANSPORTS),
        help=f"comma-separated subset of {','.join(TRANSPORTS)}",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="client processes per case, the sessions split between them (default 1)",
    )
    parser.add_argument(
        "--max-batch-delay-ms", type=float, default=1.0, help="server setting (its default: 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 s per case, 1 and 64 sessions"
    )
    parser.add_argument(
        "--rows-per-message",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        help="rows in each WebSocket message, comma-separated: each is a case (several rows "
        "are a ragged batch on the server; default 1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="`tcnserve serve --workers N`: N edge processes and an engine process; 0: one "
        "process (default: pass nothing, the server's own default)",
    )
    parser.add_argument(
        "--json", type=Path, help="also write the cases here (bench/plot_service.py)"
    )
    parser.add_argument(
        "--echo",
        action="store_true",
        help="also run every case against bench/noop_app.py (the same stack doing no work)",
    )
    args = parser.parse_args()
    began = time.perf_counter()
    if args.sessions is None:
        args.sessions = [1, 64] if args.quick else [1, 64, 256]
    warmup = 1 if args.quick else WARMUP_PUSHES
    if args.quick:
        args.seconds = min(args.seconds, 1.0)
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown:
        parser.error(f"unknown transports: {', '.join(sorted(unknown))}")

    sys.path.insert(0, str(ROOT))
    from model import read_checkpoint_info

    config, _ = read_checkpoint_info(DEFAULT_MODEL)
    port = free_port()
    command = [
        *serve_command(),
        "--port",
        str(port),
        "--max-sessions",
        str(max(args.sessions) + 8),
        "--max-batch-delay-ms",
        str(args.max_batch_delay_ms),
        "--torch-threads",
        "1",
        "--log-level",
        "warning",
        *([] if args.workers is None else ["--workers", str(args.workers)]),
    ]
    print(f"$ {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(environment())
    print(
        f"built-in model: in {config.in_channels}, channels {list(config.channels)}, kernel "
        f"{config.kernel_size}, receptive field {config.receptive_field}; server: torch "
        f"threads 1, max_batch_delay_ms {args.max_batch_delay_ms:g}; "
        f"{args.seconds:g} s per case, {warmup} warm-up pushes per session",
        flush=True,
    )
    with Server(command, port) as server:
        given = "not given: the server's default" if args.workers is None else "given"
        print(f"server: {server.describe()} (--workers {given})", flush=True)
        workers = len(server.edges())  # in force: edge processes counted
        multi = workers > 0
        diffs = asyncio.run(check_outputs(server.url, config.in_channels, config.receptive_field))
        print(
            f"check: {CHECK_ROWS} rows, one per message, after a {config.receptive_field + 100}"
            "-row prefix: max |WS - /predict| "
            + ", ".join(f"{kind} {d:.1e}" for kind, d in diffs.items()),
            flush=True,
        )
        print(table([], multi), flush=True)
        cases = run_cases(server, args, config.in_channels, warmup, multi)
    for c in cases:
        c.workers = workers
    http = {c.sessions: c.rate for c in cases if c.transport == "http"}
    single = {(c.sessions, c.transport): c.rate for c in cases if c.rows == 1}
    for c in cases:
        if c.sessions in http:
            c.ratio = c.rate / http[c.sessions]
    print("\nsummary")
    print(table(cases, multi))
    print(LEGEND)
    for c in cases:
        if c.rows > 1 and (c.sessions, c.transport) in single:
            print(
                f"{c.sessions} sessions {c.transport}: {c.rows} rows per message give "
                f"{c.rate / single[c.sessions, c.transport]:.2f}x the steps/s of one row"
            )
    floor_cases = []
    if args.json:  # written again with the echo's cases once they have run
        write_results(args.json, "ws_stream", [dataclasses.asdict(c) for c in cases])
    if args.echo:
        port = free_port()
        noop = [sys.executable, str(ROOT / "bench" / "noop_app.py"), str(port)]
        print("\nthe same cases against the same stack doing no work (bench/noop_app.py):")
        print(table([]), flush=True)
        with Server(noop, port) as floor:
            floor_cases = run_cases(floor, args, config.in_channels, warmup)
        for c in floor_cases:
            c.stack = "no-work"
        print("\ntcnserve as a share of the no-work stack (steps/s; p99 ratio):")
        for ours, base in zip(cases, floor_cases, strict=True):
            print(
                f"  {ours.sessions:>5} sessions {ours.transport:<9} x{ours.rows:<3}"
                f"{ours.rate / base.rate:6.0%}"
                f"   p99 {ours.p99_ms / base.p99_ms:5.1f}x"
            )
    if args.json and floor_cases:
        write_results(args.json, "ws_stream", [dataclasses.asdict(c) for c in cases + floor_cases])
    busiest = max(cases, key=lambda c: c.client_cpu / c.procs)
    per_proc = busiest.client_cpu / busiest.procs
    if per_proc > 0.9:
        print(
            f"client processes: a client process was CPU-bound ({per_proc:.0%} of a core at "
            f"{busiest.sessions} {busiest.transport}): rerun with --client-procs 2 or more"
        )
    else:
        print(
            f"client processes: {args.client_procs} per case; the busiest used {per_proc:.0%} "
            f"of a core ({busiest.sessions} {busiest.transport}), so it was not the limit"
        )
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
