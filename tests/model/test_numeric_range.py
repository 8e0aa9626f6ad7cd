"""Inputs that would overflow: the weight-derived bound refuses them, and any call whose outputs
would still be NaN or Inf is refused without changing a stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import MAX_POSITION, TCN, NonFiniteOutputError, StreamPool, TCNConfig, safe_input_bound
from tests.model.conftest import chunk, full_forward, random_net, random_sequence

CONFIG = TCNConfig(in_channels=3, channels=(6, 5, 4), kernel_size=3, out_channels=2)


def test_the_bound_holds_for_inputs_just_inside_it():
    net = random_net(CONFIG, seed=3, std=0.5)
    bound = safe_input_bound(net, torch.float32)
    assert bound is not None and 1e4 < bound < 3.4e38
    x = torch.full((1, 3, 200), bound * 0.999) * torch.tensor([1.0, -1.0, 1.0])[None, :, None]
    assert torch.isfinite(net(x)).all()
    pool = StreamPool(net, 2)
    assert pool.max_input_abs == bound
    slot = pool.open()
    with pytest.raises(ValueError, match="without overflowing"):
        pool.push(slot, torch.full((4, 3), bound * 1.01))
    with pytest.raises(ValueError, match="without overflowing"):
        pool.step([slot], torch.full((1, 3), -bound * 1.01))
    with pytest.raises(ValueError, match="without overflowing"):
        pool.advance([slot], torch.full((2, 3), bound * 2), [2])
    assert pool.position(slot) == 0
    assert torch.isfinite(pool.push(slot, torch.full((4, 3), bound * 0.999))).all()


@pytest.mark.parametrize("mode", ["add", "concat"])
def test_the_bound_holds_for_embeddings_just_inside_it_too(mode: str):
    """A stream's embedding is held to the same bound as its inputs (model/numeric_range.py
    counts its projection in), and an embedding beyond it is refused when the stream opens."""
    config = TCNConfig(**{**CONFIG.to_dict(), "embedding_dims": [2], "embedding_mode": mode})
    net = random_net(config, seed=3, std=0.5)
    bound = safe_input_bound(net, torch.float32)
    assert bound is not None and 1e4 < bound < 3.4e38
    x = torch.full((1, 3, 200), bound * 0.999) * torch.tensor([1.0, -1.0, 1.0])[None, :, None]
    e = torch.tensor([[bound * 0.999, -bound * 0.999]])
    assert torch.isfinite(net(x, embeddings=e)).all()
    pool = StreamPool(net, 2)
    assert pool.max_embedding_abs == bound
    with pytest.raises(ValueError, match="embedding's values must be within"):
        pool.open(embedding=e[0] * 1.02)
    assert pool.free == 2
    slot = pool.open(embedding=e[0])
    assert torch.isfinite(pool.push(slot, torch.full((4, 3), bound * 0.999))).all()


def test_float16_has_no_useful_bound():
    net = random_net(CONFIG, seed=3, std=0.5)
    assert safe_input_bound(net, torch.float16) is None


def exploding_net():
    """No useful bound: weights so large that inputs of 1e30 overflow float32."""
    net = random_net(CONFIG, seed=4)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.5e5)
    return net


# A step through each kernel a CPU pool can take (kernel_for(2) is "fused" under "auto").
CALLS = ["step", "step:blas", "step:torch", "step:numpy", "push", "advance"]


def pool_for(net: TCN, call: str, capacity: int) -> tuple[StreamPool, str]:
    """A pool whose steps take the kernel that `call` names after its colon, and the call."""
    call, _, kernel = call.partition(":")
    return StreamPool(net, capacity, step_kernel=kernel or "auto"), call


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("call", CALLS)
def test_non_finite_outputs_are_refused_and_change_nothing(call):
    net = exploding_net()
    kernel = call.partition(":")[2]
    pool, call = pool_for(net, call, 3)
    assert pool.max_input_abs is None
    seqs = [random_sequence(CONFIG, 30, seed) * 1e-12 for seed in (1, 2)]
    a, b = pool.open(), pool.open()
    head = [pool.push(a, chunk(seqs[0], 0, 10)), pool.push(b, chunk(seqs[1], 0, 10))]
    histories = [pool.history(a), pool.history(b)]
    loud = torch.full((3, 3), 1e30)
    with pytest.raises(NonFiniteOutputError) as refused:
        if call == "step":
            pool.step([a, b], torch.stack([chunk(seqs[0], 10, 11)[0], loud[0]]))
        elif call == "push":
            pool.push(b, loud)
        else:
            pool.advance([a, b], torch.cat([chunk(seqs[0], 10, 12), loud]), [2, 3])
    # push names its rows; step and advance name their streams.
    assert refused.value.rows == ([0, 1, 2] if call == "push" else [1])
    assert (pool.position(a), pool.position(b)) == (10, 10)
    for slot, before in zip((a, b), histories, strict=True):
        assert torch.equal(pool.history(slot), before)
    # Both streams continue exactly as if the refused call never happened: as a twin pool
    # that was given the same calls but the refused one, bit for bit (and as the full forward,
    # within what this exploding net's float32 rounding allows).
    twin, _ = pool_for(net, f"{call}:{kernel}" if kernel else call, 3)
    ta, tb = twin.open(), twin.open()
    twin_head = [twin.push(ta, chunk(seqs[0], 0, 10)), twin.push(tb, chunk(seqs[1], 0, 10))]
    for i, (slot, twin_slot) in enumerate(((a, ta), (b, tb))):
        tail = pool.advance([slot], chunk(seqs[i], 10, 30), [20])
        twin_tail = twin.advance([twin_slot], chunk(seqs[i], 10, 30), [20])
        got = torch.cat([head[i], tail])
        assert torch.equal(got, torch.cat([twin_head[i], twin_tail]))
        torch.testing.assert_close(got, full_forward(net, seqs[i]), rtol=1e-3, atol=0)


@pytest.mark.parametrize("kernel", ["auto", "blas", "torch"])
def test_no_stream_passes_the_largest_position(kernel):
    pool = StreamPool(random_net(CONFIG, seed=1), 2, step_kernel=kernel)
    with pytest.raises(ValueError, match="position"):
        pool.open(MAX_POSITION + 1)
    assert pool.free == 2  # refused before a slot was taken
    slot = pool.open(MAX_POSITION - 2)
    pool.push(slot, torch.zeros(2, 3))
    for call in (
        lambda: pool.push(slot, torch.zeros(1, 3)),
        lambda: pool.step([slot], torch.zeros(1, 3)),
        lambda: pool.advance([slot], torch.zeros(2, 3), [2]),
    ):
        with pytest.raises(ValueError, match="largest position"):
            call()
    assert pool.position(slot) == MAX_POSITION
    assert np.isfinite(pool.step([pool.open()], torch.zeros(1, 3)).numpy()).all()


def hiding_net() -> TCN:
    """conv1 overflows to +Inf, conv2 turns it into -Inf and its ReLU into 0: the outputs stay
    finite while conv2's ring would keep the Inf (no useful bound, so the rings are checked)."""
    config = TCNConfig(in_channels=1, channels=(2, 2), kernel_size=2, out_channels=1)
    net = random_net(config, seed=1)
    with torch.no_grad():
        block = net.blocks[0]
        block.conv1.weight.fill_(1e36)
        block.conv1.bias.zero_()
        block.conv2.weight.fill_(-1.0)
        block.conv2.bias.zero_()
    return net


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("call", CALLS)
def test_an_inf_hidden_from_the_outputs_is_refused_too(call):
    pool, call = pool_for(hiding_net(), call, 2)
    assert not pool.overflow_safe
    slot = pool.open()
    pool.push(slot, torch.full((3, 1), 1e-3))
    loud = torch.full((2, 1), 1e3)
    with pytest.raises(NonFiniteOutputError):
        if call == "step":
            pool.step([slot], loud[:1])
        elif call == "push":
            pool.push(slot, loud)
        else:
            pool.advance([slot], loud, [2])
    assert pool.position(slot) == 3


@pytest.mark.parametrize("kernel, scans", [("blas", False), ("torch", True)])
def test_the_rings_are_scanned_only_when_the_kernel_cannot_vouch_for_them(
    monkeypatch, kernel, scans
):
    # Without a useful bound the written ring rows must be checked; "blas" checks them as it
    # writes them, so a finite step needs no second look, while the torch kernel looks again.
    pool = StreamPool(hiding_net(), 3, step_kernel=kernel)
    assert not pool.overflow_safe
    slots = [pool.open() for _ in range(3)]
    scanned = []
    real = pool._nonfinite_ring_rows
    monkeypatch.setattr(pool, "_nonfinite_ring_rows", lambda s: scanned.append(s) or real(s))
    y = pool.step(slots, torch.full((3, 1), 1e-3))
    assert torch.isfinite(y).all()
    assert bool(scanned) is scans
