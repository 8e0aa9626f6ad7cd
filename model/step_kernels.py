"""Three kernels behind `StreamPool.step`: one timestep of N streams from their ring buffers.

Each does, per causal conv layer: write time t's input row into the ring, gather the k dilated
taps (rows t - j*d), and one (N, k*C_in) x (k*C_in, C_out) matmul + bias + activation;
then the residual add and the activation per block. They differ in who runs which part:

- `step_torch`: torch ops; any device and dtype. Each op costs a few microseconds of dispatch,
  which dominates a step of a few streams on a CPU.
- `step_blas`: CPU, many streams: the ring writes and tap gathers in one compiled pass per conv
  (`fused_step.write_and_gather`, numba), the matmuls in torch. At N = 256 (R1) the rings are
  far larger than the caches, and torch's index_copy_ and embedding cost ~1.4x that pass.
- `step_numpy`: the same arithmetic through numpy on zero-copy views of the same CPU tensors,
  about 1 us an op. Only for small steps: numpy's BLAS starts its own threads on large
  products, which would fight the service's threads; `numpy_max_rows` keeps it below that.

(The fourth, `fused_step.fused_step`, is the whole step of a few streams in one compiled call.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.activations import Activation
from model.fused_step import write_and_gather

# Largest per-layer product (rows x k*C_in x C_out) handed to numpy: below OpenBLAS's
# multithreading threshold (measured to start between 2**18.8 and 2**19.1 here).
NUMPY_MAX_MACS = 2**18


def add_skip(total: torch.Tensor | None, out: torch.Tensor, skip: Any) -> torch.Tensor:
    """The skip sum so far plus a block's conv output `out` (1x1 conv'd when `skip` is its
    (w, b); as it is when None), before the block's residual add overwrites `out`."""
    value = out.clone() if skip is None else torch.addmm(skip[1], out, skip[0])
    return value if total is None else total.add_(value)


def finish_skips(h: torch.Tensor, total: torch.Tensor | None, act: Activation) -> torch.Tensor:
    """With skip connections, the network's output: act(the last block's output + the sum),
    or for keras-tcn the sum alone (it includes the last block's conv output)."""
    if act.keras:
        return total
    return act.inplace(h if total is None else h.add_(total))


def add_skip_np(total: np.ndarray | None, out: np.ndarray, skip: Any) -> np.ndarray:
    value = out.copy() if skip is None else out @ skip[0] + skip[1]
    if total is None:
        return value
    total += value
    return total


def finish_skips_np(h: np.ndarray, total: np.ndarray | None, act: Activation) -> np.ndarray:
    """`finish_skips` for numpy arrays."""
    if act.keras:
        return total
    if total is not None:
        h += total
    return act.numpy_inplace(h)


# A block's operands: (ring1, w1, b1, ring2, w2, b2, downsample (w, b) or None, norm1, norm2,
# cond), where a ring is (capacity * L, C_in), w is (k * C_in, C_out) with taps oldest first, b
# is (C_out,), a norm is a layer norm's (weight, bias, eps) or None, and cond is a conditioned
# model's (per-slot table (slots, C_first), mix or None) (model/streaming/conditioning.py).
Block = tuple[Any, ...]


def slot_rows(cond: Any, slots: Any) -> Any:
    """A block's `cond` for the streams at `slots`: (their table rows, mix); None stays None."""
    if cond is None:
        return None
    table, mix = cond
    if isinstance(table, np.ndarray):
        return table.take(slots, axis=0), mix
    return table.index_select(0, slots), mix


def step_torch(
    plan: tuple[Block, ...],
    h: torch.Tensor,  # (N, C_in) inputs of the first block
    writes: tuple[torch.Tensor, ...],  # per block (N,): ring row of time t
    taps: tuple[torch.Tensor, ...],  # per block (N, k): ring rows of the taps, oldest first
    act: Activation,
    skips: tuple | None = None,  # StreamPool._skips
    slots: torch.Tensor | None = None,  # (N,) on the plan's device: for a conditioned model
) -> torch.Tensor:  # (N, C_last)
    """A block's two convs have the same dilation and ring length, so the same ring rows."""
    n = h.shape[0]
    total = None
    for i, (ring1, w1, b1, ring2, w2, b2, downsample, n1, n2, cond) in enumerate(plan):
        ring1.index_copy_(0, writes[i], h)
        rows = F.embedding(taps[i], ring1).view(n, -1)
        a = act.first(b1, rows, w1, n1, slot_rows(cond, slots))
        ring2.index_copy_(0, writes[i], a)
        a = act.second(b2, F.embedding(taps[i], ring2).view(n, -1), w2, n2)
        if skips is not None and i < len(skips):
            total = add_skip(total, a, skips[i])
        residual = h if downsample is None else torch.addmm(downsample[1], h, downsample[0])
        h = act.inplace(a.add_(residual))
    return h if skips is None else finish_skips(h, total, act)


