"""The pool's ring buffers: their layout, building them from a TCN, and the row arithmetic.

Layout. Every causal conv layer (kernel k, dilation d) owns one ring tensor of shape
(capacity * L, C_in) with L = (k - 1) * d + 1: for each slot, L time-major rows of C_in
contiguous values, the layer's whole receptive window (the current input and the (k-1)*d before
it). The input of time t lives at row `slot * L + t % L`. A step first writes the new row, then
gathers the k dilated taps `t - j*d` into one (N, k*C_in) operand: each tap is a contiguous run
of C_in values, so the gather reads k short contiguous rows per stream. A channel-major layout
(C_in, L) would need C_in strided reads per tap instead. Keeping the current input in the ring
(L rather than (k-1)*d rows) lets the torch kernel gather all k taps with one index op, without a
concatenation; rows of times before 0 are the zeros the ring starts with, which is the full
forward's left padding.

This file builds every tensor a step reads (`_build`: rings, weights in their step form, the
input history, embedding and head) and computes which ring rows a step writes and gathers
(`_ring_rows` on the host, `_device_ring_rows` on the pool's device). The paths that update the
rings are in steps.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.streaming.conditioning import folded_mix
from model.tcn import TCN


@dataclass(frozen=True)
class _CausalLayer:
    """One dilated causal conv, in the two forms the pool uses."""

    conv_weight: torch.Tensor  # (C_out, C_in, k): chunked pushes run F.conv1d
    step_weight: torch.Tensor  # (k * C_in, C_out): taps oldest first, for one addmm per step
    bias: torch.Tensor  # (C_out,)
    dilation: int
    ring: torch.Tensor  # (capacity * L, C_in)
    ring_len: int  # L = (k - 1) * d + 1
    past_offsets: torch.Tensor  # (L - 1,) offsets -(L-1) .. -1: the past rows in time order


@dataclass(frozen=True)
class _Block:
    conv1: _CausalLayer
    conv2: _CausalLayer
    downsample: tuple[torch.Tensor, torch.Tensor] | None  # (C_in, C_out) weight, bias
    norm1: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (weight, bias, eps)
    norm2: tuple[torch.Tensor, torch.Tensor, float] | None = None
    # A conditioned model's per-stream term after norm1 (conditioning.py): the (slots, W) table
    # and, for "concat" after a layer norm, the (W, W) matmul before it; None for a plain model.
    cond: tuple[torch.Tensor, torch.Tensor | None] | None = None


class RingBuffers:
    """StreamPool's ring buffers and the tensors of its model, in the forms a step uses."""

    def _build(self, net: TCN) -> None:
        cfg, dev, dt = self.config, self.device, self.dtype
        k = cfg.kernel_size

        def layer(
            conv: torch.nn.Conv1d, dilation: int, mix: torch.Tensor | None = None
        ) -> _CausalLayer:
            w = conv.weight.detach()  # (C_out, C_in, k); folds weight norm if present
            b = conv.bias.detach()
            if mix is not None:  # "concat" with nothing between: W2a (W1 x + b1), one conv
                w = torch.einsum("om,mik->oik", mix, w.double())
                b = mix @ b.double()
            w = w.to(dev, dt, copy=True)
            c_out, c_in, _ = w.shape
            ring_len = (k - 1) * dilation + 1
            return _CausalLayer(
                conv_weight=w.contiguous(),
                step_weight=w.permute(2, 1, 0).reshape(k * c_in, c_out).contiguous(),
                bias=b.to(dev, dt, copy=True).contiguous(),
                dilation=dilation,
                # capacity * L ring rows, then the scratch rows of `advance` (model/ragged.py)
                ring=torch.zeros(
                    self._slots_held * ring_len + self.max_advance_rows, c_in, device=dev, dtype=dt
                ),
                ring_len=ring_len,
                past_offsets=torch.arange(1 - ring_len, 0, device=dev),
            )

        self._build_embeddings(net)
        blocks = []
        for i, (block, dilation) in enumerate(zip(net.blocks, cfg.dilations, strict=True)):
            ds = None
            if block.downsample is not None:
                ds = (
                    block.downsample.weight.detach()[:, :, 0].T.to(dev, dt, copy=True).contiguous(),
                    block.downsample.bias.detach().to(dev, dt, copy=True),
                )
            norms = [
                None
                if norm is None
                else (
                    norm.weight.detach().to(dev, dt, copy=True),
                    norm.bias.detach().to(dev, dt, copy=True),
                    float(norm.eps),
                )
                for norm in (block.norm1, block.norm2)
            ]
            cond = None
            if self._block_embeddings is not None:
                cond = (self._block_embeddings[i].table, self._block_embeddings[i].mix)
            conv1 = layer(block.conv1, dilation, folded_mix(block))
            blocks.append(_Block(conv1, layer(block.conv2, dilation), ds, *norms, cond))
        self._blocks: tuple[_Block, ...] = tuple(blocks)
        self._layers = tuple(layer for b in blocks for layer in (b.conv1, b.conv2))
        # Per layer: how far back each tap reaches (oldest first), and the ring length.
        dilations = np.array([[layer.dilation] for layer in self._layers])  # (layers, 1)
        self._tap_offsets_np = (dilations * np.arange(k - 1, -1, -1))[:, None, :]  # (layers,1,k)
        self._ring_lengths_np = np.array([[layer.ring_len] for layer in self._layers])
        self._tap_lengths_np = self._ring_lengths_np[:, :, None]  # (layers, 1, 1)
        self._scratch_at = [self._slots_held * layer.ring_len for layer in self._layers]
        self._scratch_at_np = np.array(self._scratch_at)[:, None, None]  # (layers, 1, 1)
        self._tap_offsets = torch.from_numpy(self._tap_offsets_np).to(dev)
        self._ring_lengths = torch.from_numpy(self._ring_lengths_np).to(dev)  # (layers, 1)
        # Flat per-block operands for the step loop: no attribute lookups on the hot path.
        self._step_plan = tuple(
            (
                b.conv1.ring,
                b.conv1.step_weight,
                b.conv1.bias,
                b.conv2.ring,
                b.conv2.step_weight,
                b.conv2.bias,
                b.downsample,
                b.norm1,
                b.norm2,
                b.cond,
            )
            for b in self._blocks
        )
        # Skip connections: per block but the last, None (its output is added as it is) or the
        # (C_i, C_last) weight and bias of its 1x1 conv; None altogether without them.
        self._skips = None
        if net.skips is not None:
            self._skips = tuple(
                None
                if conv is None
                else (
                    conv.weight.detach()[:, :, 0].T.to(dev, dt, copy=True).contiguous(),
                    conv.bias.detach().to(dev, dt, copy=True),
                )
                for conv in net.skips
            )
        self._embedding = (
            net.embedding.weight.detach().to(dev, dt, copy=True)
            if net.embedding is not None
            else None
        )
        # The last R - 1 raw inputs of each stream: all a stream's future outputs depend on,
        # so they rebuild its state anywhere (see `history`). Token models keep the ids.
        self.history_len = cfg.receptive_field - 1
        shape = (self._slots_held * self.history_len,)
        if cfg.vocab_size is None:
            shape += (cfg.in_channels,)
        self._history = torch.zeros(
            shape, device=dev, dtype=dt if cfg.vocab_size is None else torch.int64
        )
        self._head = None
        if net.head is not None:
            self._head = (
                net.head.weight.detach().T.to(dev, dt, copy=True).contiguous(),
                net.head.bias.detach().to(dev, dt, copy=True),
            )

    def _matrices(self) -> list[torch.Tensor]:
        """Every weight matrix a step multiplies by."""
        mats = [layer.step_weight for layer in self._layers]
        mats += [b.downsample[0] for b in self._blocks if b.downsample is not None]
        mats += [s[0] for s in self._skips or () if s is not None]
        mats += [b.cond[1] for b in self._blocks if b.cond is not None and b.cond[1] is not None]
        return mats + ([self._head[0]] if self._head is not None else [])

    @property
    def state_bytes_per_stream(self) -> int:
        """Bytes of conv ring buffer one stream holds: sum over conv layers of L * C_in values."""
        return sum(layer.ring_len * layer.ring.shape[1] for layer in self._layers) * (
            torch.finfo(self.dtype).bits // 8
        )

    @property
    def history_bytes_per_stream(self) -> int:
        """Bytes of the input history (last R - 1 raw inputs) one stream keeps."""
        return self._history[: self.history_len].numel() * self._history.element_size()

    def _ring_rows(
        self, slot_np: np.ndarray, per_block: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Host-side ring rows of one step, every layer at once (a few numpy ops).

        taps (layers, N, k): the rows of the k taps, oldest first; writes (layers, N): the row
        of time t, which is the last tap (a view). `per_block`: one entry per block instead,
        as a block's two convs share dilation and ring length, hence their rows.
        """
        pos = self._positions[slot_np]
        step = 2 if per_block else 1
        lengths = self._tap_lengths_np[::step]  # (layers, 1, 1)
        taps = (pos[:, None] - self._tap_offsets_np[::step]) % lengths
        taps += slot_np[:, None] * lengths
        return taps[:, :, -1], taps

    def _device_ring_rows(
        self, slot_np: np.ndarray, per_block: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same on the pool's device: only 2N integers cross the bus."""
        pos = self._positions[slot_np]
        where = torch.from_numpy(np.stack([slot_np, pos])).to(self.device, non_blocking=True)
        s, t = where[0], where[1]
        step = 2 if per_block else 1
        lengths = self._ring_lengths[::step]
        base = s * lengths
        writes = torch.remainder(t, lengths).add_(base)
        taps = torch.remainder(t[:, None] - self._tap_offsets[::step], lengths[:, :, None])
        return writes, taps.add_(base[:, :, None])
