"""Per-request CPU of tcnserve's own request path, without sockets: the ASGI app driven directly.

uvicorn, the network and the client are left out, so what remains is what tcnserve's code costs
on the event loop per push, beside the same harness driving bench/noop_app.py (FastAPI doing no
work). N sessions each push one row per round, all N pushes of a round in flight together (so
the model worker batches them), for `--rounds` rounds; and the same with one binary WebSocket
message per push on each session's socket, beside noop_app.py's echo. Reported per case:
event-loop CPU per request (thread CPU time of this thread, which runs the loop), and the model
worker's CPU per request, both in microseconds; the cases run interleaved `--repeats` times and
the medians are printed. Cheap to run and steady on a busy machine (it measures CPU time, not
throughput), so it is the quick check while working on the request path; bench/edge_http.py and
bench/ws_stream.py measure the real thing over sockets.

Run: python bench/asgi_path.py [--sessions 64] [--rounds 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from service.app import create_app  # noqa: E402
from service.protocol.wire import encode_frame  # noqa: E402
from service.settings import Settings  # noqa: E402

Receive = Callable[[], Awaitable[dict]]
KEY = "bench-key-0123456789"


async def request(app, method: str, path: str, body: bytes = b"", headers=()) -> tuple[int, bytes]:
    """One HTTP request through the ASGI app; returns (status, body)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a client that stays connected
        return {"type": "http.disconnect"}

    status, chunks = 0, []

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {KEY}".encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await app(scope, receive, send)
    return status, b"".join(chunks)


class FakeSocket:
    """One WebSocket connection into the ASGI app: messages handed to its receive, answers taken
    from its send, with no network and no uvicorn protocol in between."""

    def __init__(self, app, path: str, query: str = ""):
        self.inbox: asyncio.Queue[dict] = asyncio.Queue()
        self.accepted = asyncio.Event()
        self.answer: asyncio.Future | None = None
        self.scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "ws",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {KEY}".encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "subprotocols": [],
            "state": {},
        }
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.ensure_future(app(self.scope, self.inbox.get, self._send))

    async def _send(self, message: dict) -> None:
        if message["type"] == "websocket.accept":
            self.accepted.set()
        elif message["type"] == "websocket.send":
            answer, self.answer = self.answer, None
            answer.set_result(message.get("bytes") or message.get("text"))
        elif message["type"] == "websocket.close":
            raise SystemExit(f"the server closed a stream: {message}")

    async def push(self, frame: bytes) -> bytes | str:
        self.answer = asyncio.get_running_loop().create_future()
        self.inbox.put_nowait({"type": "websocket.receive", "bytes": frame})
        return await self.answer


class FakeTransport(asyncio.Transport):
    """What uvicorn's protocol writes to: `on_write` sees each write."""

    def __init__(self, on_write: Callable[[bytes], None]):
        super().__init__()
        self.on_write = on_write
        self.closing = False

    def write(self, data: bytes) -> None:
        self.on_write(bytes(data))

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )


class ProtocolSocket:
    """One WebSocket connection through uvicorn's own protocol, as `tcnserve serve` runs it
    (service/ws/protocol.py, so tcnserve's streams take their direct path), fed client frames
    by data_received and answered through a fake transport: the whole per-message path on the
    event loop except the socket system calls."""

    MASK = b"\x01\x02\x03\x04"

    def __init__(self, config, path: str, query: str = ""):
        from uvicorn.server import ServerState

        self.answer: asyncio.Future | None = None
        self.opened = asyncio.get_running_loop().create_future()
        self.protocol = config.ws_protocol_class(config, ServerState(), {})
        self.protocol.connection_made(FakeTransport(self._written))
        target = path + (f"?{query}" if query else "")
        self.protocol.data_received(
            (
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                # lowercase, as uvicorn's HTTP protocol hands an upgrade on (httptools does)
                f"Sec-WebSocket-Version: 13\r\nauthorization: Bearer {KEY}\r\n\r\n"
            ).encode()
        )

    def _written(self, data: bytes) -> None:
        if not self.opened.done():
            self.opened.set_result(data)
        elif self.answer is not None and not self.answer.done():
            self.answer.set_result(data)

    def frame(self, payload: bytes) -> bytes:
        """A masked binary client frame (payloads under 126 bytes)."""
        mask = self.MASK
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bytes([0x82, 0x80 | len(payload)]) + mask + masked

    async def push(self, frame: bytes) -> bytes:
        self.answer = asyncio.get_running_loop().create_future()
        self.protocol.data_received(frame)
        return await self.answer


