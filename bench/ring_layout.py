"""Ring-buffer layouts for a large CPU step, side by side in one run, against the GEMM floor.

Reference config R1's convs (8 blocks x 64 channels, kernel 7, dilations 1..128), N streams at
scattered ring positions, one torch thread, the torch step's ops (ring write, tap gather, addmm
with ReLU, residual). Only the ring layout differs between the cases:

  time-major (the pool's): per slot L = (k-1)d + 1 rows in time order; taps are k rows d apart.
  phase-grouped: per slot and phase t mod d, the k-1 past rows of that phase side by side, one
      (k-1)*C run: one gather of a contiguous run, then the run shifted by a row and written back.
  tap-contiguous: per slot and phase, k rows in a circle, so the k taps are k adjacent rows (in
      rotated order, gathered row by row); k/(k-1) more memory.
  GEMM floor: the 16 addmm+ReLU alone on preallocated, cache-hot operands.

The layouts were proposed to cut the cold-row gathers that keep the step above the floor
(docs/step_engine.md); this is the measurement that decided against them.
Run: python bench/ring_layout.py [--streams 256] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

C, K, DILATIONS = 64, 7, tuple(2**i for i in range(8))
addmm_relu = torch._addmm_activation


class Case:
    """One layout: `step()` advances all N streams by one timestep."""

    def __init__(self, n: int, rows_per_slot, row_width: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.n = n
        self.weights = [
            (torch.randn(K * C, C, generator=gen) * 0.05, torch.randn(C, generator=gen) * 0.01)
            for _ in range(2 * len(DILATIONS))
        ]
        self.rings = [
            torch.randn(n * rows_per_slot(d), row_width, generator=gen)
            for d in DILATIONS
            for _ in range(2)
        ]
        rng = np.random.default_rng(seed)
        self.slots = rng.permutation(n).astype(np.int64)  # streams in no particular slot order
        self.pos = rng.integers(0, 100_000, n).astype(np.int64)
        self.x = torch.randn(n, C, generator=gen)

    def conv(self, i: int, gathered: torch.Tensor) -> torch.Tensor:
        w, b = self.weights[i]
        return addmm_relu(b, gathered, w)


class RowTaps(Case):
    """A layout whose k taps are k rows of C values, wherever `tap_rows` puts them: a step
    writes time t's row (the newest tap), gathers the k rows, and multiplies."""

    def tap_rows(self, d: int) -> torch.Tensor:  # (N, k) ring rows, oldest first
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        h, n = self.x, self.n
        for b, d in enumerate(DILATIONS):
            taps = self.tap_rows(d)
            now = taps[:, -1].contiguous()
            r1, r2 = self.rings[2 * b], self.rings[2 * b + 1]
            r1.index_copy_(0, now, h)
            a = self.conv(2 * b, F.embedding(taps, r1).view(n, -1))
            r2.index_copy_(0, now, a)
            a = self.conv(2 * b + 1, F.embedding(taps, r2).view(n, -1))
            h = a.add_(h).relu_()
        self.pos += 1
        return h


class TimeMajor(RowTaps):
    def __init__(self, n: int, seed: int):
        super().__init__(n, lambda d: (K - 1) * d + 1, C, seed)

    def tap_rows(self, d: int) -> torch.Tensor:
        length = (K - 1) * d + 1
        times = self.pos[:, None] - d * np.arange(K - 1, -1, -1)
        return torch.from_numpy(times % length + self.slots[:, None] * length)


class PhaseGrouped(Case):
    def __init__(self, n: int, seed: int):
        super().__init__(n, lambda d: d, (K - 1) * C, seed)

    def step(self) -> torch.Tensor:
        h = self.x
        for b, d in enumerate(DILATIONS):
            group = torch.from_numpy(self.pos % d + self.slots * d)
            r1, r2 = self.rings[2 * b], self.rings[2 * b + 1]
            run = torch.cat([F.embedding(group, r1), h], 1)  # the k taps, oldest first
            a = self.conv(2 * b, run)
            r1.index_copy_(0, group, run[:, C:])  # shifted by a row: the oldest drops out
            run = torch.cat([F.embedding(group, r2), a], 1)
            a = self.conv(2 * b + 1, run)
            r2.index_copy_(0, group, run[:, C:])
            h = a.add_(h).relu_()
        self.pos += 1
        return h


class TapContiguous(RowTaps):
    def __init__(self, n: int, seed: int):
        super().__init__(n, lambda d: d * K, C, seed)

    def tap_rows(self, d: int) -> torch.Tensor:
        times = self.pos[:, None] - d * np.arange(K - 1, -1, -1)  # (N, k), oldest first
        return torch.from_numpy((self.slots[:, None] * d + times % d) * K + (times // d) % K)


class Floor(Case):
    def __init__(self, n: int, seed: int):
        super().__init__(n, lambda d: 1, C, seed)
        self.operands = [torch.randn(n, K * C) for _ in self.weights]

    def step(self) -> None:
        for i, a in enumerate(self.operands):
            self.conv(i, a)


def check_same_outputs(steps: int = 900) -> float:
    """The three layouts compute the same steps: from zero rings (the left padding), past the
    wrap of the largest ring, the largest difference of their outputs."""
    layouts = [TimeMajor(4, 1), PhaseGrouped(4, 1), TapContiguous(4, 1)]
    for case in layouts:
        for ring in case.rings:
            ring.zero_()
    worst = 0.0
    for t in range(steps):
        outs = []
        for case in layouts:
            case.x = torch.full((4, C), 0.01 * (t % 7))
            outs.append(case.step().clone())
        worst = max(worst, *(float((o - outs[0]).abs().max()) for o in outs[1:]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="steps per timed run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {
        "time-major (the pool's)": TimeMajor(args.streams, 0),
        "phase-grouped": PhaseGrouped(args.streams, 0),
        "tap-contiguous": TapContiguous(args.streams, 0),
        "GEMM floor": Floor(args.streams, 0),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():
        case.step()
    for _ in range(args.repeats):  # interleaved, so a change in load hits every case alike
        for name, case in cases.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                case.step()
            times[name].append((time.perf_counter() - start) / args.calls)
    floor = statistics.median(times["GEMM floor"])
    print(f"the layouts' outputs agree within {check_same_outputs():.1e} over 900 steps")
    print(f"R1 convs, N = {args.streams}, one torch thread, medians of {args.repeats} runs")
    print(f"{'layout':<26}{'ms/step':>9}{'us/stream':>11}{'x floor':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<26}{median * 1e3:>9.3f}{median / args.streams * 1e6:>11.2f}"
              f"{median / floor:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
