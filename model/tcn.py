"""The paper's Temporal Convolutional Network: dilated causal convs in residual blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from model.activations import activation as activation_of
from model.config import ACTIVATIONS, TCNConfig


class CausalConv1d(nn.Conv1d):
    """A dilated conv that sees only the present and the past, via explicit left padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.left_padding = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T)
        return super().forward(F.pad(x, (self.left_padding, 0)))


class TemporalBlock(nn.Module):
    """Two weight-normed dilated causal convs (activation, dropout) plus a residual connection;
    the activation (ReLU in the paper) also follows the residual add."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        dropout: float,
        act: str = "relu",
        gate: bool = False,
        layer_norm: bool = False,
        keras: bool = False,
        layer_norm_eps: float = 1e-5,
        embedding_width: int = 0,
        embedding_mode: str = "add",
    ):
        super().__init__()
        self.act = activation_of(act)
        self.gate = gate
        self.keras = keras
        first_width = 2 * out_channels if gate else out_channels
        self.conv1 = weight_norm(CausalConv1d(in_channels, first_width, kernel_size, dilation))
        # pytorch-tcn's use_norm="layer_norm": each conv's output normed per timestep
        self.norm1 = nn.LayerNorm(first_width, eps=layer_norm_eps) if layer_norm else None
        self.norm2 = nn.LayerNorm(out_channels, eps=layer_norm_eps) if layer_norm else None
        self.conv2 = weight_norm(CausalConv1d(out_channels, out_channels, kernel_size, dilation))
        self.dropout = nn.Dropout(dropout)
        # 1x1 conv on the residual path only when the channel count changes, as in the paper.
        self.downsample = (
            nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )
        # pytorch-tcn's embedding_projection_1 and (embedding_mode="concat") _2: a sequence's
        # embedding 1x1 conv'd to the first conv's width, then added to its (normed) output,
        # or concatenated with it and 1x1 conv'd back to that width.
        self.embedding_projection = (
            nn.Conv1d(embedding_width, first_width, 1) if embedding_width else None
        )
        self.concat_projection = (
            nn.Conv1d(2 * first_width, first_width, 1)
            if embedding_width and embedding_mode == "concat"
            else None
        )

    def forward(
        self, x: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T)
        return self.forward_with_skip(x, embedding)[0]

    @staticmethod
    def _normed(h: torch.Tensor, norm: nn.LayerNorm | None) -> torch.Tensor:
        return h if norm is None else norm(h.transpose(1, 2)).transpose(1, 2)

    def forward_with_skip(
        self, x: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block's output, its second conv's activated output: the skip connection's);
        `embedding` (B, E): each sequence's static embedding, where the block takes one."""
        h = self._normed(self.conv1(x), self.norm1)  # (B, C_first, T)
        if self.embedding_projection is not None:
            e = self.embedding_projection(embedding[:, :, None])  # (B, E, 1) -> (B, C_first, 1)
            if self.concat_projection is None:
                h = h + e  # the same vector at every timestep
            else:  # (B, 2 C_first, T) -> (B, C_first, T)
                h = self.concat_projection(torch.cat([h, e.expand_as(h)], dim=1))
        h = self.dropout(F.glu(h, dim=1) if self.gate else self.act(h))
        h = self.dropout(self.act(self._normed(self.conv2(h), self.norm2)))
        if self.keras:  # keras-tcn's Act_Conv_Blocks
            h = self.act(h)
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(h + residual), h


