"""A ragged batch: N streams advanced by T_1 .. T_N timesteps in one call, O(T) per layer.

`StreamPool.step` advances N streams by one row; `StreamPool.push` advances one stream by a
chunk as a conv over its whole receptive window (O(L + T) per layer, so a few rows cost about
as much as a thousand). Here every output row gathers exactly its k taps, each from wherever it
lives: a tap at a time before the stream's first new row is in the layer's ring buffer, a later
one is a row of this call's input to the layer. So a call costs k * sum(T_i) tap rows per layer
and one matmul per layer for all streams together, whatever their row counts.

Nothing is written to the rings while layers compute (only to their scratch rows): the ring
rows (each stream's last min(T_i, L) inputs of every layer) and the input history are written
at the end, after the outputs were checked, so a refused call leaves every stream as it was.

Rows are stream-major: stream i's T_i rows, oldest first, then stream i + 1's.

The two convs of a residual block have the same dilation and ring length, so the same tap,
ring and scratch rows: the plan holds one set of indices per block, which both convs use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.activations import Activation
from model.step_kernels import add_skip, finish_skips, slot_rows


@dataclass(frozen=True)
class RaggedPlan:
    """Every index a ragged call needs, for all layers, computed once on the host.

    Each layer's ring tensor has `scratch` spare rows after its capacity * L ring rows: the
    call's input to the layer is copied there, so one gather reads every tap, whether it comes
    from the ring or from this call.
    """

    n: int  # rows in the call
    taps: torch.Tensor  # (blocks, n, k) rows of each block's ring tensors (ring or scratch)
    kept: list[torch.Tensor]  # per block: rows of this call that the rings keep
    kept_at: list[torch.Tensor]  # per block: ring rows they go to
    history_kept: torch.Tensor  # rows of this call the input history keeps
    history_at: torch.Tensor  # input-history rows they go to
    slots: torch.Tensor | None = None  # (n,) each row's slot: a conditioned model's table rows


def ragged_plan(
    slots: np.ndarray,  # (N,) distinct open slots
    positions: np.ndarray,  # (N,) their positions before the call
    lengths: np.ndarray,  # (N,) rows per stream, each >= 1
    tap_offsets: np.ndarray,  # (blocks, 1, k) how far back each tap reaches, oldest first
    ring_lengths: np.ndarray,  # (blocks, 1, 1) L per block
    scratch_at: np.ndarray,  # (blocks, 1, 1) each block's first scratch row: capacity * L
    history_len: int,
    device: torch.device,
    with_slots: bool = False,  # also each row's slot (a conditioned model)
) -> RaggedPlan:
    n = int(lengths.sum())
    stream = np.repeat(np.arange(lengths.size), lengths)  # (n,) which stream each row is
    starts = np.cumsum(lengths) - lengths  # (N,) first row of each stream
    row = np.arange(n)
    t0 = positions[stream]  # (n,) the stream's first new time
    t = t0 + row - starts[stream]  # (n,) time of each row
    last = t0 + lengths[stream] - 1  # (n,) time of the stream's last row
    slot = slots[stream]  # (n,)
    tap_time = t[None, :, None] - tap_offsets  # (blocks, n, k)
    in_ring = slot[None, :, None] * ring_lengths + tap_time % ring_lengths
    in_call = scratch_at + row[None, :, None] - tap_offsets
    taps = np.where(tap_time >= t0[None, :, None], in_call, in_ring)
    lengths_2d = ring_lengths[:, :, 0]  # (blocks, 1)
    keep = t[None, :] > last[None, :] - lengths_2d  # (blocks, n): each stream's last L rows
    ring_at = slot[None, :] * lengths_2d + t[None, :] % lengths_2d
    counts = keep.sum(1)
    kept = np.concatenate([row[m] for m in keep])
    kept_at = np.concatenate([at[m] for at, m in zip(ring_at, keep, strict=True)])
    keep_h = t > last - history_len
    history = np.stack([row[keep_h], slot[keep_h] * history_len + t[keep_h] % max(history_len, 1)])
    # Few host-to-device copies: one per kind of index, split into views per block.
    moved = [torch.from_numpy(a).to(device, non_blocking=True) for a in (taps, kept, kept_at)]
    moved_history = torch.from_numpy(history).to(device, non_blocking=True)
    splits = counts.tolist()
    return RaggedPlan(
        n=n,
        taps=moved[0],
        kept=list(moved[1].split(splits)),
        kept_at=list(moved[2].split(splits)),
        history_kept=moved_history[0],
        history_at=moved_history[1],
        slots=torch.from_numpy(slot).to(device, non_blocking=True) if with_slots else None,
    )


def ragged_forward(
    plan: RaggedPlan,
    blocks: tuple,  # StreamPool._step_plan: (ring1, w1, b1, ring2, w2, b2, downsample) per block
    scratch_at: list[int],  # per block: the first scratch row of its ring tensors
    h: torch.Tensor,  # (n, C_in) the first block's inputs
    act: Activation,
    skips: tuple | None = None,  # StreamPool._skips
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """-> (n, C_last) outputs of the last block, and the ring writes (ring, rows, values) to
    apply once the caller accepts the result, one per conv."""
    n = plan.n
    writes = []

    def taps(i: int, ring: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ring[scratch_at[i] : scratch_at[i] + n] = x  # scratch: nothing reads it between calls
        writes.append((ring, plan.kept_at[i], x[plan.kept[i]]))
        return F.embedding(plan.taps[i], ring).view(n, -1)  # (n, k * C_in), oldest tap first

    total = None
    for i, (ring1, w1, b1, ring2, w2, b2, downsample, n1, n2, cond) in enumerate(blocks):
        # each conv one (n, k * C_in) x (k * C_in, C_out) matmul
        a = act.first(b1, taps(i, ring1, h), w1, n1, slot_rows(cond, plan.slots))
        out = act.second(b2, taps(i, ring2, a), w2, n2)
        if skips is not None and i < len(skips):
            total = add_skip(total, out, skips[i])
        residual = h if downsample is None else torch.addmm(downsample[1], h, downsample[0])
        h = act.inplace(out.add_(residual))
    return (h if skips is None else finish_skips(h, total, act)), writes
