"""The HTTP edge under wrk: tcnserve next to the same web stack doing no work, in one run.

Cases (wrk, keep-alive, its own process; its CPU share is printed so it is seen not to be the
bottleneck):
  * single-row push, POST /v1/sessions/{id}/steps, 64 sessions over 64 connections;
  * many sessions per request, POST /v1/steps, 1,000 sessions one row each per request;
against bench/noop_app.py: FastAPI + uvicorn (httptools) reading the same bodies and answering
a fixed body of the same shape, and against that app's WebSocket echo (one-row binary
messages from `--echo-sessions` sessions, bench/ws_stream.py's client in its own process): the
/v1/steps target is its steps/s over the echo's messages/s. Ratios come from the same run.
The server's CPU is that of all its processes (with `--workers N` a supervisor, an engine and
N edges: bench/_harness.py's process tree, read at both ends of each case), in % of one core
and in microseconds per request answered.

Run: python bench/edge_http.py [--duration 10] [--model DIR] [--workers N] [--echo-sessions 256]
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
    cpu_window,
    environment,
    free_port,
    read_tree_cpu,
    run_wrk,
    serve_command,
    write_results,
)

LUA = ROOT / "bench" / "wrk" / "post_body.lua"


def wrk(url: str, paths: list[str], body: bytes, connections: int, duration: float) -> dict:
    """Run wrk; requests/s, p50/p99 ms, errors and wrk's CPU share of one core."""
    with tempfile.TemporaryDirectory() as tmp:
        paths_file, body_file = Path(tmp) / "paths", Path(tmp) / "body"
        paths_file.write_text("\n".join(paths) + "\n")
        body_file.write_bytes(body)
        env = {**os.environ, "WRK_PATHS": str(paths_file), "WRK_BODY": str(body_file)}
        threads = min(2, connections)
        command = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{round(duration)}s",
            "-s",
            str(LUA),
        ]
        return run_wrk([*command, url], env, duration)


def open_sessions(url: str, n: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=60) as c:
        return [
            c.post("/v1/sessions", json={"model": "default"}).json()["session_id"] for _ in range(n)
        ]


