"""keras-tcn 3.5.x models (a saved `.keras` file) into a tcnserve TCN, without TensorFlow.

A `.keras` file is a zip of the model's config (JSON) and its weights (HDF5, read with h5py), so
every option is read from the file itself, never assumed: the TCN layer's `nb_filters`,
`kernel_size`, `nb_stacks`, `dilations`, `padding`, `use_skip_connections`, `activation`,
`use_batch_norm`, `use_layer_norm`, `return_sequences`, and one Dense head after it.

keras-tcn's residual block is not pytorch-tcn's: the second conv's output goes through the
activation twice (its Act_Conv1D_1, then Act_Conv_Blocks), and skip connections sum every
block's second-conv output (the last block's included) in place of the last block's output,
with no activation after; the converted config says so (`keras_tcn`). Batch norms are folded
into the convs with Keras' epsilon (1e-3). Layer norms keep Keras' epsilon (1e-3).

An activation is converted only where tcnserve computes what Keras 3 computes for it: the
names in `ACTIVATIONS` (Keras' defaults: gelu exact, elu's alpha 1), `"leaky_relu"` (Keras'
slope 0.2: tcnserve's `keras_leaky_relu`) and a saved `keras.layers.LeakyReLU(negative_slope=
0.01)` (torch's slope). Everything else is refused by name: swish/silu, softplus, linear,
any other name, a saved function (its file records only a name, which an unregistered
function of that name shares), other layers. So are `padding="same"` (not causal),
`go_backwards`, dtype policies other than float32, and layers other than one Dense head.

`return_sequences=False` models answer only their last timestep; served, they answer every
timestep, the last of which is the source model's output.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.activations import LEAKY_SLOPE
from model.tcn import TCN, TCNConfig

# Keras activation names whose Keras 3 function tcnserve's activation of that name computes
# (keras.activations.gelu's approximate=False is torch's exact GELU; elu's alpha is 1).
ACTIVATIONS = ("relu", "tanh", "elu", "gelu", "selu", "sigmoid")
# Keras names whose function tcnserve computes under another name.
RENAMED = {"leaky_relu": "keras_leaky_relu"}  # negative slope 0.2
# Keras names that users pass and tcnserve does not compute, with what Keras computes.
UNSERVED = {
    "swish": "Keras' swish (silu: x * sigmoid(x)) is not one of tcnserve's activations",
    "silu": "Keras' silu (x * sigmoid(x)) is not one of tcnserve's activations",
    "softplus": "Keras' softplus (log(1 + exp(x))) is not one of tcnserve's activations",
    "linear": "no activation (the identity) is not one of tcnserve's block activations",
}
# The Dense head's own: Keras' softmax and log_softmax are over the last axis, the channels;
# activation=None is Keras' linear.
HEAD_ONLY = {"linear": "none", "softmax": "softmax", "log_softmax": "log_softmax", None: "none"}
SERVED = (
    f"{', '.join((*ACTIVATIONS, *RENAMED))} or keras.layers.LeakyReLU(negative_slope={LEAKY_SLOPE})"
)
KERAS_BATCH_NORM_EPS = 1e-3  # keras.layers.BatchNormalization's default, keras-tcn's
KERAS_LAYER_NORM_EPS = 1e-3  # keras.layers.LayerNormalization's
OPTIONS_READ = (
    "nb_filters", "kernel_size", "nb_stacks", "dilations", "padding", "use_skip_connections",
    "activation", "use_batch_norm", "use_layer_norm", "return_sequences",
)  # fmt: skip


def convert_keras_file(path: str | Path) -> tuple[TCN, dict[str, Any]]:
    """A saved keras-tcn `.keras` model -> (the TCN, what the conversion read)."""
    import h5py  # the only reader needed: no TensorFlow

    path = Path(path)
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: expected a Keras 3 `.keras` file (model.save('x.keras'))")
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    layers = config.get("config", {}).get("layers", [])
    tcn_layers = [layer for layer in layers if layer.get("class_name") == "TCN"]
    if len(tcn_layers) != 1:
        raise ValueError(f"{path}: expected one keras-tcn TCN layer, found {len(tcn_layers)}")
    tcn = tcn_layers[0]
    others = [layer for layer in layers if layer.get("class_name") not in ("InputLayer", "TCN")]
    if len(others) > 1 or (others and others[0].get("class_name") != "Dense"):
        names = ", ".join(f"{o.get('class_name')}" for o in others)
        raise ValueError(f"{path}: only one Dense layer may follow the TCN; found {names}")
    inputs = [layer for layer in layers if layer.get("class_name") == "InputLayer"]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one input, found {len(inputs)}")
    in_channels = inputs[0]["config"]["batch_shape"][-1]
    options = tcn["config"]
    net = _build(options, in_channels, others[0] if others else None, weights)
    read = {
        "source_format": "keras-tcn",
        "keras_tcn_options": {k: options.get(k) for k in OPTIONS_READ},
        "head": None if not others else others[0]["config"].get("activation", "linear"),
    }
    return net, read


def _refusals(options: dict[str, Any]) -> list[str]:
    problems = []
    if options.get("padding") != "causal":
        problems.append(
            f"padding={options.get('padding')!r}: each output would depend on later inputs; "
            "only padding='causal' streams"
        )
    problems += _dtype_problems("the TCN layer", options)
    if options.get("use_weight_norm"):
        problems.append("use_weight_norm=True: not served yet")
    if options.get("go_backwards"):
        problems.append("go_backwards=True: reads the sequence backwards, which cannot stream")
    if options.get("return_state"):
        problems.append("return_state=True: not served")
    return problems


def block_activation(identifier: Any) -> tuple[str | None, str | None]:
    """A saved Keras activation -> (tcnserve's activation that computes it, None) or (None,
    why not, naming it)."""
    if isinstance(identifier, str):
        if identifier in ACTIVATIONS:
            return identifier, None
        if identifier in RENAMED:
            return RENAMED[identifier], None
        why = UNSERVED.get(identifier, "not one of the Keras activations tcnserve computes")
        return None, f"activation={identifier!r}: {why} (served: {SERVED})"
    if not isinstance(identifier, dict):
        if identifier is None:
            return None, f"activation=None (linear): {UNSERVED['linear']} (served: {SERVED})"
        return None, f"activation={identifier!r}: not a saved Keras activation"
    kind, config = identifier.get("class_name"), identifier.get("config")
    if kind == "function":
        return None, (
            f"activation=<function {config!r}>: a saved function records only its name, which "
            f"an unregistered function of that name shares; build the TCN with the activation's "
            f"name (activation='relu', ...) (served: {SERVED})"
        )
    if not isinstance(config, dict) or identifier.get("module") != "keras.layers":
        return None, f"activation={kind}: not a Keras layer that tcnserve computes ({SERVED})"
    slope = config.get("negative_slope")
    if kind == "LeakyReLU" and identifier.get("registered_name") is None:
        dtype = _dtype_problems(f"activation={kind}", config)
        if dtype:
            return None, dtype[0]
        if slope == LEAKY_SLOPE:
            return "leaky_relu", None
        return None, (
            f"activation=LeakyReLU(negative_slope={slope!r}): tcnserve computes a leaky ReLU "
            f"only with torch's negative slope, {LEAKY_SLOPE}"
        )
    return None, f"activation={kind} (a Keras layer): not one that tcnserve computes ({SERVED})"


def _dtype_problems(what: str, config: dict[str, Any]) -> list[str]:
    """Keras computes a layer in its dtype policy's compute dtype; tcnserve in float32."""
    policy = config.get("dtype")
    name = policy.get("config", {}).get("name") if isinstance(policy, dict) else policy
    if name in (None, "float32"):
        return []
    return [f"{what}'s dtype policy {name!r}: only float32 models convert exactly"]


