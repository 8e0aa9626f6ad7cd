"""Streaming step cost of StreamPool against the alternatives, side by side in one run.

Reference config R1: in 4, 8 blocks x 64 channels, kernel 7, head 3 (receptive field 3,061),
float32. Compares StreamPool.step (N streams per call) with recomputing the receptive window by
TCN.forward, pytorch-tcn 1.2.3's batch-1 streaming mode and the bare per-step matmuls; where the
step runs the "blas" kernel, also with the same step through torch ops alone and with a read of
the ring rows the step touches (the ring-read floor); on CUDA, with the step as CUDA graphs; and
StreamPool.push of a chunk with TCN.forward over the same rows. Prints one table; see
bench/README.md for the rows and columns. Run: python bench/model_step.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Measure the working tree's model/, whether or not (and however) tcnserve is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import TCN, StreamPool, TCNConfig, fused_step

R1 = TCNConfig(in_channels=4, channels=(64,) * 8, kernel_size=7, out_channels=3)
TEMPLATE_EXTRA_STEPS = (0, 97, 1234, 2900)  # streams sit at different ring positions

# Targets (issue 2's first pass, raised by issue 10): (ratio name, N): (comparison, bound).
TARGETS = {
    ("recompute/ours", 1): (">=", 100.0),
    ("pytorch-tcn/ours", 1): (">=", 30.0),
    ("ours/floor", 256): ("<=", 1.5),
}


# ----- timing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of `runs` timed runs of `calls` calls each."""

    median: float
    low: float
    high: float
    calls: int
    runs: int

    @property
    def spread(self) -> float:
        return (self.high - self.low) / self.median

    def scaled(self, factor: float) -> Timing:
        return Timing(
            self.median * factor, self.low * factor, self.high * factor, self.calls, self.runs
        )


class Timer:
    """Median of timed runs, each at least `min_time` long, of cases measured interleaved.

    The cases being compared take turns run by run, so a change in machine load hits them
    alike and their ratios hold up better than their absolute times.
    """

    def __init__(self, device: torch.device, min_time: float, runs: int):
        self.device = device
        self.min_time = min_time
        self.runs = runs

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[], object], calls: int) -> float:
        """Seconds per call over `calls` back-to-back calls."""
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()  # around the run, not per call: a step never waits on the device
        return (time.perf_counter() - start) / calls

    def warm_up(self, fn: Callable[[], object]) -> tuple[int, int]:
        """Calls per run and runs for `fn`, after warming it up."""
        self.run(fn, 1)  # first call: lazy allocations, caches, kernel selection
        estimate = self.run(fn, 1)
        calls = max(1, math.ceil(self.min_time / estimate))
        if calls > 1:  # a cheap call: one more run's worth of warm-up
            self.run(fn, calls)
        return calls, (min(self.runs, 3) if estimate > 1.0 else self.runs)

    def measure(self, cases: dict[str, Callable[[], object]]) -> dict[str, Timing]:
        gc.collect()
        plans = {name: self.warm_up(fn) for name, fn in cases.items()}
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for turn in range(max(runs for _, runs in plans.values())):
            for name, fn in cases.items():
                calls, runs = plans[name]
                if turn < runs:
                    samples[name].append(self.run(fn, calls))
        return {
            name: Timing(statistics.median(s), min(s), max(s), plans[name][0], len(s))
            for name, s in samples.items()
        }


# ----- the contenders --------------------------------------------------------------------------


