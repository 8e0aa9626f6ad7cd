"""The bucketed static-buffer step of model/cuda_graphs.py, run uncaptured on the CPU.

Everything but the capture itself: buckets and padding, the packed input buffer, the ring rows
computed from it, the refusal of non-finite steps and the input history written after it. The
captured graphs are checked against this on a GPU in tests/model/test_streaming_cuda.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import NonFiniteOutputError, StreamPool, TCNConfig
from model.cuda_graphs import bucket_for, buckets_for
from tests.model.conftest import (
    chunk,
    drive,
    full_forward,
    random_embedding,
    random_net,
    random_sequence,
    tcn_configs,
)


def test_buckets() -> None:
    assert buckets_for(1) == (1,)
    assert buckets_for(8) == (1, 2, 4, 8)
    assert buckets_for(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert [bucket_for(n, buckets_for(100)) for n in (1, 3, 64, 65, 100)] == [1, 4, 64, 100, 100]
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucket_for(101, buckets_for(100))


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_graphed_step_streams_equal_full_forward(
    config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    net = random_net(config, seed)
    n = data.draw(st.integers(1, 5), label="streams")
    lengths = data.draw(st.lists(st.integers(1, 30), min_size=n, max_size=n), label="lengths")
    seqs = [random_sequence(config, length, seed + i) for i, length in enumerate(lengths)]
    embeddings = [random_embedding(config, seed + i) for i in range(n)]
    pool = StreamPool(
        net, capacity=n + data.draw(st.integers(0, 2), label="spare"), cuda_graphs=True
    )
    assert pool._graphs is not None and pool.fused_max_rows == 0
    slots = [pool.open(embedding=e) for e in embeddings]
    got = drive(data, pool, slots, seqs)  # steps go through the buckets, push/advance do not
    for g, seq, e in zip(got, seqs, embeddings, strict=True):
        want = full_forward(net, seq, embedding=e)
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    for slot, seq in zip(slots, seqs, strict=True):  # the history was written after each check
        length = seq.shape[-1]
        keep = min(length, config.receptive_field - 1)
        assert torch.equal(pool.history(slot), chunk(seq, length - keep, length))


def test_padding_rows_touch_no_stream() -> None:
    # Capacity 5: buckets 1, 2, 4, 5. A step of 3 streams pads to 4 with the reserved slot.
    config = TCNConfig(in_channels=2, channels=(4, 3), kernel_size=3, out_channels=2)
    net = random_net(config, seed=1)
    graphed = StreamPool(net, 5, cuda_graphs=True)
    plain = StreamPool(net, 5)
    slots = [graphed.open() for _ in range(5)]
    assert slots == [plain.open() for _ in range(5)] == [0, 1, 2, 3, 4]
    gen = torch.Generator().manual_seed(0)
    for t in range(40):
        chosen = torch.randperm(5, generator=gen)[: 1 + t % 5].numpy()
        x = torch.randn(chosen.size, 2, generator=gen)
        torch.testing.assert_close(graphed.step(chosen, x), plain.step(chosen, x))
    for slot in slots:
        a, b = graphed.export_state(slot), plain.export_state(slot)
        assert a["position"] == b["position"]
        for ring_a, ring_b in zip(a["rings"], b["rings"], strict=True):
            torch.testing.assert_close(ring_a, ring_b)
        torch.testing.assert_close(a["history"], b["history"])


def test_graphed_token_model() -> None:
    config = TCNConfig(in_channels=3, channels=(4,), kernel_size=2, vocab_size=6)
    net = random_net(config, seed=2)
    pool = StreamPool(net, 3, cuda_graphs=True)
    slot = pool.open()
    seq = random_sequence(config, 12, seed=3)
    got = torch.cat([pool.step([slot], seq[t : t + 1]) for t in range(12)])
    torch.testing.assert_close(got, full_forward(net, seq), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_graphed_step_refuses_a_hidden_inf_and_changes_nothing() -> None:
    # conv1 overflows to +Inf, conv2's ReLU hides it from the outputs (as in test_numeric_range).
    config = TCNConfig(in_channels=1, channels=(2, 2), kernel_size=2, out_channels=1)
    net = random_net(config, seed=1)
    with torch.no_grad():
        net.blocks[0].conv1.weight.fill_(1e36)
        net.blocks[0].conv1.bias.zero_()
        net.blocks[0].conv2.weight.fill_(-1.0)
        net.blocks[0].conv2.bias.zero_()
    pool = StreamPool(net, 2, cuda_graphs=True)
    assert not pool.overflow_safe
    quiet, loud = pool.open(), pool.open()
    for _ in range(3):
        pool.step([quiet, loud], torch.full((2, 1), 1e-3))
    before = pool.history(loud)
    with pytest.raises(NonFiniteOutputError) as refused:
        pool.step([quiet, loud], torch.tensor([[1e-3], [1e3]]))
    assert refused.value.rows == [1]
    assert (pool.position(quiet), pool.position(loud)) == (3, 3)
    assert torch.equal(pool.history(loud), before)


def test_graphed_pool_keeps_its_public_api() -> None:
    config = TCNConfig(in_channels=2, channels=(3,), kernel_size=2)
    net = random_net(config, seed=0)
    pool = StreamPool(net, 2, cuda_graphs=True)
    assert pool.state_bytes_per_stream == StreamPool(net, 2).state_bytes_per_stream
    a, b = pool.open(), pool.open()
    assert len(pool) == 2 and pool.free == 0
    x = np.ones((2, 2), dtype=np.float32)
    pool.step(np.array([a, b]), x)
    pool.advance([a, b], np.ones((3, 2), dtype=np.float32), [1, 2])
    pool.push(a, np.ones((4, 2), dtype=np.float32))
    assert (pool.position(a), pool.position(b)) == (6, 3)
    pool.reset(b)
    pool.close(a)
    assert len(pool) == 1
