"""The paths that advance streams and update their ring buffers: step, advance, push.

- `step`: N streams by one timestep, through the kernel `kernel_for` picks (planning.py), or
  as CUDA graphs (`_step_graphed`).
- `advance`: N streams by lengths[i] rows each, in one ragged call (model/ragged.py), or
  through the fused kernel for a few rows (`_advance_fused`).
- `push`: one stream by a chunk, as a conv over its receptive window.

A refused call (invalid inputs, non-finite outputs: validation.py) leaves every stream as it
was: `push` and `advance` apply their ring writes only once the outputs were checked; `step`
writes the ring rows of time t, which nothing reads before the position passes t, and the input
history and positions only after the check. `_advance_fused` writes the rings as it goes, so it
runs only where the inputs' bound rules out a refusal once it has begun (`overflow_safe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model import fused_step
from model.ragged import ragged_forward, ragged_plan
from model.step_kernels import add_skip, finish_skips, step_blas, step_numpy, step_torch
from model.streaming.errors import MAX_POSITION, NonFiniteOutputError
from model.streaming.planning import CHUNKED_PUSH_ROWS
from model.streaming.rings import _CausalLayer
from model.streaming.validation import _all_finite, _nonfinite_rows, _nonfinite_written
from model.tcn import apply_output_activation


class StepPaths:
    """StreamPool's step, advance and push, and the embedding and head they share."""

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self._embedding) if self._embedding is not None else x

    def _finish(self, h: torch.Tensor) -> torch.Tensor:  # (rows, C) -> (rows, out)
        if self._head is not None:
            h = torch.addmm(self._head[1], h, self._head[0])
        return apply_output_activation(h, self.config.output_activation, dim=-1)

    def step(
        self, slots: Sequence[int] | np.ndarray | torch.Tensor, x: torch.Tensor | np.ndarray
    ) -> torch.Tensor:
        """Advance N distinct streams by one timestep: x (N, in_channels) -> y (N, out)."""
        if self._fused_checked:
            y = self._step_fused_checked(slots, x)
            if y is not None:
                return y
        slot_np = self._slot_array(slots)
        n = slot_np.size
        kernel = self.kernel_for(n)
        if kernel == "graphs":
            return self._step_graphed(slot_np, x)
        on_host = kernel in ("fused", "numpy")
        x_np = self._host_rows(x, n) if on_host else None
        if not on_host:
            x = self._rows(x, n, "step")
        positions = self._positions[slot_np]
        if positions.max() >= MAX_POSITION:
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        # The ring rows of time t are written during the step, but nothing reads them before
        # the position passes t: a refused step (non-finite outputs) leaves the stream as it was
        # as long as the input history and the positions are only written after the check.
        if kernel == "fused":
            # Float models without an output activation record the history and positions in
            # the same compiled call, once the step is known to be finite.
            commit = self._embedding is None and self.config.output_activation == "none"
            h = self._embedding_np[x_np] if self._embedding is not None else x_np
            y_np, finite = fused_step.fused_step(
                self._fused_plan, slot_np, positions, h, self._positions if commit else None
            )
            y = apply_output_activation(
                torch.from_numpy(y_np), self.config.output_activation, dim=-1
            )
            if finite and commit:
                return y
            bad = [] if finite and self.config.output_activation == "none" else _nonfinite_rows(y)
            if not bad and not finite:
                bad = self._nonfinite_ring_rows(slot_np)
        else:
            written_finite = False  # not known: look at the ring rows if it matters
            if kernel == "numpy":
                y = torch.from_numpy(self._step_numpy(slot_np, x_np))
                y = apply_output_activation(y, self.config.output_activation, dim=-1)
            elif kernel == "blas":
                with torch.inference_mode():
                    h, written_finite = step_blas(
                        self._blas_plan,
                        slot_np,
                        positions,
                        self._embed(x),
                        self._operand,
                        self._act,
                        self._skips,
                    )
                    y = self._finish(h)
            else:
                with torch.inference_mode():
                    y = self._finish(self._step_torch(slot_np, x))
            bad = _nonfinite_rows(y)
            if not bad and not self.overflow_safe and not written_finite:
                bad = self._nonfinite_ring_rows(slot_np)
        if bad:
            raise NonFiniteOutputError(
                f"the outputs of streams {bad} would not be finite; the step was refused", bad
            )
        if self.history_len:
            remember = positions % self.history_len + slot_np * self.history_len
            if on_host:
                self._history_np[remember] = x_np
            else:
                with torch.inference_mode():
                    rows = torch.from_numpy(remember).to(self.device)
                    self._history.index_copy_(0, rows, x)
        self._positions[slot_np] += 1
        return y

    def _step_fused_checked(self, slots: Any, x: Any) -> torch.Tensor | None:
        """`step` as one compiled call that checks, steps and commits (`_step_checked`), for
        slots and rows already in the kernel's layout: int64 slots, C-contiguous writable rows
        of the pool's dtype. None where they are not, or where a check fails: `step`'s own
        path then converts them, or raises its error; nothing was written."""
        if isinstance(x, torch.Tensor):
            if not x.is_cpu or x.requires_grad:
                return None
            x = x.numpy()
        if not (isinstance(slots, np.ndarray) and isinstance(x, np.ndarray)):
            return None
        n = slots.shape[0]
        if (
            slots.dtype != np.int64
            or slots.ndim != 1
            or not 0 < n <= self.fused_max_rows
            or x.dtype != self._host_dtype
            or x.shape != (n, self.config.in_channels)
            or not (x.flags.c_contiguous and x.flags.writeable and slots.flags.c_contiguous)
        ):
            return None
        plan = self._fused_plan
        outcome = fused_step.step_checked(
            plan, slots, self._positions, self._open, x, self._fused_limit, MAX_POSITION
        )
        if outcome == fused_step.STEP_OK:
            return torch.from_numpy(plan.y[:n].copy())
        if outcome != fused_step.STEP_NONFINITE:
            return None
        # Time t's ring rows were written (nothing reads them before the position passes t);
        # the history and the positions were not.
        bad = _nonfinite_rows(torch.from_numpy(plan.y[:n])) or self._nonfinite_ring_rows(slots)
        raise NonFiniteOutputError(
            f"the outputs of streams {bad} would not be finite; the step was refused", bad
        )

    def _step_graphed(self, slot_np: np.ndarray, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """`step` through model/cuda_graphs.py: one copy each way, outputs on the CPU."""
        if isinstance(x, torch.Tensor) and not x.is_cpu:
            x = x.cpu()  # a blocking copy: the rows are read on the host right after
        x = self._rows(x, slot_np.size, "step", device=torch.device("cpu"))
        positions = self._positions[slot_np]
        if positions.max() >= MAX_POSITION:
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        y, finite, bucket = self._graphs.run(slot_np, positions, x)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise NonFiniteOutputError(
                f"the outputs of streams {bad} would not be finite; the step was refused", bad
            )
        self._graphs.commit(bucket)
        self._positions[slot_np] += 1
        return y

    def _step_torch(self, slot_np: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            writes, taps = map(torch.from_numpy, self._ring_rows(slot_np, per_block=True))
        else:
            writes, taps = self._device_ring_rows(slot_np, per_block=True)
        slots = None  # a conditioned model's table rows are the slots'
        if self._block_embeddings is not None:
            slots = torch.from_numpy(slot_np).to(self.device, non_blocking=True)
        return step_torch(
            self._step_plan,
            self._embed(x),
            writes.unbind(0),
            taps.unbind(0),
            self._act,
            self._skips,
            slots,
        )

    def _step_numpy(self, slot_np: np.ndarray, x: np.ndarray) -> np.ndarray:
        writes, taps = self._ring_rows(slot_np)
        h = self._embedding_np[x] if self._embedding is not None else x
        h = step_numpy(self._numpy_plan, h, writes, taps, self._act, self._skips_np, slot_np)
        if self._head is not None:
            h = h @ self._head_np[0]
            h += self._head_np[1]
        return h

    @torch.inference_mode()
    def advance(
        self,
        slots: Sequence[int] | np.ndarray,
        x: torch.Tensor | np.ndarray,
        lengths: Sequence[int] | np.ndarray,
    ) -> torch.Tensor:
        """Advance N distinct streams by lengths[i] >= 1 timesteps each, in one batched call.

        x (sum(lengths), in_channels) holds stream 0's rows oldest first, then stream 1's, ...;
        returns y (sum(lengths), out) in the same order. Costs k tap rows per row and layer
        (model/ragged.py), so a few rows cost a few rows' worth, never the receptive field; for
        one long chunk, `push` (a conv over the window) is cheaper.
        """
        slot_np = self._slot_array(slots)
        counts = np.asarray(lengths)
        if counts.shape != slot_np.shape or counts.dtype.kind not in "iu" or (counts < 1).any():
            raise ValueError(f"lengths must be {slot_np.size} integers >= 1, got {lengths!r}")
        counts = counts.astype(np.int64, copy=False)
        if counts.sum() > self.max_advance_rows:
            raise ValueError(
                f"advance: {int(counts.sum())} rows in one call, more than max_advance_rows "
                f"({self.max_advance_rows}); split the call, or push long chunks"
            )
        return self._advance(slot_np, counts, x, "advance")

    def _advance(self, slot_np: np.ndarray, counts: np.ndarray, x: Any, what: str) -> torch.Tensor:
        total = int(counts.sum())
        if (
            total <= self.fused_advance_rows
            and self.overflow_safe
            and self._embedding is None
            and self.config.output_activation == "none"
        ):
            return self._advance_fused(slot_np, counts, self._host_rows(x, total, what))
        x = self._rows(x, total, what)
        if (self._positions[slot_np] > MAX_POSITION - counts).any():
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        plan = ragged_plan(  # one set of indices per block: its two convs share them
            slot_np,
            self._positions[slot_np],
            counts,
            self._tap_offsets_np[::2],
            self._tap_lengths_np[::2],
            self._scratch_at_np[::2],
            self.history_len,
            self.device,
            with_slots=self._block_embeddings is not None,
        )
        h, writes = ragged_forward(
            plan, self._step_plan, self._scratch_at[::2], self._embed(x), self._act, self._skips
        )
        y = self._finish(h)
        bad_rows = _nonfinite_rows(y)
        if not bad_rows and not self.overflow_safe:
            per_conv = [rows for rows in plan.kept for _ in range(2)]  # a block's, per conv
            bad_rows = _nonfinite_written(writes, per_conv)
        if bad_rows and what == "push":  # one stream: its rows are named, as a chunk's are
            raise NonFiniteOutputError(
                f"the outputs of rows {bad_rows[:10]} would not be finite; the push was refused",
                [int(r) for r in bad_rows],
            )
        if bad_rows:
            streams = sorted(set(np.searchsorted(np.cumsum(counts), bad_rows, side="right")))
            raise NonFiniteOutputError(
                f"the outputs of streams {streams} would not be finite; nothing was applied",
                [int(i) for i in streams],
            )
        for ring, rows, values in writes:
            ring.index_copy_(0, rows, values)
        if self.history_len:
            self._history.index_copy_(0, plan.history_at, x[plan.history_kept])
        self._positions[slot_np] += counts
        return y

    def _advance_fused(
        self, slot_np: np.ndarray, counts: np.ndarray, x: np.ndarray
    ) -> torch.Tensor:
        """A ragged advance of a few rows through the fused step kernel, as that many rows of
        one step: each stream's rows in time order, at consecutive positions. A conv's row t
        is written into its ring before any later row of the same call reads it as a tap, so
        the rows of one stream may share a call, layer by layer.

        Unlike a one-row step, its ring writes overwrite taps that a refused call would still
        need, so it is used only where the inputs' bound rules out any overflow
        (`overflow_safe`): finite inputs within `max_input_abs`, checked first, cannot give a
        non-finite output, and the call cannot be refused after it has begun.
        """
        positions = self._positions[slot_np]
        if (positions > MAX_POSITION - counts).any():
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        row_slots = np.repeat(slot_np, counts)
        firsts = np.cumsum(counts) - counts  # each stream's first row in x
        row_positions = np.repeat(positions - firsts, counts) + np.arange(len(row_slots))
        y_np, finite = fused_step.fused_step(
            self._fused_plan,
            row_slots,
            row_positions,
            x,
            self._positions,
        )
        if not finite:  # cannot happen below the bound; the streams' rings are not trusted now
            raise RuntimeError(
                f"non-finite values in a fused advance of streams {slot_np.tolist()} despite "
                "inputs within max_input_abs"
            )
        return torch.from_numpy(y_np)

    def push(self, slot: int, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Advance one stream by T rows: x (T, in_channels) -> y (T, out).

        One row is a step; up to CHUNKED_PUSH_ROWS rows run as a ragged advance of this one
        stream (k tap rows per row and layer: a few rows cost a few rows' worth); longer chunks
        as one conv per layer over the layer's window and the chunk, cheaper per row once T is
        large. One public way to feed rows, whatever T."""
        self._check_slot(slot)
        steps = _row_count(x)
        if steps == 1:  # the step kernels' own path
            return self.step([slot], x)
        if 0 < steps <= min(CHUNKED_PUSH_ROWS, self.max_advance_rows):
            with torch.inference_mode():
                return self._advance(np.array([slot]), np.array([steps]), x, "push")
        return self._push_chunk(slot, x)

    @torch.inference_mode()
    def _push_chunk(self, slot: int, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A long chunk of one stream: one conv per layer over its window and the chunk."""
        x = self._rows(x, None, "push")
        steps = x.shape[0]
        self._check_advance(np.array([slot]), steps)
        t0 = int(self._positions[slot])
        # Every ring write waits until all layers have computed: a failure half-way (e.g. out
        # of memory on a long chunk) leaves the stream exactly as it was.
        writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if self.history_len:
            kept = min(steps, self.history_len)
            when = np.arange(t0 + steps - kept, t0 + steps) % self.history_len
            rows = torch.from_numpy(when + slot * self.history_len).to(self.device)
            writes.append((self._history, rows, x[steps - kept :]))
        h = self._embed(x).T  # (C, T)

        def conv(
            layer: _CausalLayer, inp: torch.Tensor, first: bool, norm, cond=None
        ) -> torch.Tensor:
            base = slot * layer.ring_len
            past = layer.ring[base + torch.remainder(t0 + layer.past_offsets, layer.ring_len)]
            seq = torch.cat([past.T, inp], dim=1)  # (C_in, L - 1 + T), oldest first
            # Keep the L - 1 newest rows; the ring's remaining row is the next step's to write.
            newest = seq[:, seq.shape[1] - layer.past_offsets.numel() :].T
            when = torch.remainder(t0 + steps + layer.past_offsets, layer.ring_len)
            writes.append((layer.ring, base + when, newest))
            y = F.conv1d(seq[None], layer.conv_weight, layer.bias, dilation=layer.dilation)[0]
            return act.of(y, 0, norm, first, cond)  # (C_out, T)

        act, skips, total = self._act, self._skips, None
        for i, block in enumerate(self._blocks):
            cond = None if block.cond is None else (block.cond[0][slot], block.cond[1])
            a = conv(block.conv1, h, True, block.norm1, cond)
            out = conv(block.conv2, a, False, block.norm2)
            if skips is not None and i < len(skips):
                total = add_skip(total, out.T, skips[i])  # (T, C_last)
            if block.downsample is None:
                h = act.inplace(out.add_(h))
            else:
                res = torch.addmm(block.downsample[1], h.T, block.downsample[0]).T
                h = act.inplace(out.add_(res))
        h = h.T.contiguous()
        if skips is not None:
            h = finish_skips(h, total, act)
        y = self._finish(h)
        bad = _nonfinite_rows(y)
        if not bad and not self.overflow_safe and not all(_all_finite(v) for _, _, v in writes):
            bad = list(range(steps))  # a hidden Inf in the state: refuse the whole chunk
        if bad:
            raise NonFiniteOutputError(
                f"the outputs of rows {bad[:10]} would not be finite; the push was refused", bad
            )
        for ring, rows, values in writes:
            ring.index_copy_(0, rows, values.contiguous())
        self._positions[slot] += steps
        return y


def _row_count(x: Any) -> int:
    """The rows `x` holds, before it is validated (0 when that cannot be told cheaply)."""
    shape = getattr(x, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 0
    try:
        return len(x)
    except TypeError:
        return 0
