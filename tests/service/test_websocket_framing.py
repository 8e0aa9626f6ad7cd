"""Frames parsed and written by tcnserve's protocol itself (service/ws/protocol.py): whole,
final, client-masked binary frames on an attached stream bypass websockets' parser; every other
frame (split across reads, fragmented, text, control, malformed, over the limit) goes through
it. A raw socket sends exact bytes to a real uvicorn server in a thread, and waits until the
server has read each piece before sending the next, so every split lands where it is cut."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import OPEN
from websockets.uri import parse_uri

import service.ws.protocol as ws_protocol
from service.app import create_app
from service.protocol.wire import decode_frame, encode_frame
from service.ws.protocol import ReleasingWebSocketProtocol
from tests.service.conftest import (
    TINY,
    assert_rows_close,
    held,
    random_rows,
    runtime_of,
    until_queued_from_elsewhere,
    uvicorn_thread,
    wait_until,
)

OUT = TINY.output_size
MAX_SIZE = 1 << 16  # the server's message limit in these tests (and max_body_bytes)


@pytest.fixture
def seen(monkeypatch) -> dict[str, int]:
    """Bytes the server has read, messages it framed itself, binary frames websockets parsed."""
    counts = {"read": 0, "own": 0, "websockets": 0}
    data_received = ReleasingWebSocketProtocol.data_received
    handle_bytes = ReleasingWebSocketProtocol.handle_bytes
    apply_mask = ws_protocol.apply_mask

    def reading(self, data: bytes) -> None:
        counts["read"] += len(data)
        data_received(self, data)

    def parsed(self, event: Frame) -> None:
        counts["websockets"] += 1
        handle_bytes(self, event)

    def unmasked(data: bytes, mask: bytes) -> bytes:
        counts["own"] += 1
        return apply_mask(data, mask)

    monkeypatch.setattr(ReleasingWebSocketProtocol, "data_received", reading)
    monkeypatch.setattr(ReleasingWebSocketProtocol, "handle_bytes", parsed)
    monkeypatch.setattr(ws_protocol, "apply_mask", unmasked)
    return counts


@contextlib.contextmanager
def server(make_settings) -> Iterator[tuple[str, Any]]:
    app = create_app(make_settings(max_body_bytes=MAX_SIZE))
    protocol = {"ws": ReleasingWebSocketProtocol, "ws_per_message_deflate": False}
    with uvicorn_thread(app, ws_max_size=MAX_SIZE, **protocol) as (url, _):
        yield url, app


def client_frame(
    opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True, wide=False
) -> bytes:
    """A client frame as bytes: masked with a random key unless told; `wide` writes the length
    in the 8-byte form whatever it is (allowed by websockets' parser, so by ours)."""
    n = len(payload)
    first = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    if wide:
        length = bytes([bit | 127]) + n.to_bytes(8, "big")
    elif n < 126:
        length = bytes([bit | n])
    elif n < 1 << 16:
        length = bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return first + length + payload
    mask = os.urandom(4)
    return first + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawSocket:
    """A WebSocket client on a plain socket: what it sends is exactly the bytes given; the
    server's frames are parsed by websockets' client protocol."""

    def __init__(self, url: str, path: str, seen: dict[str, int]):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.seen = seen
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            assert chunk, "the server closed during the handshake"
            response += chunk
        head, _, rest = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.parser = ClientProtocol(parse_uri(f"ws://{host}:{port}{path}"), state=OPEN)
        self.parser.receive_data(rest)
        self.frames: list[Frame] = list(self.parser.events_received())

    def send_read(self, data: bytes) -> None:
        """Send `data` and wait until the server has read all of it (a read of its own)."""
        before = self.seen["read"]
        self.sock.sendall(data)
        wait_until(lambda: self.seen["read"] >= before + len(data), "the server to read it")

    def next_frame(self) -> Frame:
        """The server's next frame other than a keepalive ping."""
        frame = self._next()
        while frame.opcode is Opcode.PING:
            frame = self._next()
        return frame

    def _next(self) -> Frame:
        while not self.frames:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.parser.receive_eof()
            else:
                self.parser.receive_data(chunk)
            self.frames += self.parser.events_received()
            if not chunk and not self.frames:
                raise AssertionError("the server closed the connection without a frame")
        return self.frames.pop(0)

    def close_code(self) -> int:
        """The code of the server's close frame, skipping nothing: the next frame must be it."""
        frame = self.next_frame()
        assert frame.opcode is Opcode.CLOSE, frame
        return Close.parse(frame.data).code

    def close(self) -> None:
        self.sock.close()


def new_session(url: str) -> str:
    r = httpx.post(f"{url}/v1/sessions", json={"model": "tiny"}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def expected(url: str, rows: list) -> list:
    r = httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": [rows]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_split_of_any_mix_of_frames_equals_the_full_forward(make_settings, seen, seed):
    """Whole binary frames (short, 16-bit and 8-byte lengths), fragmented ones, text messages
    and pings, sent as one byte stream cut at random points (1-byte pieces among them): the
    answers come in order and equal the full forward, pongs echo their pings, and both the
    protocol's own framing and websockets' parser handled some of the binary frames. (A read
    that ends inside a frame leaves the rest of the frames of that read, and of reads after it
    until one ends where a frame does, to websockets' parser.)"""
    rng = random.Random(seed)
    rows = random_rows(120, seed=1400 + seed)
    stream = b""
    kinds: list[str] = []
    pings: list[bytes] = []
    ends: list[int] = []  # where each message (and ping) ends in the stream
    position = 0
    while position < len(rows):
        size = min(rng.choice([1, 1, 2, 5, 20, 40]), len(rows) - position)
        chunk = rows[position : position + size]
        kind = rng.choice(["binary", "binary", "binary", "wide", "fragmented", "text"])
        payload = encode_frame(np.asarray(chunk, np.float32), position)
        if kind in ("binary", "wide"):
            stream += client_frame(0x2, payload, wide=kind == "wide")
        elif kind == "fragmented":
            cut = rng.randint(0, len(payload))
            stream += client_frame(0x2, payload[:cut], fin=False)
            stream += client_frame(0x0, payload[cut:])
        else:
            stream += client_frame(0x1, json.dumps({"inputs": chunk, "offset": position}).encode())
        kinds.append(kind)
        ends.append(len(stream))
        position += size
        if rng.random() < 0.2:
            pings.append(os.urandom(rng.randint(0, 8)))
            stream += client_frame(0x9, pings[-1])
            ends.append(len(stream))
    # Cuts inside frames (pieces of one byte among them), and at half the frames' ends: a read
    # that ends where a frame does brings the next one back to the protocol's own framing.
    cuts = rng.sample(range(1, len(stream)), 40)
    cuts += [c + 1 for c in cuts[:10]] + rng.sample(ends[:-1], len(ends) // 2)
    cuts = sorted(set(cuts))
    with server(make_settings) as (url, _):
        sid = new_session(url)
        client = RawSocket(url, f"/v1/sessions/{sid}/stream?framing=offset", seen)
        try:
            for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                client.send_read(stream[start:end])
            outputs: list = []
            pongs: list[bytes] = []
            answered = 0
            while answered < len(kinds):
                frame = client.next_frame()
                if frame.opcode is Opcode.PONG:
                    pongs.append(frame.data)
                    continue
                if kinds[answered] == "text":
                    assert frame.opcode is Opcode.TEXT, frame
                    outputs += json.loads(frame.data)["outputs"]
                else:
                    assert frame.opcode is Opcode.BINARY, frame
                    outputs += decode_frame(frame.data, OUT, True)[1].tolist()
                answered += 1
            while len(pongs) < len(pings):
                frame = client.next_frame()
                assert frame.opcode is Opcode.PONG, frame
                pongs.append(frame.data)
            assert pongs == pings
        finally:
            client.close()
        assert_rows_close(outputs, expected(url, rows))
    assert seen["own"] > 0 and seen["websockets"] > 0


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (client_frame(0x2, b"\x00" * 16, masked=False), 1002),  # a client frame must be masked
        (client_frame(0x2, b"\x00" * 16, rsv=4), 1002),  # RSV1 without an extension
        (client_frame(0x3, b"\x00" * 16), 1002),  # a reserved opcode
        (b"\x82\xff" + (MAX_SIZE + 1).to_bytes(8, "big"), 1009),  # over the limit: no payload
        (b"\x82\xff" + (1 << 62).to_bytes(8, "big"), 1009),  # waited for
    ],
    ids=["unmasked", "rsv1", "reserved-opcode", "over-the-limit", "absurd-length"],
)
def test_malformed_frames_after_good_ones_close_as_websockets_does(make_settings, seen, bad, code):
    rows = random_rows(2, seed=1500)
    with server(make_settings) as (url, _):
        sid = new_session(url)
        client = RawSocket(url, f"/v1/sessions/{sid}/stream", seen)
        try:
            good = client_frame(0x2, encode_frame(np.asarray(rows[:1], np.float32), None))
            client.send_read(good + bad)  # one read: the good one framed here, the bad one not
            frame = client.next_frame()  # the good one's answer, unless the close overtook it
            if frame.opcode is Opcode.BINARY:
                frame = client.next_frame()
            assert frame.opcode is Opcode.CLOSE, frame
            assert Close.parse(frame.data).code == code
        finally:
            client.close()
        r = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30)
        assert r.json()["position"] == 1  # the good one was pushed, nothing else
    assert seen["own"] == 1


@pytest.mark.asyncio
async def test_an_answer_after_the_clients_close_is_dropped_quietly(make_settings, seen, caplog):
    """The client closes while its push is in flight: the server answers the close at once,
    the push still lands, its answer is not written after the close, and nothing is logged."""
    with server(make_settings) as (url, app):
        worker = runtime_of(app).registry.get("tiny").worker
        sid = new_session(url)
        client = RawSocket(url, f"/v1/sessions/{sid}/stream", seen)
        try:
            gate, blocker = await held(worker)
            push = encode_frame(np.asarray(random_rows(1, seed=1600), np.float32), None)
            client.send_read(client_frame(0x2, push))
            await until_queued_from_elsewhere(worker, 1)
            with caplog.at_level(logging.ERROR):
                client.send_read(client_frame(0x8, (1000).to_bytes(2, "big")))
                assert client.close_code() == 1000
                gate.set()
                await blocker
                position = lambda: httpx.get(f"{url}/v1/sessions/{sid}").json()["position"]  # noqa: E731
                wait_until(lambda: position() == 1, "the push in flight to land")
            assert client.sock.recv(65536) == b""  # nothing after the close: the server hung up
        finally:
            client.close()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert seen["own"] == 1
