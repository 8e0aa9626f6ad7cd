"""Whole-sequence inference: sequences of different lengths through one TCN.forward each group."""

from __future__ import annotations

import numpy as np
import torch

from model import TCN

# Right padding is harmless by causality (outputs of real timesteps never see later ones), but it
# costs compute: a group pads to its longest member only while padding stays under this share.
MAX_PADDING_SHARE = 0.5


def group_by_length(lengths: list[int]) -> list[list[int]]:
    """Indices of sequences grouped longest first, so each group wastes little padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0  # rows of real data in the last group, kept as a running sum (linear overall)
    for i in order:
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            if (len(group) + 1) * longest * (1 - MAX_PADDING_SHARE) <= real + lengths[i]:
                group.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


@torch.inference_mode()
def forward_sequences(
    net: TCN,
    sequences: list[np.ndarray],
    device: torch.device,
    dtype: torch.dtype,
    last_only: bool,
    embeddings: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Per sequence: its (T, out) float32 output rows, or only the last row with `last_only`;
    `embeddings` (B, E): a conditioned model's, one row per sequence."""
    tokens = net.config.vocab_size is not None
    outputs: list[np.ndarray] = [np.zeros(0) for _ in sequences]
    lengths = [len(s) for s in sequences]
    for group in group_by_length(lengths):
        longest = lengths[group[0]]
        if tokens:
            x = torch.zeros(len(group), longest, dtype=torch.int64)  # (B, T); pad id 0
            for b, i in enumerate(group):
                x[b, : lengths[i]] = torch.from_numpy(sequences[i])
            x = x.to(device)
        else:
            first = torch.from_numpy(sequences[group[0]])
            x = torch.zeros(len(group), longest, first.shape[1], dtype=first.dtype)  # (B, T, C)
            for b, i in enumerate(group):
                x[b, : lengths[i]] = torch.from_numpy(sequences[i])
            x = x.to(device, dtype).transpose(1, 2)  # (B, T, C) -> (B, C, T)
        e = None
        if embeddings is not None:  # (B, E): this group's rows
            e = torch.from_numpy(embeddings[group]).to(device, dtype)
        y = net(x, embeddings=e).transpose(1, 2)  # (B, out, T) -> (B, T, out)
        y = y.float().cpu().numpy()
        for b, i in enumerate(group):
            outputs[i] = y[b, lengths[i] - 1 : lengths[i]] if last_only else y[b, : lengths[i]]
    return outputs
