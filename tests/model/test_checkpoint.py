"""Checkpoints: config.json + model.safetensors round trips, clear errors, and no unpickling."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import TCN, TCNConfig, load_model, read_checkpoint_info, save_model
from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from tests.model.conftest import random_net

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = [
    TCNConfig(in_channels=3, channels=[4, 5], kernel_size=3, out_channels=2),
    TCNConfig(
        in_channels=4,
        channels=[4, 4],
        kernel_size=2,
        dilations=[1, 3],
        vocab_size=9,
        output_activation="log_softmax",
    ),
    TCNConfig(in_channels=2, channels=[3], kernel_size=1, output_activation="sigmoid"),
    TCNConfig(
        in_channels=3,
        channels=[4, 4],
        kernel_size=3,
        gate=True,
        layer_norm=True,
        embedding_dims=[2, 1],
        embedding_mode="concat",
    ),
]


def _input(config: TCNConfig, length: int = 13) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if config.vocab_size is not None:
        return torch.randint(0, config.vocab_size, (2, length), generator=gen)
    return torch.randn(2, config.in_channels, length, generator=gen)


def _embeddings(config: TCNConfig) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, config.embedding_width, generator=gen) if config.embedding_dims else None


@pytest.mark.parametrize("fold", [False, True], ids=["weight-normed", "folded"])
@pytest.mark.parametrize("config", CONFIGS, ids=["head", "tokens", "k1", "embeddings"])
def test_round_trip(tmp_path: Path, config: TCNConfig, fold: bool) -> None:
    net = random_net(config, seed=1, fold=fold)
    x, e = _input(config), _embeddings(config)
    with torch.no_grad():
        expected = net(x, embeddings=e)
    assert save_model(net, tmp_path / "ckpt") == tmp_path / "ckpt"
    assert net.weight_norm_folded == fold  # saving folds a copy, never the caller's module
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == config
    assert not loaded.training
    assert loaded.weight_norm_folded
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded(x, embeddings=e), expected, atol=1e-6, rtol=1e-6)


def test_load_as_float64_on_cpu(tmp_path: Path) -> None:
    config = CONFIGS[0]
    net = random_net(config, seed=2)
    save_model(net, tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert all(p.device == torch.device("cpu") for p in loaded.parameters())
    x = _input(config)
    y = loaded(x.double())
    assert y.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(y, net.double()(x.double()), atol=1e-12, rtol=1e-12)


def test_saved_weights_are_the_folded_inference_weights(tmp_path: Path) -> None:
    net = random_net(CONFIGS[0], seed=3, fold=False)
    save_model(net, tmp_path)
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    expected = net.folded_state_dict()
    assert set(stored) == set(expected)
    assert not any("parametrizations" in key for key in stored)
    for key, value in expected.items():
        torch.testing.assert_close(stored[key], value, atol=0, rtol=0, msg=key)


def test_metadata_round_trip(tmp_path: Path) -> None:
    config = CONFIGS[1]
    metadata = {"task": "copy-memory", "steps": 1200, "trained": True, "loss": [0.5, 0.25]}
    save_model(random_net(config, seed=0), tmp_path, metadata=metadata)
    assert read_checkpoint_info(tmp_path) == (config, metadata)
    doc = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert doc["format"] == "tcnserve/1"
    assert doc["config"] == config.to_dict()


def test_metadata_defaults_to_empty(tmp_path: Path) -> None:
    save_model(random_net(CONFIGS[0], seed=0), tmp_path)
    assert read_checkpoint_info(tmp_path) == (CONFIGS[0], {})


def test_overwriting_a_checkpoint(tmp_path: Path) -> None:
    save_model(random_net(CONFIGS[0], seed=0), tmp_path)
    save_model(random_net(CONFIGS[2], seed=0), tmp_path, metadata={"v": 2})
    assert read_checkpoint_info(tmp_path) == (CONFIGS[2], {"v": 2})
    assert load_model(tmp_path).config == CONFIGS[2]


# ----- broken checkpoints ------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    save_model(random_net(CONFIGS[0], seed=0), tmp_path)
    return tmp_path


def _edit_config(directory: Path, edit) -> None:
    doc = json.loads((directory / CONFIG_FILE).read_text())
    edit(doc)
    (directory / CONFIG_FILE).write_text(json.dumps(doc))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a tcnserve checkpoint"):
        load_model(tmp_path / "nowhere")


def test_missing_config(checkpoint: Path) -> None:
    (checkpoint / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json .*not a tcnserve checkpoint"):
        read_checkpoint_info(checkpoint)
    with pytest.raises(FileNotFoundError, match="not a tcnserve checkpoint"):
        load_model(checkpoint)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "tcnserve/1", "config": ', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", r"not a tcnserve/1 checkpoint config"),
        ('{"config": {"in_channels": 1, "channels": [1]}}', "not a tcnserve/1 checkpoint"),
        ('{"format": "tcnserve/0", "config": {}}', "not a tcnserve/1 checkpoint"),
        ('{"format": "tcnserve/1"}', "invalid config"),
        ('{"format": "tcnserve/1", "config": {"channels": [4]}}', "invalid config"),
        ('{"format": "tcnserve/1", "config": {"in_channels": 3}}', "invalid config"),
    ],
    ids=["truncated", "empty", "list", "no format", "old format", "no config", "no in", "no ch"],
)
def test_corrupted_config(checkpoint: Path, text: str, message: str) -> None:
    (checkpoint / CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_checkpoint_info(checkpoint)
    with pytest.raises(ValueError, match=message):
        load_model(checkpoint)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["config"].update(kernel_size=0), "kernel_size must be an integer >= 1"),
        (lambda d: d["config"].update(output_activation="swish"), "output_activation"),
        (lambda d: d["config"].update(levels=3), "unknown TCNConfig fields: levels"),
    ],
    ids=["bad value", "bad activation", "unknown field"],
)
def test_invalid_config_values(checkpoint: Path, edit, message: str) -> None:
    _edit_config(checkpoint, edit)
    with pytest.raises(ValueError, match=message):
        load_model(checkpoint)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["config"].update(channels=[4, 5, 5], dilations=None),
            r"missing: \['blocks\.2",
        ),
        (lambda d: d["config"].update(out_channels=None), r"unexpected: \['head\.bias"),
        (lambda d: d["config"].update(vocab_size=5), r"missing: \['embedding\.weight'\]"),
    ],
    ids=["extra block", "no head", "embedding"],
)
def test_weights_that_do_not_match_the_config(checkpoint: Path, edit, message: str) -> None:
    _edit_config(checkpoint, edit)
    with pytest.raises(ValueError, match=rf"weights do not match config\.json .*{message}"):
        load_model(checkpoint)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["config"].update(channels=[8, 5]),
        lambda d: d["config"].update(kernel_size=4),
        lambda d: d["config"].update(in_channels=2),
        lambda d: d["config"].update(channels=[4], dilations=None),
    ],
    ids=["widths", "kernel", "in_channels", "fewer blocks"],
)
def test_weights_with_other_shapes_give_the_same_clear_error(checkpoint: Path, edit) -> None:
    _edit_config(checkpoint, edit)
    with pytest.raises(ValueError, match=r"weights do not match config\.json"):
        load_model(checkpoint)


def test_missing_weights_file(checkpoint: Path) -> None:
    (checkpoint / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(checkpoint)


def test_truncated_weights_file(checkpoint: Path) -> None:
    data = (checkpoint / WEIGHTS_FILE).read_bytes()
    (checkpoint / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=r"(?i)deserializ|invalid|incomplete|metadata"):
        load_model(checkpoint)


def test_weights_file_is_safetensors(checkpoint: Path) -> None:
    """8-byte little-endian header length, a JSON header naming every tensor, then raw data."""
    data = (checkpoint / WEIGHTS_FILE).read_bytes()
    assert data[:1] != b"\x80"  # a pickle (protocol >= 2) starts with PROTO
    assert data[:2] != b"PK"  # torch.save's zip container
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "tcnserve/1"}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(tensors) == set(load_file(str(checkpoint / WEIGHTS_FILE)))
    assert all(v["dtype"] == "F32" for v in tensors.values())
    end = max(v["data_offsets"][1] for v in tensors.values())
    assert len(data) == 8 + header_len + end


class _Trap:
    """Unpickling this creates a marker directory: proof that someone ran pickle's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("container", ["raw pickle", "torch.save"])
def test_loading_never_unpickles(checkpoint: Path, tmp_path: Path, container: str) -> None:
    marker = tmp_path / "unpickled"
    payload = {"blocks.0.conv1.weight": _Trap(marker)}
    weights = checkpoint / WEIGHTS_FILE
    if container == "raw pickle":
        weights.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, weights)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        load_model(checkpoint)
    assert not marker.exists()
    if container == "raw pickle":
        pickle.loads(weights.read_bytes())  # the trap is live: the check above could fail
        assert marker.exists()


def test_weights_saved_by_hand_load(tmp_path: Path) -> None:
    """Any safetensors file with the folded keys loads, whoever wrote it."""
    config = CONFIGS[2]
    net = random_net(config, seed=9)
    save_model(TCN(config), tmp_path)  # config.json plus weights to replace
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / WEIGHTS_FILE)
    x = _input(config)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(x), net(x), atol=0, rtol=0)


def test_checkpoint_files_are_world_readable(tmp_path):
    from model import TCN, TCNConfig, save_model

    out = save_model(TCN(TCNConfig(in_channels=1, channels=(2,), kernel_size=2)), tmp_path / "c")
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_mode & 0o044 == 0o044, name
