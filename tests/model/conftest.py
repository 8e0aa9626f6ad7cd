"""Shared builders for the model-layer tests: seeded random TCNs, inputs and config strategies."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from model import TCN, StreamPool, TCNConfig
from model.config import ACTIVATIONS, EMBEDDING_MODES, OUTPUT_ACTIVATIONS


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors on a shared machine: extra intra-op threads only spin and slow us down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_net(config: TCNConfig, seed: int, std: float = 0.4, fold: bool = True) -> TCN:
    """An eval-mode TCN whose every parameter is redrawn from N(0, std), so no layer is ~zero.

    The reference init (N(0, 0.01)) makes most outputs nearly constant, which would let a
    streaming bug hide under the tolerance; std 0.3-0.5 keeps every tap visible.
    """
    torch.manual_seed(seed)
    net = TCN(config)
    if fold:
        net.fold_weight_norm()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, std)
        for block in net.blocks:
            # "concat"'s 1x1 conv over [h; c] would grow each block's outputs ~ std sqrt(2W)
            # times; at unit gain the nets keep a plain one's scale, where float32 rounding
            # of the reference stays under the tests' tolerance.
            if block.concat_projection is not None:
                fan_in = block.concat_projection.in_channels
                block.concat_projection.weight.mul_(1.0 / (std * fan_in**0.5))
    return net.eval()


def positive_net(config: TCNConfig, seed: int) -> TCN:
    """A folded float64 TCN with all weights in [0.1, 0.5]: every ReLU passes positive inputs."""
    torch.manual_seed(seed)
    net = TCN(config).fold_weight_norm().double()
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.1, 0.5)
    return net.eval()


def random_sequence(config: TCNConfig, length: int, seed: int) -> torch.Tensor:
    """One stream's input: (in_channels, T) float32, or (T,) int64 token ids."""
    gen = torch.Generator().manual_seed(seed)
    if config.vocab_size is not None:
        return torch.randint(0, config.vocab_size, (length,), generator=gen)
    return torch.randn(config.in_channels, length, generator=gen)


def random_embedding(config: TCNConfig, seed: int) -> torch.Tensor | None:
    """One stream's embedding, (sum(embedding_dims),) float32, or None for a plain model."""
    if config.embedding_dims is None:
        return None
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(config.embedding_width, generator=gen)


