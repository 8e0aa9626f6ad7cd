"""Edge <-> engine transports for tiny streaming messages, side by side in one run.

The pattern measured: an edge process forwards one-row pushes to an engine process; the engine
decodes each and answers with a small struct. Both are msgspec MessagePack structs shaped like
service/engine/messages.py's (array-like, tagged): a push is (request id, owner of 11 chars,
session id of 32 hex chars, offset, rows: 4 float32 as raw bytes with dtype and shape), about
80 bytes; an answer is (request id, position, outputs: 3 float32 as raw bytes), about 25 bytes.
The edge keeps W requests in flight (W = 1, 16, 256): it sends W, then one new push per answer.
Messages made during one turn of a side's event loop go out together, each message framed by a
4-byte little-endian length (or as zmq frames, for the zmq variants that use zmq's framing).
Each side is its own process (subprocess), its own event loop; the engine holds a position per
session, as a real one would, and nothing else (no model), so the numbers are the transport and
the encode/decode around it. The edge checks that answers come back in order (the `errors`
line must say 0).

Transports:

  uds            asyncio Unix domain socket, an asyncio.Protocol on both sides; every frame made in
                 a loop turn goes out in one `transport.write`, flushed by a `loop.call_soon`
                 callback scheduled by the turn's first frame.
  zmq-msg        pyzmq over ipc://, zmq.asyncio DEALER (edge) / ROUTER (engine): one zmq message
                 per push or answer, all of a turn sent back to back with NOBLOCK.
  zmq-multipart  the same sockets, one multipart message per turn, one zmq frame per message.
  zmq-blob       the same sockets, one single-frame message per turn holding the turn's messages
                 as length-prefixed frames (the uds framing).
                 On all three: each side awaits the first message with zmq.asyncio's
                 `recv_multipart()` (which checks ZMQ_EVENTS before it waits on the socket's
                 edge-triggered FD), drains the rest with NOBLOCK recvs on a sync shadow of the same
                 socket, and sends from the same coroutine before its next await, so no send can
                 swallow the FD's edge while nothing would recheck it. HWMs are off (the window
                 bounds the queues).
  shm            one byte ring per direction in a `multiprocessing.shared_memory` segment, with an
                 eventfd doorbell per ring (os.eventfd, registered with loop.add_reader).

The shm design. Each ring is a single-producer single-consumer byte stream: a header of three
uint64 words on their own cache lines, `head` (bytes ever written, written only by the producer),
`tail` (bytes ever read, written only by the consumer) and `sleeping` (the consumer's doorbell
request), then `capacity` bytes of data. The producer copies a turn's frames (the uds framing)
into the data area at head % capacity (in two pieces across the end), then publishes by storing
the new head; the consumer copies out everything in [tail, head) and stores the new tail. The
words are read and written through a memoryview cast to 'Q', which does one aligned 8-byte load
or store, so no reader sees a torn value, and x86's ordering (stores are not reordered with
stores, loads not with loads) makes the data visible before the head that covers it. There is no
flow control beyond the window: the ring (1 MiB) is far larger than W messages, and a write that
would not fit is an error. The doorbell: the consumer drains the ring, handles what it got, and
looks again on the next loop turn (call_soon); only when a look finds the ring empty does it set
`sleeping`, look once more (a frame published before the producer could see the flag is caught
here) and then return to its loop, whose epoll waits on the eventfd. The producer, after
publishing, reads `sleeping`; if set, it clears it and writes the eventfd. So under load, while
the consumer keeps finding data, no doorbell syscall is made at all; an idle consumer costs one
eventfd write and read per wake. The one race left is x86's store->load reordering (the consumer's
flag store passing its head load while the producer's head store passes its flag load: both miss),
for which there are no fences in Python; a 10 ms timer on each consumer rescues such a lost wakeup
and counts it (the `rescued wakeups` line; expect 0).

Measured per case: answers received per second over `--seconds` (3) after `--warmup` (0.5 s),
and each process's CPU (utime + stime of /proc/<pid>/stat, all threads, so zmq's I/O thread is
included) over the same window, per message and as % of one core. Cases run `--rounds` (3)
times, interleaved (every transport of a window, then the next round), and the table shows
medians and the spread of the rate, (max - min) / median.

Where the scheduler puts the two processes matters most at W = 1: on one core a round trip is a
direct switch, on two cores it is a cross-core wake-up (slow on a VM, whose idle vCPU must be
woken), so unpinned rounds spread widely; `--pin` (edge on CPU 0, engine on CPU 1) fixes the
placement. Read ratios from one run, and the spread column before trusting one.

Run: python bench/engine_transport.py [--seconds 3] [--rounds 3] [--loop uvloop] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ("uds", "zmq-msg", "zmq-multipart", "zmq-blob", "shm")
HEADER = struct.Struct("<I")
OWNER = "tenant-042"
SESSIONS = 64
RING_BYTES = 1 << 20
RING_HEADER = 4096  # head, tail, sleeping: uint64 words 0, 8, 16 (64 bytes apart)
HEAD, TAIL, SLEEPING = 0, 8, 16
RESCUE_S = 0.01
TICK = os.sysconf("SC_CLK_TCK")


class Rows(msgspec.Struct, array_like=True):
    data: bytes
    dtype: str
    shape: tuple[int, ...]


class Push(msgspec.Struct, array_like=True, tag=True):
    id: int
    owner: str
    session_id: str
    offset: int | None
    rows: Rows


class Answer(msgspec.Struct, array_like=True, tag=True):
    id: int
    position: int
    outputs: bytes


# ----- framing, CPU, the two sides' work ------------------------------------------------------


def frame(messages: list[bytes]) -> bytes:
    parts = []
    for m in messages:
        parts.append(HEADER.pack(len(m)))
        parts.append(m)
    return b"".join(parts)


def split(data: bytes) -> tuple[list[memoryview], int]:
    """The complete frames at the start of `data`, and how many bytes they took."""
    view = memoryview(data)
    out, i, n = [], 0, len(data)
    while n - i >= 4:
        (size,) = HEADER.unpack_from(data, i)
        if n - i - 4 < size:
            break
        out.append(view[i + 4 : i + 4 + size])
        i += 4 + size
    return out, i


class Deframer:
    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> list[memoryview]:
        if self.rest:
            data = self.rest + data
        frames, used = split(data)
        self.rest = data[used:] if used < len(data) else b""
        return frames


def cpu_s(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class EngineCore:
    """Decode a push, advance its session, encode the answer."""

    def __init__(self) -> None:
        self.decode = msgspec.msgpack.Decoder(Push).decode
        self.encode = msgspec.msgpack.Encoder().encode
        self.positions: dict[str, int] = {}
        self.outputs = np.array([0.25, -0.5, 1.0], np.float32).tobytes()

    def answer(self, payload: bytes | memoryview) -> bytes:
        push = self.decode(payload)
        position = self.positions.get(push.session_id, 0) + push.rows.shape[0]
        self.positions[push.session_id] = position
        return self.encode(Answer(push.id, position, self.outputs))

    def answers(self, payloads: list) -> list[bytes]:
        return [self.answer(p) for p in payloads]


class EdgeCore:
    """Keeps `window` pushes in flight and times the window [warmup, warmup + seconds]."""

    def __init__(self, window: int, engine_pid: int, warmup: float, seconds: float) -> None:
        self.window, self.engine_pid = window, engine_pid
        self.warmup, self.seconds = warmup, seconds
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder(Answer).decode
        rng = np.random.default_rng(0)
        self.sessions = [rng.bytes(16).hex() for _ in range(SESSIONS)]
        self.rows = Rows(np.arange(4, dtype=np.float32).tobytes(), "<f4", (1, 4))
        self.next_id = self.expect = self.received = self.errors = 0
        self.sending = True
        self.marks: list[tuple[float, int, float, float]] = []
        self.done = asyncio.get_running_loop().create_future()

    def push(self) -> bytes:
        i = self.next_id
        self.next_id = i + 1
        session = self.sessions[i % SESSIONS]
        offset = i // SESSIONS if i % 2 else None
        return self.encode(Push(i, OWNER, session, offset, self.rows))

    def first(self) -> list[bytes]:
        """The window's first pushes; starts the clock."""
        loop = asyncio.get_running_loop()
        loop.call_later(self.warmup, self._mark)
        loop.call_later(self.warmup + self.seconds, self._finish)
        return [self.push() for _ in range(self.window)]

    def on_answers(self, payloads: list) -> list[bytes]:
        for p in payloads:
            answer = self.decode(p)
            if answer.id != self.expect:
                self.errors += 1
            self.expect = answer.id + 1
        self.received += len(payloads)
        if not self.sending:
            return []
        return [self.push() for _ in payloads]

    def _mark(self) -> None:
        mark = (time.perf_counter(), self.received, cpu_s(os.getpid()), cpu_s(self.engine_pid))
        self.marks.append(mark)

    def _finish(self) -> None:
        self._mark()
        self.sending = False
        self.done.set_result(None)

    def result(self) -> dict:
        (t0, n0, e0, g0), (t1, n1, e1, g1) = self.marks
        n = n1 - n0
        return {
            "wall_s": t1 - t0,
            "messages": n,
            "rate": n / (t1 - t0),
            "edge_us": (e1 - e0) / n * 1e6,
            "engine_us": (g1 - g0) / n * 1e6,
            "edge_pct": (e1 - e0) / (t1 - t0) * 100,
            "engine_pct": (g1 - g0) / (t1 - t0) * 100,
            "errors": self.errors,
        }


