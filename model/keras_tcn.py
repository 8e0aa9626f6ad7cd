"""keras-tcn 3.5.x models (a saved `.keras` file) into a tcnserve TCN, without TensorFlow.

A `.keras` file is a zip of the model's config (JSON) and its weights (HDF5, read with h5py), so
every option is read from the file itself, never assumed: the TCN layer's `nb_filters`,
`kernel_size`, `nb_stacks`, `dilations`, `padding`, `use_skip_connections`, `activation`,
`use_batch_norm`, `use_layer_norm`, `return_sequences`, and one Dense head after it.

keras-tcn's residual block is not pytorch-tcn's: the second conv's output goes through the
activation twice (its Act_Conv1D_1, then Act_Conv_Blocks), and skip connections sum every
block's second-conv output (the last block's included) in place of the last block's output,
with no activation after; the converted config says so (`keras_tcn`). Batch norms are folded
into the convs with Keras' epsilon (1e-3). What tcnserve cannot compute exactly is refused by
name: `padding="same"` (not causal), `leaky_relu` (Keras' slope 0.2, not torch's 0.01), other
activations, `go_backwards`, layers other than one Dense head. Layer norms keep Keras' epsilon
(1e-3).

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

from model.tcn import TCN, TCNConfig

# keras-tcn activation names tcnserve computes identically (Keras' gelu is the exact one).
ACTIVATIONS = ("relu", "tanh", "elu", "gelu", "selu", "sigmoid")
# A Dense head's activation -> tcnserve's output activation (Keras' softmax is over the last
# axis: the channels, as tcnserve's).
HEAD_ACTIVATIONS = {"linear": "none", "softmax": "softmax", **{a: a for a in ACTIVATIONS}}
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
    activation = options.get("activation")
    if activation == "leaky_relu":
        problems.append(
            "activation='leaky_relu': Keras' negative slope is 0.2, tcnserve computes torch's 0.01"
        )
    elif activation not in ACTIVATIONS:
        problems.append(f"activation={activation!r}: tcnserve serves {', '.join(ACTIVATIONS)}")
    if options.get("use_weight_norm"):
        problems.append("use_weight_norm=True: not served yet")
    if options.get("go_backwards"):
        problems.append("go_backwards=True: reads the sequence backwards, which cannot stream")
    if options.get("return_state"):
        problems.append("return_state=True: not served")
    return problems


def _build(options: dict, in_channels: int, dense: dict | None, h5: Any) -> TCN:
    problems = _refusals(options)
    head_activation = "none"
    if dense is not None:
        act = dense["config"].get("activation", "linear")
        if act not in HEAD_ACTIVATIONS:
            problems.append(f"the Dense head's activation={act!r} is not served")
        else:
            head_activation = HEAD_ACTIVATIONS[act]
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
        output_activation=head_activation,
        activation=str(options["activation"]),
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
