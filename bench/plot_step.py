"""Plots of the streaming step: latency against receptive field, and per-stream cost against N.

    python bench/plot_step.py receptive-field [--quick]  # -> docs/benchmarks/*receptive_field.png
    python bench/plot_step.py streams [--quick]          # -> docs/benchmarks/step_vs_streams.png
    python bench/plot_step.py streams --from-json docs/benchmarks/results/step_vs_streams.json

Each measurement run also writes its numbers to docs/benchmarks/results/<plot>.json, and
`--from-json` redraws a plot from such a file without measuring. Timing is bench/model_step.py's:
one torch thread, the cases of one point interleaved run by run, medians of the runs; every
plot's footer names the machine, the date and the commit it was measured on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model_step import (  # noqa: E402
    R1,
    MatmulFloor,
    Timer,
    beside_blas,
    checkout,
    cpu_model,
    pytorch_tcn_like,
)

from model import TCN, StreamPool, TCNConfig  # noqa: E402

OUT = ROOT / "docs" / "benchmarks"
RESULTS = OUT / "results"


def footer(meta: dict) -> str:
    return (
        f"{meta['machine']} | {meta['date']} | commit {meta['commit']} | torch {meta['torch']}, "
        f"{meta['threads']} thread(s) | {meta['note']}"
    )


def environment(args: argparse.Namespace) -> dict:
    cores = os.cpu_count()
    return {
        "machine": f"{cpu_model()}, {cores} cores",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": checkout(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "note": args.note,
    }


def same_weights(config: TCNConfig) -> tuple[TCN, torch.nn.Module | None]:
    """Our TCN and pytorch-tcn's (when installed) computing the same function."""
    try:
        import pytorch_tcn
    except ImportError:
        return TCN(config).fold_weight_norm().eval(), None
    from model.convert import convert_pytorch_tcn

    theirs = pytorch_tcn_like(pytorch_tcn, config)
    return convert_pytorch_tcn(theirs).eval(), theirs


def warm_stream(net: TCN, n: int, step_kernel: str = "auto") -> tuple[StreamPool, np.ndarray]:
    """A pool of n streams past the receptive field, at different ring positions."""
    source = StreamPool(net, 4)
    states = []
    for extra in (0, 97, 1234, 2900):
        slot = source.open()
        source.push(slot, torch.randn(net.receptive_field + extra, net.config.in_channels))
        states.append(source.export_state(slot))
    pool = StreamPool(net, n, step_kernel=step_kernel)
    slots = [pool.import_state(states[i % 4]) for i in range(n)]
    return pool, np.random.default_rng(0).permutation(np.asarray(slots, dtype=np.int64))


def continual_available() -> bool:
    try:
        import continual  # noqa: F401  (continual-inference)
    except ImportError:
        return False
    return True


# ----- receptive field -------------------------------------------------------------------------


def measure_receptive_field(args: argparse.Namespace) -> dict:
    blocks = (2, 5, 8) if args.quick else (2, 3, 4, 5, 6, 7, 8)
    timer = Timer(torch.device("cpu"), args.min_time, args.runs)
    points = []
    for b in blocks:
        config = TCNConfig(in_channels=4, channels=(64,) * b, kernel_size=7, out_channels=3)
        net, theirs = same_weights(config)
        pool, slots = warm_stream(net, 1)
        x = torch.randn(1, 4)
        window = torch.randn(1, 4, config.receptive_field)
        cases = {
            "ours": lambda pool=pool, slots=slots, x=x: pool.step(slots, x),
            "recompute": lambda net=net, window=window: net(window)[:, :, -1],
        }
        if theirs is not None:
            theirs(torch.randn(1, 4, config.receptive_field + 10), inference=True)
            cases["pytorch-tcn"] = lambda theirs=theirs, x=x: theirs(x[:, :, None], inference=True)
        timings = timer.measure(cases)
        point = {"blocks": b, "receptive_field": config.receptive_field}
        point.update({name: t.median for name, t in timings.items()})
        points.append(point)
        print(point, flush=True)
    missing = [] if continual_available() else ["continual-inference (not installed)"]
    return {"plot": "receptive-field", "points": points, "missing": missing}


