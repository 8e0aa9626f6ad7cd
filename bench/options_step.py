"""The cost of each model option: the R1 step (in 4, 8 x 64, kernel 7, out 3) of N streams with
every block activation tcnserve serves, with skip connections, with gates too, with layer
norms too, and with a per-stream embedding (16 values, added, or concatenated: folded into the
first conv, or after a layer norm one more matmul per block), side by side in one run, as a
ratio to the plain ReLU model's.

One torch thread; N = 1 (the fused kernel), 16 (fused), 256 ("blas": compiled gathers, torch's
GEMM); best of `--repeats`. (Batch-normed pytorch-tcn models are folded into their convs at
conversion, so they cost what the same model without the norm costs.)

Run: python bench/options_step.py [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._harness import best_us, environment, write_results
from model import TCN, StreamPool, TCNConfig
from model.config import ACTIVATIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(environment())
    sizes = (1, 16, 256)
    print(f"R1 step per call, one torch thread, best of {args.repeats}\n")
    print(f"{'option':<20}" + "".join(f"{f'N={n}':>22}" for n in sizes))
    results, relu = [], {}
    rng = np.random.default_rng(0)
    options = [*((a, False, False, False, None) for a in ACTIVATIONS)]
    options += [("relu", True, False, False, None), ("relu", True, True, False, None)]
    options += [("relu", True, True, True, None), ("relu", False, False, False, "add")]
    options += [("relu", False, False, False, "concat"), ("relu", False, False, True, "concat")]
    for act, skips, gate, norm, embedding in options:
        torch.manual_seed(0)
        config = TCNConfig(
            4, [64] * 8, kernel_size=7, out_channels=3, activation=act, skip_connections=skips,
            gate=gate, layer_norm=norm, embedding_dims=[16] if embedding else None,
            embedding_mode=embedding or "add",
        )  # fmt: skip
        pool = StreamPool(TCN(config).eval(), max(sizes))
        e = rng.standard_normal(16).astype(np.float32) if embedding else None
        slots = np.array([pool.open(embedding=e) for _ in range(max(sizes))])
        row = {"activation": act, "skip_connections": skips, "gate": gate, "layer_norm": norm,
               "embedding": embedding}  # fmt: skip
        cells = []
        for n in sizes:
            x = rng.standard_normal((n, 4)).astype(np.float32)
            step = pool.step
            us = best_us(lambda s=slots[:n], x=x, f=step: f(s, x), args.repeats, 200 // n + 3)
            relu.setdefault(n, us)
            row[f"n{n}_us"] = us
            cells.append(f"{us:>9.1f} us ({us / relu[n]:.2f}x)")
        results.append(row)
        name = (
            act + ("+skips" if skips else "") + ("+gate" if gate else "") + ("+ln" if norm else "")
        ) + (f"+emb:{embedding}" if embedding else "")
        print(f"{name:<20}" + "".join(f"{c:>22}" for c in cells))
    if args.json:
        write_results(args.json, "options_step", results)


if __name__ == "__main__":
    main()