class Outbox:
    """Collects a turn's messages and writes them, framed, in one call on the next turn."""

    def __init__(self, write) -> None:
        self.loop = asyncio.get_running_loop()
        self.write = write
        self.messages: list[bytes] = []

    def add(self, messages: list[bytes]) -> None:
        if not messages:
            return
        if not self.messages:
            self.loop.call_soon(self.flush)
        self.messages.extend(messages)

    def flush(self) -> None:
        messages, self.messages = self.messages, []
        self.write(frame(messages))


# ----- uds ------------------------------------------------------------------------------------


class EngineProtocol(asyncio.Protocol):
    def __init__(self, core: EngineCore) -> None:
        self.core, self.deframer = core, Deframer()

    def connection_made(self, transport) -> None:
        self.outbox = Outbox(transport.write)

    def data_received(self, data: bytes) -> None:
        self.outbox.add(self.core.answers(self.deframer.feed(data)))


class EdgeProtocol(asyncio.Protocol):
    def __init__(self, core: EdgeCore) -> None:
        self.core, self.deframer = core, Deframer()

    def connection_made(self, transport) -> None:
        self.outbox = Outbox(transport.write)
        self.outbox.add(self.core.first())

    def data_received(self, data: bytes) -> None:
        self.outbox.add(self.core.on_answers(self.deframer.feed(data)))