class TCN(nn.Module):
    """A stack of TemporalBlocks with an optional embedding input and per-timestep head."""

    def __init__(self, config: TCNConfig):
        super().__init__()
        self.config = config
        self.embedding = (
            nn.Embedding(config.vocab_size, config.in_channels)
            if config.vocab_size is not None
            else None
        )
        widths = (config.in_channels, *config.channels)
        self.blocks = nn.ModuleList(
            TemporalBlock(
                widths[i],
                widths[i + 1],
                config.kernel_size,
                config.dilations[i],
                config.dropout,
                config.activation,
                config.gate,
                config.layer_norm,
                config.keras_tcn,
                config.layer_norm_eps,
                config.embedding_width,
                config.embedding_mode,
            )
            for i in range(config.num_blocks)
        )
        # Skip connections: a 1x1 conv from each block but the last whose width differs from
        # the last block's (None where it does not, as pytorch-tcn's downsample_skip_connection).
        last = config.channels[-1]
        # keras-tcn's skips take every block's output, the last one's too, all of one width.
        skipped = config.channels if config.keras_tcn else config.channels[:-1]
        self.skips = (
            nn.ModuleList(nn.Conv1d(c, last, 1) if c != last else None for c in skipped)
            if config.skip_connections
            else None
        )
        self.head = (
            nn.Linear(config.channels[-1], config.out_channels)
            if config.out_channels is not None
            else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # What locuslab/TCN actually trains with: its N(0, 0.01) on the dilated convs writes a
        # tensor that old-style weight norm recomputes from (g, v), so the convs keep
        # nn.Conv1d's default init; the 1x1 downsample and the head do get N(0, 0.01).
        for block in self.blocks:
            if block.downsample is not None:
                nn.init.normal_(block.downsample.weight, 0.0, 0.01)
        if self.head is not None:
            nn.init.normal_(self.head.weight, 0.0, 0.01)

    @property
    def receptive_field(self) -> int:
        return self.config.receptive_field

    @property
    def weight_norm_folded(self) -> bool:
        return not any(parametrize.is_parametrized(b.conv1) for b in self.blocks)

    def fold_weight_norm(self) -> TCN:
        """Replace g * v / |v| with the plain weight it computes; inference gets one conv."""
        for block in self.blocks:
            for conv in (block.conv1, block.conv2):
                if parametrize.is_parametrized(conv, "weight"):
                    parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        return self

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The inference weights (weight norm applied), without changing this module."""
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            if ".parametrizations.weight." not in name:
                state[name] = tensor
        for name, module in self.named_modules():
            if parametrize.is_parametrized(module, "weight"):
                with torch.no_grad():
                    state[f"{name}.weight"] = module.weight.detach().clone()
        return state

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input and return it as floats, (B, in_channels, T)."""
        c = self.config
        if c.vocab_size is not None:
            if x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"this model takes token ids of shape (B, T) int64, got {tuple(x.shape)} "
                    f"{x.dtype}"
                )
            return self.embedding(x).transpose(1, 2)  # (B, T, C) -> (B, C, T)
        if x.dim() != 3 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"expected input of shape (B, {c.in_channels}, T), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {x.dtype}")
        return x

    def sequence_embedding(
        self, embeddings: torch.Tensor | list[torch.Tensor] | tuple | None, batch: int
    ) -> torch.Tensor | None:
        """Check each sequence's static embedding and return it as (B, embedding_width): one
        (B, sum(embedding_dims)) tensor, or a list of (B, dim) tensors, one per embedding_dims
        entry (pytorch-tcn's forward(x, embeddings=...)); None for a model without them."""
        dims = self.config.embedding_dims
        if dims is None:
            if embeddings is not None:
                raise ValueError(
                    "this model takes no embeddings (its config has no embedding_dims); "
                    "call it without embeddings="
                )
            return None
        width = self.config.embedding_width
        if embeddings is None:
            raise ValueError(
                f"this model is conditioned on per-sequence embeddings of widths {list(dims)}: "
                f"pass embeddings=(B, {width}) (or a list of (B, dim) tensors); they are never "
                "taken as zeros"
            )
        parts = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
        if len(parts) > 1 and len(parts) != len(dims):
            raise ValueError(
                f"expected {len(dims)} embeddings (widths {list(dims)}), got {len(parts)}"
            )
        wanted = [width] if len(parts) == 1 else list(dims)
        for part, dim in zip(parts, wanted, strict=True):
            if not isinstance(part, torch.Tensor) or not part.is_floating_point():
                got = part.dtype if isinstance(part, torch.Tensor) else type(part).__name__
                raise TypeError(f"embeddings must be floating-point tensors, got {got}")
            if part.dim() == 3:
                raise ValueError(
                    f"embeddings of shape {tuple(part.shape)} vary over time; this model takes "
                    "one static vector per sequence, (B, dim)"
                )
            if part.shape != (batch, dim):
                raise ValueError(
                    f"expected an embedding of shape ({batch}, {dim}), got {tuple(part.shape)}"
                )
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, E)

    def forward(
        self,
        x: torch.Tensor,
        embeddings: torch.Tensor | list[torch.Tensor] | tuple | None = None,
    ) -> torch.Tensor:
        """(B, in_channels, T) floats or (B, T) token ids -> (B, output_size, T); a model with
        embedding_dims also takes each sequence's embedding (`sequence_embedding`)."""
        h = self.embed(x)
        e = self.sequence_embedding(embeddings, h.shape[0])
        if e is not None:
            e = e.to(h.dtype)
        if self.skips is None:
            for block in self.blocks:
                h = block(h, e)
        else:
            total = None
            for i, block in enumerate(self.blocks):
                h, out = block.forward_with_skip(h, e)
                if i < len(self.skips):
                    skip = out if self.skips[i] is None else self.skips[i](out)
                    total = skip if total is None else total + skip
            act = self.blocks[-1].act
            h = total if self.config.keras_tcn else act(h if total is None else h + total)
        if self.head is not None:
            h = self.head(h.transpose(1, 2)).transpose(1, 2)  # (B, T, C) -> (B, out, T)
        return apply_output_activation(h, self.config.output_activation, dim=1)


def apply_output_activation(y: torch.Tensor, activation: str, dim: int) -> torch.Tensor:
    """The config's output activation, taken over the channel dimension `dim`."""
    if activation == "none":
        return y
    if activation in ACTIVATIONS:  # per value
        return activation_of(activation)(y)
    if activation == "softmax":
        return torch.softmax(y, dim=dim)
    if activation == "log_softmax":
        return torch.log_softmax(y, dim=dim)
    raise ValueError(f"unknown output activation {activation!r}")
