"""Pushes of a few rows: StreamPool.advance (a ragged batch) against single-row steps and the
chunked push, side by side in one run, on the reference config R1 (in 4, 8 x 64, kernel 7).

Cases: one stream pushing T = 1 ... 400 rows as T steps, one advance (the ragged batch), one
`push` (the public call: a step for one row, the ragged advance up to CHUNKED_PUSH_ROWS, the
chunked conv beyond) and the chunked conv itself (one conv per layer over the window), so the
crossing that CHUNKED_PUSH_ROWS stands for is seen; 64 streams x 10 rows (ten 64-stream steps vs
one advance); 64 streams with 1-19 rows each (ragged).
Targets: a 10-row push <= 0.5x ten steps; 64 x 10 <= 1.5x ten steps.

Run: python bench/ragged_push.py [--repeats 5]
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
from model.streaming import CHUNKED_PUSH_ROWS

R1 = TCNConfig(in_channels=4, channels=[64] * 8, kernel_size=7, out_channels=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args()
    results: list[dict] = []
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(environment())
    print(f"reference config R1, receptive field {R1.receptive_field}, one torch thread, best of "
          f"{args.repeats}")  # fmt: skip
    net = TCN(R1).eval()
    pool = StreamPool(net, 128)
    slots = np.array([pool.open() for _ in range(64)])
    rng = np.random.default_rng(0)
    one = slots[:1]
    x1 = rng.standard_normal((1, 4)).astype(np.float32)
    print(f"chunked push from {CHUNKED_PUSH_ROWS + 1} rows (CHUNKED_PUSH_ROWS)")
    print(f"\n{'case':<34} {'steps':>10} {'advance':>10} {'push':>10} {'chunk':>10} "
          f"{'push/steps':>11}")  # fmt: skip
    for t in (1, 10, 100, 200, 400):
        xt = rng.standard_normal((t, 4)).astype(np.float32)
        steps = best_us(lambda t=t: [pool.step(one, x1) for _ in range(t)], args.repeats, 3)
        adv = best_us(lambda xt=xt, t=t: pool.advance(one, xt, [t]), args.repeats, 3)
        push = best_us(lambda xt=xt: pool.push(int(one[0]), xt), args.repeats, 3)
        conv = best_us(lambda xt=xt: pool._push_chunk(int(one[0]), xt), args.repeats, 3)
        print(f"{f'1 stream x {t} rows':<34} {steps:>8.0f}us {adv:>8.0f}us {push:>8.0f}us "
              f"{conv:>8.0f}us {push / steps:>10.2f}x")  # fmt: skip
        results.append({"streams": 1, "rows": t, "steps_us": steps, "advance_us": adv,
                        "push_us": push, "chunk_us": conv})  # fmt: skip
    x64 = rng.standard_normal((64, 4)).astype(np.float32)
    x640 = rng.standard_normal((640, 4)).astype(np.float32)
    steps = best_us(lambda: [pool.step(slots, x64) for _ in range(10)], args.repeats, 1)
    adv = best_us(lambda: pool.advance(slots, x640, [10] * 64), args.repeats, 1)
    print(f"{'64 streams x 10 rows':<34} {steps:>8.0f}us {adv:>8.0f}us {'':>21} "
          f"{adv / steps:>10.2f}x (advance/steps)")  # fmt: skip
    results.append({"streams": 64, "rows": 10, "steps_us": steps, "advance_us": adv})
    lengths = rng.integers(1, 20, 64)
    xr = rng.standard_normal((int(lengths.sum()), 4)).astype(np.float32)
    adv = best_us(lambda: pool.advance(slots, xr, lengths), args.repeats, 1)
    print(f"{f'64 streams x 1-19 rows ({lengths.sum()} rows)':<34} {'':>10} {adv:>8.0f}us "
          f"{'':>10}   {adv / lengths.sum():.1f} us/row")  # fmt: skip
    results.append({"streams": 64, "rows": int(lengths.sum()), "advance_us": adv, "ragged": True})
    if args.json:
        write_results(args.json, "ragged_push", results)


if __name__ == "__main__":
    main()
