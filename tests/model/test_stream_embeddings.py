"""A conditioned model's streams (model/streaming/conditioning.py): each stream's embedding is
given when it opens, checked there, kept per slot as one bias row per block, and travels with
its state; a plain model's pool has none of it.

That streaming equals the full forward with embeddings, through every kernel and any schedule,
is the property tests' job (test_streaming.py, test_fused_step.py, test_cuda_graphs.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import StateMismatchError, StreamPool, TCNConfig
from tests.model.conftest import chunk, full_forward, random_net, random_sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL32 = {"atol": 1e-5, "rtol": 1e-5}
ADD = TCNConfig(
    in_channels=3, channels=[4, 6], kernel_size=3, out_channels=2, embedding_dims=[2, 3]
)
CONCAT = TCNConfig(**{**ADD.to_dict(), "embedding_mode": "concat", "gate": True})
CONCAT_LN = TCNConfig(**{**CONCAT.to_dict(), "layer_norm": True})
PLAIN = TCNConfig(**{**ADD.to_dict(), "embedding_dims": None})


def embedding(seed: int) -> torch.Tensor:
    return torch.randn(5, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", ["fused", "blas", "numpy", "torch"])
@pytest.mark.parametrize("config", [ADD, CONCAT, CONCAT_LN], ids=["add", "concat", "concat+ln"])
def test_streams_of_one_input_differ_by_their_embeddings_only(config, kernel) -> None:
    net = random_net(config, seed=0)
    seq = random_sequence(config, 12, seed=0)
    pool = StreamPool(net, 3, step_kernel=kernel)
    slots = [pool.open(embedding=embedding(i)) for i in range(3)]
    got = torch.stack([pool.step(slots, chunk(seq, t, t + 1).expand(3, -1)) for t in range(12)])
    for i in range(3):  # (T, streams, out)
        torch.testing.assert_close(got[:, i], full_forward(net, seq, embedding=embedding(i)))
    assert not torch.allclose(got[:, 0], got[:, 1])


def test_an_embedding_is_one_vector_or_one_per_entry_as_any_array() -> None:
    net = random_net(ADD, seed=1)
    pool = StreamPool(net, 4)
    e = embedding(1)
    forms = [e, e.numpy(), e.tolist(), [e[:2], e[2:].numpy()]]
    slots = [pool.open(embedding=form) for form in forms]
    seq = random_sequence(ADD, 6, seed=1)
    y = [pool.push(slot, chunk(seq, 0, 6)) for slot in slots]
    for other in y[1:]:
        torch.testing.assert_close(other, y[0], atol=0, rtol=0)
    assert torch.equal(pool.embedding_of(slots[3]), e.double())


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        (None, ValueError, r"conditioned on a per-stream embedding of 5 values .*\[2, 3\]"),
        (torch.randn(4), ValueError, r"expected an embedding of 5 values .*got shape \(4,\)"),
        (torch.randn(1, 5), ValueError, r"one static vector per stream, got shape \(1, 5\)"),
        (torch.randn(5, 9), ValueError, r"one static vector per stream"),
        ([torch.randn(3), torch.randn(2)], ValueError, r"embedding 0 has 3 values, .* says 2"),
        (torch.ones(5, dtype=torch.int64), TypeError, r"floating-point values, got torch.int64"),
        ("hello", TypeError, r"a vector of floats, got str"),
        (torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0]), ValueError, r"finite"),
        (torch.tensor([0.0, float("inf"), 0.0, 0.0, 0.0]), ValueError, r"finite"),
        (torch.full((5,), 1e37), ValueError, r"within \+-.* without overflowing"),
    ],
    ids=["missing", "short", "2-d", "per timestep", "entries swapped", "ints", "str", "nan",
         "inf", "too large"],
)  # fmt: skip
def test_open_refuses_a_bad_embedding_and_takes_no_slot(given, error, message) -> None:
    pool = StreamPool(random_net(ADD, seed=2), 2)
    with pytest.raises(error, match=message):
        pool.open(embedding=given)
    assert (len(pool), pool.free) == (0, 2)


def test_a_plain_model_takes_no_embedding_and_keeps_no_tables() -> None:
    pool = StreamPool(random_net(PLAIN, seed=3), 2, step_kernel="fused")
    with pytest.raises(ValueError, match="this model takes no embedding"):
        pool.open(embedding=embedding(0))
    assert pool.free == 2
    assert pool._block_embeddings is None and pool._stream_embeddings is None
    assert all(block[-1] is None for block in pool._step_plan)
    assert all(table.shape == (0, 0) for table in pool._fused_plan.cond_tables)
    slot = pool.open()
    assert pool.embedding_of(slot) is None
    assert "embedding" not in pool.export_state(slot)


def test_concat_folds_into_the_first_conv_unless_a_layer_norm_is_between() -> None:
    """Without a norm, W2a of "concat"'s 1x1 conv is folded into conv1 at load and only the
    per-stream row is left; after a layer norm the kernels multiply by it (the `mix`)."""
    for config, mixed in ((ADD, False), (CONCAT, False), (CONCAT_LN, True)):
        pool = StreamPool(random_net(config, seed=4), 3)
        for block in pool._blocks:
            table, mix = block.cond
            assert table.shape == (3, block.conv1.bias.shape[0])
            assert (mix is not None) == mixed


@pytest.mark.parametrize("config", [ADD, CONCAT_LN], ids=["add", "concat+ln"])
def test_reset_keeps_the_embedding_and_close_clears_it(config) -> None:
    net = random_net(config, seed=5)
    pool = StreamPool(net, 1)
    seq = random_sequence(config, 10, seed=5)
    slot = pool.open(embedding=embedding(5))
    first = pool.push(slot, chunk(seq, 0, 10))
    pool.reset(slot)
    torch.testing.assert_close(pool.push(slot, chunk(seq, 0, 10)), first, atol=0, rtol=0)
    pool.close(slot)
    assert all(not block.table.any() for block in pool._block_embeddings)
    assert not pool._stream_embeddings.any()
    with pytest.raises(ValueError, match="conditioned on a per-stream embedding"):
        pool.open()
    slot = pool.open(embedding=embedding(6))
    want = full_forward(net, seq, embedding=embedding(6))
    torch.testing.assert_close(pool.push(slot, chunk(seq, 0, 10)), want, **TOL32)


def test_the_exported_state_holds_the_embedding_and_is_checked_on_import() -> None:
    net = random_net(CONCAT, seed=6)
    pool = StreamPool(net, 3)
    slot = pool.open(embedding=embedding(6))
    pool.push(slot, torch.randn(4, 3))
    state = pool.export_state(slot)
    assert torch.equal(state["embedding"], embedding(6).double())
    for broken, message in (
        ({k: v for k, v in state.items() if k != "embedding"}, r"expected the stream's embedding"),
        ({**state, "embedding": torch.zeros(4)}, r"\(5,\) values"),
        ({**state, "embedding": torch.full((5,), float("nan"))}, r"invalid state: .*finite"),
    ):
        with pytest.raises(StateMismatchError, match=message):
            pool.import_state(broken)
    assert len(pool) == 1
    plain = StreamPool(random_net(PLAIN, seed=6), 1)
    with pytest.raises(StateMismatchError, match="different model"):
        plain.import_state(state)


def test_the_fingerprint_covers_the_embedding_options_and_projections() -> None:
    a = StreamPool(random_net(ADD, seed=7), 1).fingerprint
    b = StreamPool(random_net(CONCAT, seed=7), 1).fingerprint
    c = StreamPool(random_net(PLAIN, seed=7), 1).fingerprint
    assert len({a, b, c}) == 3
    # The same config, one projection weight moved: another model, whose pool refuses the state.
    source = StreamPool(random_net(CONCAT, seed=7), 1)
    state = source.export_state(source.open(embedding=embedding(0)))
    for projection in ("embedding_projection", "concat_projection"):
        net = random_net(CONCAT, seed=7)
        with torch.no_grad():
            getattr(net.blocks[1], projection).weight[0, 0] += 1e-3
        moved = StreamPool(net, 1)
        assert moved.fingerprint != source.fingerprint, projection
        with pytest.raises(StateMismatchError, match="different model"):
            moved.import_state(state)


PINNED_FINGERPRINT = "ece65450e054524eab7298285795c7f0"  # see the test below


def test_options_at_their_defaults_leave_the_fingerprint_as_it_was() -> None:
    """A model's fingerprint does not move when TCNConfig gains an option it does not use:
    pinned, so that a new option with a default that changes it fails here."""
    from model.streaming.state import _fingerprint

    net = random_net(TCNConfig(in_channels=2, channels=(3,), kernel_size=2), seed=0)
    assert _fingerprint(net) == PINNED_FINGERPRINT


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_without_a_bound_an_embedding_that_overflows_is_refused_at_open() -> None:
    net = random_net(ADD, seed=8)
    with torch.no_grad():
        net.blocks[1].embedding_projection.weight.fill_(1e36)
    pool = StreamPool(net, 2)
    assert pool.max_embedding_abs is None  # no useful bound: every call checks its outputs
    with pytest.raises(ValueError, match="overflows float32 in the model's projection"):
        pool.open(embedding=np.full(5, 1e3, dtype=np.float32))
    assert pool.free == 2
    slot = pool.open(embedding=np.full(5, 1e-3))
    assert torch.isfinite(pool.push(slot, torch.randn(3, 3))).all()