def _head_activation(identifier: Any) -> tuple[str | None, str | None]:
    if (identifier is None or isinstance(identifier, str)) and identifier in HEAD_ONLY:
        return HEAD_ONLY[identifier], None
    name, problem = block_activation(identifier)
    if problem is None:
        return name, None
    also = ", ".join(str(name) for name in HEAD_ONLY)
    return None, f"the Dense head's {problem}; a head's may also be {also}"


def _build(options: dict, in_channels: int, dense: dict | None, h5: Any) -> TCN:
    problems = _refusals(options)
    activation, problem = block_activation(options.get("activation", "relu"))
    problems += [problem] if problem else []
    head_activation = "none"
    if dense is not None:
        head_activation, problem = _head_activation(dense["config"].get("activation", "linear"))
        problems += [problem] if problem else []
        problems += _dtype_problems("the Dense head", dense["config"])
        if not dense["config"].get("use_bias", True):
            problems.append("a Dense head without bias is not served yet")
    if problems:
        raise ValueError("cannot convert this keras-tcn model exactly: " + "; ".join(problems))
    dilations = [int(d) for d in options["dilations"]] * int(options.get("nb_stacks", 1))
    filters = options["nb_filters"]
    per_stack = filters if isinstance(filters, list) else [filters] * len(options["dilations"])
    channels = [int(c) for c in per_stack] * int(options.get("nb_stacks", 1))
    config = TCNConfig(
        in_channels=int(in_channels),
        channels=channels,
        kernel_size=int(options["kernel_size"]),
        dilations=dilations,
        out_channels=None if dense is None else int(dense["config"]["units"]),
        output_activation=str(head_activation),
        activation=str(activation),
        skip_connections=bool(options.get("use_skip_connections", True)),
        keras_tcn=True,
        layer_norm=bool(options.get("use_layer_norm")) and not options.get("use_batch_norm"),
        layer_norm_eps=KERAS_LAYER_NORM_EPS,
    )
    state: dict[str, torch.Tensor] = {}
    # Keras 3 keeps a layer's weights under its class's snake-case name (one TCN, one Dense).
    root = h5["layers/tcn"]
    for i in range(len(channels)):
        block = root[f"residual_block_{i}"]
        norms = _norms(block, "batch_norm_layers") if options.get("use_batch_norm") else None
        if config.layer_norm:  # kept as they are: per timestep, over the channels
            for k, (gamma, beta) in enumerate(_norms(block, "layer_norm_layers", 2)):
                state[f"blocks.{i}.norm{k + 1}.weight"] = gamma
                state[f"blocks.{i}.norm{k + 1}.bias"] = beta
        for k, norm in enumerate(norms or [None, None]):
            weight = _tensor(block, f"conv1D_{k}", 0).permute(2, 1, 0)  # (k, in, out) -> torch
            bias = _tensor(block, f"conv1D_{k}", 1)
            if norm is not None:
                weight, bias = _fold(weight, bias, norm)
            state[f"blocks.{i}.conv{k + 1}.weight"] = weight
            state[f"blocks.{i}.conv{k + 1}.bias"] = bias
        if "matching_conv1D" in block:
            state[f"blocks.{i}.downsample.weight"] = _tensor(block, "matching_conv1D", 0).permute(
                2, 1, 0
            )
            state[f"blocks.{i}.downsample.bias"] = _tensor(block, "matching_conv1D", 1)
    if dense is not None:
        group = h5["layers/dense"]
        state["head.weight"] = _tensor(group, "", 0).T.contiguous()
        state["head.bias"] = _tensor(group, "", 1)
    net = TCN(config).fold_weight_norm()
    want = net.state_dict()
    wrong = sorted(
        k for k in want if k not in state or tuple(state[k].shape) != tuple(want[k].shape)
    )
    if wrong or set(state) - set(want):
        raise ValueError(
            f"the weights do not fit the config keras-tcn's options describe: {wrong[:4]}"
        )
    net.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return net.eval().requires_grad_(False)


