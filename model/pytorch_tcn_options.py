"""pytorch-tcn's constructor options: stated, never assumed, and the conversion checked against
the library's own forward.

A pytorch-tcn state_dict shows its widths, kernel size, dilations (the padding buffers), the
norm (weight-norm keys or plain weights, batch-norm statistics, layer-norm weights), gates,
that it takes embeddings (and their total width) and skip connections between blocks of
different widths. It does not show `activation`, `causal`, `use_skip_connections` when every
block has one width, `output_activation`, `input_shape`, `lookahead`, the `embedding_shapes`
one by one (static (dim,) or time-varying (dim, time_steps)) or `embedding_mode` (both modes
hold the same projections): each changes the forward, so the keyword arguments the model was
built with must be given (`{}`: it was built with the defaults), or the options are read from
the live module (`options_of`).

`verify` rebuilds the source model from those options when pytorch-tcn is importable, loads the
same state_dict, and refuses a conversion whose outputs differ from the library's on random
input (and random embeddings, for a model that takes them) by more than
`ATOL + RTOL * max|output|`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from model.config import EMBEDDING_MODES
from model.tcn import TCN

# pytorch-tcn 1.2.3's TCN(...) keyword arguments and their defaults.
DEFAULTS: dict[str, Any] = {
    "kernel_size": 4,
    "dilations": None,
    "dilation_reset": None,
    "dropout": 0.1,
    "causal": True,
    "use_norm": "weight_norm",
    "activation": "relu",
    "kernel_initializer": "xavier_uniform",
    "use_skip_connections": False,
    "input_shape": "NCL",
    "embedding_shapes": None,
    "embedding_mode": "add",
    "use_gate": False,
    "lookahead": 0,
    "output_projection": None,
    "output_activation": None,
}
# The positional arguments, accepted as keywords too.
SHAPE_ARGUMENTS = ("num_inputs", "num_channels")
# Options that change nothing in eval mode (training-only).
NO_EFFECT_IN_EVAL = ("dropout", "kernel_initializer")
# pytorch-tcn's activation names (its `activation_fn`) that tcnserve computes identically, per
# value, with the same default constants (model/activations.py): as block activations, and
# after the output projection.
ACTIVATIONS = ("relu", "tanh", "leaky_relu", "sigmoid", "elu", "gelu", "selu")
OUTPUT_ACTIVATIONS = {None: "none", **{name: name for name in ACTIVATIONS}}
ATOL, RTOL = 1e-5, 1e-5
VERIFY_STEPS = 256  # timesteps of the random input (at least the receptive field is used)


@dataclass(frozen=True)
class PytorchTcnOptions:
    """The stated constructor options, checked for what tcnserve can serve exactly."""

    kwargs: dict[str, Any]  # as given (positional ones included as keywords)
    activation: str  # tcnserve's name, of every block
    output_activation: str  # tcnserve's name
    input_shape: str
    embedding_dims: tuple[int, ...] | None = None  # the static embeddings' widths
    embedding_mode: str = "add"

    def get(self, name: str) -> Any:
        return self.kwargs.get(name, DEFAULTS.get(name))


def parse(kwargs: Mapping[str, Any]) -> PytorchTcnOptions:
    """Check stated options; ValueError naming each that tcnserve cannot serve exactly."""
    if not isinstance(kwargs, Mapping):
        raise ValueError("pytorch-tcn options must be a JSON object of TCN(...) keyword arguments")
    unknown = sorted(set(kwargs) - set(DEFAULTS) - set(SHAPE_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"unknown pytorch-tcn TCN(...) argument(s) {', '.join(unknown)}; pytorch-tcn 1.2.3 "
            f"takes {', '.join([*SHAPE_ARGUMENTS, *DEFAULTS])}"
        )
    options = {**DEFAULTS, **kwargs}
    problems = []
    if options["causal"] is not True:
        problems.append(
            "causal=False: each output then depends on later inputs too, so it cannot be "
            "computed one timestep at a time; tcnserve serves causal models only"
        )
    if options["activation"] in ("softmax", "log_softmax"):
        problems.append(
            f"activation={options['activation']!r}: pytorch-tcn builds nn."
            f"{_torch_name(options['activation'])}() without dim inside every block, which "
            "normalises over the batch: no per-stream server can reproduce it"
        )
    elif options["activation"] not in ACTIVATIONS:
        problems.append(
            f"activation={options['activation']!r}: tcnserve serves {', '.join(ACTIVATIONS)} "
            "(a custom activation class cannot be read from a state_dict)"
        )
    if not isinstance(options["use_skip_connections"], bool):
        problems.append("use_skip_connections: true or false")
    if not isinstance(options["use_gate"], bool):
        problems.append("use_gate: true or false")
    if options["use_norm"] not in ("weight_norm", "batch_norm", "layer_norm", None):
        problems.append(f"use_norm={options['use_norm']!r}: pytorch-tcn has no such norm")
    embedding_dims = _embedding_dims(options["embedding_shapes"], problems)
    if options["embedding_mode"] not in EMBEDDING_MODES:
        problems.append(
            f"embedding_mode={options['embedding_mode']!r}: pytorch-tcn takes "
            f"{' or '.join(EMBEDDING_MODES)}"
        )
    if options["lookahead"] != 0:
        problems.append("lookahead != 0: not causal (pytorch-tcn itself refuses it)")
    if options["input_shape"] not in ("NCL", "NLC"):
        problems.append(f"input_shape={options['input_shape']!r}: pytorch-tcn takes NCL or NLC")
    activation = options["output_activation"]
    if activation in ("softmax", "log_softmax"):
        problems.append(
            f"output_activation={activation!r}: pytorch-tcn builds nn.{_torch_name(activation)}() "
            "without dim, which for (N, C, L) outputs normalises over the batch, not the "
            "channels: no per-stream server can reproduce it"
        )
    elif activation not in OUTPUT_ACTIVATIONS:
        problems.append(f"output_activation={activation!r}: not served yet")
    if problems:
        raise ValueError("cannot convert this pytorch-tcn model exactly: " + "; ".join(problems))
    return PytorchTcnOptions(
        dict(kwargs),
        str(options["activation"]),
        OUTPUT_ACTIVATIONS[activation],
        str(options["input_shape"]),
        embedding_dims,
        str(options["embedding_mode"]) if embedding_dims is not None else "add",
    )


def _embedding_dims(shapes: Any, problems: list[str]) -> tuple[int, ...] | None:
    """embedding_shapes' widths where every shape is a static (dim,); else a problem each."""
    if shapes is None:
        return None
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, (list, tuple)) or not shapes:
        problems.append(f"embedding_shapes={shapes!r}: a list of (dim,) shapes")
        return None
    dims = []
    for shape in shapes:
        entries = list(shape) if isinstance(shape, (list, tuple)) else None
        if entries is None or not all(_is_int(d) and d >= 1 for d in entries):
            problems.append(f"embedding_shapes entry {shape!r}: a (dim,) shape of integers >= 1")
        elif len(entries) == 2:
            problems.append(
                f"embedding_shapes entry {tuple(entries)!r}: a (dim, time_steps) shape is a "
                "time-varying embedding, one conditioning vector per timestep of a sequence of "
                "exactly time_steps steps; a stream has no fixed length and its later steps do "
                "not exist yet, so it cannot be served one timestep at a time (tcnserve serves "
                "static (dim,) embeddings)"
            )
        elif len(entries) != 1:
            problems.append(f"embedding_shapes entry {shape!r}: (dim,) or (dim, time_steps)")
        else:
            dims.append(int(entries[0]))
    return tuple(dims) if len(dims) == len(shapes) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_against_weights(options: PytorchTcnOptions, net: TCN, norm_shown: str | None) -> None:
    """Stated shape options must be what the weights show."""
    config = net.config
    shown = {
        "num_inputs": config.in_channels,
        "num_channels": list(config.channels),
        "kernel_size": config.kernel_size,
        "dilations": list(config.dilations),
        "output_projection": config.out_channels,
    }
    stated = {
        "num_inputs": options.kwargs.get("num_inputs"),
        "num_channels": _as_list(options.kwargs.get("num_channels")),
        "kernel_size": options.kwargs.get("kernel_size"),
        "dilations": _as_list(options.kwargs.get("dilations")) or _reset_dilations(options),
        "output_projection": options.kwargs.get("output_projection"),
    }
    wrong = [
        f"{name}={stated[name]!r} (the weights show {shown[name]!r})"
        for name in shown
        if stated[name] is not None and stated[name] != shown[name]
    ]
    norm = options.get("use_norm")
    if norm != norm_shown:
        shows = {
            None: "plain",
            "weight_norm": "weight-normed",
            "batch_norm": "batch-normed",
            "layer_norm": "layer-normed",
        }
        wrong.append(f"use_norm={norm!r} (the weights are {shows[norm_shown]})")
    if wrong:
        raise ValueError(
            "the stated pytorch-tcn options contradict the weights: " + "; ".join(wrong)
        )