# A block's operands for `step_blas`: (ring1, w1, b1, ring2, w2, b2, downsample, L, d, norm1,
# norm2, cond), where ring1 and ring2 are numpy views of the rings, the rest as in `Block`.
BlasBlock = tuple[Any, ...]


def step_blas(
    plan: tuple[BlasBlock, ...],
    slots: np.ndarray,  # (N,) int64, C-contiguous
    positions: np.ndarray,  # (N,) int64: time t of each stream
    h: torch.Tensor,  # (N, C_in) inputs of the first block, on the CPU
    operand: np.ndarray,  # flat scratch of at least N * k * C_in values for every conv
    act: Activation,
    skips: tuple | None = None,
) -> tuple[torch.Tensor, bool]:
    """The step of many CPU streams: per conv, `write_and_gather` (compiled, GIL released)
    lays the taps out in `operand`, then torch's addmm + ReLU. Returns the last block's output
    (N, C_last) and whether every value written into a ring is finite."""
    h = h.contiguous()
    finite = True
    total = None
    slots_t = torch.from_numpy(slots) if plan[0][-1] is not None else None  # conditioned
    for i, block in enumerate(plan):
        ring1, w1, b1, ring2, w2, b2, downsample, ring_len, dilation, n1, n2, cond = block
        conv = (ring_len, dilation, slots, positions, operand, act)
        rows = slot_rows(cond, slots_t)
        a, ok1 = _gathered_conv(ring1, w1, b1, h, *conv, first=True, norm=n1, cond=rows)
        a, ok2 = _gathered_conv(ring2, w2, b2, a, *conv, norm=n2)
        finite = finite and ok1 and ok2
        if skips is not None and i < len(skips):
            total = add_skip(total, a, skips[i])
        residual = h if downsample is None else torch.addmm(downsample[1], h, downsample[0])
        h = act.inplace(a.add_(residual))
    return (h if skips is None else finish_skips(h, total, act)), finite


def _gathered_conv(
    ring: np.ndarray,
    weight: torch.Tensor,  # (k * C_in, C_out)
    bias: torch.Tensor,
    inp: torch.Tensor,  # (N, C_in), contiguous
    ring_len: int,
    dilation: int,
    slots: np.ndarray,
    positions: np.ndarray,
    operand: np.ndarray,
    act: Activation,
    first: bool = False,
    norm: Any = None,
    cond: Any = None,
) -> tuple[torch.Tensor, bool]:
    n, c = inp.shape
    taps = operand[: n * weight.shape[0]].reshape(n, -1)  # (N, k * C_in)
    k = weight.shape[0] // c
    ok = write_and_gather(ring, ring_len, dilation, k, slots, positions, inp.numpy(), c, taps)
    if first:
        return act.first(bias, torch.from_numpy(taps), weight, norm, cond), ok
    return act.second(bias, torch.from_numpy(taps), weight, norm), ok


def step_numpy(
    plan: tuple[Block, ...],
    h: np.ndarray,  # (N, C_in)
    writes: np.ndarray,  # (layers, N)
    taps: np.ndarray,  # (layers, N, k)
    act: Activation,
    skips: tuple | None = None,  # StreamPool._skips, as numpy views
    slots: np.ndarray | None = None,  # (N,): for a conditioned model
) -> np.ndarray:  # (N, C_last)
    n = h.shape[0]
    total = None
    for i, (ring1, w1, b1, ring2, w2, b2, downsample, n1, n2, cond) in enumerate(plan):
        ring1[writes[2 * i]] = h
        a = ring1.take(taps[2 * i], axis=0).reshape(n, -1) @ w1
        a += b1
        a = act.numpy_of(a, n1, first=True, cond=slot_rows(cond, slots))
        ring2[writes[2 * i + 1]] = a
        out = ring2.take(taps[2 * i + 1], axis=0).reshape(n, -1) @ w2
        out += b2
        out = act.numpy_of(out, n2)
        if skips is not None and i < len(skips):
            total = add_skip_np(total, out, skips[i])
        if downsample is None:
            out += h
        else:
            out += h @ downsample[0]
            out += downsample[1]
        h = act.numpy_inplace(out)
    return h if skips is None else finish_skips_np(h, total, act)


def numpy_view(plan: tuple[Block, ...]) -> tuple[Block, ...]:
    """The same plan as numpy arrays sharing memory with the (CPU) tensors."""

    def view(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return item.numpy()
        if isinstance(item, tuple):
            return tuple(view(x) for x in item)
        return item

    return view(plan)
