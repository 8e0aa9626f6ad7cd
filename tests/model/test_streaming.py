"""StreamPool: streaming equals the full forward for any chunking and interleaving of streams.

The property tests drive a pool with a random schedule: each move either pushes a random-length
chunk of one stream or steps a random subset of streams (in random order, as a list, tuple,
numpy array or tensor of slots) by one row. Whatever the schedule, each stream's outputs,
concatenated, must equal `net(x)` on that stream's whole sequence.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import (
    TCN,
    PoolFullError,
    SlotError,
    StateMismatchError,
    StreamPool,
    TCNConfig,
)
from model.streaming.errors import MAX_POSITION
from tests.model.conftest import (
    chunk,
    drive,
    full_forward,
    random_embedding,
    random_net,
    random_sequence,
    ring_bytes_per_stream,
    row,
    tcn_configs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL32 = {"atol": 1e-5, "rtol": 1e-5}
TOL64 = {"atol": 1e-10, "rtol": 1e-10}
PROPERTY = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def open_streams(
    pool: StreamPool, count: int, data: st.DataObject, embeddings: list | None = None
) -> list[int]:
    """Open `count` streams (with their `embeddings`, for a conditioned model) after some
    open/close churn, so slot ids are not just 0..count-1: the decoys had embeddings of their
    own, which the streams must not see."""
    config = pool.config
    decoys = [
        pool.open(embedding=random_embedding(config, 500 + i))
        for i in range(data.draw(st.integers(0, pool.free - count)))
    ]
    embeddings = embeddings or [random_embedding(config, 0)] * count
    slots = [pool.open(embedding=e) for e in embeddings]
    for slot in data.draw(st.permutations(decoys), label="close order"):
        pool.close(slot)
    return slots


def stream_inputs(
    config: TCNConfig, lengths: list[int], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Each stream's sequence and embedding (None for a plain model)."""
    seqs = [random_sequence(config, length, seed + i) for i, length in enumerate(lengths)]
    return seqs, [random_embedding(config, seed + i) for i in range(len(lengths))]


# Every host kernel a pool can be told to use (CUDA graphs: tests/model/test_streaming_cuda.py).
HOST_KERNELS = ["auto", "fused", "blas", "numpy", "torch"]


@pytest.mark.parametrize("kernel", HOST_KERNELS)
@given(config=tcn_configs(embeddings=True), seed=st.integers(0, 2**16), data=st.data())
@settings(PROPERTY, max_examples=40)
def test_interleaved_streams_equal_full_forward(
    kernel: str, config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    """Random configs (every option: activation, skip connections, gate, layer norm, the
    keras-tcn block, heads, token inputs, per-stream embeddings added or concatenated) through
    each kernel, random chunkings and orders; each stream has an embedding of its own."""
    net = random_net(config, seed, std=data.draw(st.floats(0.3, 0.5), label="std"))
    n = data.draw(st.integers(2, 5), label="streams")
    lengths = data.draw(st.lists(st.integers(1, 24), min_size=n, max_size=n), label="lengths")
    seqs, embeddings = stream_inputs(config, lengths, seed)
    expected = [full_forward(net, s, embedding=e) for s, e in zip(seqs, embeddings, strict=True)]
    spare = data.draw(st.integers(0, 3), label="spare")
    pool = StreamPool(net, capacity=n + spare, step_kernel=kernel)
    slots = open_streams(pool, n, data, embeddings)
    got = drive(data, pool, slots, seqs)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, **TOL32, msg=lambda m, i=i: f"stream {i}: {m}")


@given(config=tcn_configs(embeddings=True), seed=st.integers(0, 2**16), data=st.data())
@settings(PROPERTY, max_examples=25)
def test_float64_pool_of_float32_net(config: TCNConfig, seed: int, data: st.DataObject) -> None:
    net = random_net(config, seed)
    n = data.draw(st.integers(1, 3), label="streams")
    lengths = data.draw(st.lists(st.integers(1, 20), min_size=n, max_size=n), label="lengths")
    seqs, embeddings = stream_inputs(config, lengths, seed)
    expected = [
        full_forward(net, s, dtype=torch.float64, embedding=e)
        for s, e in zip(seqs, embeddings, strict=True)
    ]
    pool = StreamPool(net, capacity=n, dtype=torch.float64)
    assert pool.dtype == torch.float64
    got = drive(data, pool, [pool.open(embedding=e) for e in embeddings], seqs)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, **TOL64)


