"""End-to-end HTTP benchmark of tcnserve against a recompute-the-window baseline service.

Starts its own servers on loopback (tcnserve with one worker; bench/window_baseline.py), warms
them up, then measures over HTTP keep-alive with httpx.AsyncClient:
  * /predict throughput for 8 sequences x 1,000 steps per request;
  * single-row session pushes with 1, 16 and 128 concurrent sessions: pushes/s, p50 and p99
    latency, and for tcnserve the mean step batch size (from /metrics);
  * the same pushes against the baseline, which runs TCN.forward over each session's last R
    inputs per push (no streaming state, no batching).
The client runs on the same machine as the servers and competes with them for the CPU.
Run: python bench/service_http.py [--duration 6] [--model DIR] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from _harness import (
    DEFAULT_MODEL,
    ROOT,
    HttpPushers,
    Server,
    batch_stats,
    environment,
    free_port,
    percentile,
    serve_command,
)

PREDICT_SHAPE = (8, 1000)  # sequences x steps per /predict request


@dataclass
class Row:
    server: str
    case: str
    rate: float  # requests/s (predict) or pushes/s
    unit: str
    p50_ms: float
    p99_ms: float
    batch: str = ""


async def bench_predict(url: str, in_channels: int, duration: float) -> Row:
    rng = np.random.default_rng(0)
    body = {"inputs": rng.standard_normal((*PREDICT_SHAPE, in_channels)).round(4).tolist()}
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for _ in range(2):  # warm-up
            (await c.post("/v1/models/default/predict", json=body)).raise_for_status()
        end = time.perf_counter() + duration
        while time.perf_counter() < end or len(latencies) < 3:
            start = time.perf_counter()
            (await c.post("/v1/models/default/predict", json=body)).raise_for_status()
            latencies.append(time.perf_counter() - start)
    rate = len(latencies) / sum(latencies)
    steps = PREDICT_SHAPE[0] * PREDICT_SHAPE[1]
    return Row(
        "tcnserve",
        f"/predict {PREDICT_SHAPE[0]}x{PREDICT_SHAPE[1]}",
        rate * steps,
        "steps/s",
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        f"{rate:.2f} req/s",
    )


async def bench_pushes(
    server: str, url: str, sessions: int, in_channels: int, duration: float, warmup: int
) -> Row:
    pushers = HttpPushers(url, sessions, in_channels, seed=sessions)
    latencies: list[float] = []
    batch = ""
    try:
        await pushers.open()
        await pushers.run(warmup)
        probe = pushers.clients[0]
        before = batch_stats((await probe.get("/metrics")).text) if server == "tcnserve" else None
        started = time.perf_counter()
        await pushers.run(None, started + duration, latencies)
        elapsed = time.perf_counter() - started
        if before is not None:
            after = batch_stats((await probe.get("/metrics")).text)
            calls = after[1] - before[1]
            batch = f"{(after[0] - before[0]) / calls:.1f}" if calls else "-"
    finally:
        await pushers.close(delete=server == "tcnserve")
    return Row(
        server,
        f"push 1 row, {sessions} sessions",
        len(latencies) / elapsed,
        "pushes/s",
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        batch,
    )


def header(args: argparse.Namespace, model_dir: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from model import read_checkpoint_info

    config, _ = read_checkpoint_info(model_dir)
    return (
        f"$ {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n"
        f"{environment()}\n"
        f"model {model_dir.name}: in {config.in_channels}, channels {list(config.channels)}, "
        f"kernel {config.kernel_size}, receptive field {config.receptive_field}; "
        f"{args.duration:g} s per case, max_batch_delay_ms {args.max_batch_delay_ms:g}, "
        f"server torch threads {args.torch_threads or 'default'}"
    )


def table(rows: list[Row]) -> str:
    lines = [
        f"{'server':<9} {'case':<28} {'rate':>12} {'unit':<9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'batch':>12}"
    ]
    for r in rows:
        lines.append(
            f"{r.server:<9} {r.case:<28} {r.rate:>12,.0f} {r.unit:<9} {r.p50_ms:>8.2f} "
            f"{r.p99_ms:>8.2f} {r.batch:>12}"
        )
    return "\n".join(lines)


async def measure(args: argparse.Namespace, model_dir: Path, in_channels: int) -> list[Row]:
    rows: list[Row] = []
    port = free_port()
    command = [
        *serve_command(),
        "--port",
        str(port),
        "--model",
        f"default={model_dir}",
        "--device",
        args.device,
        "--max-sessions",
        str(max(args.sessions) + 8),
        "--max-batch-delay-ms",
        str(args.max_batch_delay_ms),
        "--log-level",
        "warning",
    ]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    with Server(command, port) as server:
        rows.append(await bench_predict(server.url, in_channels, args.duration))
        print(table(rows[-1:]).splitlines()[1], flush=True)
        for n in args.sessions:
            rows.append(
                await bench_pushes("tcnserve", server.url, n, in_channels, args.duration, 5)
            )
            print(table(rows[-1:]).splitlines()[1], flush=True)
    if args.no_baseline:
        return rows
    port = free_port()
    baseline = [
        sys.executable,
        str(ROOT / "bench" / "window_baseline.py"),
        "--port",
        str(port),
        "--model",
        str(model_dir),
    ]
    with Server(baseline, port) as server:
        for n in args.sessions:
            rows.append(
                await bench_pushes("baseline", server.url, n, in_channels, args.duration, 1)
            )
            print(table(rows[-1:]).splitlines()[1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measured case")
    parser.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 128],
        help="concurrent sessions, comma-separated",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--max-batch-delay-ms", type=float, default=1.0)
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="server's intra-op threads (0: torch's)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline service")
    args = parser.parse_args()
    model_dir = args.model.resolve()
    sys.path.insert(0, str(ROOT))
    from model import read_checkpoint_info

    config, _ = read_checkpoint_info(model_dir)
    print(header(args, model_dir), flush=True)
    print(table([]), flush=True)
    rows = asyncio.run(measure(args, model_dir, config.in_channels))
    tcn = {r.case: r for r in rows if r.server == "tcnserve"}
    base = {r.case: r for r in rows if r.server == "baseline"}
    print("\nsummary")
    print(table(rows))
    for case, r in base.items():
        if case in tcn and r.rate:
            print(f"{case}: tcnserve {tcn[case].rate / r.rate:.1f}x the baseline's pushes/s")
    print("p50/p99: per-request latency; one client process shares the CPU with the servers")


if __name__ == "__main__":
    main()
