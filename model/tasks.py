"""The paper's synthetic tasks: batch generators, and each task's paper setup in `TASKS`.

Inputs come in the model's (B, C, T) layout. Both generators draw everything from the
generator they are given (never from the global RNG), so a seed names a data set exactly:

    gen = torch.Generator().manual_seed(1234)
    x, y = adding_problem(32, 600, gen)  # x: (32, 2, 600) float32, y: (32,) float32
    x, y = copy_memory(32, 100, gen)  # x: (32, 10, 120) one-hot float32, y: (32, 120) int64
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import TCNConfig

COPY_MEMORY_LEN = 10  # symbols to remember
COPY_ALPHABET = 8  # symbols are 1..8
COPY_BLANK = 0
COPY_DELIMITER = 9
COPY_CLASSES = 10  # blank, 8 symbols, delimiter


def adding_problem(
    batch: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adding problem: inputs (B, 2, T) and targets (B,), the sum of the two marked values.

    Channel 0 holds values uniform in [0, 1); channel 1 is a 0/1 marker with exactly two ones,
    one in each half of the sequence (the first in [0, T//2), the second in [T//2, T)). A model
    reads its prediction from the output at the last timestep.
    """
    _check_positive("batch", batch)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    half = seq_len // 2
    values = torch.rand(batch, seq_len, generator=generator)  # (B, T)
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, seq_len, (batch,), generator=generator)
    marks = torch.zeros(batch, seq_len)  # (B, T)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]  # (B,)
    inputs = torch.stack((values, marks), dim=1)  # (B, 2, T)
    return inputs, targets


def copy_memory(
    batch: int, blank_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy memory: one-hot inputs (B, 10, T + 20) and class targets (B, T + 20) int64.

    Time layout of a sequence of length T + 20, as in Arjovsky et al. (2016):
    positions 0..9 hold 10 symbols from 1..8, then T - 1 blanks (0), the delimiter (9) at
    position T + 9, then 10 blanks during which the model must recall the symbols. Targets are
    blank everywhere except the last 10 positions, which hold the 10 symbols in order.
    """
    _check_positive("batch", batch)
    _check_positive("blank_len", blank_len)
    n = COPY_MEMORY_LEN
    seq_len = blank_len + 2 * n
    symbols = torch.randint(1, COPY_ALPHABET + 1, (batch, n), generator=generator)  # (B, 10)
    tokens = torch.full((batch, seq_len), COPY_BLANK, dtype=torch.int64)  # (B, T + 20)
    tokens[:, :n] = symbols
    tokens[:, blank_len + n - 1] = COPY_DELIMITER
    targets = torch.full((batch, seq_len), COPY_BLANK, dtype=torch.int64)
    targets[:, -n:] = symbols
    one_hot = F.one_hot(tokens, COPY_CLASSES)  # (B, T + 20, 10)
    inputs = one_hot.transpose(1, 2).to(torch.float32).contiguous()  # (B, 10, T + 20)
    return inputs, targets


# The tasks as training sees them: data, the paper's model and optimizer, metrics.

Batch = tuple[torch.Tensor, torch.Tensor]
PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (out, y) -> (B,)


def _adding_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out[:, 0, -1] - y) ** 2  # the prediction is the last timestep's output


def _copy_recall_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = COPY_MEMORY_LEN  # out is log_softmax (B, 10, T + 20)
    return F.nll_loss(out[:, :, -n:], y[:, -n:], reduction="none").mean(dim=1)


def _copy_all_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(out, y, reduction="none").mean(dim=1)  # the paper's loss, all positions


def _copy_recall_accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = COPY_MEMORY_LEN
    return (out[:, :, -n:].argmax(dim=1) == y[:, -n:]).float().mean(dim=1)


def _adding_baseline(y: torch.Tensor) -> float:
    """MSE of always predicting the mean target: the target's variance (about 1/6)."""
    y = y.double()
    return float(((y - y.mean()) ** 2).mean())


def _copy_baseline(y: torch.Tensor) -> float:
    """Recall cross-entropy of predicting each symbol's frequency: the labels' entropy."""
    recall = y[:, -COPY_MEMORY_LEN:].flatten()
    p = torch.bincount(recall, minlength=COPY_CLASSES).double() / recall.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


@dataclass(frozen=True)
class TaskSpec:
    """A task: its data, its model, the paper's training settings and its metrics."""

    name: str
    make_batch: Callable[[int, int, torch.Generator], Batch]
    config: TCNConfig
    loss: PerSample  # training loss per sequence
    metric: str
    metric_fn: PerSample  # held-out metric per sequence; lower is better
    extra_metrics: dict[str, PerSample]
    optimizer: str
    lr: float
    grad_clip: float | None
    batch_size: int
    epochs: int
    steps_per_epoch: int
    paper_seq_len: int
    paper_value: float
    # The metric of a useless model that ignores its input, from the held-out targets.
    baseline_fn: Callable[[torch.Tensor], float]
    baseline_name: str


TASKS: dict[str, TaskSpec] = {
    # locuslab adding_problem: 50,000 training sequences per epoch, batch 32, 10 epochs.
    "adding": TaskSpec(
        name="adding",
        make_batch=adding_problem,
        config=TCNConfig(in_channels=2, channels=(24,) * 8, kernel_size=8, out_channels=1),
        loss=_adding_squared_error,
        metric="mse",
        metric_fn=_adding_squared_error,
        extra_metrics={},
        optimizer="adam",
        lr=2e-3,
        grad_clip=None,
        batch_size=32,
        epochs=10,
        steps_per_epoch=1563,
        paper_seq_len=600,
        paper_value=5.8e-5,
        baseline_fn=_adding_baseline,
        baseline_name="predicting the mean target",
    ),
    # locuslab copy_memory: 10,000 training sequences per epoch, batch 32.
    "copy": TaskSpec(
        name="copy",
        make_batch=copy_memory,
        config=TCNConfig(
            in_channels=COPY_CLASSES,
            channels=(10,) * 8,
            kernel_size=8,
            dropout=0.05,
            out_channels=COPY_CLASSES,
            output_activation="log_softmax",
        ),
        loss=_copy_all_nll,
        metric="recall_cross_entropy",
        metric_fn=_copy_recall_nll,
        extra_metrics={
            "all_positions_cross_entropy": _copy_all_nll,
            "recall_accuracy": (_copy_recall_accuracy),
        },
        optimizer="rmsprop",
        lr=5e-4,
        grad_clip=1.0,
        batch_size=32,
        epochs=50,
        steps_per_epoch=313,
        paper_seq_len=1000,
        paper_value=3.5e-5,
        baseline_fn=_copy_baseline,
        baseline_name="predicting each symbol's frequency",
    ),
}


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
