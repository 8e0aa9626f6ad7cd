"""The step as captured CUDA graphs: one graph per batch-size bucket, replayed with static buffers.

On a GPU a step of R1 is ~100 small kernels; launched one by one from Python they cost far more
than they compute. A CUDA graph records them once and replays them with one launch, so a step
costs about one launch plus its two copies:

- host -> device, one copy: a pinned staging buffer holds the step's slots (int64), positions
  (int64) and input rows, packed back to back; the device copy of that buffer is what the graph
  reads. The ring rows of every block (`slot * L + (t - j*d) mod L`) are computed on the device
  inside the graph, from those slots and positions.
- device -> host, one copy: the outputs and one finite flag per row, into a pinned buffer.

A graph has fixed shapes, so it is captured per bucket: a power of two of rows up to the pool's
capacity. A step of n streams replays the smallest bucket >= n; the spare rows are padding that
points at a slot the pool reserves for it and never hands out, so they read and write only
that slot's rings. The input history is written by a second, small graph per bucket, replayed
only after the outputs were checked (a refused step must leave every stream as it was).

`StreamPool(..., cuda_graphs=True)` turns it on (off by default: it has not yet run on a GPU
in this project's CI). On a CPU pool the same static-buffer step runs eagerly, uncaptured, so
the padding, packing, device-side index arithmetic and commit are tested without a GPU;
tests/model/test_streaming_cuda.py checks graph replay == eager step == full forward on one.

Why not torch.compile: on CPU it needs a C++ compiler at run time, and on CUDA its Triton
backend builds a small C launcher with the system compiler too; hand-captured graphs need
nothing beyond torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.step_kernels import add_skip, finish_skips, slot_rows


def buckets_for(capacity: int) -> tuple[int, ...]:
    """Row counts graphs are captured for: powers of two below capacity, then capacity."""
    sizes = []
    size = 1
    while size < capacity:
        sizes.append(size)
        size *= 2
    return (*sizes, capacity)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n rows."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"a step of {n} streams is larger than the largest bucket, {buckets[-1]}")


@dataclass
class _Bucket:
    """The static buffers of one bucket and, on CUDA, its two captured graphs."""

    rows: int
    host_in: torch.Tensor  # (bytes,) uint8, pinned on CUDA: slots | positions | inputs
    device_in: torch.Tensor  # the same bytes on the device
    host_slots: np.ndarray  # (rows,) int64 view of host_in
    host_positions: np.ndarray  # (rows,) int64 view of host_in
    host_x: torch.Tensor  # (rows, C_in) or (rows,) view of host_in, in the input dtype
    device_out: torch.Tensor  # (rows, out + 1): outputs, then 1 where the row is finite
    host_out: torch.Tensor  # the same on the host, pinned on CUDA
    step: Callable[[], None]  # replays (or, on CPU, runs) the step
    commit: Callable[[], None]  # replays (or runs) the input-history write


class GraphedStep:
    """Bucketed static-buffer steps of one StreamPool; see the module docstring."""

    def __init__(self, pool: Any, pad_slot: int):
        self.pool = pool
        self.pad_slot = pad_slot  # a slot of the pool's rings that no stream ever gets
        self.device = pool.device
        self.capture = pool.device.type == "cuda"
        self.buckets = buckets_for(pool.capacity)
        self._built: dict[int, _Bucket] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.capture else None
        cfg = pool.config
        self._tokens = cfg.vocab_size is not None
        self._in_dtype = torch.int64 if self._tokens else pool.dtype
        self._in_width = 1 if self._tokens else cfg.in_channels
        self._out_width = cfg.output_size

    # ----- the step a graph records ------------------------------------------------------------

    def _body(self, slots: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, out: Any):
        """One step on device tensors, writing outputs and finite flags into `out`."""
        pool = self.pool
        lengths = pool._ring_lengths[::2]  # (blocks, 1): a block's two convs share L
        offsets = pool._tap_offsets[::2]  # (blocks, 1, k)
        base = slots * lengths  # (blocks, rows)
        writes = torch.remainder(positions, lengths).add_(base)
        taps = torch.remainder(positions[:, None] - offsets, lengths[:, :, None])
        taps = taps.add_(base[:, :, None])  # (blocks, rows, k)
        h = pool._embed(x)
        rows = h.shape[0]
        finite = torch.ones(rows, dtype=torch.bool, device=h.device)
        check_rings = not pool.overflow_safe
        act, skips, total = pool._act, pool._skips, None
        for i, block in enumerate(pool._step_plan):
            ring1, w1, b1, ring2, w2, b2, downsample, n1, n2, cond = block
            ring1.index_copy_(0, writes[i], h)
            # a conditioned model's table rows: the padding rows read the spare slot's zeros
            a = act.first(
                b1, F.embedding(taps[i], ring1).view(rows, -1), w1, n1, slot_rows(cond, slots)
            )
            ring2.index_copy_(0, writes[i], a)
            if check_rings:
                finite &= torch.isfinite(h).all(dim=1) & torch.isfinite(a).all(dim=1)
            a = act.second(b2, F.embedding(taps[i], ring2).view(rows, -1), w2, n2)
            if skips is not None and i < len(skips):
                total = add_skip(total, a, skips[i])
            residual = h if downsample is None else torch.addmm(downsample[1], h, downsample[0])
            h = act.inplace(a.add_(residual))
        if skips is not None:
            h = finish_skips(h, total, act)
        y = pool._finish(h)
        finite &= torch.isfinite(y).all(dim=1)
        out[:, : self._out_width].copy_(y)
        out[:, self._out_width].copy_(finite)

    def _commit_body(self, slots: torch.Tensor, positions: torch.Tensor, x: torch.Tensor):
        pool = self.pool
        if pool.history_len:
            rows = torch.remainder(positions, pool.history_len).add_(slots * pool.history_len)
            pool._history.index_copy_(0, rows, x)

    # ----- buffers and capture ------------------------------------------------------------------

    def _bucket(self, rows: int) -> _Bucket:
        bucket = self._built.get(rows)
        if bucket is None:
            bucket = self._built[rows] = self._build(rows)
        return bucket

    def _build(self, rows: int) -> _Bucket:
        in_item = torch.finfo(self._in_dtype).bits // 8 if not self._tokens else 8
        x_bytes = rows * self._in_width * in_item
        x_bytes += -x_bytes % 8  # keep whatever follows 8-byte aligned
        nbytes = 16 * rows + x_bytes
        pin = self.capture
        host_in = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        device_in = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)

        def views(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ints = buf[: 16 * rows].view(torch.int64)
            x = buf[16 * rows : 16 * rows + rows * self._in_width * in_item].view(self._in_dtype)
            return ints[:rows], ints[rows:], x.view(rows) if self._tokens else x.view(rows, -1)

        host_slots, host_positions, host_x = views(host_in)
        d_slots, d_positions, d_x = views(device_in)
        host_slots.fill_(self.pad_slot)  # warm-up and capture touch only the padding slot
        device_in.copy_(host_in)
        out_shape = (rows, self._out_width + 1)
        device_out = torch.zeros(out_shape, dtype=self.pool.dtype, device=self.device)
        host_out = torch.zeros(out_shape, dtype=self.pool.dtype, pin_memory=pin)

        def step() -> None:
            self._body(d_slots, d_positions, d_x, device_out)

        def commit() -> None:
            self._commit_body(d_slots, d_positions, d_x)

        if self.capture:
            step, commit = self._graph(step), self._graph(commit)
        return _Bucket(
            rows=rows,
            host_in=host_in,
            device_in=device_in,
            host_slots=host_slots.numpy(),
            host_positions=host_positions.numpy(),
            host_x=host_x,
            device_out=device_out,
            host_out=host_out,
            step=step,
            commit=commit,
        )

    def _graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Capture fn (after warming it up on a side stream, as CUDA graphs require)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._graph_pool):
            fn()
        return graph.replay

    def capture_all(self) -> None:
        """Build (and on CUDA capture) every bucket now, largest first, instead of on first use."""
        for rows in reversed(self.buckets):
            self._bucket(rows)

    # ----- one step -----------------------------------------------------------------------------

    def run(
        self, slots: np.ndarray, positions: np.ndarray, x: torch.Tensor
    ) -> tuple[torch.Tensor, np.ndarray, _Bucket]:
        """Replay the step for n streams: -> (y (n, out) on the host, finite (n,) bool, the
        bucket to `commit` once the caller accepts y)."""
        n = slots.size
        bucket = self._bucket(bucket_for(n, self.buckets))
        bucket.host_slots[:n] = slots
        bucket.host_slots[n:] = self.pad_slot
        bucket.host_positions[:n] = positions
        bucket.host_positions[n:] = 0
        bucket.host_x[:n].copy_(x)
        bucket.host_x[n:].zero_()
        with torch.inference_mode():
            bucket.device_in.copy_(bucket.host_in, non_blocking=self.capture)
            bucket.step()
            bucket.host_out[:n].copy_(bucket.device_out[:n], non_blocking=self.capture)
        if self.capture:
            torch.cuda.current_stream(self.device).synchronize()  # the one sync of a step
        out = bucket.host_out[:n]
        y = out[:, : self._out_width].clone()
        return y, out[:, self._out_width].float().numpy() == 1.0, bucket

    def commit(self, bucket: _Bucket) -> None:
        """Write the accepted step's inputs into the input history (device-side, no sync)."""
        with torch.inference_mode():
            bucket.commit()