@torch.no_grad()
def full_forward(
    net: TCN,
    seq: torch.Tensor,
    dtype: torch.dtype | None = None,
    embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """`net` over one whole sequence (as returned by random_sequence), as (T, out) rows; a
    conditioned net takes the stream's `embedding` (random_embedding).

    With `dtype`, runs a copy of the net in that dtype (e.g. a float64 reference).
    """
    if dtype is not None:
        net = copy.deepcopy(net).to(dtype)
        if seq.is_floating_point():
            seq = seq.to(dtype)
        if embedding is not None:
            embedding = embedding.to(dtype)
    embeddings = None if embedding is None else embedding[None]  # (1, E)
    return net(seq[None], embeddings=embeddings)[0].T  # (1, out, T) -> (T, out)


def chunk(seq: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Timesteps [start, stop) of a sequence in push layout: (T, C) (a strided view) or (T,)."""
    if seq.dim() == 1:
        return seq[start:stop]
    return seq[:, start:stop].T  # (C, T) -> (T, C), deliberately not contiguous


def row(seq: torch.Tensor, t: int) -> torch.Tensor:
    """Timestep t of a sequence in step layout: (C,) floats or a 0-d token id."""
    return seq[t] if seq.dim() == 1 else seq[:, t]


@st.composite
def tcn_configs(
    draw: st.DrawFn,
    max_blocks: int = 4,
    max_width: int = 8,
    max_kernel: int = 4,
    vocab: bool | None = None,
    embeddings: bool = False,
) -> TCNConfig:
    """Small but varied TCNConfigs: widths may differ (1x1 residuals), any block activation,
    any output activation; with `embeddings`, per-stream embeddings (any widths, either mode)
    half of the time."""
    blocks = draw(st.integers(1, max_blocks))
    channels = draw(st.lists(st.integers(1, max_width), min_size=blocks, max_size=blocks))
    dilations = draw(st.none() | st.lists(st.integers(1, 5), min_size=blocks, max_size=blocks))
    with_vocab = draw(st.booleans()) if vocab is None else vocab
    skips, keras = draw(st.booleans()), draw(st.booleans())
    if skips and keras:  # keras-tcn's skip connections: every block of one width
        channels = [channels[0]] * blocks
    dims = None
    if embeddings:
        dims = draw(st.none() | st.lists(st.integers(1, 3), min_size=1, max_size=3))
    return TCNConfig(
        in_channels=draw(st.integers(1, 4)),
        channels=channels,
        kernel_size=draw(st.integers(1, max_kernel)),
        dilations=dilations,
        out_channels=draw(st.none() | st.integers(1, 5)),
        output_activation=draw(st.sampled_from(OUTPUT_ACTIVATIONS)),
        vocab_size=draw(st.integers(2, 12)) if with_vocab else None,
        activation=draw(st.sampled_from(ACTIVATIONS)),
        skip_connections=skips,
        keras_tcn=keras,
        gate=draw(st.booleans()),
        layer_norm=draw(st.booleans()),
        embedding_dims=dims,
        embedding_mode=draw(st.sampled_from(EMBEDDING_MODES)) if dims is not None else "add",
    )


def ring_bytes_per_stream(config: TCNConfig, itemsize: int) -> int:
    """What one stream's ring buffers hold, from the config alone.

    Each of a block's two causal convs keeps its receptive window, (k - 1) * d + 1 rows of its
    input channels: conv1 reads the block input, conv2 reads conv1's output.
    """
    widths = (config.in_channels, *config.channels)
    total = 0
    for i, d in enumerate(config.dilations):
        window = (config.kernel_size - 1) * d + 1
        total += window * widths[i] + window * widths[i + 1]
    return total * itemsize


SLOT_FORMS = {
    "list": list,
    "tuple": tuple,
    "numpy": lambda s: np.array(s, dtype=np.int64),
    "tensor": lambda s: torch.tensor(s, dtype=torch.int64),
}


def drive(
    data: st.DataObject,
    pool: StreamPool,
    slots: list[int],
    seqs: list[torch.Tensor],
    starts: list[int] | None = None,
    max_push: int | None = None,
    input_device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Feed every stream the rest of its sequence under a random schedule; (T_i, out) each.

    Each move pushes a random-length chunk of one stream, steps a random subset of streams (in
    random order, slots as a list, tuple, numpy array or tensor) by one row, or advances a
    random subset by a random number of rows each in one ragged call.
    Checks positions after every move and that the pool never touches the caller's inputs.
    Inputs and slot tensors are handed over on `input_device`.
    """
    fed = list(starts) if starts is not None else [0] * len(seqs)
    lengths = [s.shape[-1] for s in seqs]
    originals = [s.clone() for s in seqs]
    outputs: list[list[torch.Tensor]] = [[] for _ in seqs]
    while True:
        active = [i for i in range(len(seqs)) if fed[i] < lengths[i]]
        if not active:
            break
        move = data.draw(st.sampled_from(["push", "step", "advance"]), label="move")
        if move == "advance":  # a ragged batch: several streams, a few rows each
            chosen = data.draw(
                st.lists(st.sampled_from(active), min_size=1, unique=True), label="advance"
            )
            sizes = [
                data.draw(st.integers(1, min(lengths[i] - fed[i], max_push or 40)), label="rows")
                for i in chosen
            ]
            x = torch.cat(
                [chunk(seqs[i], fed[i], fed[i] + n) for i, n in zip(chosen, sizes, strict=True)]
            )
            form = data.draw(st.sampled_from(sorted(SLOT_FORMS)), label="slots as")
            y = pool.advance(
                SLOT_FORMS[form]([slots[i] for i in chosen]), x.to(input_device), sizes
            )
            assert y.shape == (sum(sizes), pool.config.output_size)
            for i, part in zip(chosen, y.split(sizes), strict=True):
                outputs[i].append(part)
                fed[i] += part.shape[0]
        elif move == "push":
            i = data.draw(st.sampled_from(active), label="stream")
            most = lengths[i] - fed[i] if max_push is None else min(max_push, lengths[i] - fed[i])
            size = data.draw(st.integers(1, most), label="chunk")
            y = pool.push(slots[i], chunk(seqs[i], fed[i], fed[i] + size).to(input_device))
            assert y.shape == (size, pool.config.output_size)
            outputs[i].append(y)
            fed[i] += size
        else:
            chosen = data.draw(
                st.lists(st.sampled_from(active), min_size=1, unique=True), label="step"
            )
            form = data.draw(st.sampled_from(sorted(SLOT_FORMS)), label="slots as")
            rows = torch.stack([row(seqs[i], fed[i]) for i in chosen]).to(input_device)
            chosen_slots = SLOT_FORMS[form]([slots[i] for i in chosen])
            if isinstance(chosen_slots, torch.Tensor):
                chosen_slots = chosen_slots.to(input_device)
            y = pool.step(chosen_slots, rows)
            assert y.shape == (len(chosen), pool.config.output_size)
            for j, i in enumerate(chosen):
                outputs[i].append(y[j : j + 1])
                fed[i] += 1
        assert [pool.position(s) for s in slots] == fed
    for seq, original in zip(seqs, originals, strict=True):
        assert torch.equal(seq, original), "the pool wrote into the caller's input"
    empty = torch.empty(0, pool.config.output_size, dtype=pool.dtype, device=pool.device)
    return [torch.cat(parts) if parts else empty for parts in outputs]
