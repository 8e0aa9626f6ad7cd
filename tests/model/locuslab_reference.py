"""A stand-in for the paper's code (locuslab/TCN): written here, same state_dict key layout.

It keeps what the converter must cope with: the old weight_norm API (weight_g / weight_v),
convs registered twice (as attributes and inside `net`), and causal convs done by padding both
sides and chomping the right end.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn


def _old_weight_norm(conv: nn.Conv1d) -> nn.Conv1d:
    with warnings.catch_warnings():  # the deprecated API is the point: it makes weight_g/_v
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(conv)


class RightChomp(nn.Module):
    """Drops the `size` trailing steps that symmetric padding let see the future."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T + size) -> (B, C, T)
        return x[:, :, : x.shape[2] - self.size]


class PaperBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, dilation: int, dropout: float = 0.2):
        super().__init__()
        pad = (k - 1) * dilation
        self.conv1 = _old_weight_norm(nn.Conv1d(c_in, c_out, k, padding=pad, dilation=dilation))
        self.chomp1, self.relu1, self.dropout1 = RightChomp(pad), nn.ReLU(), nn.Dropout(dropout)
        self.conv2 = _old_weight_norm(nn.Conv1d(c_out, c_out, k, padding=pad, dilation=dilation))
        self.chomp2, self.relu2, self.dropout2 = RightChomp(pad), nn.ReLU(), nn.Dropout(dropout)
        # The same conv modules again: state_dict lists their tensors under net.0 and net.4 too.
        self.net = nn.Sequential(
            self.conv1, self.chomp1, self.relu1, self.dropout1,
            self.conv2, self.chomp2, self.relu2, self.dropout2,
        )  # fmt: skip
        self.downsample = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T)
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.net(x) + residual)


class PaperTemporalConvNet(nn.Module):
    def __init__(
        self,
        num_inputs: int,
        channels: Sequence[int],
        kernel_size: int = 2,
        dilations: Sequence[int] | None = None,
    ):
        super().__init__()
        dilations = dilations or [2**i for i in range(len(channels))]
        widths = [num_inputs, *channels]
        self.network = nn.Sequential(
            *(
                PaperBlock(widths[i], widths[i + 1], kernel_size, dilations[i])
                for i in range(len(channels))
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_last, T)
        return self.network(x)


class PaperSequenceModel(nn.Module):
    """The paper's task wrapper: `tcn` plus a Linear applied at every timestep."""

    def __init__(self, num_inputs: int, channels: Sequence[int], kernel_size: int, out: int):
        super().__init__()
        self.tcn = PaperTemporalConvNet(num_inputs, channels, kernel_size)
        self.linear = nn.Linear(channels[-1], out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, out, T)
        return self.linear(self.tcn(x).transpose(1, 2)).transpose(1, 2)


class PaperLanguageModel(nn.Module):
    """The paper's language-model wrapper: `encoder` embedding, `tcn`, tied `decoder`."""

    def __init__(self, vocab: int, emb: int, channels: Sequence[int], kernel_size: int):
        super().__init__()
        self.encoder = nn.Embedding(vocab, emb)
        self.tcn = PaperTemporalConvNet(emb, channels, kernel_size)
        self.decoder = nn.Linear(channels[-1], vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, vocab, T)
        h = self.tcn(self.encoder(tokens).transpose(1, 2))  # (B, T, E) -> (B, E, T)
        return self.decoder(h.transpose(1, 2)).transpose(1, 2)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights with g independent of |v|, so folding weight norm is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()
