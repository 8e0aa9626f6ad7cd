"""The client half of scripts/container_check.sh: what a user of the running container sees.

    python scripts/container_probe.py make-model DIR     # the seeded checkpoint to mount
    python scripts/container_probe.py check URL DIR KEY  # against the container serving DIR
    python scripts/container_probe.py drain URL          # right after its SIGTERM
    python scripts/container_probe.py pinned BASE_FREEZE IMAGE_FREEZE constraints.txt

`check` waits for /readyz, then compares every answer with this checkout's own forward of the
same checkpoint (model.load_model, in this process): /v1/models/tiny/predict, an HTTP session
pushed in chunks with offsets, and a WebSocket session (`/v1/stream`, JSON and binary frames);
a request without the key must be refused. Each check prints one `ok` line; the first failure
exits non-zero naming it.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import time
from pathlib import Path

import httpx
import torch
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import TCN, TCNConfig, load_model, save_model  # noqa: E402

MODEL = "tiny"
CONFIG = TCNConfig(in_channels=2, channels=(6, 6, 5), kernel_size=3, out_channels=2)  # R = 29
ATOL = 1e-5  # float32 server paths (batched, padded, streamed) against one float32 forward


class CheckFailed(Exception):
    """One check of the container failed; the message says which and how."""


def make_model(directory: Path) -> None:
    """A checkpoint whose weights are all drawn from N(0, 0.4): every input moves the outputs."""
    torch.manual_seed(23)
    net = TCN(CONFIG)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.4)
    save_model(net, directory, {"task": "container-check", "trained": False})


def forward(net: TCN, rows: list[list[float]]) -> list[list[float]]:
    x = torch.tensor(rows, dtype=torch.float32).T.unsqueeze(0)  # (1, C_in, T)
    with torch.inference_mode():
        return net(x)[0].T.tolist()  # (T, C_out)


def expect_close(what: str, actual: list, expected: list) -> None:
    a = torch.tensor(actual, dtype=torch.float64)
    e = torch.tensor(expected, dtype=torch.float64)
    if a.shape != e.shape:
        raise CheckFailed(f"{what}: shape {tuple(a.shape)}, the forward's {tuple(e.shape)}")
    worst = (a - e).abs().max().item() if a.numel() else 0.0
    if worst > ATOL:
        raise CheckFailed(f"{what}: differs from the in-process forward by {worst:.3g} > {ATOL}")
    print(f"ok: {what} equals the in-process forward (max |diff| {worst:.2g})")


def wait_ready(client: httpx.Client, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = client.get("/readyz")
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.5)
    raise CheckFailed(f"/readyz not 200 within {timeout_s:.0f} s (last: {last})")


def rows_of(seed: int, length: int) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(length, CONFIG.in_channels, generator=gen).tolist()


def check(url: str, directory: Path, key: str, ready_timeout_s: float) -> None:
    net = load_model(directory)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        started = time.monotonic()
        ready = wait_ready(client, ready_timeout_s)
        if MODEL not in json.dumps(ready):
            raise CheckFailed(f"/readyz does not list the mounted model {MODEL!r}: {ready}")
        print(f"ok: /readyz 200 after {time.monotonic() - started:.1f} s: {ready}")
        if (r := client.get("/healthz")).status_code != 200:
            raise CheckFailed(f"/healthz answered {r.status_code}")
        print("ok: /healthz 200")
        if (r := client.get("/v1/models")).status_code != 401:
            raise CheckFailed(f"/v1/models without the API key answered {r.status_code}, not 401")
        print("ok: a request without the API key is refused (401)")

        long, short = rows_of(1, 40), rows_of(2, 7)
        r = client.post(
            f"/v1/models/{MODEL}/predict",
            json={"inputs": [long, short], "outputs": "all"},
            headers=auth,
        )
        if r.status_code != 200:
            raise CheckFailed(f"predict answered {r.status_code}: {r.text[:300]}")
        outputs = r.json()["outputs"]
        expect_close("POST /v1/models/tiny/predict, sequence 0", outputs[0], forward(net, long))
        expect_close("POST /v1/models/tiny/predict, sequence 1", outputs[1], forward(net, short))

        rows = rows_of(3, 40)
        r = client.post("/v1/sessions", json={"model": MODEL, "prefix": rows[:5]}, headers=auth)
        if r.status_code != 201:
            raise CheckFailed(f"POST /v1/sessions answered {r.status_code}: {r.text[:300]}")
        sid, pushed = r.json()["session_id"], r.json()["outputs"]
        for offset in range(5, 40, 5):
            r = client.post(
                f"/v1/sessions/{sid}/steps",
                json={"inputs": rows[offset : offset + 5], "offset": offset},
                headers=auth,
            )
            if r.status_code != 200:
                raise CheckFailed(f"push at offset {offset} answered {r.status_code}: {r.text}")
            pushed += r.json()["outputs"]
        expect_close("an HTTP session pushed in 8 chunks", pushed, forward(net, rows))
        if (r := client.delete(f"/v1/sessions/{sid}", headers=auth)).status_code != 204:
            raise CheckFailed(f"DELETE /v1/sessions/{sid} answered {r.status_code}")

    rows = rows_of(4, 24)
    ws_url = url.replace("http://", "ws://", 1) + f"/v1/stream?model={MODEL}"
    with connect(ws_url, additional_headers=auth, open_timeout=30) as ws:
        opened = json.loads(ws.recv(timeout=30))
        if opened.get("model") != MODEL or opened.get("position") != 0:
            raise CheckFailed(f"/v1/stream opened with {opened}")
        streamed: list[list[float]] = []
        for offset in range(0, 12, 4):  # JSON text frames
            ws.send(json.dumps({"inputs": rows[offset : offset + 4], "offset": offset}))
            answer = json.loads(ws.recv(timeout=30))
            if "outputs" not in answer:
                raise CheckFailed(f"WebSocket push at offset {offset} answered {answer}")
            streamed += answer["outputs"]
        chunk = rows[12:]  # one binary frame: little-endian float32 rows
        values = [v for row in chunk for v in row]
        ws.send(struct.pack(f"<{len(values)}f", *values))
        frame = ws.recv(timeout=30)
        if not isinstance(frame, bytes):
            raise CheckFailed(f"the binary WebSocket push answered {frame!r}")
        values = struct.unpack(f"<{len(frame) // 4}f", frame)
        width = CONFIG.out_channels
        streamed += [list(values[i : i + width]) for i in range(0, len(values), width)]
    what = "a WebSocket session (/v1/stream, JSON and binary frames)"
    expect_close(what, streamed, forward(net, rows))


def drain(url: str, timeout_s: float) -> None:
    """Right after SIGTERM: /readyz answers 503 `draining` (the probes take the pod off)."""
    deadline = time.monotonic() + timeout_s
    answers = []
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            r = client.get("/readyz")
            answers.append(r.status_code)
            if r.status_code == 503 and r.json()["error"]["code"] == "draining":
                print(f"ok: after SIGTERM /readyz answers 503 draining ({len(answers)} polls)")
                return
            time.sleep(0.05)
    raise CheckFailed(f"/readyz never answered 503 draining after SIGTERM: {answers[-5:]}")


def pinned(base: Path, image: Path, lock: Path) -> None:
    """Every package the Dockerfile installed (in the image's `pip freeze`, not in its base's,
    or at another version) is pinned by the lock at that version; torch's +cpu label aside."""

    def pins(path: Path) -> dict[str, str]:
        found = {}
        for line in path.read_text().splitlines():
            if match := re.match(r"([A-Za-z0-9._-]+)==([^\s;+]+)", line):
                found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
        return found

    before, after, locked = pins(base), pins(image), pins(lock)
    installed = {n: v for n, v in after.items() if before.get(n) != v}
    wrong = [
        f"{name} {version} (lock: {locked.get(name, 'none')})"
        for name, version in sorted(installed.items())
        if locked.get(name) != version
    ]
    if wrong:
        raise CheckFailed(f"installed but not so pinned by {lock.name}: {', '.join(wrong)}")
    print(f"ok: all {len(installed)} packages the Dockerfile installed are pinned by {lock.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-model")
    make.add_argument("directory", type=Path)
    probe = commands.add_parser("check")
    probe.add_argument("url")
    probe.add_argument("directory", type=Path)
    probe.add_argument("key")
    probe.add_argument("--ready-timeout-s", type=float, default=240.0)
    draining = commands.add_parser("drain")
    draining.add_argument("url")
    draining.add_argument("--timeout-s", type=float, default=10.0)
    lock = commands.add_parser("pinned")
    lock.add_argument("freezes", type=Path, nargs=3, metavar="BASE_FREEZE IMAGE_FREEZE LOCK")
    args = parser.parse_args()
    if args.command == "make-model":
        make_model(args.directory)
        return 0
    try:
        if args.command == "drain":
            drain(args.url, args.timeout_s)
        elif args.command == "pinned":
            pinned(*args.freezes)
        else:
            check(args.url, args.directory, args.key, args.ready_timeout_s)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
