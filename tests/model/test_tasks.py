"""The synthetic task generators: shapes, structure, and determinism given a generator."""

from __future__ import annotations

import pytest
import torch

from model.tasks import (
    COPY_BLANK,
    COPY_CLASSES,
    COPY_DELIMITER,
    COPY_MEMORY_LEN,
    adding_problem,
    copy_memory,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seq_len", [2, 3, 17, 64])
def test_adding_problem_structure(seq_len: int) -> None:
    x, y = adding_problem(64, seq_len, gen(0))
    assert x.shape == (64, 2, seq_len) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.float32
    values, marks = x[:, 0], x[:, 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(marks.unique().tolist()) <= {0.0, 1.0}
    half = seq_len // 2
    assert (marks[:, :half].sum(dim=1) == 1).all()
    assert (marks[:, half:].sum(dim=1) == 1).all()
    torch.testing.assert_close(y, (values * marks).sum(dim=1))


def test_adding_problem_is_deterministic_per_seed() -> None:
    a = adding_problem(8, 50, gen(7))
    b = adding_problem(8, 50, gen(7))
    c = adding_problem(8, 50, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_adding_problem_ignores_the_global_rng() -> None:
    torch.manual_seed(1)
    a = adding_problem(4, 20, gen(3))
    torch.manual_seed(2)
    b = adding_problem(4, 20, gen(3))
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize(
    ("batch", "seq_len", "match"),
    [(0, 10, "batch"), (4, 1, "seq_len"), (4, 10.0, "seq_len"), (True, 10, "batch")],
)
def test_adding_problem_rejects_bad_sizes(batch: object, seq_len: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        adding_problem(batch, seq_len, gen(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("blank_len", [1, 5, 30])
def test_copy_memory_layout(blank_len: int) -> None:
    n = COPY_MEMORY_LEN
    x, y = copy_memory(16, blank_len, gen(0))
    total = blank_len + 2 * n
    assert x.shape == (16, COPY_CLASSES, total) and x.dtype == torch.float32
    assert y.shape == (16, total) and y.dtype == torch.int64
    assert (x.sum(dim=1) == 1).all()  # one-hot per timestep
    tokens = x.argmax(dim=1)  # (B, T + 20)
    symbols = tokens[:, :n]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (tokens[:, n : blank_len + n - 1] == COPY_BLANK).all()
    assert (tokens[:, blank_len + n - 1] == COPY_DELIMITER).all()
    assert (tokens[:, -n:] == COPY_BLANK).all()
    assert (y[:, :-n] == COPY_BLANK).all()
    assert torch.equal(y[:, -n:], symbols)


def test_copy_memory_is_deterministic_per_seed() -> None:
    a = copy_memory(8, 20, gen(5))
    b = copy_memory(8, 20, gen(5))
    c = copy_memory(8, 20, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_copy_memory_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="blank_len"):
        copy_memory(4, 0, gen(0))