async def engine_uds(args, ready) -> None:
    loop = asyncio.get_running_loop()
    core = EngineCore()
    server = await loop.create_unix_server(lambda: EngineProtocol(core), args.path)
    ready({})
    async with server:
        await server.serve_forever()


async def edge_uds(args, core: EdgeCore) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_unix_connection(lambda: EdgeProtocol(core), args.path)
    await core.done
    transport.close()


# ----- zmq ------------------------------------------------------------------------------------


def zmq_socket(kind: int):
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(kind)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    return sock, zmq.Socket.shadow(sock.underlying)


async def receive(sock, raw) -> list[list[bytes]]:
    """The first message (awaited), then whatever else is queued."""
    import zmq

    batch = [await sock.recv_multipart()]
    while True:
        try:
            batch.append(raw.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return batch


def zmq_payloads(mode: str, parts: list[list[bytes]]) -> list:
    if mode == "zmq-msg":
        return [m[0] for m in parts]
    if mode == "zmq-multipart":
        return [p for m in parts for p in m]
    return [p for m in parts for p in split(m[0])[0]]


def zmq_send(mode: str, raw, messages: list[bytes], prefix: list[bytes]) -> None:
    import zmq

    if mode == "zmq-msg":
        for m in messages:
            raw.send_multipart([*prefix, m], zmq.NOBLOCK)
    elif mode == "zmq-multipart":
        raw.send_multipart([*prefix, *messages], zmq.NOBLOCK)
    else:
        raw.send_multipart([*prefix, frame(messages)], zmq.NOBLOCK)


async def engine_zmq(args, ready) -> None:
    import zmq

    sock, raw = zmq_socket(zmq.ROUTER)
    sock.bind(f"ipc://{args.path}")
    core = EngineCore()
    ready({})
    while True:
        batch = await receive(sock, raw)
        identity = batch[0][0]  # one edge
        payloads = zmq_payloads(args.transport, [m[1:] for m in batch])
        zmq_send(args.transport, raw, core.answers(payloads), [identity])


async def edge_zmq(args, core: EdgeCore) -> None:
    import zmq

    sock, raw = zmq_socket(zmq.DEALER)
    sock.connect(f"ipc://{args.path}")

    async def run() -> None:
        zmq_send(args.transport, raw, core.first(), [])
        while True:
            pushes = core.on_answers(zmq_payloads(args.transport, await receive(sock, raw)))
            if pushes:
                zmq_send(args.transport, raw, pushes, [])

    task = asyncio.create_task(run())
    await core.done
    task.cancel()
    sock.close()


# ----- shm ------------------------------------------------------------------------------------


def attach(name: str) -> shared_memory.SharedMemory:
    """A segment the parent made; the parent unlinks it (so no resource tracker here)."""
    shm = shared_memory.SharedMemory(name)
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


class RingWriter:
    def __init__(self, shm: shared_memory.SharedMemory, doorbell: int) -> None:
        self.shm = shm  # its views outlive any caller's reference
        self.words = shm.buf[:RING_HEADER].cast("Q")
        self.data = shm.buf[RING_HEADER : RING_HEADER + RING_BYTES]
        self.doorbell = doorbell
        self.head = self.words[HEAD]
        self.rings = 0

    def write(self, blob: bytes) -> None:
        n, head = len(blob), self.head
        if head + n - self.words[TAIL] > RING_BYTES:
            raise RuntimeError("ring full: the window holds more than the ring")
        at = head % RING_BYTES
        first = min(n, RING_BYTES - at)
        self.data[at : at + first] = blob[:first]
        if first < n:
            self.data[: n - first] = blob[first:]
        self.head = head + n
        self.words[HEAD] = self.head  # publish
        if self.words[SLEEPING]:
            self.words[SLEEPING] = 0
            os.eventfd_write(self.doorbell, 1)
            self.rings += 1


class RingReader:
    """Calls on_data(bytes) with what the producer wrote; see the module docstring."""

    def __init__(self, shm: shared_memory.SharedMemory, doorbell: int, on_data) -> None:
        self.shm = shm  # its views outlive any caller's reference
        self.words = shm.buf[:RING_HEADER].cast("Q")
        self.data = shm.buf[RING_HEADER : RING_HEADER + RING_BYTES]
        self.doorbell, self.on_data = doorbell, on_data
        self.tail = self.words[TAIL]
        self.loop = asyncio.get_running_loop()
        self.scheduled = True
        self.rescued = 0
        self.loop.add_reader(doorbell, self._rung)
        self.loop.call_soon(self._look)
        self.loop.call_later(RESCUE_S, self._rescue)

    def _take(self) -> bytes:
        head, tail = self.words[HEAD], self.tail
        if head == tail:
            return b""
        at, n = tail % RING_BYTES, head - tail
        if at + n <= RING_BYTES:
            blob = bytes(self.data[at : at + n])
        else:
            blob = bytes(self.data[at:]) + bytes(self.data[: at + n - RING_BYTES])
        self.tail = head
        self.words[TAIL] = head
        return blob

    def _look(self) -> None:
        self.scheduled = False
        blob = self._take()
        if not blob:
            self.words[SLEEPING] = 1
            blob = self._take()
            if not blob:
                return  # asleep: the producer rings
            self.words[SLEEPING] = 0
        self.on_data(blob)
        self.scheduled = True
        self.loop.call_soon(self._look)

    def _rung(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.doorbell)
        if not self.scheduled:
            self._look()

    def _rescue(self) -> None:
        if not self.scheduled and self.words[SLEEPING] and self.words[HEAD] != self.tail:
            self.rescued += 1
            self._look()
        self.loop.call_later(RESCUE_S, self._rescue)


def shm_ends(args, mine: str) -> tuple[tuple, tuple]:
    """((segment, doorbell) this side reads, (segment, doorbell) it writes)."""
    to_engine = (attach(args.shm[0]), args.doorbells[0])
    to_edge = (attach(args.shm[1]), args.doorbells[1])
    return (to_engine, to_edge) if mine == "engine" else (to_edge, to_engine)


async def engine_shm(args, ready) -> None:
    core = EngineCore()
    (rshm, rbell), (wshm, wbell) = shm_ends(args, "engine")
    deframer = Deframer()
    writer = RingWriter(wshm, wbell)
    outbox = Outbox(writer.write)
    reader = RingReader(rshm, rbell, lambda blob: outbox.add(core.answers(deframer.feed(blob))))
    ready(lambda: {"rescued": reader.rescued, "doorbells": writer.rings})
    await asyncio.Event().wait()


async def edge_shm(args, core: EdgeCore) -> dict:
    (rshm, rbell), (wshm, wbell) = shm_ends(args, "edge")
    deframer = Deframer()
    writer = RingWriter(wshm, wbell)
    outbox = Outbox(writer.write)
    outbox.add(core.first())
    reader = RingReader(rshm, rbell, lambda blob: outbox.add(core.on_answers(deframer.feed(blob))))
    await core.done
    return {"rescued": reader.rescued, "doorbells": writer.rings}


# ----- the two child processes ----------------------------------------------------------------


ENGINES = {"uds": engine_uds, "shm": engine_shm}
EDGES = {"uds": edge_uds, "shm": edge_shm}


def child(args) -> None:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    kind = "uds" if args.transport == "uds" else "shm" if args.transport == "shm" else "zmq"

    async def engine() -> None:
        stats = {}

        def ready(extra) -> None:
            stats["extra"] = extra
            print("ready", flush=True)

        stop = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
        task = asyncio.create_task(ENGINES.get(kind, engine_zmq)(args, ready))
        await asyncio.wait([stop, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # an engine that stopped on its own raises here
        extra = stats.get("extra")
        print(json.dumps(extra() if callable(extra) else {}), flush=True)
        os._exit(0)

    async def edge() -> None:
        core = EdgeCore(args.window, args.engine_pid, args.warmup, args.seconds)
        extra = await EDGES.get(kind, edge_zmq)(args, core)
        print(json.dumps({**core.result(), **(extra or {})}), flush=True)
        os._exit(0)

    main = engine if args.role == "engine" else edge
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# ----- the parent: cases, table, conclusion ---------------------------------------------------


def run_case(args, transport: str, window: int, tmp: str) -> dict:
    base = [sys.executable, __file__, "--transport", transport, "--window", str(window)]
    base += ["--warmup", str(args.warmup), "--seconds", str(args.seconds), "--loop", args.loop]
    base += ["--path", os.path.join(tmp, f"{transport}.sock")]
    segments, fds = [], ()
    if transport == "shm":
        segments = [
            shared_memory.SharedMemory(create=True, size=RING_HEADER + RING_BYTES) for _ in "ab"
        ]
        fds = (os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK))
        base += ["--shm", *(s.name for s in segments), "--doorbells", *map(str, fds)]
    pin = (lambda cpu: ["--cpu", str(cpu)]) if args.pin else (lambda cpu: [])
    try:
        engine = subprocess.Popen(
            [*base, "--role", "engine", *pin(1)], stdout=subprocess.PIPE, pass_fds=fds, text=True
        )
        try:
            if engine.stdout.readline().strip() != "ready":
                raise SystemExit(f"{transport} engine did not start")
            edge = subprocess.run(
                [*base, "--role", "edge", "--engine-pid", str(engine.pid), *pin(0)],
                stdout=subprocess.PIPE,
                pass_fds=fds,
                text=True,
                timeout=args.warmup + args.seconds + 60,
                check=True,
            )
            result = json.loads(edge.stdout.splitlines()[-1])
        finally:
            engine.send_signal(signal.SIGTERM)
            engine_out, _ = engine.communicate(timeout=30)
        engine_extra = json.loads(engine_out.splitlines()[-1]) if engine_out.strip() else {}
        for key, value in engine_extra.items():
            result[f"engine_{key}"] = value
        return result
    finally:
        for fd in fds:
            os.close(fd)
        for s in segments:
            s.close()
            s.unlink()


def header(args) -> str:
    import zmq

    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = "?"
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    async def sizes() -> tuple[int, int]:
        push = EdgeCore(1, os.getpid(), 0, 0).push()
        return len(push), len(EngineCore().answer(push))

    push, answer = asyncio.run(sizes())
    return "\n".join(
        [
            "command: python bench/engine_transport.py " + " ".join(sys.argv[1:]),
            f"Python {platform.python_version()}, loop {args.loop}, msgspec {msgspec.__version__}, "
            f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), {os.cpu_count()} CPUs ({cpu})"
            f"{', edge pinned to CPU 0, engine to CPU 1' if args.pin else ''}",
            f"{datetime.datetime.now().isoformat(timespec='seconds')}, checkout {rev}, "
            f"load average {load}",
            f"messages: push {push} bytes, answer {answer} bytes (msgpack, before framing); "
            f"{args.warmup} s warm-up, {args.seconds} s timed, median of {args.rounds} round(s)",
        ]
    )


def si(x: float) -> str:
    return f"{x / 1e3:.1f} k" if x >= 1e3 else f"{x:.0f}"


def summarize(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "errors"}
    rates = [r["rate"] for r in runs]
    med["spread"] = (max(rates) - min(rates)) / med["rate"]
    med["errors"] = sum(r["errors"] for r in runs)
    med["rescued"] = sum(r.get("rescued", 0) + r.get("engine_rescued", 0) for r in runs)
    return med


def table(rows: dict, windows: list[int], transports: list[str]) -> str:
    cols = f"{'W':>4}  {'transport':<14}{'msgs/s':>9}{'spread':>8}{'x fastest':>10}"
    cols += f"{'edge us':>9}{'engine us':>10}{'total us':>9}{'edge CPU':>9}{'engine CPU':>11}"
    lines = [cols, "-" * len(cols)]
    for w in windows:
        best = max(rows[(t, w)]["rate"] for t in transports)
        for t in transports:
            r = rows[(t, w)]
            lines.append(
                f"{w:>4}  {t:<14}{si(r['rate']):>9}{r['spread']:>7.0%} {r['rate'] / best:>9.2f}"
                f"{r['edge_us']:>9.1f}{r['engine_us']:>10.1f}{r['edge_us'] + r['engine_us']:>9.1f}"
                f"{r['edge_pct']:>8.0f}%{r['engine_pct']:>10.0f}%"
            )
    return "\n".join(lines)


def conclusion(rows: dict, windows: list[int], transports: list[str]) -> str:
    sentences = []
    winners = []
    for w in windows:
        ranked = sorted(transports, key=lambda t: -rows[(t, w)]["rate"])
        top = ranked[0]
        winners.append(top)
        others = ", ".join(
            f"{rows[(top, w)]['rate'] / rows[(t, w)]['rate']:.2f}x {t}" for t in ranked[1:]
        )
        cheapest = min(
            transports, key=lambda t: rows[(t, w)]["edge_us"] + rows[(t, w)]["engine_us"]
        )
        cpu = rows[(cheapest, w)]["edge_us"] + rows[(cheapest, w)]["engine_us"]
        sentence = f"At W={w}, {top} is fastest ({si(rows[(top, w)]['rate'])} msgs/s: {others})"
        if cheapest == top:
            sentence += f" and also uses the least CPU per message ({cpu:.1f} us, both sides)"
        else:
            sentence += f"; {cheapest} uses the least CPU per message ({cpu:.1f} us, both sides)"
        second = ranked[1] if len(ranked) > 1 else None
        if second:
            margin = max(rows[(top, w)]["spread"], rows[(second, w)]["spread"], 0.03)
            if rows[(top, w)]["rate"] / rows[(second, w)]["rate"] < 1 + margin:
                sentence += (
                    f"; {top} and {second} are within the run-to-run spread ({margin:.0%}): "
                    "call it a tie"
                )
        sentences.append(sentence + ".")
    zmqs = [t for t in transports if t.startswith("zmq")]
    if len(zmqs) > 1:
        best = [max(zmqs, key=lambda t: rows[(t, w)]["rate"]) for w in windows]
        detail = ", ".join(f"{b} at W={w}" for b, w in zip(best, windows, strict=True))
        sentences.append(f"Of the zmq variants the fastest is {detail}.")
    for w in windows:
        busy = statistics.mean(
            rows[(t, w)]["rate"] * (rows[(t, w)]["edge_us"] + rows[(t, w)]["engine_us"]) / 1e6
            for t in transports
        )
        if w > 1 and busy >= 0.85:
            sentences.append(
                f"At W={w} the two processes' CPU adds up to {busy:.0%} of one core on average: "
                "each turn's messages go out in one write, so the whole window travels as one "
                "batch and the sides take turns instead of overlapping; the rate there is about "
                "1 / (total us), and the CPU per message decides it."
            )
    if len(set(winners)) == 1:
        sentences.append(f"{winners[0]} wins at every window measured.")
    saturated = [
        f"{side} at W={w} ({t})"
        for w in windows
        for t in transports
        for side in ("edge", "engine")
        if rows[(t, w)][f"{side}_pct"] > 90
    ]
    if saturated:
        sentences.append(
            "A process above 90% of a core (the limit there, not the transport's wire): "
            + ", ".join(saturated)
            + "."
        )
    return " ".join(sentences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", default="1,16,256")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--pin", action="store_true", help="edge on CPU 0, engine on CPU 1")
    # the child processes' arguments
    parser.add_argument("--role", choices=("engine", "edge"), help=argparse.SUPPRESS)
    parser.add_argument("--transport", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--engine-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shm", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--doorbells", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return

    windows = [int(w) for w in args.windows.split(",")]
    transports = args.transports.split(",")
    if unknown := set(transports) - set(TRANSPORTS):
        parser.error(f"unknown transports: {', '.join(sorted(unknown))}")
    print(header(args), flush=True)
    runs: dict[tuple[str, int], list[dict]] = {(t, w): [] for t in transports for w in windows}
    with tempfile.TemporaryDirectory(prefix="engine_transport_") as tmp:
        for w in windows:
            for _ in range(args.rounds):
                for t in transports:
                    runs[(t, w)].append(run_case(args, t, w, tmp))
    rows = {key: summarize(value) for key, value in runs.items()}
    print()
    print(table(rows, windows, transports))
    print()
    errors = sum(r["errors"] for r in rows.values())
    rescued = sum(r["rescued"] for r in rows.values() if "rescued" in r)
    print(f"errors (answers out of order): {errors}; shm rescued wakeups: {rescued}")
    print(
        "msgs/s: answers received per second (one push + one answer each); x fastest: msgs/s over "
        "the window's best; us: CPU microseconds per message of each process (all threads, "
        "utime + stime), total = both; CPU: % of one core over the timed window; spread: "
        "(max - min) / median msgs/s over the rounds."
    )
    print()
    print(conclusion(rows, windows, transports))


if __name__ == "__main__":
    main()