class MatmulFloor:
    """The per-step GEMMs alone on preallocated operands: no gather, scatter or activation."""

    def __init__(self, net: TCN, n: int, device: torch.device, dtype: torch.dtype):
        k = net.config.kernel_size

        def gemm(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
            weight = weight.detach().to(device, dtype).contiguous()  # (K, C_out)
            operand = torch.randn(n, weight.shape[0], device=device, dtype=dtype)  # (N, K)
            out = torch.empty(n, weight.shape[1], device=device, dtype=dtype)
            return bias.detach().to(device, dtype), operand, weight, out

        self.gemms = []
        for block in net.blocks:
            for conv in (block.conv1, block.conv2):
                c_out, c_in, _ = conv.weight.shape
                # (C_out, C_in, k) -> (k * C_in, C_out), taps oldest first as a step stacks them
                weight = conv.weight.permute(2, 1, 0).reshape(k * c_in, c_out)
                self.gemms.append(gemm(weight, conv.bias))
            if block.downsample is not None:
                self.gemms.append(gemm(block.downsample.weight[:, :, 0].T, block.downsample.bias))
        if net.head is not None:
            self.gemms.append(gemm(net.head.weight.T, net.head.bias))

    def __call__(self) -> None:
        for bias, operand, weight, out in self.gemms:
            torch.addmm(bias, operand, weight, out=out)


class RingReadFloor:
    """One load from every 64-byte line of the ring rows a step of these streams touches (per
    conv and stream, its k taps; the newest is the row the step writes), compiled, with the
    rows of the stream PREFETCH_AHEAD places on asked for first as the pool's gather does, the
    positions moving on one step per call: a step's memory traffic without its copies or
    arithmetic. Its own rings of the pool's shape (same bytes, pages faulted in), so the cache
    sees what a step's does. With the matmul floor, it bounds any step that does not overlap
    memory with compute."""

    def __init__(
        self,
        config: TCNConfig,
        dtype: torch.dtype,
        capacity: int,
        slots: np.ndarray,
        positions: np.ndarray,
    ):
        import numba  # the pool's compiled kernels need it too; no numba, no row

        self.touch = numba.njit(nogil=True)(_touch_rows)
        k = config.kernel_size
        widths = (config.in_channels, *config.channels)
        self.layers = []
        for block, dilation in enumerate(config.dilations):
            for c_in in (widths[block], widths[block + 1]):
                ring_len = (k - 1) * dilation + 1
                # torch's allocator, as the pool's: rows start where its rows do on cache lines
                ring = torch.ones(capacity * ring_len, c_in, dtype=dtype).numpy()
                self.layers.append((ring, ring_len, dilation))
        self.k = k
        self.ahead = fused_step.PREFETCH_AHEAD
        self.slots = slots.astype(np.int64)
        self.positions = positions.astype(np.int64)

    def __call__(self) -> float:
        total = 0.0
        for ring, ring_len, dilation in self.layers:
            total += self.touch(
                ring, ring_len, dilation, self.k, self.slots, self.positions, self.ahead
            )
        self.positions += 1
        return total


def beside_blas(
    pool: StreamPool, plain: StreamPool, slots: np.ndarray, x: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """What to time beside a "blas" step of `slots`: "torch kernel", the same step on `plain`
    (a step_kernel="torch" pool of the same streams), and "ring floor" (RingReadFloor)."""
    positions = np.array([pool.position(int(slot)) for slot in slots])
    return {
        "torch kernel": lambda: plain.step(slots, x),
        "ring floor": RingReadFloor(pool.config, pool.dtype, pool.capacity, slots, positions),
    }


def _touch_rows(ring, ring_len, dilation, k, slots, positions, ahead):  # see RingReadFloor
    total = 0.0
    n, c = slots.shape[0], ring.shape[1]
    per_line = 64 // ring.itemsize
    for s in range(n):
        if s + ahead < n:
            later = slots[s + ahead] * ring_len
            then = positions[s + ahead] % ring_len
            fused_step.prefetch_taps(ring, later, then, ring_len, dilation, k, c)
        base = slots[s] * ring_len
        now = positions[s] % ring_len
        for j in range(k):
            row = now - j * dilation
            if row < 0:
                row += ring_len
            for q in range(0, c, per_line):
                total += ring[base + row, q]
            total += ring[base + row, c - 1]  # the last line, where a row does not start on one
    return total


def same_weight_models() -> tuple[TCN, torch.nn.Module | None, str]:
    """Our folded TCN and pytorch-tcn's on the same random weights, and where ours came from.

    Ours is built from pytorch-tcn's state_dict by model.convert when that works, else by
    copying its effective (weight-normed) weights here; without pytorch-tcn, ours is random.
    """
    try:
        import pytorch_tcn
    except ImportError:
        return TCN(R1).fold_weight_norm().eval(), None, "random (pytorch-tcn not installed)"
    theirs = pytorch_tcn_like(pytorch_tcn, R1)
    try:
        from model.convert import convert_pytorch_tcn

        net, source = convert_pytorch_tcn(theirs), "model.convert"
        if net.config != R1:
            raise ValueError(f"model.convert built {net.config}, not R1")
    except Exception:  # an absent or unfinished converter must not stop the benchmark
        net, source = copy_pytorch_tcn_weights(theirs), "copied by the bench"
    x = torch.randn(1, R1.in_channels, 500)
    diff = (net(x) - theirs(x)).abs().max().item()
    return net.eval(), theirs, f"pytorch-tcn's init, {source} (forward max|diff| {diff:.1e})"


def pytorch_tcn_like(pytorch_tcn: Any, config: TCNConfig) -> torch.nn.Module:
    """A causal pytorch-tcn TCN (default options, its own random init) shaped like `config`."""
    return pytorch_tcn.TCN(
        config.in_channels,
        list(config.channels),
        kernel_size=config.kernel_size,
        causal=True,
        output_projection=config.out_channels,
    ).eval()


def copy_pytorch_tcn_weights(theirs: torch.nn.Module) -> TCN:
    """An R1 TCN holding a default-options pytorch-tcn TCN's effective weights."""
    net = TCN(R1).fold_weight_norm()
    with torch.no_grad():
        for ours, block in zip(net.blocks, theirs.network, strict=True):
            for mine, their in ((ours.conv1, block.conv1), (ours.conv2, block.conv2)):
                mine.weight.copy_(their.weight)  # their .weight applies weight norm
                mine.bias.copy_(their.bias)
            if ours.downsample is not None:
                ours.downsample.weight.copy_(block.downsample.weight)
                ours.downsample.bias.copy_(block.downsample.bias)
        net.head.weight.copy_(theirs.projection_out.weight[:, :, 0])  # 1x1 conv -> linear
        net.head.bias.copy_(theirs.projection_out.bias)
    return net


@dataclass
class Template:
    """A stream warmed past the receptive field: its inputs and its exported state."""

    history: torch.Tensor  # (T, in_channels)
    state: dict


def warm_templates(net: TCN, device: torch.device, dtype: torch.dtype) -> list[Template]:
    """A few streams pushed past the receptive field, at different ring positions."""
    pool = StreamPool(net, len(TEMPLATE_EXTRA_STEPS), device, dtype)
    templates = []
    for extra in TEMPLATE_EXTRA_STEPS:
        history = torch.randn(net.receptive_field + extra, net.config.in_channels, dtype=dtype)
        slot = pool.open()
        pool.push(slot, history)
        templates.append(Template(history, pool.export_state(slot)))
    return templates


def warm_pool(
    net: TCN,
    n: int,
    templates: list[Template],
    device: torch.device,
    dtype: torch.dtype,
    cuda_graphs: bool = False,
    step_kernel: str = "auto",
) -> tuple[StreamPool, list[int], list[Template]]:
    """A full pool of n steady-state streams (imported copies of the templates)."""
    pool = StreamPool(net, n, device, dtype, step_kernel=step_kernel, cuda_graphs=cuda_graphs)
    picks = [templates[i % len(templates)] for i in range(n)]
    slots = [pool.import_state(t.state) for t in picks]
    return pool, slots, picks


# ----- one run ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    n: str
    case: str
    per_call: Timing | None
    per_stream: Timing | None
    ratio_name: str = ""
    ratio: float | None = None
    check: float | None = None
    note: str = ""

    @classmethod
    def timed(cls, label: str, case: str, per_call: Timing, per: int, *rest: Any, **kw: Any) -> Row:
        """A row of a measured case: per call, and per stream (or row) of the `per` it did."""
        return cls(label, case, per_call, per_call.scaled(1 / per), *rest, **kw)


def recompute_window(net: TCN, history: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The step output as a window recompute gives it: the last of R forward outputs."""
    r = net.receptive_field
    window = torch.cat([history[-(r - 1) :].to(x.device), x[None]])  # (R, C_in)
    return net(window.T[None])[0, :, -1]  # (1, C_in, R) -> (out,)


def step_rows(
    args: argparse.Namespace, net: TCN, theirs: torch.nn.Module | None, templates: list[Template]
) -> list[Row]:
    """StreamPool.step at each N against window recompute, pytorch-tcn and the matmul floor."""
    device, dtype = torch.device(args.device), torch.float32
    timer = Timer(device, args.min_time, args.runs)
    rng = np.random.default_rng(args.seed)
    r, c_in = net.receptive_field, R1.in_channels
    theirs_step, theirs_check, theirs_1 = None, None, None
    if theirs is not None:
        theirs(templates[0].history.T[None].to(device), inference=True)  # same history as ours
        x1 = torch.randn(1, c_in, device=device, dtype=dtype)
        check_pool, check_slots, _ = warm_pool(net, 1, templates[:1], device, dtype)
        y_ours = check_pool.step(check_slots, x1)[0]
        theirs_check = (theirs(x1[:, :, None], inference=True)[0, :, 0] - y_ours).abs().max().item()

        def theirs_step() -> torch.Tensor:
            return theirs(x1[:, :, None], inference=True)

    rows = []
    for n in args.ns:
        pool, slot_list, picks = warm_pool(net, n, templates, device, dtype)
        order = rng.permutation(n)  # a batcher hands slots over in arrival order, not sorted
        slots = np.asarray(slot_list, dtype=np.int64)[order]
        x = torch.randn(n, c_in, device=device, dtype=dtype)
        y = pool.step(slots, x)
        check = max(
            (y[i] - recompute_window(net, picks[order[i]].history, x[i])).abs().max().item()
            for i in range(min(n, args.check_streams))
        )
        cases = {
            "ours": lambda pool=pool, slots=slots, x=x: pool.step(slots, x),
            "floor": MatmulFloor(net, n, device, dtype),
        }
        kernel, plain = pool.kernel_for(n), None
        if kernel == "blas":  # the same step through torch ops alone, and the memory floor
            plain, _, _ = warm_pool(net, n, templates, device, dtype, step_kernel="torch")
            cases.update(beside_blas(pool, plain, slots, x))
        graphed = None
        if device.type == "cuda":  # the same step as captured CUDA graphs, outputs on the host
            graphed, _, _ = warm_pool(net, n, templates, device, dtype, cuda_graphs=True)
            y_graph = graphed.step(slots, x)
            graph_check = (y_graph - y.cpu()).abs().max().item()
            cases["graphs"] = lambda graphed=graphed, slots=slots, x=x: graphed.step(slots, x)
        batch = min(n, args.recompute_batch)
        if n <= args.recompute_max_n:
            windows = torch.randn(batch, c_in, r, device=device, dtype=dtype)
            cases["recompute"] = lambda windows=windows: net(windows)[:, :, -1]
        if theirs_step is not None and theirs_1 is None:  # batch 1: the same at every N
            cases["theirs"] = theirs_step
        timings = timer.measure(cases)
        del pool, cases, graphed, plain
        theirs_1 = timings.get("theirs", theirs_1)
        ours, floor = timings["ours"], timings["floor"]
        recompute = timings["recompute"].scaled(n / batch) if "recompute" in timings else None

        label = str(n)
        rows.append(Row.timed(label, "ours StreamPool.step", ours, n, note=kernel))
        rows.append(
            Row(
                label,
                "recompute TCN.forward",
                recompute,
                recompute.scaled(1 / n) if recompute else None,
                "recompute/ours",
                recompute.median / ours.median if recompute else None,
                check,
                ("" if batch == n else f"b{batch}") if recompute else "too slow",
            )
        )
        if theirs_1 is None:
            rows.append(Row(label, "pytorch-tcn streaming", None, None, note="not installed"))
        else:
            rows.append(
                Row(
                    label,
                    "pytorch-tcn streaming",
                    theirs_1.scaled(n),
                    theirs_1,
                    "pytorch-tcn/ours",
                    theirs_1.median * n / ours.median,
                    theirs_check if n == 1 else None,
                    "" if n == 1 else "n x 1",
                )
            )
        ratio = ours.median / floor.median
        rows.append(Row.timed(label, "matmul floor", floor, n, "ours/floor", ratio))
        if "ring floor" in timings:
            torch_ops, ring = timings["torch kernel"], timings["ring floor"]
            rows.append(
                Row.timed(label, "ours, torch kernel", torch_ops, n, "torch/ours",
                          torch_ops.median / ours.median, note="step_kernel='torch'")
            )  # fmt: skip
            rows.append(
                Row.timed(label, "ring-read floor", ring, n, "(floor+ring)/floor",
                          (floor.median + ring.median) / floor.median, note="memory alone")
            )  # fmt: skip
        if "graphs" in timings:
            graphs = timings["graphs"]
            rows.append(
                Row.timed(label, "ours, CUDA graphs", graphs, n, "graphs/floor",
                          graphs.median / floor.median, graph_check, "vs eager step")
            )  # fmt: skip
    return rows


def push_rows(args: argparse.Namespace, net: TCN) -> list[Row]:
    """StreamPool.push of one stream's chunks against TCN.forward over the same rows."""
    device, dtype = torch.device(args.device), torch.float32
    timer = Timer(device, args.min_time, args.runs)
    rows = []
    for t in args.chunks:
        pool = StreamPool(net, 1, device, dtype)
        slot = pool.open()
        chunk = torch.randn(t, R1.in_channels, device=device, dtype=dtype)
        full = net(chunk.T[None])  # (1, out, T): no history, so push of a fresh stream equals it
        check = (pool.push(slot, chunk) - full[0].T).abs().max().item()
        timings = timer.measure(
            {
                "push": lambda pool=pool, slot=slot, chunk=chunk: pool.push(slot, chunk),
                "forward": lambda chunk=chunk: net(chunk.T[None]),
            }
        )
        push, forward = timings["push"], timings["forward"]
        label = f"T={t}"
        rows.append(Row.timed(label, "ours StreamPool.push", push, t, check=check))
        ratio = push.median / forward.median
        rows.append(Row.timed(label, "TCN.forward, no history", forward, t, "push/forward", ratio))
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    device, dtype = torch.device(args.device), torch.float32
    torch.manual_seed(args.seed)
    net, theirs, args.weights = same_weight_models()
    net = net.to(device, dtype)
    if theirs is not None:
        theirs = theirs.to(device, dtype)
    templates = warm_templates(net, device, dtype)
    return step_rows(args, net, theirs, templates) + push_rows(args, net)


# ----- report ----------------------------------------------------------------------------------


def seconds(value: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def rate(per_item: float) -> str:
    value = 1.0 / per_item
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def ratio(value: float) -> str:
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def target_cells(row: Row) -> tuple[str, str]:
    n = int(row.n) if row.n.isdigit() else None
    goal = TARGETS.get((row.ratio_name, n))
    if goal is None or row.ratio is None:
        return "", ""
    op, bound = goal
    met = row.ratio >= bound if op == ">=" else row.ratio <= bound
    return f"{op} {bound:g}x", "pass" if met else "MISS"


def table(rows: list[Row]) -> str:
    header = (
        "N",
        "case",
        "per call",
        "per stream",
        "steps/s",
        "spread",
        "ratio",
        "",
        "target",
        "",
        "max|diff|",
        "note",
    )
    lines = [header]
    for row in rows:
        goal, status = target_cells(row)
        lines.append(
            (
                row.n,
                row.case,
                seconds(row.per_call.median) if row.per_call else "n/a",
                seconds(row.per_stream.median) if row.per_stream else "n/a",
                rate(row.per_stream.median) if row.per_stream else "",
                f"{row.per_call.spread:.0%}" if row.per_call else "",
                row.ratio_name,
                ratio(row.ratio) if row.ratio is not None else "",
                goal,
                status,
                f"{row.check:.1e}" if row.check is not None else "",
                row.note,
            )
        )
    right = {2, 3, 4, 5, 7}
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def checkout() -> str:
    """The commit measured, marked dirty when model/ differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "model"], cwd=root, capture_output=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit}{' (model/ modified)' if dirty else ''}" if commit else "unknown"


def report(args: argparse.Namespace, rows: list[Row]) -> str:
    device = torch.device(args.device)
    where = cpu_model()
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (host {where})"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    r = R1.receptive_field
    return "\n".join(
        [
            f"command: python bench/model_step.py {' '.join(sys.argv[1:])}".rstrip(),
            f"torch {torch.__version__} | {args.device} | threads {torch.get_num_threads()} | "
            f"{where} | {now} | checkout {checkout()}"
            + (" | QUICK: smoke run, numbers meaningless" if args.quick else ""),
            f"R1: in {R1.in_channels}, {R1.num_blocks} blocks x {R1.channels[0]} channels, "
            f"kernel {R1.kernel_size}, head {R1.out_channels}, receptive field {r:,}, float32",
            f"weights: {args.weights}",
            f"timing: median of {args.runs} runs of >= {args.min_time:g} s (cases slower than "
            "1 s per call: 3 runs of 1 call), the cases of one N interleaved run by run",
            "",
            table(rows),
            "",
            "ours: StreamPool.step on all N slots of a capacity-N pool, streams past the "
            "receptive field at mixed ring positions, slots in shuffled order; its note names "
            "the kernel (pool.kernel_for(N)).",
            "torch kernel (where ours is 'blas'): the same step with step_kernel='torch' "
            "(index_copy_ and embedding where 'blas' runs its compiled ring gathers).",
            "ring-read floor (there too): one load per 64-byte line of every ring row the step "
            "touches, compiled, on rings of the same shape; (floor+ring)/floor is the least "
            "multiple of the matmul floor a step reaches without overlapping memory and "
            "arithmetic.",
            f"recompute: TCN.forward over (N, {R1.in_channels}, {r:,}), last output kept; "
            f"'bK' = timed on a batch of K windows and scaled to N; "
            f"'too slow' = not measured above N = {args.recompute_max_n}.",
            "pytorch-tcn: 1.2.3 TCN(..., causal=True), model(x (1, 4, 1), inference=True); "
            "batch 1 only, so 'n x 1' rows are N x the measured single-stream time.",
            "matmul floor: the step's addmms alone (16 convs as (N, k*C_in) x (k*C_in, C_out), "
            "1x1 downsample, head) on preallocated operands; a lower bound for any step.",
            "push: one stream, chunks of T rows back to back, against TCN.forward over T rows.",
            "ratios use per-stream medians from this run; spread = (slowest - fastest run) / "
            "median.",
            f"max|diff|: ours vs the window recompute on {args.check_streams} of the N streams "
            "(checked even where not timed), vs pytorch-tcn's streaming output on the same "
            "history, and vs TCN.forward for a fresh stream's first chunk.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny repetition counts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--min-time", type=float, help="seconds per timed run (0.2)")
    parser.add_argument("--runs", type=int, help="timed runs per case, median reported (5)")
    parser.add_argument(
        "--recompute-max-n", type=int, default=64, help="largest N to recompute at (64)"
    )
    parser.add_argument(
        "--recompute-batch", type=int, help="windows per recompute call; scaled to N (N)"
    )
    parser.add_argument("--check-streams", type=int, default=4, help="streams checked per N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.min_time is None:
        args.min_time = 0.01 if args.quick else 0.2
    if args.runs is None:
        args.runs = 2 if args.quick else 5
    if args.recompute_batch is None:
        args.recompute_batch = 4 if args.quick else max(args.ns)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        rows = run(args)
    print(report(args, rows))


if __name__ == "__main__":
    main()
