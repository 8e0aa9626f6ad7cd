"""StreamPool on a CUDA device: streams on the GPU equal the CPU float64 full forward.

Skipped without a GPU. On a GPU machine: `python -m pytest -q -m cuda tests/model`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import StreamPool, TCNConfig
from tests.model.conftest import drive, full_forward, random_net, random_sequence, tcn_configs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(autouse=True, scope="module")
def exact_float32():
    """cuDNN convolutions default to TF32 (~1e-3 error); the serving process turns it off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@given(config=tcn_configs(max_blocks=3), seed=st.integers(0, 2**16), data=st.data())
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_cuda_streams_equal_cpu_float64_forward(
    config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    net = random_net(config, seed)
    n = data.draw(st.integers(2, 4), label="streams")
    lengths = data.draw(
        st.lists(st.integers(1, config.receptive_field + 10), min_size=n, max_size=n),
        label="lengths",
    )
    seqs = [random_sequence(config, length, seed + i) for i, length in enumerate(lengths)]
    expected = [full_forward(net, s, dtype=torch.float64) for s in seqs]
    pool = StreamPool(net, capacity=n + 1, device="cuda")
    assert pool.device.type == "cuda"
    slots = [pool.open() for _ in range(n)]
    input_device = data.draw(st.sampled_from(["cpu", "cuda"]), label="inputs on")
    got = drive(data, pool, slots, seqs, input_device=input_device)
    for g, e in zip(got, expected, strict=True):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu().double(), e, **TOL)


def test_cuda_state_moves_to_a_cpu_pool_and_back() -> None:
    config = TCNConfig(in_channels=3, channels=[8, 8, 4], kernel_size=3, out_channels=2)
    net = random_net(config, seed=0)
    seq = random_sequence(config, 40, seed=0)
    expected = full_forward(net, seq, dtype=torch.float64)
    gpu = StreamPool(net, capacity=2, device="cuda")
    cpu = StreamPool(net, capacity=2)
    slot = gpu.open()
    head = gpu.push(slot, seq[:, :15].T.cuda()).cpu()
    state = gpu.export_state(slot)
    moved = cpu.import_state(state)
    middle = cpu.push(moved, seq[:, 15:30].T)
    back = gpu.import_state(cpu.export_state(moved))
    tail = gpu.push(back, seq[:, 30:].T).cpu()
    got = torch.cat([head, middle, tail])
    torch.testing.assert_close(got.double(), expected, **TOL)