def plot_receptive_field(data: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = data["points"]
    rf = [p["receptive_field"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {
        "ours": ("tcnserve StreamPool.step", "o-", "C0"),
        "pytorch-tcn": ("pytorch-tcn 1.2.3 streaming (inference=True)", "s-", "C1"),
        "continual": ("continual-inference", "^-", "C2"),
        "recompute": ("window recompute (TCN.forward over R inputs)", "x--", "C3"),
    }
    for key, (label, style, color) in styles.items():
        if all(key in p for p in points):
            ax.plot(rf, [p[key] * 1e6 for p in points], style, color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("receptive field R (inputs), kernel 7, 64 channels, 2-8 blocks")
    ax.set_ylabel("latency of one step, one stream (us, median)")
    ax.set_title("Per-step latency vs receptive field (N = 1, CPU, float32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    notes = footer(meta)
    if data.get("missing"):
        notes += "\nnot measured: " + ", ".join(data["missing"])
    fig.text(0.01, 0.01, notes, fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- streams ---------------------------------------------------------------------------------


def measure_streams(args: argparse.Namespace) -> dict:
    ns = (1, 16, 256) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    timer = Timer(torch.device("cpu"), args.min_time, args.runs)
    net, theirs = same_weights(R1)
    theirs_s = None
    if theirs is not None:
        theirs(torch.randn(1, 4, R1.receptive_field + 10), inference=True)
        x1 = torch.randn(1, 4, 1)
        theirs_s = timer.measure({"t": lambda: theirs(x1, inference=True)})["t"].median
    points = []
    for n in ns:
        pool, slots = warm_stream(net, n)
        x = torch.randn(n, 4)
        cases = {
            "ours": lambda pool=pool, slots=slots, x=x: pool.step(slots, x),
            "floor": MatmulFloor(net, n, torch.device("cpu"), torch.float32),
        }
        kernel, plain = pool.kernel_for(n), None
        if kernel == "blas":  # as bench/model_step.py: the torch kernel and the memory floor
            plain, _ = warm_stream(net, n, step_kernel="torch")
            cases.update(beside_blas(pool, plain, slots, x))
        timings = timer.measure(cases)
        point = {"n": n, "kernel": kernel}
        point.update({name: timing.median / n for name, timing in timings.items()})
        points.append(point)
        print(point, flush=True)
        del pool, plain, cases
    return {"plot": "streams", "points": points, "pytorch_tcn_per_step": theirs_s}


def kernel_spans(points: list[dict]) -> str:
    """Which kernel ours ran at which N, e.g. "fused N = 1-16, blas N = 32-1024"."""
    spans: list[list] = []
    for p in points:
        kernel = p.get("kernel", "?")
        if spans and spans[-1][0] == kernel:
            spans[-1][2] = p["n"]
        else:
            spans.append([kernel, p["n"], p["n"]])
    return ", ".join(f"{k} N = {lo}" + (f"-{hi}" if hi != lo else "") for k, lo, hi in spans)


def plot_streams(data: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = data["points"]
    ns = [p["n"] for p in points]
    ours = np.array([p["ours"] for p in points]) * 1e6
    floor = np.array([p["floor"] for p in points]) * 1e6
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(ns, ours, "o-", color="C0", label="tcnserve StreamPool.step, per stream")
    ax.plot(ns, floor, "s--", color="C7", label="GEMM floor: the step's matmuls alone, per stream")
    blas = [p for p in points if "torch kernel" in p]  # N where the pool takes "blas"
    if blas:
        at = [p["n"] for p in blas]
        ax.plot(at, [p["torch kernel"] * 1e6 for p in blas], "x:", color="C3",
                label="the same step through torch ops alone (step_kernel='torch')")  # fmt: skip
        ax.plot(at, [(p["floor"] + p["ring floor"]) * 1e6 for p in blas], "^-.", color="C2",
                label="GEMM floor + ring-read floor (memory alone), no overlap")  # fmt: skip
    if data.get("pytorch_tcn_per_step"):
        ax.axhline(
            data["pytorch_tcn_per_step"] * 1e6,
            color="C1",
            linestyle=":",
            label="pytorch-tcn 1.2.3 streaming, one stream (batch 1 only)",
        )
    for n, o, f in zip(ns, ours, floor, strict=True):  # under the floor: nothing is drawn there
        ax.annotate(f"{o / f:.2f}x", (n, f), textcoords="offset points", xytext=(0, -12),
                    ha="center", fontsize=7)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("streams advanced per step call (N)")
    ax.set_ylabel("cost per stream-step (us, median)")
    ax.set_title("Per-stream step cost vs N against the GEMM floor (R1, CPU, float32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.text(
        0.01,
        0.01,
        footer(meta)
        + f"\nlabels (under the floor): ours / floor at that N; kernels: {kernel_spans(points)}. "
        "R1: in 4, 8 x 64, kernel 7, R = 3,061",
        fontsize=6.5,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = {
    "receptive-field": ("step_vs_receptive_field", measure_receptive_field, plot_receptive_field),
    "streams": ("step_vs_streams", measure_streams, plot_streams),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plot", choices=sorted(PLOTS))
    parser.add_argument("--quick", action="store_true", help="few points, short runs")
    parser.add_argument("--from-json", type=Path, help="redraw from saved results, no timing")
    parser.add_argument(
        "--out", type=Path, default=OUT, help="folder for the PNG (docs/benchmarks)"
    )
    parser.add_argument("--min-time", type=float, help="seconds per timed run (0.1; quick 0.02)")
    parser.add_argument("--runs", type=int, help="timed runs per case (5; quick 2)")
    parser.add_argument(
        "--note",
        default="shared machine: ratios from one run are what to trust",
        help="printed in the footer (say whether the machine was quiet)",
    )
    args = parser.parse_args(argv)
    args.min_time = args.min_time or (0.02 if args.quick else 0.1)
    args.runs = args.runs or (2 if args.quick else 5)
    name, measure, draw = PLOTS[args.plot]
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        data, meta = saved["data"], saved["meta"]
    else:
        torch.set_num_threads(1)
        meta = environment(args)
        with torch.inference_mode():
            data = measure(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved_at = RESULTS / f"{name}.json"
        saved_at.write_text(json.dumps({"meta": meta, "data": data}, indent=1) + "\n")
        print(f"results: {saved_at.relative_to(ROOT)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.png"
    draw(data, meta, path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