def measured(
    server: Server, paths: list[str], body: bytes, connections: int, duration: float
) -> dict:
    """wrk() with the server's CPU over it: all its processes, in % of one core
    (`server_cpu`) and in microseconds per request answered (`server_us`)."""
    before = read_tree_cpu(server.process.pid)
    result = wrk(server.url, paths, body, connections, duration)
    cpu = cpu_window(before, read_tree_cpu(server.process.pid))
    requests = result["rps"] * duration
    result["server_cpu"] = cpu.share(cpu.seconds)
    result["server_us"] = cpu.seconds / requests * 1e6 if requests else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--many", type=int, default=1000, help="sessions per /v1/steps request")
    parser.add_argument(
        "--workers",
        type=int,
        help="`tcnserve serve --workers N` (0: one process; default: pass nothing, the "
        "server's own default)",
    )
    parser.add_argument(
        "--echo-sessions",
        type=int,
        default=256,
        help="sessions of the WebSocket echo row (256, as bench/scaling.py; 0: skip it)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here (plot_service.py)")
    args = parser.parse_args()
    print(environment())
    from model import read_checkpoint_info

    in_channels = read_checkpoint_info(args.model)[0].in_channels
    rng = np.random.default_rng(0)
    row = rng.random(in_channels).round(6).tolist()
    single = json.dumps({"inputs": [row]}).encode()

    port = free_port()
    command = [
        *serve_command(), "--port", str(port), "--model", f"default={args.model}",
        "--max-sessions", str(max(args.sessions, args.many) + 24), "--log-level", "warning",
        *([] if args.workers is None else ["--workers", str(args.workers)]),
    ]  # fmt: skip
    results = {}
    with Server(command, port) as server:
        given = "not given: the server's default" if args.workers is None else "given"
        servers = f"{server.describe()} (--workers {given})"
        print(f"server: {servers}", flush=True)
        workers = len(server.edges())  # in force: 0 is one process
        sids = open_sessions(server.url, max(args.sessions, args.many))
        paths = [f"/v1/sessions/{sid}/steps" for sid in sids[: args.sessions]]
        wrk(server.url, paths, single, args.sessions, 2)  # warm-up
        metrics0 = httpx.get(f"{server.url}/metrics").text
        results["push"] = measured(server, paths, single, args.sessions, args.duration)
        total, count = (
            a - b
            for a, b in zip(
                batch_stats(httpx.get(f"{server.url}/metrics").text),
                batch_stats(metrics0),
                strict=True,
            )
        )
        results["push"]["batch"] = total / max(count, 1)
        many = json.dumps(
            {"steps": [{"session_id": sid, "inputs": [row]} for sid in sids[: args.many]]}
        ).encode()
        wrk(server.url, ["/v1/steps"], many, 2, 2)
        results["many"] = measured(server, ["/v1/steps"], many, 2, args.duration)

    port = free_port()
    noop = [
        sys.executable, str(ROOT / "bench" / "noop_app.py"), str(port), str(args.many),
        str(in_channels),
    ]  # fmt: skip
    with Server(noop, port) as floor:
        fake = [f"/v1/sessions/{i:024d}/steps" for i in range(args.sessions)]
        wrk(floor.url, fake, single, args.sessions, 2)
        results["noop_push"] = measured(floor, fake, single, args.sessions, args.duration)
        results["noop_many"] = measured(floor, ["/v1/steps"], many, 2, args.duration)
        if args.echo_sessions:
            from ws_stream import WARMUP_PUSHES, run_case

            echo = run_case(
                floor, "ws-binary", args.echo_sessions, in_channels, args.duration,
                max(1, (os.cpu_count() or 1) // 4), WARMUP_PUSHES,
            )  # fmt: skip
            results["ws_echo"] = {
                "rate": echo.rate, "p99": echo.p99_ms, "client_cpu": echo.client_cpu,
                "server_us": echo.server_us,
            }  # fmt: skip

    if args.json:
        write_results(
            args.json,
            "edge_http",
            {
                "push_sessions": args.sessions,
                "sessions_per_request": args.many,
                "workers": workers,
                **results,
            },
        )
    push, noop_push = results["push"], results["noop_push"]
    many_r, noop_many = results["many"], results["noop_many"]
    print(
        f"\nmodel {args.model.name}, {args.duration:.0f} s per case, wrk on the same "
        f"{os.cpu_count()} cores; tcnserve: {servers}; no-work: one process"
    )
    print(
        f"{'case':<44} {'req/s':>8} {'steps/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'wrk CPU':>8} {'server CPU':>10} {'srv us/req':>10}"
    )

    def line(name: str, r: dict, steps_per_request: int) -> None:
        print(
            f"{name:<44} {r['rps']:>8.0f} {r['rps'] * steps_per_request:>9.0f} {r['p50']:>7.1f} "
            f"{r['p99']:>7.1f} {r['errors']:>6} {r['wrk_cpu']:>7.0%} "
            f"{r['server_cpu']:>10.0%} {r['server_us']:>10.0f}"
        )

    line(f"tcnserve single-row push, {args.sessions} sessions", push, 1)
    line("no-work FastAPI endpoint, same body", noop_push, 1)
    line(f"tcnserve /v1/steps, {args.many} sessions x 1 row", many_r, args.many)
    line(f"no-work FastAPI endpoint, same {len(many) // 1024} KiB body", noop_many, args.many)
    print(
        f"\nsingle-row push: {push['rps'] / noop_push['rps']:.0%} of the no-work endpoint "
        f"(mean step batch {push['batch']:.1f} streams)"
    )
    print(
        f"/v1/steps: {many_r['rps'] * args.many / noop_push['rps']:.1f}x the no-work endpoint's "
        f"single-row requests/s in steps/s; {many_r['rps'] / noop_many['rps']:.0%} of the "
        "no-work endpoint reading the same body"
    )
    if "ws_echo" in results:
        echo = results["ws_echo"]
        print(
            f"/v1/steps: {many_r['rps'] * args.many / echo['rate']:.2f}x the WebSocket echo's "
            f"messages/s ({echo['rate']:.0f} msgs/s, {args.echo_sessions} sessions x one-row "
            f"binary messages, the client at {echo['client_cpu']:.0%} of a core, "
            f"{echo['server_us']:.0f} us of server CPU per message)"
        )
    print(
        "wrk CPU: wrk's share of one core over its run; server CPU: all server processes\n"
        "  (/proc, process tree by ppid, read at both ends of each case), % of one core\n"
        "srv us/req: server CPU microseconds per request answered (/v1/steps: per "
        f"{args.many}-step request);\n  single-row push: "
        f"{push['server_us'] / noop_push['server_us']:.1f}x the no-work endpoint's"
    )


if __name__ == "__main__":
    main()