def protocol_config(app, direct: bool = True):
    """uvicorn's config as `tcnserve serve` builds it, for ProtocolSocket; `direct=False`: the
    protocol it subclasses, which offers no direct path (every message takes the ASGI path)."""
    import uvicorn
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from service.ws.protocol import ReleasingWebSocketProtocol

    protocol = ReleasingWebSocketProtocol if direct else WebSocketsSansIOProtocol
    config = uvicorn.Config(
        app, ws=protocol, ws_per_message_deflate=False, lifespan="off", log_level="warning",
        ws_ping_interval=None,  # the fake client answers no keepalive ping
    )  # fmt: skip
    config.load()
    return config


def worker_cpu() -> float:
    """CPU seconds of this process's threads other than the calling one."""
    me = threading.get_native_id()
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == me:
            continue
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks
    return total


async def measure(push: Callable[[int, int], Awaitable[None]], sessions: int, rounds: int) -> tuple:
    for r in range(3):  # warm-up rounds
        await asyncio.gather(*(push(i, r) for i in range(sessions)))
    cpu, other = time.thread_time(), worker_cpu()
    for r in range(3, 3 + rounds):
        await asyncio.gather(*(push(i, r) for i in range(sessions)))
    n = sessions * rounds
    return (time.thread_time() - cpu) / n * 1e6, (worker_cpu() - other) / n * 1e6


