"""bf16 against float32 for the built-in model: how far a bfloat16 StreamPool's outputs drift.

    python scripts/bf16_error.py [--model DIR] [--steps 4000] [--streams 4]

Streams random inputs (adding-problem style: values in [0, 1) and a 0/1 marker channel, as
the built-in model was trained on, or standard normal with --normal) through a float32 and a
bfloat16 StreamPool of the same model on the CPU, and through a float64 full forward, and
prints the max and 99.9th-percentile |error| and the output scale. The CUDA tests' bf16
tolerance (tests/model/test_streaming_cuda.py) comes from this; docs/streaming.md records it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import StreamPool, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "service" / "default_model")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--normal", action="store_true", help="standard-normal inputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = load_model(args.model)
    cfg = net.config
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.streams, cfg.in_channels, args.steps)
    if args.normal:
        x = torch.randn(shape, generator=gen)
    else:
        x = torch.rand(shape, generator=gen)
        if cfg.in_channels > 1:
            x[:, 1] = (torch.rand(args.streams, args.steps, generator=gen) < 0.01).float()
    with torch.no_grad():
        reference = net.double()(x.double()).float()  # (B, out, T)
        net = net.float()
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        pool = StreamPool(net, args.streams, dtype=dtype)
        slots = np.array([pool.open() for _ in range(args.streams)])
        rows = [pool.step(slots, x[:, :, t].to(dtype)).float() for t in range(args.steps)]
        got[dtype] = torch.stack(rows, dim=-1)  # (B, out, T)
    scale = reference.abs().max().item()
    print(
        f"model {args.model.name}: receptive field {cfg.receptive_field}, {args.streams} streams "
        f"x {args.steps} steps, {'normal' if args.normal else 'adding-problem'} inputs; "
        f"max |output| {scale:.3g}"
    )
    for dtype, y in got.items():
        err = (y - reference).abs()
        print(
            f"{str(dtype).removeprefix('torch.'):>9} step vs float64 forward: max |err| "
            f"{err.max().item():.3g}, p99.9 {err.flatten().quantile(0.999).item():.3g}, "
            f"max relative to max |output| {err.max().item() / scale:.3g}"
        )


if __name__ == "__main__":
    main()
