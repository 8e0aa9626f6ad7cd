"""Stream embeddings of a StreamPool: the static vector each stream of a conditioned model has.

A model with `embedding_dims` (pytorch-tcn's embedding_shapes of (dim,) tuples) conditions each
sequence on one vector e. Every block projects it to its first conv's width, c = P e + p, and
applies it after that conv (and its norm), before the activation or gate: added
(embedding_mode "add"), or concatenated and 1x1 conv'd, W2 [h; c] + b2 = W2a h + (W2b c + b2)
("concat"). Either way the block's term does not depend on time, so the pool computes it once,
when the stream opens (`open(embedding=...)`), and keeps it as that stream's row of a
preallocated per-block (slots, width) table: each kernel adds the rows of the streams it
advances, as a second bias (the `cond` entry of a block in the step plan: (table, mix)).

For "concat", W2a h is folded into the first conv's weights at load (rings.py) when nothing
nonlinear sits between them (no norm; a pytorch-tcn batch norm is already folded into the conv
by the converter); after a layer norm it cannot be, and every kernel multiplies the normed
output by W2a (`mix`, (W, W)) before adding the row.

The embedding itself is kept too (float64, as given): it travels with `export_state`, and
`embedding_of` hands it out to rebuild a stream from its `history`. A pool of a model without
embeddings has no tables, and its kernels get None in their place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.tcn import TCN, TemporalBlock


@dataclass(frozen=True)
class _BlockEmbedding:
    """How one block takes its streams' embeddings."""

    projection: torch.Tensor  # (E, W) float64 on the CPU: c = e @ projection + projection_bias
    projection_bias: torch.Tensor  # (W,)
    concat: tuple[torch.Tensor, torch.Tensor] | None  # (W2b^T (W, W), b2 (W,)): c @ W2b^T + b2
    table: torch.Tensor  # (slots, W) in the pool's dtype and device: each stream's term
    mix: torch.Tensor | None  # (W, W) W2a^T in the pool's dtype: "concat" after a layer norm


