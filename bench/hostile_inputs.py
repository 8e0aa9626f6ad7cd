"""What hostile or buggy requests cost a real `tcnserve serve`, and how fast valid rows parse.

For each finding of the two hardening issues: the answer's status and code, the growth of the
server's peak RSS around the request, and the longest `/healthz` answer while it ran (an
event-loop stall shows there); for dropped WebSockets, the RSS left 5 s after they are gone.
Then the decode speed of valid rows per MiB, for the decoder the
server uses (msgspec straight into arrays) next to pydantic validation of the same body (what
the server did before), side by side in one run.

    python bench/hostile_inputs.py                  # this checkout
    python bench/hostile_inputs.py --source DIR     # another checkout (e.g. a git worktree of
                                                    # an older commit), for before/after

The server runs the built-in default model; `--source` runs that tree's server with this
script's Python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._harness import ROOT, environment, free_port

MiB = 1024 * 1024
KEY_A, KEY_B = "bench-key-a-0123456789", "bench-key-b-0123456789"


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Probe:
    """Measure one request: peak-RSS growth of the server and the slowest /healthz meanwhile."""

    def __init__(self, url: str, pid: int):
        self.url, self.pid = url, pid

    def __call__(self, fn):
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
        before = status_kib(self.pid, "VmRSS")
        stop, worst = threading.Event(), [0.0]

        def watch() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    start = time.perf_counter()
                    with contextlib.suppress(httpx.HTTPError):
                        c.get(f"{self.url}/healthz")
                    worst[0] = max(worst[0], time.perf_counter() - start)
                    time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            answer = fn()
        except Exception as e:  # e.g. the server died
            answer = f"{type(e).__name__}: {e}"[:60]
        finally:
            stop.set()
            watcher.join()
        growth = (status_kib(self.pid, "VmHWM") - before) / 1024
        return answer, growth, worst[0] * 1000


def describe(r) -> str:
    if isinstance(r, str):
        return r
    try:
        error = r.json().get("error", {})
    except ValueError:
        error = "(not JSON)"
    # /v2 answers {"error": "message"} (the Open Inference Protocol's form)
    code = error.get("code", "") if isinstance(error, dict) else f"{error[:24]}..."
    return f"{r.status_code} {code}".strip()


def ws_answer(text: str) -> str:
    try:
        answer = json.loads(text)
    except ValueError:
        return "(not JSON)"
    if "error" in answer:
        return f"error message {answer['error']['code']}"
    has_nan = any(v != v for row in answer.get("outputs", []) for v in row)
    return f"outputs, NaN: {has_nan}"


def empty_rows(size: int, field: str, nested: bool) -> bytes:
    rows = b"[" + b",".join([b"[]"] * (size // 3)) + b"]"
    return b'{"' + field.encode() + b'": ' + (b"[" + rows + b"]" if nested else rows) + b"}"


def run_server(source: Path, log: Path, extra_env: dict[str, str]):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
    env.update(extra_env, PYTHONPATH=str(source))
    out = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "debug"],
        cwd=source,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("server did not become ready")


def findings(url: str, pid: int, log: Path) -> list[tuple[str, str, float, float]]:
    import websockets.sync.client as ws_client

    probe = Probe(url, pid)
    rows_out: list[tuple[str, str, float, float]] = []
    a = {"X-API-Key": KEY_A}
    json_type = {"content-type": "application/json"}
    c = httpx.Client(base_url=url, headers={**a, **json_type}, timeout=120)

    def record(name: str, fn) -> None:
        answer, growth, stall = probe(fn)
        rows_out.append((name, describe(answer), growth, stall))

    sid = c.post("/v1/sessions", json={"model": "default"}).json()["session_id"]
    for size in (1 * MiB, 4 * MiB):
        body = empty_rows(size, "inputs", nested=True)
        record(
            f"1. /predict [[],...] {size // MiB} MiB",
            lambda body=body: c.post("/v1/models/default/predict", content=body),
        )
    body = empty_rows(4 * MiB, "inputs", nested=False)
    record("1. /steps [[],...] 4 MiB", lambda: c.post(f"/v1/sessions/{sid}/steps", content=body))

    def ws_text():
        ws_url = url.replace("http", "ws") + f"/v1/sessions/{sid}/stream"
        with ws_client.connect(ws_url, additional_headers=a, max_size=None) as ws:
            ws.send(empty_rows(4 * MiB, "inputs", nested=False).decode())
            text = ws.recv(timeout=120)
        return ws_answer(text)

    record("1. WS text [[],...] 4 MiB", ws_text)
    valid = json.dumps({"inputs": [[[0.123456789, 1.0]] * 100_000]}).encode()
    record(
        f"1. /predict valid {len(valid) / MiB:.1f} MiB",
        lambda: c.post("/v1/models/default/predict", content=valid),
    )

    huge = {"inputs": [[3.4e38, 3.4e38]] * 50}
    record("2. push 50 rows of 3.4e38", lambda: c.post(f"/v1/sessions/{sid}/steps", json=huge))
    record(
        "2. the next valid push",
        lambda: c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.5, 1.0]]}),
    )
    huge_predict = {"inputs": [huge["inputs"]]}
    record("2. /predict 3.4e38", lambda: c.post("/v1/models/default/predict", json=huge_predict))

    def ws_binary_overflow():
        import numpy as np

        ws_url = url.replace("http", "ws") + f"/v1/sessions/{sid}/stream"
        with ws_client.connect(ws_url, additional_headers=a) as ws:
            ws.send(np.full((5, 2), 3.4e38, dtype="<f4").tobytes())
            answer = ws.recv(timeout=30)
        if isinstance(answer, bytes):
            values = np.frombuffer(answer, dtype="<f4")
            return f"binary answer, NaN: {bool(np.isnan(values).any())}"
        return ws_answer(answer)

    record("2. WS binary 3.4e38", ws_binary_overflow)

    snapshot = {"position": 2**64, "inputs": [[0.0, 0.0]] * 3570}

    def absurd_positions():
        statuses = {c.post("/v1/sessions", json=snapshot_body).status_code for _ in range(20)}
        return f"answers {sorted(statuses)}"

    snapshot_body = {"model": "default", "snapshot": snapshot}

    record("3. 20 x snapshot position 2**64", absurd_positions)
    c.delete(f"/v1/sessions/{sid}")
    opened = []

    def fill():
        for _ in range(17):
            r = c.post("/v1/sessions", json={"model": "default"})
            if r.status_code != 201:
                return f"key A opened {len(opened)}, then {describe(r)}"
            opened.append(r.json()["session_id"])
        return f"key A opened {len(opened)}"

    record("3./4. key A opens all it can (16 slots)", fill)
    b = httpx.Client(base_url=url, headers={"X-API-Key": KEY_B}, timeout=30)
    record(
        "4. key B, while key A holds the rest",
        lambda: b.post("/v1/sessions", json={"model": "default"}),
    )
    for s in opened:
        c.delete(f"/v1/sessions/{s}")

    def trickle():
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/models/default/predict HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(8)
        try:
            data = sock.recv(100)
            return f"closed: {data[:12].decode() or 'EOF'}"
        except TimeoutError:
            return "still open after 8 s"
        finally:
            sock.close()

    record("5. headers trickled, then silence", trickle)
    ws_url = url.replace("http", "ws") + "/v1/stream?model=default"
    for headers in ({"Authorization": f"Bearer {KEY_A}"}, {"X-API-Key": KEY_A}):
        with ws_client.connect(ws_url, additional_headers=headers) as ws:
            ws.recv(timeout=10)
    leaks = log.read_text().count(KEY_A)
    rows_out.append(("6. key in the debug log (lines)", str(leaks), 0.0, 0.0))
    c.close()
    b.close()
    return rows_out


def round_two(url: str, pid: int) -> list[tuple[str, str, float, float]]:
    """The findings of hardening round 2 (the session store's faults are measured by
    tests/service/test_durability_faults.py against a stopped redis-server)."""
    import websockets.sync.client as ws_client

    probe = Probe(url, pid)
    rows_out: list[tuple[str, str, float, float]] = []
    a = {"X-API-Key": KEY_A}
    c = httpx.Client(base_url=url, headers={**a, "content-type": "application/json"}, timeout=120)

    def record(name: str, fn) -> None:
        answer, growth, stall = probe(fn)
        rows_out.append((name, describe(answer), growth, stall))

    sid = c.post("/v1/sessions", json={"model": "default"}).json()["session_id"]
    for shown, value in (("'\u00b2'", "\u00b2".encode()), ("5,000 digits", b"9" * 5000)):
        record(
            f"R2-1. Inference-Header-Content-Length {shown}",
            lambda value=value: c.post(
                "/v2/models/default/infer",
                content=b'{"inputs": []}',
                headers=[(b"inference-header-content-length", value)],
            ),
        )
    deep = b"[" * 970 + b"]" * 970
    record(
        "R2-2. /predict nested 970 deep",
        lambda: c.post("/v1/models/default/predict", content=b'{"inputs": ' + deep + b"}"),
    )

    def streams_deep() -> str:
        ws_url = url.replace("http", "ws") + "/v1/streams"
        with ws_client.connect(ws_url, additional_headers=a) as ws:
            item = f'{{"session_id": "{sid}", "inputs": {deep.decode()}}}'
            ws.send(f'{{"steps": [{item}]}}')
            first = ws_answer(ws.recv(timeout=30))
            ws.send(json.dumps({"steps": [{"session_id": sid, "inputs": [[0.5, 1.0]]}]}))
            json.loads(ws.recv(timeout=30))
        return f"{first}, socket kept"

    record("R2-2. /v1/streams text nested 970 deep", streams_deep)

    def dropped() -> str:
        ws_url = url.replace("http", "ws") + f"/v1/sessions/{sid}/stream"
        before = status_kib(pid, "VmRSS")
        sockets = []
        for _ in range(40):
            ws = ws_client.connect(ws_url, additional_headers=a, max_size=None)
            ws.send(b"\0" * (16 * MiB - 64))
            ws.recv(timeout=60)
            sockets.append(ws)
        for ws in sockets:  # TCP reset, no close frame
            ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            ws.socket.close()
        time.sleep(5)
        return f"RSS +{(status_kib(pid, 'VmRSS') - before) / 1024:.0f} MiB 5 s after"

    record("R2-3. 40 WS x 16 MiB, then dropped", dropped)
    one_row = b'{"inputs": [' + b",".join([b"[[0,0]]"] * 2_000_000) + b"]}"
    record(
        f"R2-4. /predict {len(one_row) / MiB:.0f} MiB of 1-row sequences",
        lambda: c.post("/v1/models/default/predict", content=one_row),
    )

    def big_header() -> str:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            try:
                for _ in range(512):  # 32 MiB
                    sock.sendall(b"a" * 65536)
                sock.sendall(b"\r\n\r\n")
            except OSError:
                pass
            with contextlib.suppress(OSError):
                return f"answer {sock.recv(12).decode()[9:12] or 'EOF'}"
        return "reset"

    record("R2-5. a 32 MiB header on /healthz", big_header)
    items = b'{"steps": [' + b",".join([b'{"session_id": "x", "inputs": [[0,0]]}'] * 400_000)
    items += b"]}"
    record(
        f"R2-6. /v1/steps {len(items) / MiB:.0f} MiB of items",
        lambda: c.post("/v1/steps", content=items),
    )
    record(
        "R2-9. empty X-API-Key beside a Bearer key",
        lambda: httpx.get(
            f"{url}/v1/models", headers={"X-API-Key": "", "Authorization": f"Bearer {KEY_A}"}
        ),
    )
    c.close()
    return rows_out


def parse_speed() -> list[tuple[str, float]]:
    """MiB/s of valid rows: pydantic (the previous decoder) vs msgspec straight to arrays."""
    from typing import Annotated

    import numpy as np
    from pydantic import BaseModel, Field

    from service.models import inputs

    body = json.dumps({"inputs": [np.random.default_rng(0).random((200_000, 2)).tolist()]})
    data = body.encode()
    Value = Annotated[float, Field(strict=True, allow_inf_nan=False)]

    class Before(BaseModel):
        inputs: list[list[list[Value]]]

    spec = inputs.InputSpec(2, None, np.dtype(np.float32), 1e30)

    def before() -> None:
        parsed = Before.model_validate_json(data)
        np.asarray(parsed.inputs[0], dtype=np.float32)

    def after() -> None:
        inputs.sequences(inputs.decode_body(data, inputs.PredictBody).inputs, spec, "inputs")

    results = []
    for name, fn in (("pydantic, then np.asarray (before)", before), ("msgspec to arrays", after)):
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 2.0:
            fn()
            n += 1
        results.append((name, len(data) / MiB * n / (time.perf_counter() - start)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose server to run")
    parser.add_argument(
        "--round", choices=("1", "2", "all"), default="all", help="which issue's findings"
    )
    args = parser.parse_args()
    print(environment())
    print(f"server from {args.source}, default model, 16 slots, two API keys, debug logging")
    log = Path("/tmp") / f"hostile-{os.getpid()}.log"
    env = {
        "TCNSERVE_MAX_SESSIONS": "16",
        "TCNSERVE_API_KEYS": f"{KEY_A},{KEY_B}",
        "TCNSERVE_REQUEST_TIMEOUT_S": "2",
    }
    url, process = run_server(args.source, log, env)
    try:
        table = findings(url, process.pid, log) if args.round in ("1", "all") else []
        if args.round in ("2", "all"):
            table += round_two(url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    print(f"\n{'request':<46} {'answer':<42} {'peak RSS +MiB':>13} {'/healthz max ms':>15}")
    for name, answer, growth, stall in table:
        print(f"{name:<46} {answer:<42} {growth:>13.0f} {stall:>15.0f}")
    if args.source == ROOT:
        print("\nvalid rows, 200,000 x 2 in one sequence:")
        speeds = parse_speed()
        for name, speed in speeds:
            print(f"  {name:<36} {speed:7.1f} MiB/s  ({1000 / speed:6.1f} ms per MiB)")
        print(f"  ratio: {speeds[1][1] / speeds[0][1]:.1f}x faster")


if __name__ == "__main__":
    main()
