"""The compiled kernels (model/fused_step.py: the fused step, and the ring gathers of the "blas"
step) against the torch kernel and the full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import NonFiniteOutputError, StreamPool, TCNConfig, fused_step
from tests.model.conftest import (
    full_forward,
    random_embedding,
    random_net,
    random_sequence,
    row,
    tcn_configs,
)


@pytest.mark.parametrize("compiled", ["fused", "blas"])
@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_compiled_steps_equal_the_full_forward_and_the_torch_kernel(
    compiled: str, config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    net = random_net(config, seed)
    n = data.draw(st.integers(1, 4), label="streams")
    length = data.draw(st.integers(1, config.receptive_field + 6), label="steps")
    seqs = [random_sequence(config, length, seed + i) for i in range(n)]
    embeddings = [random_embedding(config, seed + i) for i in range(n)]
    pools = {kernel: StreamPool(net, n + 1, step_kernel=kernel) for kernel in (compiled, "torch")}
    assert all(pools[compiled].kernel_for(rows) == compiled for rows in range(1, n + 2))
    slots = {kernel: [pool.open(embedding=e) for e in embeddings] for kernel, pool in pools.items()}
    outputs = {kernel: [] for kernel in pools}
    for t in range(length):
        active = data.draw(st.permutations(range(n)), label="order")[: 1 + t % n]
        x = torch.stack([row(seqs[i], t) for i in active])
        for kernel, pool in pools.items():
            y = pool.step([slots[kernel][i] for i in active], x)
            outputs[kernel].append((active, y))
        # streams left out of this step catch up one row at a time, in their own order
        for i in sorted(set(range(n)) - set(active)):
            for kernel, pool in pools.items():
                outputs[kernel].append(([i], pool.step([slots[kernel][i]], row(seqs[i], t)[None])))
    for (_, got), (_, torch_y) in zip(outputs[compiled], outputs["torch"], strict=True):
        torch.testing.assert_close(got, torch_y, atol=1e-5, rtol=1e-5)
    per_stream: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for active, y in outputs[compiled]:
        for j, i in enumerate(active):
            per_stream[i].append(y[j])
    for i in range(n):
        want = full_forward(net, seqs[i], embedding=embeddings[i])
        torch.testing.assert_close(torch.stack(per_stream[i]), want, atol=1e-5, rtol=1e-5)


def test_auto_runs_small_steps_fused_and_large_ones_through_blas() -> None:
    config = TCNConfig(in_channels=4, channels=(64, 64), kernel_size=7, out_channels=3)
    # Weights at ~1.5 / sqrt(fan-in) keep activations near unit scale, where a float32 tolerance
    # of 1e-5 means something: at random_net's default std (0.4) a 448-wide fan-in grows them
    # ~8x per layer, to outputs in the thousands whose float32 rounding exceeds it in any kernel.
    std = 1.5 / (7 * 64) ** 0.5
    pool = StreamPool(random_net(config, seed=0, std=std), capacity=64)
    biggest = 7 * 64 * 64
    assert pool.fused_max_rows == fused_step.FUSED_MAX_MACS // biggest < 64
    assert StreamPool(random_net(config, seed=0), 4).fused_max_rows == 4  # capped at capacity
    slots = [pool.open() for _ in range(64)]
    gen = torch.Generator().manual_seed(0)
    # The contract is against exact arithmetic (a float64 reference), as everywhere else: two
    # float32 kernels that sum in different orders may each be within it and differ by more.
    reference = StreamPool(
        random_net(config, seed=0, std=std), capacity=64, dtype=torch.float64, step_kernel="torch"
    )
    assert reference.kernel_for(1) == reference.kernel_for(64) == "torch"
    ref_slots = [reference.open() for _ in range(64)]
    most = pool.fused_max_rows
    for n, kernel in ((1, "fused"), (most, "fused"), (most + 1, "blas"), (64, "blas")):
        assert pool.kernel_for(n) == kernel
        x = torch.randn(n, 4, generator=gen)
        got = pool.step(slots[:n], x)
        want = reference.step(ref_slots[:n], x.double())
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["fused", "blas"])
def test_float64_and_token_models_run_compiled(kernel: str) -> None:
    config = TCNConfig(in_channels=3, channels=(5, 4), kernel_size=3, out_channels=2, vocab_size=7)
    net = random_net(config, seed=3)
    seq = random_sequence(config, 30, seed=4)
    for dtype in (torch.float32, torch.float64):
        pool = StreamPool(net, 2, dtype=dtype, step_kernel=kernel)
        slot = pool.open()
        got = torch.cat([pool.step([slot], seq[t : t + 1]) for t in range(30)])
        assert got.dtype == dtype
        want = full_forward(net, seq, dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_without_numba_auto_falls_back_to_numpy(monkeypatch) -> None:
    net = random_net(TCNConfig(in_channels=2, channels=(3,), kernel_size=2), seed=0)
    monkeypatch.setattr(fused_step, "AVAILABLE", False)
    pool = StreamPool(net, 2)
    assert pool.fused_max_rows == 0 and pool.numpy_max_rows > 0
    assert pool.kernel_for(1) == "numpy" and pool.kernel_for(pool.numpy_max_rows + 1) == "torch"
    for kernel in ("fused", "blas"):
        with pytest.raises(ValueError, match=f"the {kernel} step kernel needs numba"):
            StreamPool(net, 2, step_kernel=kernel)


def test_fused_kernel_refuses_more_rows_than_its_buffers() -> None:
    net = random_net(TCNConfig(in_channels=2, channels=(3,), kernel_size=2), seed=0)
    pool = StreamPool(net, 2)
    most = pool._fused_plan.max_rows
    slots = np.zeros(most + 1, dtype=np.int64)
    x = np.zeros((most + 1, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=f"1 to {most} rows"):
        fused_step.fused_step(pool._fused_plan, slots, np.zeros(most + 1, dtype=np.int64), x)


def test_fused_relu_keeps_nan_like_torch() -> None:
    # A NaN must not turn into 0 in a ReLU: the pool's refusal of non-finite outputs relies on it.
    config = TCNConfig(in_channels=1, channels=(2,), kernel_size=1)
    net = random_net(config, seed=0)
    with torch.no_grad():
        net.blocks[0].conv1.bias.fill_(float("nan"))
    pool = StreamPool(net, 1, step_kernel="fused")
    plan = pool._fused_plan
    y, finite = fused_step.fused_step(
        plan, np.array([0]), np.zeros(1, dtype=np.int64), np.ones((1, 1), dtype=np.float32)
    )
    assert not finite
    assert np.isnan(y).all()


def test_a_non_finite_step_in_the_kernels_layout_is_refused_and_changes_nothing() -> None:
    # int64 slots and float32 rows: the kernel checks and commits in one call
    # (`_step_checked`); a step whose outputs are not finite moves nothing on.
    config = TCNConfig(in_channels=2, channels=(3, 3), kernel_size=2, out_channels=1)
    pool = StreamPool(random_net(config, seed=3), 3, step_kernel="fused")
    a, b = pool.open(), pool.open()
    slots = np.array([a, b], dtype=np.int64)
    for _ in range(4):
        pool.step(slots, np.ones((2, 2), dtype=np.float32))
    history = [pool.history(a), pool.history(b)]
    plan = pool._fused_plan
    head_bias = plan.ops[16 * plan.n_blocks + 1]  # the kernel's copy of the head's bias
    kept = head_bias.copy()
    head_bias[0, 0] = np.nan
    with pytest.raises(NonFiniteOutputError, match=r"streams \[0, 1\]"):
        pool.step(slots, np.ones((2, 2), dtype=np.float32))
    assert pool.position(a) == pool.position(b) == 4
    for slot, before in zip((a, b), history, strict=True):
        torch.testing.assert_close(pool.history(slot), before, atol=0, rtol=0)
    head_bias[:] = kept
    y = pool.step(slots, np.ones((2, 2), dtype=np.float32))
    assert pool.position(a) == pool.position(b) == 5 and torch.isfinite(y).all()


def test_read_only_and_strided_inputs_give_the_same_steps() -> None:
    # Network buffers decode to read-only arrays and callers may pass views: same results, and
    # the caller's arrays are not written.
    config = TCNConfig(in_channels=2, channels=(4, 4), kernel_size=3, out_channels=1)
    net = random_net(config, seed=7)
    fused = StreamPool(net, 3, step_kernel="fused")
    blas = StreamPool(net, 3, step_kernel="blas")
    plain = StreamPool(net, 3, step_kernel="torch")
    for pool in (fused, blas, plain):
        for _ in range(3):
            pool.open()
    rng = np.random.default_rng(0)
    for t in range(12):
        wide = rng.standard_normal((3, 4)).astype(np.float32)
        x = wide[:, ::2] if t % 2 else wide[:, :2].copy()
        if t % 3 == 0:
            x.flags.writeable = False
        slots = np.array([2, 0, 1])[: 1 + t % 3]
        if t % 4 == 0:
            slots.flags.writeable = False
        before = x.copy()
        want = plain.step(slots, x[: slots.size])
        for pool in (fused, blas):
            got = pool.step(slots, x[: slots.size])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(x, before)


@given(config=tcn_configs(max_blocks=3), seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fused_ragged_advances_equal_the_torch_ragged_path_and_the_full_forward(
    config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    # A few rows in all (the service's 10-row pushes) take the fused kernel, each stream's rows
    # in time order; a "torch" pool takes model/ragged.py for the same calls.
    net = random_net(config, seed)
    n = data.draw(st.integers(1, 3), label="streams")
    length = data.draw(st.integers(1, config.receptive_field + 8), label="rows")
    seqs = [random_sequence(config, length, seed + i) for i in range(n)]
    pools = {kernel: StreamPool(net, n, step_kernel=kernel) for kernel in ("auto", "torch")}
    assert pools["auto"].fused_advance_rows > 0 and pools["torch"].fused_advance_rows == 0
    slots = {kernel: [pool.open() for _ in range(n)] for kernel, pool in pools.items()}
    got: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in range(n)] for k in pools}
    done = [0] * n
    while min(done) < length:
        active = [i for i in range(n) if done[i] < length]
        sizes = [data.draw(st.integers(1, min(6, length - done[i])), label="size") for i in active]
        chunks = [
            seqs[i][done[i] : done[i] + k]
            if seqs[i].dim() == 1
            else seqs[i][:, done[i] : done[i] + k].T
            for i, k in zip(active, sizes, strict=True)
        ]  # (k,) ids or (k, C) rows each
        x = torch.cat(chunks)
        for kernel, pool in pools.items():
            y = pool.advance([slots[kernel][i] for i in active], x, sizes)
            for part, i in zip(torch.split(y, sizes), active, strict=True):
                got[kernel][i].append(part)
        for i, k in zip(active, sizes, strict=True):
            done[i] += k
    for i in range(n):
        want = full_forward(net, seqs[i])
        for kernel in pools:
            torch.testing.assert_close(torch.cat(got[kernel][i]), want, atol=1e-5, rtol=1e-5)
        assert pools["auto"].position(slots["auto"][i]) == length
        history = pools["auto"].history(slots["auto"][i])
        torch.testing.assert_close(history, pools["torch"].history(slots["torch"][i]))


def test_a_few_ragged_rows_take_the_fused_kernel_and_many_the_ragged_path() -> None:
    config = TCNConfig(in_channels=2, channels=(64, 64), kernel_size=7)
    pool = StreamPool(random_net(config, seed=0), 4)
    calls = []
    real = pool._advance_fused
    pool._advance_fused = lambda *args: calls.append(len(args[2])) or real(*args)
    a, b = pool.open(), pool.open()
    few, many = 5, pool.fused_advance_rows + 1
    pool.advance([a, b], torch.randn(few, 2), [2, 3])
    pool.advance([a, b], torch.randn(many, 2), [1, many - 1])
    assert calls == [few]
    assert pool.position(a) == 3 and pool.position(b) == many + 2


def test_a_narrow_models_every_advance_takes_the_fused_kernel() -> None:
    # Narrow layers (at most FUSED_NARROW_MACS a row): the kernel is as fast as the torch path
    # at any row count and keeps the GIL released, so advances up to max_advance_rows take it.
    config = TCNConfig(in_channels=2, channels=(8, 8, 8), kernel_size=3)
    net = random_net(config, seed=3)
    pool = StreamPool(net, 3, max_advance_rows=400)
    reference = StreamPool(net, 3, step_kernel="torch", max_advance_rows=400)
    assert pool.fused_advance_rows == pool.max_advance_rows == 400
    calls = []
    real = pool._advance_fused
    pool._advance_fused = lambda *args: calls.append(len(args[2])) or real(*args)
    slots = [pool.open() for _ in range(3)]
    ref_slots = [reference.open() for _ in range(3)]
    seqs = [random_sequence(config, 150, seed) for seed in range(3)]  # (C, T) each
    lengths = [150, 100, 150]
    x = torch.cat([seq[:, :n].T for seq, n in zip(seqs, lengths, strict=True)])
    got = pool.advance(slots, x, lengths)
    assert calls == [400]
    torch.testing.assert_close(got, reference.advance(ref_slots, x, lengths), atol=1e-5, rtol=1e-5)
    for y, seq, n in zip(torch.split(got, lengths), seqs, lengths, strict=True):
        torch.testing.assert_close(y, full_forward(net, seq[:, :n]), atol=1e-5, rtol=1e-5)


def test_the_fused_kernel_has_a_branch_for_every_activation():
    """`_act` branches on an activation's position in model/config.py's ACTIVATIONS; a name
    added there without its branch would compute NaN (refused), so the lists must agree."""
    from model.config import ACTIVATIONS
    from model.fused_step import FUSED_ACTIVATIONS

    assert FUSED_ACTIVATIONS == ACTIVATIONS