def available() -> bool:
    return importlib.util.find_spec("pytorch_tcn") is not None


def rebuild(options: PytorchTcnOptions, net: TCN, state: Mapping[str, torch.Tensor]):
    """The source model, built by pytorch-tcn from the stated options, with `state` loaded."""
    import pytorch_tcn

    config = net.config
    kwargs = {k: v for k, v in options.kwargs.items() if k not in SHAPE_ARGUMENTS}
    kwargs |= {"kernel_size": config.kernel_size, "dilations": list(config.dilations)}
    kwargs.pop("dilation_reset", None)  # the dilations themselves are given
    kwargs["output_projection"] = config.out_channels
    source = pytorch_tcn.TCN(config.in_channels, list(config.channels), **kwargs)
    source.load_state_dict(dict(state), strict=True)
    return source.eval()


def verify(net: TCN, source: torch.nn.Module, input_shape: str) -> float:
    """Max |difference| of the two forwards on random input; ValueError past the tolerance."""
    config = net.config
    steps = max(VERIFY_STEPS, min(2 * config.receptive_field, 4096))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, steps, generator=gen)
    # one static vector per sequence and embedding_shapes entry, as pytorch-tcn takes them
    embeddings = [torch.randn(2, d, generator=gen) for d in config.embedding_dims or ()] or None
    with torch.inference_mode():
        ours = net(x, embeddings=embeddings)
        theirs = source(x.transpose(1, 2) if input_shape == "NLC" else x, embeddings=embeddings)
        if input_shape == "NLC":
            theirs = theirs.transpose(1, 2)
    if theirs.shape != ours.shape:
        raise ValueError(
            f"the converted model's outputs {tuple(ours.shape)} differ in shape from "
            f"pytorch-tcn's {tuple(theirs.shape)}: refusing to write it"
        )
    difference = float((ours - theirs.float()).abs().max())
    allowed = ATOL + RTOL * float(theirs.abs().max())
    if not difference <= allowed:  # NaN fails too
        raise ValueError(
            f"the converted model differs from pytorch-tcn's own forward by {difference:.3g} "
            f"(allowed {allowed:.3g}) on random input: an option was not stated as the model "
            "was built; refusing to write it"
        )
    return difference


def options_of(module: torch.nn.Module) -> dict[str, Any]:
    """The forward-changing options of a live pytorch_tcn.TCN, read from its attributes."""
    block = module.network[0]
    out = module.output_activation
    return {
        "causal": module.causal,
        "activation": module.activation,
        "use_skip_connections": module.use_skip_connections,
        "use_gate": module.use_gate,
        "use_norm": block.use_norm,
        "embedding_shapes": module.embedding_shapes,
        "embedding_mode": module.embedding_mode,
        "input_shape": module.input_shape,
        "output_activation": out if out is None or isinstance(out, str) else repr(out),
    }


def _as_list(value: Any) -> list | None:
    return None if value is None else [int(v) for v in value]


def _reset_dilations(options: PytorchTcnOptions) -> list[int] | None:
    """The dilations pytorch-tcn derives from dilation_reset (when no dilations are given)."""
    reset, channels = options.kwargs.get("dilation_reset"), options.kwargs.get("num_channels")
    if reset is None or channels is None:
        return None
    period = int(math.log2(reset * 2))
    return [2 ** (i % period) for i in range(len(channels))]


def _torch_name(activation: str) -> str:
    return {"softmax": "Softmax", "log_softmax": "LogSoftmax"}[activation]
