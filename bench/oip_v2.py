"""Single-timestep sequence requests over the Open Inference Protocol (/v2) next to /v1, under wrk.

Each case sends one-row pushes to S concurrent sequences (S = 1 and 64), one keep-alive
connection per sequence, against one `tcnserve serve` process:
  * /v1: POST /v1/sessions/{id}/steps, {"inputs": [[row]]};
  * /v2 JSON: POST /v2/models/default/infer, {"parameters": {"sequence_id": n}, "inputs":
    [{"name": "input", "shape": [1, 1, C], "datatype": "FP32", "data": row}]};
  * /v2 binary: the same with the row as 4C raw bytes (binary tensor data extension, binary
    output): what tritonclient sends by default.
wrk runs as its own process (bench/wrk/post_requests.lua); its CPU share of one core is printed
next to the server's, so the load generator is seen not to be the limit. No offsets are sent
(every push applies at the sequence's position), the same on both protocols.

Run: python bench/oip_v2.py [--duration 10] [--model DIR] [--sequences 1,64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    DEFAULT_MODEL,
    ROOT,
    Server,
    batch_stats,
    environment,
    free_port,
    run_wrk,
    serve_command,
)
from edge_http import server_cpu

LUA = ROOT / "bench" / "wrk" / "post_requests.lua"


def wrk(url: str, requests: list[tuple[str, bytes, int | None]], duration: float) -> dict:
    """wrk with one connection per request listed; requests/s, p50/p99 ms, errors, wrk's CPU."""
    connections = len(requests)
    threads = min(2, connections)
    with tempfile.TemporaryDirectory() as tmp:
        lines = []
        for i, (path, body, header) in enumerate(requests):
            (Path(tmp) / f"body{i}").write_bytes(body)
            lines.append(f"{path}\t{Path(tmp) / f'body{i}'}\t{header or ''}")
        listing = Path(tmp) / "requests"
        listing.write_text("\n".join(lines) + "\n")
        env = {**os.environ, "WRK_REQUESTS": str(listing), "WRK_THREADS": str(threads)}
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(duration)}s"]
        command += ["-s", str(LUA), url]
        return run_wrk(command, env, duration)


def v1_requests(url: str, rows: np.ndarray) -> list[tuple[str, bytes, int | None]]:
    """One session per row; its push request."""
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for row in rows.tolist():
            r = c.post("/v1/sessions", json={"model": "default"})
            r.raise_for_status()
            body = json.dumps({"inputs": [row]}).encode()
            out.append((f"/v1/sessions/{r.json()['session_id']}/steps", body, None))
    return out


def v2_requests(
    url: str, rows: np.ndarray, first_id: int, binary: bool
) -> list[tuple[str, bytes, int | None]]:
    """One sequence per row, started here; the request that pushes its row."""
    path = "/v2/models/default/infer"
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i, row in enumerate(rows):
            sequence_id = first_id + i
            tensor = {"name": "input", "shape": [1, 1, len(row)], "datatype": "FP32"}
            json_tensor = {**tensor, "data": row.tolist()}
            start = {"sequence_id": sequence_id, "sequence_start": True}
            c.post(path, json={"parameters": start, "inputs": [json_tensor]}).raise_for_status()
            if not binary:
                body = {"parameters": {"sequence_id": sequence_id}, "inputs": [json_tensor]}
                out.append((path, json.dumps(body).encode(), None))
                continue
            raw = row.astype("<f4").tobytes()
            head = json.dumps(
                {
                    "parameters": {"sequence_id": sequence_id, "binary_data_output": True},
                    "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
                }
            ).encode()
            out.append((path, head + raw, len(head)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--sequences", default="1,64", help="concurrent sequences per case")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every case this many times, interleaved"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.sequences.split(",")]
    print(environment())
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    from model import read_checkpoint_info

    in_channels = read_checkpoint_info(args.model)[0].in_channels
    rng = np.random.default_rng(0)
    port = free_port()
    command = [
        *serve_command(), "--port", str(port), "--model", f"default={args.model}",
        "--max-sessions", str(3 * sum(counts) + 8), "--log-level", "warning",
    ]  # fmt: skip
    rows_of = {n: rng.random((n, in_channels)).round(6).astype(np.float32) for n in counts}
    results = []
    with Server(command, port) as server:
        next_id = 1
        for n in counts:
            cases = {
                "/v1 steps (JSON)": v1_requests(server.url, rows_of[n]),
                "/v2 infer, JSON tensors": v2_requests(server.url, rows_of[n], next_id, False),
                "/v2 infer, binary tensors": v2_requests(server.url, rows_of[n], next_id + n, True),
            }
            next_id += 2 * n
            for name, requests in [c for _ in range(args.rounds) for c in cases.items()]:
                wrk(server.url, requests, 2)  # warm-up
                cpu0 = server_cpu(server.process.pid)
                metrics0 = httpx.get(f"{server.url}/metrics").text
                r = wrk(server.url, requests, args.duration)
                r["server_cpu"] = (server_cpu(server.process.pid) - cpu0) / args.duration
                total, calls = (
                    a - b
                    for a, b in zip(
                        batch_stats(httpx.get(f"{server.url}/metrics").text),
                        batch_stats(metrics0),
                        strict=True,
                    )
                )
                r["batch"] = total / max(calls, 1)
                results.append((n, name, r))

    print(
        f"\nmodel {args.model.name}, {args.duration:.0f} s per case, one row per request, "
        f"wrk on the same {os.cpu_count()} cores as the server (a machine shared with others)"
    )
    print(
        f"{'sequences':>9} {'case':<28} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'batch':>6} {'wrk CPU':>8} {'server CPU':>10} {'vs /v1':>7}"
    )
    base = {}
    for n, name, r in results:
        if name.startswith("/v1"):
            base[n] = r["rps"]  # each round's /v2 cases against that round's /v1
        print(
            f"{n:>9} {name:<28} {r['rps']:>8.0f} {r['p50']:>7.2f} {r['p99']:>7.2f} "
            f"{r['errors']:>6} {r['batch']:>6.1f} {r['wrk_cpu']:>7.0%} {r['server_cpu']:>9.0%} "
            f"{r['rps'] / base[n]:>6.0%}"
        )


if __name__ == "__main__":
    main()