def concat_split(block: TemporalBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A concat block's 1x1 conv W2 [h; c] + b2 as (W2a, W2b, b2), float64: each (W, W)."""
    w = block.concat_projection.weight.detach().double()[:, :, 0]  # (W, 2W)
    width = w.shape[0]
    return w[:, :width], w[:, width:], block.concat_projection.bias.detach().double()


def folded_mix(block: TemporalBlock) -> torch.Tensor | None:
    """W2a (W, W) float64 where it folds into the block's first conv (no norm between)."""
    if block.concat_projection is None or block.norm1 is not None:
        return None
    return concat_split(block)[0]


class StreamEmbeddings:
    """StreamPool's per-stream embeddings: their tables, and setting one when a stream opens."""

    def _build_embeddings(self, net: TCN) -> None:
        """Per block, the projections and the (slots, W) table; None for a plain model."""
        self._block_embeddings: tuple[_BlockEmbedding, ...] | None = None
        self._stream_embeddings: torch.Tensor | None = None
        if net.config.embedding_dims is None:
            return
        blocks = []
        for block in net.blocks:
            proj = block.embedding_projection
            width = proj.weight.shape[0]
            concat, mix = None, None
            if block.concat_projection is not None:
                w2a, w2b, b2 = concat_split(block)
                concat = (w2b.T.contiguous(), b2)
                if block.norm1 is not None:  # cannot fold through the layer norm
                    mix = w2a.T.to(self.device, self.dtype).contiguous()
            blocks.append(
                _BlockEmbedding(
                    projection=proj.weight.detach().double()[:, :, 0].T.cpu().contiguous(),
                    projection_bias=proj.bias.detach().double().cpu(),
                    concat=None if concat is None else tuple(t.cpu() for t in concat),
                    table=torch.zeros(
                        self._slots_held, width, device=self.device, dtype=self.dtype
                    ),
                    mix=mix,
                )
            )
        self._block_embeddings = tuple(blocks)
        self._stream_embeddings = torch.zeros(
            self._slots_held, net.config.embedding_width, dtype=torch.float64
        )

    def _embedding_rows(self, embedding: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Check a stream's embedding: -> (it as (E,) float64, each block's term in the pool's
        dtype). ValueError or TypeError naming what is wrong; nothing is changed."""
        cfg = self.config
        if cfg.embedding_dims is None:
            raise ValueError(
                "this model takes no embedding (its config has no embedding_dims); open the "
                "stream without one"
            )
        dims, width = list(cfg.embedding_dims), cfg.embedding_width
        if embedding is None:
            raise ValueError(
                f"this model is conditioned on a per-stream embedding of {width} values "
                f"(embedding_dims {dims}): open(embedding=...) with it; it is never taken as "
                "zeros"
            )
        e = _as_vector(embedding, dims)
        if e.shape != (width,):
            raise ValueError(
                f"expected an embedding of {width} values (embedding_dims {dims}), got shape "
                f"{tuple(e.shape)}"
            )
        limit = self.max_embedding_abs
        if not bool(torch.isfinite(e).all()):
            raise ValueError("the embedding must be finite (no NaN or Inf)")
        if limit is not None and float(e.abs().max()) > limit:
            raise ValueError(
                f"the embedding's values must be within +-{limit:.3g}, the largest magnitude "
                f"this model takes in {str(self.dtype).removeprefix('torch.')} without "
                "overflowing"
            )
        rows = []
        for block in self._block_embeddings:
            c = torch.addmv(block.projection_bias, block.projection.T, e)  # (W,)
            if block.concat is not None:
                c = torch.addmv(block.concat[1], block.concat[0].T, c)
            row = c.to(self.device, self.dtype)
            if not bool(torch.isfinite(row).all()):
                raise ValueError(
                    f"this embedding overflows {str(self.dtype).removeprefix('torch.')} in the "
                    "model's projection of it"
                )
            rows.append(row)
        return e, rows

    def _set_embedding(self, slot: int, e: torch.Tensor, rows: list[torch.Tensor]) -> None:
        self._stream_embeddings[slot] = e
        for block, row in zip(self._block_embeddings, rows, strict=True):
            block.table[slot] = row

    def _clear_embedding(self, slot: int) -> None:
        self._stream_embeddings[slot] = 0.0
        for block in self._block_embeddings:
            block.table[slot] = 0.0

    def embedding_of(self, slot: int) -> torch.Tensor | None:
        """The embedding the stream was opened with, (E,) float64 on the CPU (None for a model
        without embeddings): with its `history`, what rebuilds it elsewhere."""
        self._check_slot(slot)
        if self._stream_embeddings is None:
            return None
        return self._stream_embeddings[slot].clone()


def _as_vector(embedding: object, dims: list[int]) -> torch.Tensor:
    """One (E,) vector, or a sequence of one (dim,) vector per embedding_dims entry,
    concatenated; float64 (exact for float32 and float64 values)."""
    parts: Sequence[object] = [embedding]
    per_entry = (
        isinstance(embedding, (list, tuple))
        and len(dims) > 1
        and len(embedding) == len(dims)
        and all(isinstance(p, (torch.Tensor, np.ndarray, list, tuple)) for p in embedding)
    )
    if per_entry:
        parts = embedding
    vectors = []
    for i, part in enumerate(parts):
        if isinstance(part, np.ndarray) and not part.flags.writeable:
            part = part.copy()
        try:
            t = torch.as_tensor(part)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"an embedding must be a vector of floats, got {type(part).__name__}"
            ) from None
        if not t.is_floating_point():
            raise TypeError(f"an embedding must be floating-point values, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(
                f"an embedding is one static vector per stream, got shape {tuple(t.shape)}"
            )
        if len(parts) > 1 and t.shape[0] != dims[i]:
            raise ValueError(
                f"embedding {i} has {t.shape[0]} values, embedding_dims says {dims[i]}"
            )
        vectors.append(t.detach().to("cpu", torch.float64))
    return torch.cat(vectors) if len(vectors) > 1 else vectors[0]
