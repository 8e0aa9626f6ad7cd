"""StreamPool on a CUDA device: streams on the GPU equal the CPU float64 full forward.

Skipped without a GPU. On a GPU machine: `python -m pytest -q -m cuda tests/model`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import StreamPool, TCNConfig
from tests.model.conftest import (
    drive,
    full_forward,
    random_embedding,
    random_net,
    random_sequence,
    row,
    tcn_configs,
)

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


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
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
    embeddings = [random_embedding(config, seed + i) for i in range(n)]
    expected = [
        full_forward(net, s, dtype=torch.float64, embedding=e)
        for s, e in zip(seqs, embeddings, strict=True)
    ]
    pool = StreamPool(net, capacity=n + 1, device="cuda")
    assert pool.device.type == "cuda"
    slots = [pool.open(embedding=e) for e in embeddings]
    input_device = data.draw(st.sampled_from(["cpu", "cuda"]), label="inputs on")
    got = drive(data, pool, slots, seqs, input_device=input_device)
    for g, e in zip(got, expected, strict=True):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu().double(), e, **TOL)


@pytest.mark.parametrize(
    "options",
    [{}, {"embedding_dims": (3, 2)}, {"embedding_dims": (4,), "embedding_mode": "concat",
                                     "layer_norm": True}],
    ids=["plain", "embedding added", "embedding concatenated after a layer norm"],
)  # fmt: skip
def test_cuda_state_moves_to_a_cpu_pool_and_back(options: dict) -> None:
    config = TCNConfig(in_channels=3, channels=[8, 8, 4], kernel_size=3, out_channels=2, **options)
    net = random_net(config, seed=0)
    seq, embedding = random_sequence(config, 40, seed=0), random_embedding(config, seed=0)
    expected = full_forward(net, seq, dtype=torch.float64, embedding=embedding)
    gpu = StreamPool(net, capacity=2, device="cuda")
    cpu = StreamPool(net, capacity=2)
    slot = gpu.open(embedding=embedding)
    head = gpu.push(slot, seq[:, :15].T.cuda()).cpu()
    state = gpu.export_state(slot)
    moved = cpu.import_state(state)
    middle = cpu.push(moved, seq[:, 15:30].T)
    back = gpu.import_state(cpu.export_state(moved))
    tail = gpu.push(back, seq[:, 30:].T).cpu()
    got = torch.cat([head, middle, tail])
    torch.testing.assert_close(got.double(), expected, **TOL)


# bfloat16 keeps 8 bits of mantissa: scripts/bf16_error.py measures the built-in model's bf16
# outputs within 0.9-1.0% of its largest output (max |err| / max |y|); the tests allow 3%.
BF16_SCALE_TOL = 0.03


@given(
    config=tcn_configs(max_blocks=3, embeddings=True), seed=st.integers(0, 2**16), data=st.data()
)
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_cuda_graph_steps_equal_eager_steps_and_the_full_forward(
    config: TCNConfig, seed: int, data: st.DataObject
) -> None:
    net = random_net(config, seed)
    n = data.draw(st.integers(1, 6), label="streams")
    length = data.draw(st.integers(1, config.receptive_field + 8), label="steps")
    seqs = [random_sequence(config, length, seed + i) for i in range(n)]
    embeddings = [random_embedding(config, seed + i) for i in range(n)]
    capacity = n + data.draw(st.integers(0, 3), label="spare")
    graphed = StreamPool(net, capacity, device="cuda", cuda_graphs=True)
    eager = StreamPool(net, capacity, device="cuda")
    assert graphed._graphs.capture  # real captures and replays, not the CPU form
    slots = [graphed.open(embedding=e) for e in embeddings]
    assert slots == [eager.open(embedding=e) for e in embeddings]
    fed, got = [0] * n, [[] for _ in range(n)]
    while min(fed) < length:
        live = [i for i in range(n) if fed[i] < length]
        chosen = data.draw(st.permutations(live), label="order")
        chosen = chosen[: data.draw(st.integers(1, len(live)), label="how many")]
        x = torch.stack([row(seqs[i], fed[i]) for i in chosen])
        picked = [slots[i] for i in chosen]
        y_graph = graphed.step(picked, x)
        assert y_graph.device.type == "cpu"  # the graphs hand their outputs over on the host
        torch.testing.assert_close(y_graph, eager.step(picked, x).cpu(), **TOL)
        for j, i in enumerate(chosen):
            got[i].append(y_graph[j])
            fed[i] += 1
    for parts, seq, e in zip(got, seqs, embeddings, strict=True):
        want = full_forward(net, seq, dtype=torch.float64, embedding=e)
        torch.testing.assert_close(torch.stack(parts).double(), want, **TOL)


def test_cuda_graphs_of_every_bucket() -> None:
    config = TCNConfig(in_channels=4, channels=[16] * 4, kernel_size=3, out_channels=2)
    net = random_net(config, seed=3)
    capacity = 70  # buckets 1, 2, 4, ..., 64, 70
    graphed = StreamPool(net, capacity, device="cuda", cuda_graphs=True)
    graphed._graphs.capture_all()
    eager = StreamPool(net, capacity, device="cuda")
    for pool in (graphed, eager):
        for _ in range(capacity):
            pool.open()
    gen = torch.Generator().manual_seed(0)
    for n in (70, 1, 33, 64, 65, 2, 70):
        slots = torch.randperm(capacity, generator=gen)[:n].numpy()
        x = torch.randn(n, 4, generator=gen)
        torch.testing.assert_close(graphed.step(slots, x), eager.step(slots, x).cpu(), **TOL)


def test_cuda_graphs_in_bfloat16_within_the_documented_tolerance() -> None:
    config = TCNConfig(in_channels=2, channels=[24] * 4, kernel_size=8, out_channels=1)
    net = random_net(config, seed=5, std=0.1)
    seqs = [random_sequence(config, 300, seed=i) for i in range(3)]
    pool = StreamPool(net, 4, device="cuda", dtype=torch.bfloat16, cuda_graphs=True)
    slots = [pool.open() for _ in range(3)]
    got: list[list[torch.Tensor]] = [[] for _ in range(3)]
    for t in range(300):
        y = pool.step(slots, torch.stack([s[:, t] for s in seqs]).to(torch.bfloat16))
        for i in range(3):
            got[i].append(y[i].float())
    for parts, seq in zip(got, seqs, strict=True):
        want = full_forward(net, seq, dtype=torch.float64).float()
        scale = want.abs().max().item()
        err = (torch.stack(parts) - want).abs().max().item()
        assert err <= BF16_SCALE_TOL * scale, f"bf16 error {err:.3g} > 3% of {scale:.3g}"
