"""How `tcnserve serve --workers N` scales: one-row WebSocket pushes against 0, 1, 2, 4, 8 edges.

For each workers count W (`--workers-list`, default 1,2,4,8; 0 is the one-process server),
starts `tcnserve serve --workers W` on the built-in model or `--model DIR` (torch threads 1
unless `--torch-threads`) on a free loopback port, and has S sessions (`--sessions`, default
256) push one row per binary WebSocket message (`WS /v1/sessions/{id}/stream?framing=offset`)
in lockstep for `--seconds`, from `--client-procs` client processes (bench/ws_stream.py's
clients and counters: run_case).
Then the same load once against bench/noop_app.py (the same FastAPI/uvicorn stack, one
process, answering each push without a model), the floor every row is compared with.

Server CPU is every process of the server (supervisor, engine, edges; bench/_harness.py's
process tree, read at both ends of the window), in % of one core and in microseconds per step
answered. The clients run on the same machine and compete with the server for its cores.

Run: python bench/scaling.py [--workers-list 0,1,2,4,8] [--sessions 256] [--seconds 5]
     [--client-procs N] [--torch-threads 1] [--no-echo] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
from _harness import (
    DEFAULT_MODEL,
    ROOT,
    Server,
    environment,
    free_port,
    serve_command,
    write_results,
)
from ws_stream import WARMUP_PUSHES, Case, run_case

HEADER = (
    f"{'workers':>7} {'procs':>5} {'steps/s':>9} {'x w=1':>6} {'x echo':>6} {'p50 ms':>7} "
    f"{'p99 ms':>7} {'batch':>6} {'server':>7} {'edges':>6} {'engine':>6} {'srv us':>6} "
    f"{'x echo':>6} {'client':>6}"
)

LEGEND = """\
workers: --workers W (0: one process; echo: bench/noop_app.py, one process, no model)
procs: server processes at the end of the window (supervisor + engine + W edges)
steps/s: one-row pushes answered per second, all sessions; x w=1: / the workers=1 row's;
  x echo: / the echo's (share of the bare stack's rate)
p50/p99: per push, client side, send -> answer; batch: mean streams per step call (/metrics)
server: CPU of every server process, % of one core; edges / engine: the edge processes
  together / the engine process (W >= 1)
srv us: server CPU microseconds per step answered; x echo: as a multiple of the echo's
client: CPU of all client processes, % of one core"""


def fmt(x: float, spec: str) -> str:
    return "-" if x is None or np.isnan(x) else format(x, spec)


def row(label: str, c: Case, one: Case | None, echo: Case | None) -> str:
    per_one = c.rate / one.rate if one else float("nan")
    per_echo = c.rate / echo.rate if echo else float("nan")
    us_echo = c.server_us / echo.server_us if echo else float("nan")
    return (
        f"{label:>7} {c.server_procs:>5} {c.rate:>9,.0f} {fmt(per_one, '.2f'):>6} "
        f"{fmt(per_echo, '.0%'):>6} {c.p50_ms:>7.2f} {c.p99_ms:>7.2f} {fmt(c.batch, '.1f'):>6} "
        f"{fmt(c.server_cpu, '.0%'):>7} {fmt(c.edge_cpu, '.0%'):>6} "
        f"{fmt(c.engine_cpu, '.0%'):>6} {fmt(c.server_us, '.0f'):>6} {fmt(us_echo, '.1f'):>6} "
        f"{fmt(c.client_cpu, '.0%'):>6}"
    )


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers-list",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4, 8],
        help="workers counts, comma-separated (0: one process; default 1,2,4,8)",
    )
    parser.add_argument("--sessions", type=int, default=256, help="concurrent sessions (256)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (5)")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=max(1, cores // 4),
        help=f"client processes, the sessions split between them (default cores // 4: "
        f"{max(1, cores // 4)})",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="the server's --torch-threads (default 1; 0: pass nothing, the server's default)",
    )
    parser.add_argument(
        "--max-batch-delay-ms", type=float, default=1.0, help="server setting (its default: 1)"
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="checkpoint to serve (the built-in one)"
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="the engine's device (cpu)"
    )
    parser.add_argument("--no-echo", action="store_true", help="skip the bench/noop_app.py row")
    parser.add_argument("--json", type=Path, help="also write the rows here (one JSON record)")
    args = parser.parse_args()
    began = time.perf_counter()

    sys.path.insert(0, str(ROOT))
    from model import read_checkpoint_info

    config, _ = read_checkpoint_info(args.model)
    procs = max(1, min(args.client_procs, args.sessions))
    threads = f"{args.torch_threads}" if args.torch_threads else "the server's default"
    print(f"$ {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(environment())
    print(
        f"machine: {cores} cores; {args.sessions} sessions pushing one row per binary WebSocket "
        f"message in lockstep, {args.seconds:g} s per row after {WARMUP_PUSHES} warm-up pushes "
        f"each, from {procs} client process(es) on the same machine"
    )
    print(
        f"model {args.model.name} (in {config.in_channels}, channels {list(config.channels)}, "
        "kernel "
        f"{config.kernel_size}, receptive field {config.receptive_field}); server on "
        f"{args.device}: torch threads "
        f"{threads}, max_batch_delay_ms {args.max_batch_delay_ms:g}",
        flush=True,
    )

    def load(server: Server) -> Case:
        return run_case(
            server, "ws-binary", args.sessions, config.in_channels, args.seconds, procs,
            WARMUP_PUSHES,
        )  # fmt: skip

    cases: list[tuple[int, Case]] = []
    print(HEADER, flush=True)
    for workers in args.workers_list:
        port = free_port()
        command = [
            *serve_command(), "--port", str(port), "--workers", str(workers),
            "--max-sessions", str(args.sessions + 8), "--device", args.device,
            "--model", f"default={args.model}",
            "--max-batch-delay-ms", str(args.max_batch_delay_ms), "--log-level", "warning",
            *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []),
        ]  # fmt: skip
        with Server(command, port) as server:
            edges = len(server.edges())
            if edges != workers:
                raise SystemExit(f"--workers {workers} started {edges} edge processes")
            case = load(server)
        case.workers = workers
        cases.append((workers, case))
        print(row(str(workers), case, None, None), flush=True)

    echo = None
    if not args.no_echo:
        port = free_port()
        noop = [
            sys.executable, str(ROOT / "bench" / "noop_app.py"), str(port), "1000",
            str(config.in_channels),
        ]  # fmt: skip
        with Server(noop, port) as floor:
            echo = load(floor)
        echo.stack = "no-work"
        print(row("echo", echo, None, None), flush=True)

    one = next((c for w, c in cases if w == 1), None)
    print("\nsummary (ratios from this run)")
    print(HEADER)
    for workers, case in cases:
        print(row(str(workers), case, one, echo))
    if echo:
        print(row("echo", echo, one, echo))
    print(LEGEND)
    if args.json:
        write_results(
            args.json,
            "scaling",
            [{**dataclasses.asdict(c), "workers": w} for w, c in cases]
            + ([{**dataclasses.asdict(echo), "workers": "echo"}] if echo else []),
        )
    rows = [(str(w), c) for w, c in cases] + ([("echo", echo)] if echo else [])
    label, busiest = max(rows, key=lambda r: r[1].client_cpu)
    per_proc = busiest.client_cpu / busiest.procs
    verdict = (
        "CPU-bound: rerun with more --client-procs (if cores allow)"
        if per_proc > 0.9
        else "not the limit"
    )
    print(
        f"client processes: {procs}; the busiest row ({label}) used {per_proc:.0%} of a core "
        "each: " + verdict
    )
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