async def main(args: argparse.Namespace) -> None:
    import noop_app

    settings = Settings(api_keys=KEY, max_sessions=2 * args.sessions + 8, torch_threads=1)
    app = create_app(settings)
    runtime = app.state.runtime
    await runtime.start()
    await asyncio.to_thread(runtime.loaded.wait)
    # As `tcnserve serve` does once its models are loaded: what exists now is never garbage,
    # so the collector stops walking it (the imports alone are ~1M objects).
    gc.collect()
    gc.freeze()
    ids, ws_ids = [], []  # sessions pushed over HTTP, and over WebSockets
    for _ in range(2 * args.sessions):
        status, body = await request(app, "POST", "/v1/sessions", b'{"model": "default"}')
        assert status == 201, body
        (ids if len(ids) < args.sessions else ws_ids).append(json.loads(body)["session_id"])
    rng = np.random.default_rng(0)
    row = [float(v) for v in rng.random(2)]
    row[1] = 0.0
    positions = [0] * args.sessions

    async def push(i: int, _round: int) -> None:
        body = json.dumps({"inputs": [row], "offset": positions[i]}).encode()
        status, answer = await request(app, "POST", f"/v1/sessions/{ids[i]}/steps", body)
        if status != 200:
            raise SystemExit(f"push answered {status}: {answer[:200]!r}")
        positions[i] += 1

    async def noop(i: int, _round: int) -> None:
        body = json.dumps({"inputs": [row], "offset": 0}).encode()
        status, _ = await request(noop_app.app, "POST", f"/v1/sessions/{ids[i]}/steps", body)
        assert status == 200

    async def describe(i: int, _round: int) -> None:
        status, _ = await request(app, "GET", f"/v1/sessions/{ids[i]}")
        assert status == 200

    many_positions = [0] * args.sessions

    async def many(i: int, _round: int) -> None:
        # One POST /v1/steps per round carrying every session's row (sent by session 0's turn).
        if i:
            return
        steps = [
            {"session_id": sid, "inputs": [row], "offset": many_positions[k]}
            for k, sid in enumerate(ids)
        ]
        status, answer = await request(
            app, "POST", "/v1/steps", json.dumps({"steps": steps}).encode()
        )
        if status != 200:
            raise SystemExit(f"/v1/steps answered {status}: {answer[:200]!r}")
        for k in range(len(ids)):
            many_positions[k] += 1

    ours = [FakeSocket(app, f"/v1/sessions/{sid}/stream", "framing=offset") for sid in ws_ids]
    echoes = [FakeSocket(noop_app.app, f"/v1/sessions/{sid}/stream") for sid in ws_ids]
    for socket in ours + echoes:
        await socket.accepted.wait()
    frame_row = np.array([row], dtype=np.float32)
    ws_positions = [0] * args.sessions

    async def ws_push(i: int, _round: int) -> None:
        answer = await ours[i].push(encode_frame(frame_row, ws_positions[i]))
        if not isinstance(answer, bytes):
            raise SystemExit(f"the stream answered {answer[:200]!r}")
        ws_positions[i] += 1

    async def ws_echo(i: int, _round: int) -> None:
        await echoes[i].push(encode_frame(frame_row, 0))

    ours_config, echo_config = protocol_config(app), protocol_config(noop_app.app)
    direct = [
        ProtocolSocket(ours_config, f"/v1/sessions/{sid}/stream", "framing=offset")
        for sid in ws_ids
    ]
    asgi_config = protocol_config(app, direct=False)
    asgi = [
        ProtocolSocket(asgi_config, f"/v1/sessions/{sid}/stream", "framing=offset")
        for sid in ws_ids
    ]
    plain = [ProtocolSocket(echo_config, f"/v1/sessions/{sid}/stream") for sid in ws_ids]
    for socket in direct + asgi + plain:
        await socket.opened
    while not all(socket.protocol._direct for socket in direct):  # their handlers attach
        await asyncio.sleep(0)

    async def ws_protocol_push(sockets: list[ProtocolSocket], i: int) -> None:
        sock = sockets[i]
        answer = await sock.push(sock.frame(encode_frame(frame_row, ws_positions[i])))
        if answer[0] != 0x82:
            raise SystemExit(f"the stream answered {answer[:200]!r}")
        ws_positions[i] += 1

    async def ws_direct(i: int, _round: int) -> None:
        await ws_protocol_push(direct, i)

    async def ws_asgi(i: int, _round: int) -> None:
        await ws_protocol_push(asgi, i)

    async def ws_plain_echo(i: int, _round: int) -> None:
        sock = plain[i]
        await sock.push(sock.frame(encode_frame(frame_row, 0)))

    cases = {
        "tcnserve push": push,
        "tcnserve GET session": describe,
        "no-work endpoint": noop,
        "/v1/steps, per item": many,
        "tcnserve WS binary": ws_push,
        "no-work WS echo": ws_echo,
        "tcnserve WS, uvicorn": ws_direct,
        "  the same, ASGI path": ws_asgi,
        "no-work echo, uvicorn": ws_plain_echo,
    }
    results: dict[str, list[tuple[float, float]]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, fn in cases.items():
            results[case].append(await measure(fn, args.sessions, args.rounds))
    for socket in direct + asgi + plain:  # the connections drop: their handlers end
        socket.protocol.connection_lost(None)
    await asyncio.sleep(0.1)
    await runtime.stop()
    print(f"{args.sessions} sessions, one row per push, {args.rounds} rounds x {args.repeats}")
    print(f"{'case':<22} {'loop us/req':>12} {'worker us/req':>14}")
    medians = {}
    for case, values in results.items():
        loop_us = statistics.median(v[0] for v in values)
        worker_us = statistics.median(v[1] for v in values)
        medians[case] = loop_us
        print(f"{case:<22} {loop_us:>12.1f} {worker_us:>14.1f}")
    extra = medians["tcnserve push"] - medians["no-work endpoint"]
    print(f"tcnserve's own event-loop work per push: {extra:.1f} us")
    extra = medians["tcnserve WS binary"] - medians["no-work WS echo"]
    print(f"tcnserve's own event-loop work per WebSocket message: {extra:.1f} us")
    ours_us, echo_us = medians["tcnserve WS, uvicorn"], medians["no-work echo, uvicorn"]
    asgi_us = medians["  the same, ASGI path"]
    print(
        f"through uvicorn's protocol: {ours_us:.1f} us per WebSocket message on the direct path, "
        f"{asgi_us:.1f} on the ASGI path ({ours_us / asgi_us:.2f}x), the echo's {echo_us:.1f} "
        f"(direct / echo {ours_us / echo_us:.2f}x, ASGI / echo {asgi_us / echo_us:.2f}x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
