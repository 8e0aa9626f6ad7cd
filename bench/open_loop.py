"""Thousands of live streams: N open sessions, each pushing one row per second, open loop.

Starts `tcnserve serve` with N slots (default 10,000), opens N sessions, then for `--seconds`
sends, every 1/R s, one POST /v1/steps carrying the next N/R sessions' rows (so every session
pushes once a second, whatever the server's pace: an open loop, late answers do not slow the
sending). A client process of its own does the sending (asyncio, one keep-alive connection per
in-flight request); its CPU share is printed. Reports the step rate, p50/p99/max latency of the
requests, how many were late (sent after their slot), and the server's memory.

Run: python bench/open_loop.py [--sessions 10000] [--rate 10] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Server, environment, free_port, percentile, serve_command, write_results


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _open(url: str, n: int) -> list[str]:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        sem = asyncio.Semaphore(16)

        async def one() -> str:
            async with sem:
                r = await c.post("/v1/sessions", json={"model": "default", "ttl_s": 3600})
                r.raise_for_status()
                return r.json()["session_id"]

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def _drive(url: str, sids: list[str], rate: int, seconds: float, out: dict) -> None:
    group = len(sids) // rate
    rng = np.random.default_rng(0)
    row = rng.random(2).round(5).tolist()
    bodies = [
        json.dumps(
            {
                "steps": [
                    {"session_id": s, "inputs": [row]} for s in sids[k * group : (k + 1) * group]
                ]
            }
        ).encode()
        for k in range(rate)
    ]
    latencies: list[float] = []
    late = errors = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def send(body: bytes) -> None:
            nonlocal errors
            start = time.perf_counter()
            r = await c.post(
                "/v1/steps", content=body, headers={"content-type": "application/json"}
            )
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200 or any("error" in x for x in r.json()["results"]):
                errors += 1

        tasks = []
        cpu = time.process_time()
        began = time.perf_counter()
        k = 0
        while (due := began + k / rate) < began + seconds:
            now = time.perf_counter()
            if now < due:
                await asyncio.sleep(due - now)
            elif now - due > 0.5 / rate:
                late += 1
            tasks.append(asyncio.create_task(send(bodies[k % rate])))
            k += 1
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
        out.update(
            requests=k,
            steps=k * group,
            elapsed=elapsed,
            latencies=latencies,
            late=late,
            errors=errors,
            cpu=(time.process_time() - cpu) / elapsed,
        )


def client(url: str, sids: list[str], rate: int, seconds: float, conn) -> None:
    out: dict = {}
    asyncio.run(_drive(url, sids, rate, seconds, out))
    conn.send(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=10, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch-size", type=int, default=128, help="server setting")
    parser.add_argument("--json", type=Path, help="also write the results here (plot_service.py)")
    args = parser.parse_args()
    print(environment())
    port = free_port()
    command = [
        *serve_command(), "--port", str(port), "--max-sessions", str(args.sessions),
        "--max-sequences-per-request", str(max(1024, args.sessions // args.rate)),
        "--max-batch-size", str(args.max_batch_size), "--log-level", "warning",
    ]  # fmt: skip
    with Server(command, port) as server:
        loaded = rss_mib(server.process.pid)
        began = time.perf_counter()
        sids = asyncio.run(_open(server.url, args.sessions))
        opened = time.perf_counter() - began
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=client, args=(server.url, sids, args.rate, args.seconds, theirs), daemon=True
        )
        proc.start()
        result = ours.recv()
        proc.join(30)
        peak = rss_mib(server.process.pid)
    lat = result["latencies"]
    per_request = args.sessions // args.rate
    print(
        f"\n{args.sessions} sessions opened in {opened:.1f} s; server RSS {loaded:.0f} MiB "
        f"after load (slots preallocated), {peak:.0f} MiB at the end"
    )
    print(
        f"open loop: {args.rate} POST /v1/steps per second x {per_request} sessions = "
        f"{args.sessions} sessions pushing one row per second, for {args.seconds:g} s"
    )
    print(
        f"served {result['steps'] / result['elapsed']:,.0f} steps/s; request latency p50 "
        f"{percentile(lat, 50) * 1e3:.1f} ms, p99 {percentile(lat, 99) * 1e3:.1f} ms, max "
        f"{max(lat) * 1e3:.1f} ms; {result['late']} of {result['requests']} sent late, "
        f"{result['errors']} with errors; client process CPU {result['cpu']:.0%} of a core"
    )
    if os.cpu_count() and os.cpu_count() <= 2:
        print("(client and server share this machine's cores)")
    if args.json:
        summary = {key: value for key, value in result.items() if key != "latencies"}
        summary.update(
            sessions=args.sessions,
            rate=args.rate,
            steps_per_s=result["steps"] / result["elapsed"],
            p50_ms=percentile(lat, 50) * 1e3,
            p99_ms=percentile(lat, 99) * 1e3,
            rss_mib=peak,
        )
        write_results(args.json, "open_loop", summary)


if __name__ == "__main__":
    main()
