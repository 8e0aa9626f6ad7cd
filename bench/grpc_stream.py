"""One-row sequence steps over gRPC ModelStreamInfer, beside a grpc.aio echo doing no work.

    python bench/grpc_stream.py [--streams 1,64,256] [--duration 8] [--workers 0,2]

For each server, and each number of concurrent streams N: a load generator in its own process
(grpc.aio, one bidirectional ModelStreamInfer call per stream, each a sequence of the built-in
model; closed loop: a stream sends its next one-row request when the answer to the last one is
in) runs for --duration seconds after a warm-up. It prints steps/s, p50/p99 latency, the
server's CPU per message (summed over its whole process tree, from /proc) and the load
generator's own CPU share (near 100% of a core: it, not the server, is the limit).

The echo is the same stack doing no work: grpc.aio on uvloop, the same messages
(service/grpc/oip_pb2.py), the same server options, and a stream handler that answers each
request with a fixed one-row response without decoding its tensor. Ratios are tcnserve over
the echo, measured in the same run. Results: docs/benchmarks/grpc_stream.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (
    ROOT,
    Server,
    cpu_window,
    environment,
    free_port,
    percentile,
    read_tree_cpu,
    serve_command,
)

METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
WARMUP_S = 1.5
IN_CHANNELS, OUT_CHANNELS = 2, 1  # the built-in model


def _request(sequence: int, start: bool) -> bytes:
    import numpy as np

    from service.grpc import oip_pb2 as pb

    message = pb.ModelInferRequest(model_name="default", id="")
    message.inputs.add(name="input", datatype="FP32", shape=[1, 1, IN_CHANNELS])
    message.raw_input_contents.append(np.asarray([[0.5, 0.0]], "<f4").tobytes())
    message.parameters["sequence_id"].int64_param = sequence
    if start:
        message.parameters["sequence_start"].bool_param = True
    return message.SerializeToString()


# ----- the echo server ----------------------------------------------------------------------


def serve_echo(port: int) -> None:
    import grpc
    import numpy as np
    import uvloop

    from service.grpc import oip_pb2 as pb
    from service.grpc.server import KEEPALIVE_MS, SERVICE

    answer = pb.ModelStreamInferResponse()
    answer.infer_response.model_name = "default"
    answer.infer_response.model_version = "1"
    answer.infer_response.outputs.add(name="output", datatype="FP32", shape=[1, 1, OUT_CHANNELS])
    answer.infer_response.raw_output_contents.append(np.zeros(OUT_CHANNELS, "<f4").tobytes())

    async def stream(requests, context):
        async for _request in requests:  # parsed by grpc (the deserializer), then answered
            yield answer

    async def main() -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
            ]
        )
        handler = grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"ModelStreamInfer": handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


# ----- the load generator -------------------------------------------------------------------


def load(address: str, streams: int, duration: float, first_id: int) -> dict:
    import grpc
    import uvloop

    from service.grpc import oip_pb2 as pb

    async def main() -> dict:
        latencies: list[float] = []
        counting = False
        errors = 0
        stop_at = 0.0

        async with grpc.aio.insecure_channel(address) as channel:
            call_of = channel.stream_stream(
                METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )

            async def one(sequence: int) -> None:
                nonlocal errors
                call = call_of()
                step = _request(sequence, start=False)
                await call.write(_request(sequence, start=True))
                first = pb.ModelStreamInferResponse.FromString(await call.read())
                if first.error_message:
                    raise SystemExit(f"the server refused the stream: {first.error_message}")
                while time.perf_counter() < stop_at:
                    sent = time.perf_counter()
                    await call.write(step)
                    answer = await call.read()
                    if counting:
                        latencies.append(time.perf_counter() - sent)
                        if len(answer) < 16:  # an answer with no output tensor: an error
                            errors += 1
                await call.done_writing()

            stop_at = time.perf_counter() + WARMUP_S + duration
            tasks = [asyncio.ensure_future(one(first_id + i)) for i in range(streams)]
            await asyncio.sleep(WARMUP_S)
            counting = True
            started, cpu0 = time.perf_counter(), _cpu()
            await asyncio.sleep(duration)
            counting = False
            wall, cpu = time.perf_counter() - started, _cpu() - cpu0
            await asyncio.gather(*tasks)
        return {
            "messages": len(latencies),
            "wall_s": wall,
            "errors": errors,
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "client_cpu_share": cpu / wall,
        }

    return uvloop.run(main())


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(grpc_port: int, server_pid: int, streams: int, duration: float, first: int) -> dict:
    """The load generator in its own process, and the server's CPU over its whole run."""
    before = read_tree_cpu(server_pid)
    out = subprocess.run(
        [sys.executable, __file__, "--load", f"127.0.0.1:{grpc_port}", str(streams),
         str(duration), str(first)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    window = cpu_window(before, read_tree_cpu(server_pid))
    if out.returncode != 0:
        raise SystemExit(f"load generator failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The server's CPU over the load process's life (warm-up included), per message counted
    # in its window, scaled by the window's share of that life.
    life = WARMUP_S + duration
    result["server_cpu_us_per_msg"] = (
        window.seconds * (result["wall_s"] / max(window.wall, life)) / max(result["messages"], 1)
    ) * 1e6
    result["rate"] = result["messages"] / result["wall_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--workers", default="0,2", help="tcnserve --workers values to run")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    print(environment())
    rows: dict[str, dict[int, dict]] = {}

    port = free_port()
    echo = subprocess.Popen([sys.executable, __file__, "--serve-echo", str(port)], cwd=ROOT)
    try:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        rows["echo"] = {n: run_load(port, echo.pid, n, args.duration, 1) for n in counts}
    finally:
        echo.terminate()
        echo.wait(30)
    for workers in args.workers.split(","):
        http, grpc_port = free_port(), free_port()
        command = [*serve_command(), "--port", str(http), "--grpc-port", str(grpc_port),
                   "--workers", workers, "--max-sessions", "1024"]  # fmt: skip
        with Server(command, http) as server:
            first, results = 1, {}
            for n in counts:
                results[n] = run_load(grpc_port, server.process.pid, n, args.duration, first)
                first += n
            rows[f"tcnserve --workers {workers}"] = results

    print("\n| server | streams | steps/s | x echo | p50 / p99 ms | server CPU / msg | "
          "x echo | load generator CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, results in rows.items():
        for n, r in results.items():
            e = rows["echo"][n]
            print(
                f"| {name} | {n} | {r['rate']:,.0f} | {r['rate'] / e['rate']:.2f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['server_cpu_us_per_msg']:.0f} us | "
                f"{r['server_cpu_us_per_msg'] / e['server_cpu_us_per_msg']:.2f} | "
                f"{r['client_cpu_share']:.0%} |" + (f" {r['errors']} errors" if r["errors"] else "")
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-echo":
        serve_echo(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        address, streams, duration, first = sys.argv[2:6]
        print(json.dumps(load(address, int(streams), float(duration), int(first))))
    else:
        main()