def _tensor(group: Any, layer: str, index: int) -> torch.Tensor:
    node = group[layer]["vars"] if layer else group["vars"]
    return torch.from_numpy(np.asarray(node[str(index)], dtype=np.float32))


def _norms(block: Any, kind: str, parts: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """The block's two norms in creation order (Keras numbers its layers globally): a batch
    norm's gamma, beta, moving mean and variance, a layer norm's gamma and beta."""
    if kind not in block:
        raise ValueError(f"the config says a {kind.split('_')[0]} norm, the weights hold none")
    group = block[kind]
    names = sorted(group, key=lambda n: int(re.sub(r"\D", "", n) or 0))
    if len(names) != 2:
        raise ValueError(f"expected two norms ({kind}) in a residual block, found {names}")
    return [tuple(_tensor(group, n, j) for j in range(parts)) for n in names]


def _fold(weight: torch.Tensor, bias: torch.Tensor, norm: tuple) -> tuple[torch.Tensor, ...]:
    """An inference-mode batch norm (gamma, beta, moving mean, moving variance) after a conv,
    folded into it, in float64."""
    gamma, beta, mean, var = (t.double() for t in norm)
    scale = gamma / torch.sqrt(var + KERAS_BATCH_NORM_EPS)
    folded_w = weight.double() * scale[:, None, None]
    folded_b = (bias.double() - mean) * scale + beta
    return folded_w.float(), folded_b.float()


def verify(net: TCN, path: str | Path) -> dict[str, Any]:
    """Where keras-tcn (and TensorFlow) is importable, both forwards on random input; a
    difference above 1e-5 + 1e-5 * max |output| is refused. -> the metadata to record."""
    import importlib.util

    if importlib.util.find_spec("tcn") is None or importlib.util.find_spec("keras") is None:
        return {"verified_against": None}
    import keras
    import tcn

    source = keras.models.load_model(path, custom_objects={"TCN": tcn.TCN}, compile=False)
    steps = max(256, min(2 * net.config.receptive_field, 4096))
    x = np.random.default_rng(0).standard_normal((2, steps, net.config.in_channels))
    x = x.astype(np.float32)
    theirs = np.asarray(source(x, training=False))
    with torch.inference_mode():
        ours = net(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    if theirs.ndim == 2:  # return_sequences=False: the last step
        ours = ours[:, -1, :]
    difference = float(np.abs(ours - theirs).max())
    allowed = 1e-5 + 1e-5 * float(np.abs(theirs).max())
    if not difference <= allowed:
        raise ValueError(
            f"the converted model differs from keras-tcn's own forward by {difference:.3g} "
            f"(allowed {allowed:.3g}): refusing to write it"
        )
    from importlib.metadata import version

    return {
        "verified_against": f"keras-tcn {version('keras-tcn')}",
        "max_abs_difference": difference,
    }
