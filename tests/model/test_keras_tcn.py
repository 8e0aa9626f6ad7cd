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
    kinds |= {"skips_tanh_layernorm", "noskips_sigmoid", "skips_selu_logsoftmax"}
    assert kinds | {"skips_leakyrelu_layer"} <= set(CASES)
    assert "skips_leaky_relu" in CASES


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


@pytest.mark.parametrize(
    ("name", "activation"),
    [
        ("skips_relu", "relu"),
        ("skips_leakyrelu_layer", "leaky_relu"),
        ("skips_leaky_relu", "keras_leaky_relu"),
    ],
)
def test_tcnserve_convert_writes_a_checkpoint_that_serves_the_same(tmp_path, name, activation):
    path, x, want = fixture(name)
    config = convert_file(path, tmp_path / "ckpt")
    assert config.keras_tcn and config.skip_connections and config.activation == activation
    net = load_model(tmp_path / "ckpt")
    with torch.inference_mode():
        y = net(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    np.testing.assert_allclose(y, want, **TOL)
    with pytest.raises(ValueError, match="records its own options"):
        convert_file(path, tmp_path / "other", dilations=[1, 2, 4])


def test_a_leaky_relu_keras_model_streams_the_same_through_advance_and_long_pushes():
    net, _ = convert_keras_file(fixture("skips_leakyrelu_layer")[0])
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 400, 3)).astype("float32"))
    with torch.inference_mode():
        want = net(x.transpose(1, 2)).transpose(1, 2)  # (B, T, out); equals Keras' (above)
    pool = StreamPool(net, 2)
    a, b = pool.open(), pool.open()
    ys = pool.advance([a, b], torch.cat([x[0, :3], x[1, :5]]), [3, 5])
    torch.testing.assert_close(ys, torch.cat([want[0, :3], want[1, :5]]), **TOL)
    torch.testing.assert_close(pool.push(a, x[0, 3:]), want[0, 3:], **TOL)  # one long chunk
    torch.testing.assert_close(pool.push(b, x[1, 5:]), want[1, 5:], **TOL)


def edited(tmp_path: Path, name: str | Path, edit) -> Path:
    """A copy of a fixture whose config.json `edit` changed (the weights as they were)."""
    src = name if isinstance(name, Path) else fixture(name)[0]
    out = tmp_path / f"{src.stem}-edited.keras"
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
        (lambda c: tcn_options(c).update(use_layer_norm=True), "a layer norm, the weights"),
        (lambda c: tcn_options(c).update(go_backwards=True), "go_backwards=True"),
        (
            lambda c: tcn_options(c)["dtype"]["config"].update(name="mixed_float16"),
            "the TCN layer's dtype policy 'mixed_float16'",
        ),
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


def keras_layer(class_name: str, **config) -> dict:
    """A Keras layer as `.keras` files save it (keras.layers.LeakyReLU(0.3), ...)."""
    dtype = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}}
    config = {"name": class_name.lower(), "trainable": True, "dtype": dtype, **config}
    return {"module": "keras.layers", "class_name": class_name, "config": config,
            "registered_name": None}  # fmt: skip


def keras_function(name: str) -> dict:
    """A function as `.keras` files save it: keras.activations.relu, or any `def relu`."""
    return {"module": "builtins", "class_name": "function", "config": name,
            "registered_name": "function"}  # fmt: skip


NOT_OURS = "not one of the Keras activations tcnserve computes"
UNSERVED_ACTIVATIONS = [
    ("swish", r"activation='swish': Keras' swish \(silu: x \* sigmoid\(x\)\) is not one of"),
    ("silu", r"activation='silu': Keras' silu \(x \* sigmoid\(x\)\) is not one of"),
    ("softplus", r"activation='softplus': Keras' softplus \(log\(1 \+ exp\(x\)\)\) is not"),
    ("linear", r"activation='linear': no activation \(the identity\) is not one of"),
    (None, r"activation=None \(linear\): no activation"),
    ("relu6", f"activation='relu6': {NOT_OURS}"),
    ("softsign", f"activation='softsign': {NOT_OURS}"),
    ("mish", f"activation='mish': {NOT_OURS}"),
    ("hard_sigmoid", f"activation='hard_sigmoid': {NOT_OURS}"),
    ("exponential", f"activation='exponential': {NOT_OURS}"),
    ("softmax", f"activation='softmax': {NOT_OURS}"),
    (keras_function("relu"), r"activation=<function 'relu'>: a saved function records only"),
    (keras_function("Custom>mine"), r"activation=<function 'Custom>mine'>"),
    (
        keras_layer("LeakyReLU", negative_slope=0.3),
        r"activation=LeakyReLU\(negative_slope=0.3\): tcnserve computes a leaky ReLU only with "
        "torch's negative slope, 0.01",
    ),
    (
        keras_layer("ReLU", max_value=None, negative_slope=0.0, threshold=0.0),
        r"activation=ReLU \(a Keras layer\): not one that tcnserve computes",
    ),
]


@pytest.mark.parametrize(("activation", "message"), UNSERVED_ACTIVATIONS)
def test_every_keras_activation_tcnserve_does_not_compute_is_refused_by_name(
    tmp_path, activation, message
):
    path = edited(tmp_path, "skips_relu", lambda c: tcn_options(c).update(activation=activation))
    with pytest.raises(ValueError, match=message):
        convert_keras_file(path)
    with pytest.raises(ValueError, match=message):
        convert_file(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def dense_options(config: dict) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")[
        "config"
    ]


@pytest.mark.parametrize(
    ("activation", "message"),
    [
        *[(a, m) for a, m in UNSERVED_ACTIVATIONS if a not in ("linear", None, "softmax")],
        (
            keras_layer("LeakyReLU", negative_slope=0.01, dtype="float16"),
            "activation=LeakyReLU's dtype policy 'float16'",
        ),
    ],
)
def test_a_dense_heads_activation_is_refused_by_name_too(tmp_path, activation, message):
    path = edited(tmp_path, "skips_relu", lambda c: dense_options(c).update(activation=activation))
    with pytest.raises(ValueError, match=f"the Dense head's {message}"):
        convert_keras_file(path)


@pytest.mark.parametrize(
    ("activation", "served"),
    [
        *[("linear", "none"), (None, "none"), ("softmax", "softmax"), ("gelu", "gelu")],
        *[
            ("log_softmax", "log_softmax"),
            (keras_layer("LeakyReLU", negative_slope=0.01), "leaky_relu"),
        ],
    ],
)
def test_a_dense_heads_activation_is_served_as_keras_computes_it(tmp_path, activation, served):
    path = edited(tmp_path, "skips_relu", lambda c: dense_options(c).update(activation=activation))
    net, _ = convert_keras_file(path)
    assert net.config.output_activation == served


@pytest.mark.skipif(
    importlib.util.find_spec("tcn") is None, reason="keras-tcn (TensorFlow) not installed"
)
def test_against_keras_tcn_itself(tmp_path):
    from model.keras_tcn import verify

    path, _, _ = fixture("skips_gelu_batchnorm_last")
    net, _ = convert_keras_file(path)
    assert verify(net, path)["verified_against"].startswith("keras-tcn")
