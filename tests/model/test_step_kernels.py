"""The step kernels and the two ways of computing ring rows agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import TCN, StreamPool, TCNConfig, fused_step
from model.step_kernels import NUMPY_MAX_MACS


def _net(kernel_size: int = 3, channels=(6, 4, 4), vocab_size=None, **options) -> TCN:
    torch.manual_seed(1)
    config = TCNConfig(3, channels, kernel_size, out_channels=2, vocab_size=vocab_size, **options)
    net = TCN(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.4)
    return net.fold_weight_norm()


# Per-stream embeddings, each way a block takes them (model/streaming/conditioning.py).
EMBEDDED = {
    "plain": {},
    "add": {"embedding_dims": (2, 3)},
    "concat": {"embedding_dims": (4,), "embedding_mode": "concat", "gate": True},
    "concat after layer norm": {
        "embedding_dims": (2,),
        "embedding_mode": "concat",
        "layer_norm": True,
    },
}


@pytest.mark.parametrize("embedded", sorted(EMBEDDED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vocab_size", [None, 5])
def test_numpy_blas_and_torch_kernels_agree_step_by_step(vocab_size, dtype, embedded):
    net = _net(vocab_size=vocab_size, **EMBEDDED[embedded])
    width = net.config.embedding_width
    gen = torch.Generator().manual_seed(7)
    embeddings = [torch.randn(width, generator=gen) if width else None for _ in range(6)]
    pools = {k: StreamPool(net, 6, dtype=dtype, step_kernel=k) for k in ("numpy", "blas", "torch")}
    slots = {k: [p.open(embedding=e) for e in embeddings] for k, p in pools.items()}
    gen = torch.Generator().manual_seed(0)
    for t in range(40):
        active = torch.randperm(6, generator=gen)[: 1 + t % 6].tolist()
        if vocab_size:
            x = torch.randint(0, vocab_size, (len(active),), generator=gen)
        else:
            x = torch.randn(len(active), 3, generator=gen)
        ys = {k: pools[k].step([slots[k][i] for i in active], x) for k in pools}
        for kernel in ("numpy", "blas"):
            assert ys[kernel].dtype == dtype
            torch.testing.assert_close(ys[kernel], ys["torch"], atol=1e-5, rtol=1e-5)
    for i in range(6):
        for kernel in ("numpy", "blas"):
            torch.testing.assert_close(pools[kernel].history(i), pools["torch"].history(i))


def test_device_ring_rows_match_host_ring_rows():
    # The on-device index arithmetic (used on CUDA) must equal the host version on any state.
    pool = StreamPool(_net(kernel_size=4), 5)
    for _ in range(5):
        pool.open()
    pool._positions[:] = [0, 3, 17, 250, 1001]
    slots = np.array([4, 0, 2, 1])
    host = pool._ring_rows(slots)
    device = pool._device_ring_rows(slots)
    for h, d in zip(host, device, strict=True):
        np.testing.assert_array_equal(h, d.cpu().numpy())


def test_auto_dispatch_threshold(monkeypatch):
    net = _net(channels=(64, 64))
    assert StreamPool(net, 4).numpy_max_rows == 0  # with numba the fused kernel takes these
    monkeypatch.setattr(fused_step, "AVAILABLE", False)
    pool = StreamPool(net, 4)
    biggest = max(w.numel() for w in pool._matrices())
    assert biggest == 3 * 64 * 64
    assert pool.numpy_max_rows == NUMPY_MAX_MACS // biggest
    assert StreamPool(net, 4, step_kernel="torch").numpy_max_rows == 0
    assert StreamPool(net, 4, dtype=torch.bfloat16).numpy_max_rows == 0  # numpy has no bf16


def test_bad_kernel_choices():
    net = _net()
    with pytest.raises(ValueError, match="step_kernel must be one of"):
        StreamPool(net, 2, step_kernel="fast")
    for kernel in ("numpy", "fused", "blas"):
        with pytest.raises(ValueError, match=f"{kernel} step kernel needs a CPU pool"):
            StreamPool(net, 2, dtype=torch.float16, step_kernel=kernel)
        with pytest.raises(ValueError, match="cuda_graphs=True runs its own step"):
            StreamPool(net, 2, step_kernel=kernel, cuda_graphs=True)
    with pytest.raises(ValueError, match="at least one stream"):
        StreamPool(net, 2).kernel_for(0)


def test_a_push_that_fails_half_way_leaves_the_stream_untouched(monkeypatch):
    from model.streaming import CHUNKED_PUSH_ROWS

    net = _net()
    pool = StreamPool(net, 2)
    slot = pool.open()
    x = torch.randn(CHUNKED_PUSH_ROWS + 30, 3)  # x[10:] is a chunk: one conv per layer
    pool.push(slot, x[:10])
    before = pool.export_state(slot)
    calls = 0
    real_conv1d = torch.nn.functional.conv1d

    def failing_conv1d(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:  # the second block's second conv
            raise RuntimeError("out of memory")
        return real_conv1d(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv1d", failing_conv1d)
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.push(slot, x[10:])
    monkeypatch.setattr(torch.nn.functional, "conv1d", real_conv1d)
    after = pool.export_state(slot)
    assert after["position"] == before["position"] == 10
    for a, b in zip(after["rings"], before["rings"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(after["history"], before["history"], rtol=0, atol=0)
    y = pool.push(slot, x[10:])  # the retry computes what an uninterrupted push would have
    torch.testing.assert_close(y, net(x.T[None])[0].T[10:], atol=1e-5, rtol=1e-5)