@given(config=tcn_configs(embeddings=True), seed=st.integers(0, 2**16), data=st.data())
@settings(PROPERTY, max_examples=10)
def test_weight_normed_net_streams_like_its_folded_self(
    config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    """A pool built from an unfolded (training-form) net folds the weights itself."""
    net = random_net(config, seed, fold=False)
    seqs, embeddings = stream_inputs(config, [15, 9], seed)
    expected = [full_forward(net, s, embedding=e) for s, e in zip(seqs, embeddings, strict=True)]
    pool = StreamPool(net, capacity=2)
    got = drive(data, pool, [pool.open(embedding=e) for e in embeddings], seqs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TOL32)


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(PROPERTY, max_examples=15)
def test_long_streams_wrap_the_rings(config: TCNConfig, seed: int, data: st.DataObject) -> None:
    """Sequences of 2-3 receptive fields: every ring buffer wraps many times, by push and step."""
    net = random_net(config, seed)
    r = config.receptive_field
    lengths = [2 * r + data.draw(st.integers(1, r + 8), label=f"extra {i}") for i in range(2)]
    seqs, embeddings = stream_inputs(config, lengths, seed)
    expected = [full_forward(net, s, embedding=e) for s, e in zip(seqs, embeddings, strict=True)]
    pool = StreamPool(net, capacity=3)
    slots = open_streams(pool, 2, data, embeddings)
    # Chunks up to R/2 keep the draw count low while both paths cross every wrap point.
    got = drive(data, pool, slots, seqs, max_push=max(1, r // 2))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **TOL32)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 8, 13, 40])
def test_fixed_chunking_of_a_long_stream(chunk_size: int) -> None:
    """One stream, R = 43, 120 steps, pushed in equal chunks (a deterministic regression net)."""
    config = TCNConfig(in_channels=2, channels=[3, 4, 3], kernel_size=4, out_channels=2)
    net = random_net(config, seed=11)
    seq = random_sequence(config, 120, seed=11)
    pool = StreamPool(net, capacity=1)
    slot = pool.open()
    got = torch.cat(
        [pool.push(slot, chunk(seq, t, t + chunk_size)) for t in range(0, 120, chunk_size)]
    )
    torch.testing.assert_close(got, full_forward(net, seq), **TOL32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
def test_pushes_of_every_length_equal_the_full_forward(config, seed, data) -> None:
    """`push` takes a step for one row, a ragged advance up to CHUNKED_PUSH_ROWS rows and a
    chunked conv beyond: any mix of the three, on two interleaved streams, equals the forward."""
    from model.streaming import CHUNKED_PUSH_ROWS

    sizes = st.sampled_from([1, 2, CHUNKED_PUSH_ROWS, CHUNKED_PUSH_ROWS + 1, 300])
    plan = data.draw(st.lists(st.tuples(st.integers(0, 1), sizes), min_size=1, max_size=5))
    net = random_net(config, seed)
    totals = [sum(size for s, size in plan if s == stream) for stream in (0, 1)]
    seqs, embeddings = stream_inputs(config, [max(total, 1) for total in totals], seed)
    pool = StreamPool(net, capacity=2)
    slots, at, got = [pool.open(embedding=e) for e in embeddings], [0, 0], [[], []]
    for s, size in plan:
        got[s].append(pool.push(slots[s], chunk(seqs[s], at[s], at[s] + size)))
        at[s] += size
    for s in (0, 1):
        if got[s]:
            want = full_forward(net, seqs[s], embedding=embeddings[s])
            torch.testing.assert_close(torch.cat(got[s]), want, **TOL32)


def test_one_step_call_advances_many_streams_at_different_positions() -> None:
    config = TCNConfig(in_channels=3, channels=[4, 4], kernel_size=3, out_channels=2)
    net = random_net(config, seed=2)
    seqs = [random_sequence(config, 12, seed=i) for i in range(4)]
    pool = StreamPool(net, capacity=4)
    slots = [pool.open() for _ in range(4)]
    heads = [
        pool.push(s, chunk(q, 0, 2 * i + 1))
        for i, (s, q) in enumerate(zip(slots, seqs, strict=True))
    ]
    positions = [2 * i + 1 for i in range(4)]
    order = [2, 0, 3, 1]
    y = pool.step(
        [slots[i] for i in order], torch.stack([row(seqs[i], positions[i]) for i in order])
    )
    for j, i in enumerate(order):
        want = full_forward(net, seqs[i])[: positions[i] + 1]
        torch.testing.assert_close(torch.cat([heads[i], y[j : j + 1]]), want, **TOL32)
    assert [pool.position(s) for s in slots] == [2, 4, 6, 8]


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(PROPERTY, max_examples=15)
def test_reset_then_replay(config: TCNConfig, seed: int, data: st.DataObject) -> None:
    """A reset stream starts over from zeros, with the embedding it was opened with."""
    net = random_net(config, seed)
    seqs, embeddings = stream_inputs(config, [20, 14], seed)
    expected = [full_forward(net, s, embedding=e) for s, e in zip(seqs, embeddings, strict=True)]
    pool = StreamPool(net, capacity=2)
    slots = [pool.open(embedding=e) for e in embeddings]
    first = drive(data, pool, slots, seqs)
    pool.reset(slots[0])
    assert pool.position(slots[0]) == 0
    assert pool.position(slots[1]) == 14  # resetting one stream leaves the other alone
    assert len(pool) == 2
    # Replay stream 0 under a new schedule while stream 1 starts a second sequence.
    more = random_sequence(config, 6, seed + 2)
    both = torch.cat([seqs[1], more], dim=-1)
    again = drive(data, pool, slots, [seqs[0], both], starts=[0, 14])
    torch.testing.assert_close(again[0], first[0], **TOL32)
    torch.testing.assert_close(again[0], expected[0], **TOL32)
    want = full_forward(net, both, embedding=embeddings[1])[14:]
    torch.testing.assert_close(again[1], want, **TOL32)


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(PROPERTY, max_examples=15)
def test_close_then_open_starts_from_zeros(
    config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    """A reused slot must not leak the previous stream's history (or embedding) into the new
    one."""
    net = random_net(config, seed)
    pool = StreamPool(net, capacity=2)
    side_embedding, old_embedding, new_embedding = (
        random_embedding(config, seed + i) for i in range(3)
    )
    bystander = pool.open(embedding=side_embedding)
    slot = pool.open(embedding=old_embedding)
    old = random_sequence(config, config.receptive_field + 5, seed)
    side = random_sequence(config, 30, seed + 1)
    drive(data, pool, [slot, bystander], [old, side[..., :10]])
    pool.close(slot)
    assert len(pool) == 1
    assert pool.free == 1
    assert not pool.is_open(slot)
    with pytest.raises(SlotError):
        pool.position(slot)
    assert pool.open(embedding=new_embedding) == slot  # the only free slot: it must be reused
    assert pool.position(slot) == 0
    new = random_sequence(config, data.draw(st.integers(1, 12), label="new length"), seed + 2)
    got = drive(data, pool, [slot, bystander], [new, side], starts=[0, 10])
    torch.testing.assert_close(got[0], full_forward(net, new, embedding=new_embedding), **TOL32)
    want = full_forward(net, side, embedding=side_embedding)[10:]
    torch.testing.assert_close(got[1], want, **TOL32)


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(PROPERTY, max_examples=20)
def test_export_import_continues_exactly(config: TCNConfig, seed: int, data: st.DataObject) -> None:
    """The exported state (the stream's embedding included) continues in another pool."""
    net = random_net(config, seed)
    length = data.draw(st.integers(2, 2 * config.receptive_field + 4), label="length")
    split = data.draw(st.integers(1, length - 1), label="split")
    seq, embedding = random_sequence(config, length, seed), random_embedding(config, seed)
    expected = full_forward(net, seq, embedding=embedding)
    source = StreamPool(net, capacity=2)
    slot = source.open(embedding=embedding)
    (head,) = drive(data, source, [slot], [seq[..., :split]])
    state = source.export_state(slot)
    assert state["position"] == split

    # Another pool of the same model, with other streams open so the slot index differs.
    target = StreamPool(net, capacity=4)
    occupied = data.draw(st.integers(0, 3), label="occupied")
    others = [target.open(embedding=random_embedding(config, 99 + i)) for i in range(occupied)]
    moved = target.import_state(state)
    assert moved not in others
    assert target.position(moved) == split
    assert len(target) == len(others) + 1
    (tail,) = drive(data, target, [moved], [seq], starts=[split])
    torch.testing.assert_close(torch.cat([head, tail]), expected, **TOL32)

    # The export is a copy: the source stream runs on (and its slot is even reused) without
    # changing it, and importing it back into the source continues from the split again.
    drive(data, source, [slot], [seq], starts=[split])
    source.close(slot)
    reuse = source.open(embedding=random_embedding(config, seed + 9))
    source.push(reuse, chunk(random_sequence(config, 7, seed + 9), 0, 7))
    back = source.import_state(state)
    (tail_again,) = drive(data, source, [back], [seq], starts=[split])
    torch.testing.assert_close(tail_again, tail, **TOL32)


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(PROPERTY, max_examples=20)
def test_history_rebuilds_a_stream(config: TCNConfig, seed: int, data: st.DataObject) -> None:
    """open(position - len(rows), embedding_of) + push(history rows) continues exactly like
    the original.

    The last R - 1 inputs (and the embedding) are all a TCN's future outputs depend on; the
    rebuilt rings start from zeros, so any ring row the restore got wrong shows up in the
    continuation.
    """
    net = random_net(config, seed)
    r = config.receptive_field
    length = data.draw(st.integers(1, 2 * r + 6), label="length")
    split = data.draw(st.integers(1, length), label="split")
    seq, embedding = random_sequence(config, length, seed), random_embedding(config, seed)
    expected = full_forward(net, seq, embedding=embedding)
    source = StreamPool(net, capacity=1)
    slot = source.open(embedding=embedding)
    drive(data, source, [slot], [seq[..., :split]])
    rows = source.history(slot)
    assert rows.shape[0] == min(split, r - 1)
    torch.testing.assert_close(rows, chunk(seq, split - rows.shape[0], split), atol=0, rtol=0)

    target = StreamPool(net, capacity=3)
    target.open(embedding=random_embedding(config, seed + 1))
    rebuilt = target.open(split - rows.shape[0], embedding=source.embedding_of(slot))
    if rows.shape[0]:
        target.push(rebuilt, rows)
    assert target.position(rebuilt) == split
    (tail,) = drive(data, target, [rebuilt], [seq], starts=[split])
    assert tail.shape[0] == length - split
    torch.testing.assert_close(tail, expected[split:], **TOL32)


@pytest.mark.parametrize("position", [-1, True, 1.0, "3"])
def test_open_refuses_bad_positions(position: object) -> None:
    pool = StreamPool(TCN(TCNConfig(in_channels=1, channels=[1])), capacity=2)
    with pytest.raises(ValueError, match="position must be"):
        pool.open(position)  # type: ignore[arg-type]
    assert (len(pool), pool.free) == (0, 2)


def test_exported_state_holds_plain_cpu_tensors() -> None:
    config = TCNConfig(in_channels=2, channels=[3, 3], kernel_size=3)
    pool = StreamPool(random_net(config, seed=0), capacity=1)
    slot = pool.open()
    pool.push(slot, torch.randn(5, 2))
    state = pool.export_state(slot)
    tensors = _tensors_in(state)
    assert tensors
    assert all(t.device.type == "cpu" for t in tensors)
    assert pool.position(slot) == 5  # exporting does not advance or close the stream


def _tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _pool_with_running_stream(config: TCNConfig, seed: int) -> tuple[StreamPool, int, TCN]:
    net = random_net(config, seed)
    pool = StreamPool(net, capacity=2)
    slot = pool.open()
    pool.push(slot, chunk(random_sequence(config, 40, seed), 0, 9))
    return pool, slot, net


MISMATCH_CONFIG = TCNConfig(in_channels=2, channels=[3, 4], kernel_size=3, out_channels=2)


@pytest.mark.parametrize(
    ("make_state", "message"),
    [
        pytest.param(
            lambda: _pool_with_running_stream(MISMATCH_CONFIG, seed=99),
            "different model",
            id="same config, other weights",
        ),
        pytest.param(
            lambda: _pool_with_running_stream(
                TCNConfig(in_channels=2, channels=[3, 4], kernel_size=2, out_channels=2), seed=1
            ),
            "different model",
            id="other kernel size",
        ),
        pytest.param(
            lambda: _pool_with_running_stream(
                TCNConfig(
                    in_channels=2, channels=[3, 4], kernel_size=3, out_channels=2, dropout=0.1
                ),
                seed=1,
            ),
            "different model",
            id="same weights, config differs in dropout",
        ),
        pytest.param(
            lambda: _pool_with_running_stream(
                TCNConfig(in_channels=2, channels=[3, 4], kernel_size=3, vocab_size=5), seed=1
            ),
            "different model",
            id="token model",
        ),
    ],
)
def test_import_of_another_models_state_is_refused(make_state, message: str) -> None:
    foreign_pool, foreign_slot, _ = make_state()
    state = foreign_pool.export_state(foreign_slot)
    pool, slot, net = _pool_with_running_stream(MISMATCH_CONFIG, seed=1)
    with pytest.raises(StateMismatchError, match=message):
        pool.import_state(state)
    assert len(pool) == 1
    assert pool.free == 1
    _assert_stream_continues(pool, slot, net, 9, seed=1)


@pytest.mark.parametrize(
    "state",
    [None, {}, {"format": "something-else"}, [1, 2], "state"],
    ids=["none", "empty", "wrong format", "list", "str"],
)
def test_import_of_garbage_is_refused(state: object) -> None:
    pool, slot, net = _pool_with_running_stream(MISMATCH_CONFIG, seed=1)
    with pytest.raises(StateMismatchError):
        pool.import_state(state)  # type: ignore[arg-type]
    assert (len(pool), pool.free) == (1, 1)
    _assert_stream_continues(pool, slot, net, 9, seed=1)


def test_import_into_a_full_pool() -> None:
    pool, slot, net = _pool_with_running_stream(MISMATCH_CONFIG, seed=1)
    state = pool.export_state(slot)
    pool.open()
    with pytest.raises(PoolFullError):
        pool.import_state(state)
    assert (len(pool), pool.free) == (2, 0)
    _assert_stream_continues(pool, slot, net, 9, seed=1)


def _assert_stream_continues(
    pool: StreamPool, slot: int, net: TCN, position: int, seed: int
) -> None:
    """The stream fed random_sequence(40, seed)[:position] still matches the full forward."""
    config = net.config
    assert pool.position(slot) == position
    seq = random_sequence(config, 40, seed)
    expected = full_forward(net, seq)
    y1 = pool.step([slot], torch.stack([row(seq, position)]))
    y2 = pool.push(slot, chunk(seq, position + 1, position + 6))
    torch.testing.assert_close(torch.cat([y1, y2]), expected[position : position + 6], **TOL32)


@pytest.mark.parametrize(
    "config",
    [
        TCNConfig(in_channels=1, channels=[1]),
        TCNConfig(in_channels=3, channels=[4, 6, 2], kernel_size=3, out_channels=5),
        TCNConfig(in_channels=2, channels=[2, 2], kernel_size=1, dilations=[3, 7]),
        TCNConfig(in_channels=4, channels=[8, 3], kernel_size=4, dilations=[5, 2], vocab_size=11),
        TCNConfig(in_channels=4, channels=[64] * 8, kernel_size=7, out_channels=3),  # R1
    ],
    ids=["tiny", "head", "k1", "tokens", "R1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_state_bytes_per_stream(config: TCNConfig, dtype: torch.dtype) -> None:
    pool = StreamPool(TCN(config), capacity=2, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert pool.state_bytes_per_stream == ring_bytes_per_stream(config, itemsize)
    # An exported stream is exactly its conv rings plus the last R - 1 raw inputs (token ids
    # for a token model), which `history` hands out for rebuilding a stream.
    per_input = 8 if config.vocab_size is not None else config.in_channels * itemsize
    history_bytes = (config.receptive_field - 1) * per_input
    exported = _tensors_in(pool.export_state(pool.open()))
    exported_bytes = sum(t.numel() * t.element_size() for t in exported)
    assert exported_bytes == pool.state_bytes_per_stream + history_bytes


def test_state_bytes_of_the_reference_config() -> None:
    """R1: 8 blocks x 64 channels, kernel 7: 16 rings of (6 d + 1) rows, 64 wide but the first."""
    config = TCNConfig(in_channels=4, channels=[64] * 8, kernel_size=7, out_channels=3)
    rows = sum(6 * d + 1 for d in config.dilations)
    expected = (rows * 64 + (6 * 1 + 1) * 4 + rows * 64 - (6 * 1 + 1) * 64) * 4
    assert StreamPool(TCN(config), capacity=1).state_bytes_per_stream == expected


# ----- bad input: a clear exception, and no state changes ----------------------------------

FLOAT_CONFIG = TCNConfig(in_channels=3, channels=[4, 5], kernel_size=3, out_channels=2)
TOKEN_CONFIG = TCNConfig(in_channels=3, channels=[4, 4], kernel_size=3, vocab_size=7)
A_FED, B_FED = 7, 4


class Scene:
    """Two running streams (a at 7, b at 4), one closed slot, one never-opened slot."""

    def __init__(self, config: TCNConfig) -> None:
        self.config = config
        self.net = random_net(config, seed=21)
        self.seqs = [random_sequence(config, 20, seed=30), random_sequence(config, 20, seed=31)]
        self.pool = StreamPool(self.net, capacity=5)
        self.a, self.b, self.closed = self.pool.open(), self.pool.open(), self.pool.open()
        self.pool.push(self.closed, chunk(self.seqs[0], 0, 3))
        self.pool.close(self.closed)
        self.unused = 4
        self.head_a = self.pool.push(self.a, chunk(self.seqs[0], 0, A_FED))
        self.head_b = torch.cat(
            [self.pool.step([self.b], row(self.seqs[1], t)[None]) for t in range(B_FED)]
        )
        self.histories = [self.pool.history(self.a), self.pool.history(self.b)]

    def rows(self, n: int) -> torch.Tensor:
        if self.config.vocab_size is not None:
            return torch.arange(n) % self.config.vocab_size
        return torch.randn(n, self.config.in_channels)

    def assert_untouched(self) -> None:
        """Positions, occupancy and (by finishing both streams) the ring contents are intact."""
        pool, seqs = self.pool, self.seqs
        assert (pool.position(self.a), pool.position(self.b)) == (A_FED, B_FED)
        assert (len(pool), pool.free) == (2, 3)
        assert not pool.is_open(self.closed)
        assert not pool.is_open(self.unused)
        for before, slot in zip(self.histories, (self.a, self.b), strict=True):
            torch.testing.assert_close(pool.history(slot), before, atol=0, rtol=0)
        tail_a = pool.push(self.a, chunk(seqs[0], A_FED, 12))
        tail_b = [pool.step([self.b, self.a], torch.stack([row(seqs[1], B_FED), row(seqs[0], 12)]))]
        tail_b.append(pool.push(self.b, chunk(seqs[1], B_FED + 1, 20)))
        tail_a2 = pool.push(self.a, chunk(seqs[0], 13, 20))
        got_a = torch.cat([self.head_a, tail_a, tail_b[0][1:], tail_a2])
        got_b = torch.cat([self.head_b, tail_b[0][:1], tail_b[1]])
        torch.testing.assert_close(got_a, full_forward(self.net, seqs[0]), **TOL32)
        torch.testing.assert_close(got_b, full_forward(self.net, seqs[1]), **TOL32)


def _nan_in_second_row(s: Scene) -> torch.Tensor:
    x = s.rows(2)
    x[1, 0] = float("nan")
    return x


def _inf_in_chunk(s: Scene) -> torch.Tensor:
    x = s.rows(5)
    x[3, 2] = float("-inf")
    return x


BAD_FLOAT_CALLS = {
    # step: slots
    "step unknown slot": (lambda s: s.pool.step([s.a, s.unused], s.rows(2)), SlotError, "slot"),
    "step closed slot": (lambda s: s.pool.step([s.closed, s.b], s.rows(2)), SlotError, "slot"),
    "step slot == capacity": (lambda s: s.pool.step([s.a, 5], s.rows(2)), SlotError, "slot"),
    "step negative slot": (lambda s: s.pool.step([-1], s.rows(1)), SlotError, "slot"),
    "step duplicate slot": (
        lambda s: s.pool.step([s.a, s.b, s.a], s.rows(3)),
        SlotError,
        "more than once",
    ),
    "step duplicate slot tensor": (
        lambda s: s.pool.step(torch.tensor([s.b, s.b]), s.rows(2)),
        SlotError,
        "more than once",
    ),
    "step no slots": (lambda s: s.pool.step([], s.rows(1)), SlotError, "non-empty"),
    "step float slots": (lambda s: s.pool.step([0.0], s.rows(1)), SlotError, "ints"),
    "step 2-d slots": (lambda s: s.pool.step([[s.a, s.b]], s.rows(2)), SlotError, "1-D"),
    # step: rows
    "step too few rows": (lambda s: s.pool.step([s.a, s.b], s.rows(1)), ValueError, "1 rows for 2"),
    "step too many rows": (lambda s: s.pool.step([s.a], s.rows(2)), ValueError, "2 rows for 1"),
    "step wrong channels": (
        lambda s: s.pool.step([s.a, s.b], torch.randn(2, 4)),
        ValueError,
        r"expected shape \(rows, 3\)",
    ),
    "step 1-d row": (lambda s: s.pool.step([s.a], torch.randn(3)), ValueError, r"\(rows, 3\)"),
    "step int rows": (
        lambda s: s.pool.step([s.a, s.b], torch.ones(2, 3, dtype=torch.int64)),
        TypeError,
        "floating-point",
    ),
    "step nan": (lambda s: s.pool.step([s.a, s.b], _nan_in_second_row(s)), ValueError, "finite"),
    "step inf": (
        lambda s: s.pool.step([s.b], torch.full((1, 3), float("inf"))),
        ValueError,
        "finite",
    ),
    "step above the input bound": (
        lambda s: s.pool.step([s.a], torch.full((1, 3), s.pool.max_input_abs * 2)),
        ValueError,
        "within",
    ),
    "step empty rows": (lambda s: s.pool.step([s.a], torch.empty(0, 3)), ValueError, "rows"),
    # push
    "push unknown slot": (lambda s: s.pool.push(s.unused, s.rows(2)), SlotError, "slot"),
    "push closed slot": (lambda s: s.pool.push(s.closed, s.rows(2)), SlotError, "slot"),
    "push slot == capacity": (lambda s: s.pool.push(5, s.rows(2)), SlotError, "slot"),
    "push negative slot": (lambda s: s.pool.push(-1, s.rows(2)), SlotError, "slot"),
    "push wrong channels": (
        lambda s: s.pool.push(s.a, torch.randn(4, 2)),
        ValueError,
        r"expected shape \(rows, 3\)",
    ),
    "push channel-major chunk": (
        lambda s: s.pool.push(s.a, torch.randn(3, 5)),
        ValueError,
        r"\(rows, 3\)",
    ),
    "push 3-d chunk": (
        lambda s: s.pool.push(s.a, torch.randn(1, 4, 3)),
        ValueError,
        r"\(rows, 3\)",
    ),
    "push int chunk": (
        lambda s: s.pool.push(s.a, torch.ones(4, 3, dtype=torch.int32)),
        TypeError,
        "floating-point",
    ),
    "push inf": (lambda s: s.pool.push(s.a, _inf_in_chunk(s)), ValueError, "finite"),
    "push empty": (lambda s: s.pool.push(s.b, torch.empty(0, 3)), ValueError, "no rows"),
    # advance (a ragged batch)
    "advance unknown slot": (
        lambda s: s.pool.advance([s.a, s.unused], s.rows(3), [1, 2]),
        SlotError,
        "slot",
    ),
    "advance duplicate slot": (
        lambda s: s.pool.advance([s.a, s.a], s.rows(3), [1, 2]),
        SlotError,
        "more than once",
    ),
    "advance rows != sum of lengths": (
        lambda s: s.pool.advance([s.a, s.b], s.rows(4), [1, 2]),
        ValueError,
        "4 rows for 3",
    ),
    "advance zero length": (
        lambda s: s.pool.advance([s.a, s.b], s.rows(2), [2, 0]),
        ValueError,
        "integers >= 1",
    ),
    "advance lengths for other streams": (
        lambda s: s.pool.advance([s.a, s.b], s.rows(2), [2]),
        ValueError,
        "2 integers",
    ),
    "advance float lengths": (
        lambda s: s.pool.advance([s.a], s.rows(2), [2.0]),
        ValueError,
        "integers",
    ),
    "advance over max_advance_rows": (
        lambda s: s.pool.advance([s.a, s.b], s.rows(1030), [1000, 30]),
        ValueError,
        "max_advance_rows",
    ),
    "advance nan": (
        lambda s: s.pool.advance([s.b, s.a], _nan_in_second_row(s), [1, 1]),
        ValueError,
        "finite",
    ),
}

BAD_TOKEN_CALLS = {
    "step float rows": (lambda s: s.pool.step([s.a], torch.ones(1, 3)), TypeError, "token ids"),
    "step float ids": (lambda s: s.pool.step([s.a], torch.ones(1)), TypeError, "int64"),
    "step id == vocab": (
        lambda s: s.pool.step([s.a, s.b], torch.tensor([1, 7])),
        ValueError,
        r"token ids must be in \[0, 7\)",
    ),
    "step negative id": (
        lambda s: s.pool.step([s.b], torch.tensor([-1])),
        ValueError,
        r"\[0, 7\)",
    ),
    "step too many ids": (lambda s: s.pool.step([s.a], torch.tensor([1, 2])), ValueError, "rows"),
    "step unknown slot": (lambda s: s.pool.step([s.unused], s.rows(1)), SlotError, "slot"),
    "step duplicate": (lambda s: s.pool.step([s.b, s.b], s.rows(2)), SlotError, "more than once"),
    "push float chunk": (lambda s: s.pool.push(s.a, torch.ones(4, 3)), TypeError, "token ids"),
    "push id out of range": (
        lambda s: s.pool.push(s.a, torch.tensor([0, 3, 6, 7, 2])),
        ValueError,
        r"\[0, 7\)",
    ),
    "push empty": (
        lambda s: s.pool.push(s.a, torch.empty(0, dtype=torch.int64)),
        ValueError,
        "no rows",
    ),
    "push closed slot": (lambda s: s.pool.push(s.closed, s.rows(3)), SlotError, "slot"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLOAT_CALLS))
def test_bad_call_on_float_model_changes_nothing(case: str) -> None:
    call, error, message = BAD_FLOAT_CALLS[case]
    scene = Scene(FLOAT_CONFIG)
    with pytest.raises(error, match=message):
        call(scene)
    scene.assert_untouched()


def _in_the_kernels_layout(step):  # type: ignore[no-untyped-def]
    """pool.step with int lists as int64 arrays and float tensors as numpy arrays: the layout
    in which the fused kernel checks a step itself (StepPaths._step_fused_checked)."""

    def wrapped(slots, x):  # type: ignore[no-untyped-def]
        if isinstance(slots, list) and slots and all(type(v) is int for v in slots):
            slots = np.array(slots, dtype=np.int64)
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            x = x.numpy()
        return step(slots, x)

    return wrapped


@pytest.mark.parametrize("case", sorted(c for c in BAD_FLOAT_CALLS if c.startswith("step")))
def test_bad_step_in_the_fused_kernels_layout_changes_nothing(case: str) -> None:
    # The same refusals, where the compiled kernel does the checks before it writes anything.
    call, error, message = BAD_FLOAT_CALLS[case]
    scene = Scene(FLOAT_CONFIG)
    assert scene.pool._fused_checked and scene.pool.kernel_for(3) == "fused"
    scene.pool.step = _in_the_kernels_layout(scene.pool.step)
    with pytest.raises(error, match=message):
        call(scene)
    del scene.pool.step
    scene.assert_untouched()


def test_a_step_at_the_last_position_is_refused_in_either_layout() -> None:
    scene = Scene(FLOAT_CONFIG)
    pool = scene.pool
    pool._positions[scene.b] = MAX_POSITION
    for slots in ([scene.a, scene.b], np.array([scene.a, scene.b], dtype=np.int64)):
        with pytest.raises(ValueError, match="largest position"):
            pool.step(slots, scene.rows(2).numpy())
    assert pool.position(scene.a) == A_FED


@pytest.mark.parametrize("case", sorted(BAD_TOKEN_CALLS))
def test_bad_call_on_token_model_changes_nothing(case: str) -> None:
    call, error, message = BAD_TOKEN_CALLS[case]
    scene = Scene(TOKEN_CONFIG)
    with pytest.raises(error, match=message):
        call(scene)
    scene.assert_untouched()


def test_token_model_with_wrongly_shaped_ids_changes_nothing() -> None:
    scene = Scene(TOKEN_CONFIG)
    with pytest.raises((TypeError, ValueError), match=r"\(rows,\)"):
        scene.pool.step([scene.a], torch.tensor([[1]]))
    with pytest.raises((TypeError, ValueError), match=r"\(rows,\)"):
        scene.pool.push(scene.a, torch.tensor([[1, 2, 3]]))
    scene.assert_untouched()


@pytest.mark.parametrize("method", ["close", "reset", "position", "export_state"])
@pytest.mark.parametrize("which", ["closed", "unused", "capacity", "negative"])
def test_slot_methods_refuse_slots_that_are_not_open(method: str, which: str) -> None:
    scene = Scene(FLOAT_CONFIG)
    slot = {"closed": scene.closed, "unused": scene.unused, "capacity": 5, "negative": -1}[which]
    with pytest.raises(SlotError, match="slot"):
        getattr(scene.pool, method)(slot)
    scene.assert_untouched()


def test_double_close_does_not_free_the_slot_twice() -> None:
    scene = Scene(FLOAT_CONFIG)
    with pytest.raises(SlotError):
        scene.pool.close(scene.closed)
    assert scene.pool.free == 3
    opened = [scene.pool.open() for _ in range(3)]
    assert len(set(opened) | {scene.a, scene.b}) == 5
    with pytest.raises(PoolFullError):
        scene.pool.open()


def test_bool_slot_is_refused_with_slot_error() -> None:
    scene = Scene(FLOAT_CONFIG)
    with pytest.raises(SlotError):
        scene.pool.push(True, scene.rows(2))  # type: ignore[arg-type]


def test_full_capacity() -> None:
    config = FLOAT_CONFIG
    net = random_net(config, seed=4)
    pool = StreamPool(net, capacity=3)
    assert (len(pool), pool.free, pool.capacity) == (0, 3, 3)
    slots = [pool.open() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert (len(pool), pool.free) == (3, 0)
    seqs = [random_sequence(config, 10, seed=i) for i in range(3)]
    heads = [pool.push(s, chunk(q, 0, 4)) for s, q in zip(slots, seqs, strict=True)]
    with pytest.raises(PoolFullError, match="3"):
        pool.open()
    assert (len(pool), pool.free) == (3, 0)
    assert [pool.position(s) for s in slots] == [4, 4, 4]
    tails = pool.step(slots, torch.stack([row(q, 4) for q in seqs]))
    for i, (s, q) in enumerate(zip(slots, seqs, strict=True)):
        got = torch.cat([heads[i], tails[i : i + 1], pool.push(s, chunk(q, 5, 10))])
        torch.testing.assert_close(got, full_forward(net, q), **TOL32)
    pool.close(slots[1])
    assert (len(pool), pool.free) == (2, 1)
    assert pool.open() == slots[1]
    assert (len(pool), pool.free) == (3, 0)


@given(ops=st.lists(st.integers(0, 5), max_size=40))
@settings(max_examples=50, deadline=None)
def test_occupancy_bookkeeping(ops: list[int]) -> None:
    """Random open/close sequences: len, free and is_open always agree with a plain set."""
    pool = StreamPool(TCN(TCNConfig(in_channels=1, channels=[1])), capacity=4)
    model: set[int] = set()
    for op in ops:
        if op >= 4:
            if len(model) == 4:
                with pytest.raises(PoolFullError):
                    pool.open()
            else:
                slot = pool.open()
                assert slot not in model
                assert 0 <= slot < 4
                assert pool.position(slot) == 0
                model.add(slot)
        elif op in model:
            pool.close(op)
            model.remove(op)
        else:
            with pytest.raises(SlotError):
                pool.close(op)
        assert len(pool) == len(model)
        assert pool.free == 4 - len(model)
        assert {s for s in range(4) if pool.is_open(s)} == model


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, None])
def test_capacity_must_be_positive_int(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        StreamPool(TCN(TCNConfig(in_channels=1, channels=[1])), capacity=capacity)  # type: ignore[arg-type]


def test_integer_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="floating-point dtype"):
        StreamPool(TCN(TCNConfig(in_channels=1, channels=[1])), capacity=1, dtype=torch.int32)


def test_numpy_and_list_inputs_are_accepted() -> None:
    net = random_net(FLOAT_CONFIG, seed=6)
    seq = random_sequence(FLOAT_CONFIG, 6, seed=6)
    pool = StreamPool(net, capacity=1)
    slot = pool.open()
    y = [
        pool.push(slot, chunk(seq, 0, 3).numpy()),
        pool.step(np.array([slot]), chunk(seq, 3, 4).double().numpy()),
        pool.step([slot], chunk(seq, 4, 5).tolist()),
        pool.push(np.int64(slot), chunk(seq, 5, 6).tolist()),
    ]
    torch.testing.assert_close(torch.cat(y), full_forward(net, seq), **TOL32)


def test_pool_snapshots_weights_at_construction() -> None:
    config = TCNConfig(in_channels=2, channels=[3, 3], kernel_size=3)
    net = random_net(config, seed=0)
    frozen = copy.deepcopy(net)
    pool = StreamPool(net, capacity=2)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)  # e.g. load_state_dict of new weights into the served module
    seq = random_sequence(config, 6, seed=0)
    pushed_slot, stepped_slot = pool.open(), pool.open()
    pushed = pool.push(pushed_slot, chunk(seq, 0, 6))
    stepped = torch.cat([pool.step([stepped_slot], row(seq, t)[None]) for t in range(6)])
    torch.testing.assert_close(pushed, stepped, **TOL32)
    torch.testing.assert_close(pushed, full_forward(frozen, seq), **TOL32)
