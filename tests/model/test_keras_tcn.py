"""keras-tcn models, converted from `.keras` files saved by real keras-tcn 3.5.6 (TensorFlow
2.19; remade by scripts/make_keras_tcn_fixtures.py), equal keras-tcn's own outputs stored beside
them, for the full forward and for streaming; what cannot be served exactly is refused by name.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model import StreamPool, load_model
from model.convert import convert_file
from model.keras_tcn import convert_keras_file

FIXTURES = Path(__file__).parent / "fixtures" / "keras_tcn"
CASES = sorted(p.stem for p in FIXTURES.glob("*.keras"))
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32, TensorFlow's rounding against torch's


def fixture(name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    data = np.load(FIXTURES / f"{name}.npz")
    return FIXTURES / f"{name}.keras", data["x"], data["y"]


def last_or_all(y: np.ndarray, want: np.ndarray) -> np.ndarray:
    return y if want.ndim == 3 else y[:, -1, :]  # return_sequences=False: the last step


def test_there_are_fixtures_of_every_kind():
    kinds = {"skips_relu", "noskips_tanh_stacks", "skips_gelu_batchnorm_last", "widths_elu"}
    assert kinds | {"skips_tanh_layernorm"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_the_converted_forward_equals_keras_tcns(name):
    path, x, want = fixture(name)
    net, read = convert_keras_file(path)
    assert read["source_format"] == "keras-tcn" and net.config.keras_tcn
    with torch.inference_mode():
        y = net(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    np.testing.assert_allclose(last_or_all(y, want), want, **TOL)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kernel", ["auto", "fused", "blas", "numpy", "torch"])
def test_streaming_the_converted_model_equals_keras_tcns(name, kernel):
    path, x, want = fixture(name)
    net, _ = convert_keras_file(path)
    pool = StreamPool(net, 2, step_kernel=kernel)
    slot = pool.open()
    chunks = [x[0, :1], x[0, 1:5], x[0, 5:6], x[0, 6:]]
    y = np.concatenate([pool.push(slot, c).numpy() for c in chunks])[None]
    np.testing.assert_allclose(last_or_all(y, want), want, **TOL)


def test_tcnserve_convert_writes_a_checkpoint_that_serves_the_same(tmp_path):
    path, x, want = fixture("skips_relu")
    config = convert_file(path, tmp_path / "ckpt")
    assert config.keras_tcn and config.skip_connections
    net = load_model(tmp_path / "ckpt")
    with torch.inference_mode():
        y = net(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    np.testing.assert_allclose(y, want, **TOL)
    with pytest.raises(ValueError, match="records its own options"):
        convert_file(path, tmp_path / "other", dilations=[1, 2, 4])


def edited(tmp_path: Path, name: str, edit) -> Path:
    """A copy of a fixture whose config.json `edit` changed (the weights as they were)."""
    src, _, _ = fixture(name)
    out = tmp_path / f"{name}-edited.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)
    return out


def tcn_options(config: dict) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == "TCN")[
        "config"
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: tcn_options(c).update(padding="same"), "padding='same'"),
        (lambda c: tcn_options(c).update(activation="leaky_relu"), "slope is 0.2"),
        (lambda c: tcn_options(c).update(activation="swish"), "activation='swish'"),
        (lambda c: tcn_options(c).update(use_layer_norm=True), "a layer norm, the weights"),
        (lambda c: tcn_options(c).update(go_backwards=True), "go_backwards=True"),
        (
            lambda c: c["config"]["layers"].append({"class_name": "LSTM", "config": {}}),
            "only one Dense layer",
        ),
    ],
)
def test_what_cannot_be_served_exactly_is_refused_by_name(tmp_path, edit, message):
    path = edited(tmp_path, "skips_relu", edit)
    with pytest.raises(ValueError, match=message):
        convert_keras_file(path)
    with pytest.raises(ValueError, match=message):
        convert_file(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tcn") is None, reason="keras-tcn (TensorFlow) not installed"
)
def test_against_keras_tcn_itself(tmp_path):
    from model.keras_tcn import verify

    path, _, _ = fixture("skips_gelu_batchnorm_last")
    net, _ = convert_keras_file(path)
    assert verify(net, path)["verified_against"].startswith("keras-tcn")
