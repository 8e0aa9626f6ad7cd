"""Converters: locuslab/TCN and pytorch-tcn state_dicts into a folded tcnserve TCN.

A state_dict holds weights, not hyperparameters. What it cannot tell is stated, never guessed:
- locuslab/TCN: its TemporalConvNet fixes ReLU, causal convs, weight norm and dilations 2**i
  (give others if your copy changed them); the head's output activation is stated (default
  none, the paper's linear heads).
- pytorch-tcn 1.2.x: the keyword arguments the model was built with (`pytorch_tcn_kwargs`,
  `{}` for the defaults), or the live module (`convert_pytorch_tcn`): its activation, causal,
  use_skip_connections, output_activation, input_shape, embedding_shapes and embedding_mode
  change the forward and a state_dict does not show them (model/pytorch_tcn_options.py).
  Options tcnserve cannot serve exactly are refused by name (e.g. time-varying embeddings).
  Where pytorch-tcn is importable, the source model is rebuilt and both forwards are compared
  (on random embeddings too, where it takes them) before anything is written.
  input_shape='NLC' only transposes: the converted model takes (B, C, T). Dilations are read
  from the streaming padding buffers, (k - 1) * dilation steps wide.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model import pytorch_tcn_options
from model.checkpoint import save_model
from model.config import TCNConfig
from model.tcn import TCN

FORMATS = ("locuslab", "pytorch-tcn")
WRAPPER_KEYS = ("state_dict", "model_state_dict")

Tensors = dict[str, torch.Tensor]

_BLOCK_KEY = re.compile(r"(.*?)network\.(\d+)\.(.+)")
# locuslab registers conv1/conv2 twice: as attributes and inside the nn.Sequential `net`.
_LOCUSLAB_ALIASES = {"conv1": "net.0", "conv2": "net.4"}
# The paper's wrappers: `linear` (most tasks) or `decoder` (language models) beside `tcn`.
_LOCUSLAB_HEADS = ("linear", "decoder")
_LOCUSLAB_EMBEDDING = "encoder"
# pytorch-tcn's embedding projections in a block, and their tcnserve names (model/tcn.py).
_EMBEDDING_KEYS = {
    "embedding_projection_1": "embedding_projection",
    "embedding_projection_2": "concat_projection",
}
# nn.BatchNorm1d's default eps, which pytorch-tcn builds its batch norms with (not in a state_dict).
BATCH_NORM_EPS = 1e-5


def load_state_dict_file(path: str | Path) -> Tensors:
    """Tensors from a torch.save file (loaded weights-only, never code) or a .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path}: not a valid safetensors file: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ValueError(f"{path}: not a PyTorch state_dict file: {e}") from None
        raise ValueError(
            f"{path}: refusing to unpickle Python objects other than tensors; a whole model "
            "saved with torch.save(model) must be re-saved as torch.save(model.state_dict())"
        ) from None
    except Exception as e:  # torch.load raises KeyError, EOFError, RuntimeError on junk
        raise ValueError(
            f"{path}: not a PyTorch state_dict file ({type(e).__name__}: {e})"
        ) from None
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: object, source: str = "input") -> Tensors:
    """The state_dict itself, or the one a training checkpoint wraps under a known key."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: holds a {type(obj).__name__}, not a state_dict of tensors")
    wrapped = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if len(wrapped) > 1:
        raise ValueError(f"{source}: ambiguous checkpoint, both {' and '.join(wrapped)} present")
    state = obj[wrapped[0]] if wrapped else obj
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad or not state:
        hint = f" (non-tensor entries: {', '.join(bad[:5])})" if bad else ""
        raise ValueError(f"{source}: not a state_dict of tensors{hint}")
    return dict(state)


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'locuslab' or 'pytorch-tcn', from the key layout."""
    pytorch_tcn = any(".parametrizations.weight." in k or ".padder." in k for k in state_dict)
    locuslab = any(k.endswith((".weight_g", ".weight_v")) for k in state_dict)
    if pytorch_tcn and locuslab:
        raise ValueError("state_dict mixes locuslab/TCN and pytorch-tcn keys")
    if pytorch_tcn:
        return "pytorch-tcn"
    if locuslab:
        return "locuslab"
    raise ValueError(
        "unknown state_dict layout: expected locuslab/TCN keys (network.0.conv1.weight_g) or "
        f"pytorch-tcn keys (network.0.conv1.parametrizations.weight.original0); got "
        f"{', '.join(list(state_dict)[:4])}, ..."
    )


PYTORCH_TCN_OPTIONS_NEEDED = (
    "a pytorch-tcn state_dict does not record the options that change its forward "
    "(activation, causal, use_skip_connections, output_activation, input_shape, "
    "embedding_shapes, embedding_mode): state the "
    "keyword arguments you built pytorch_tcn.TCN with, e.g. --pytorch-tcn-kwargs "
    '\'{"activation": "relu", "output_activation": null}\' (\'{}\' if you used the defaults), '
    "or convert the live module with model.convert.convert_pytorch_tcn(module)"
)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    format: str = "auto",
    dilations: Sequence[int] | None = None,
    output_activation: str = "none",
    pytorch_tcn_kwargs: Mapping[str, Any] | None = None,
) -> TCN:
    """A folded, eval-mode TCN computing what the source model computes."""
    return _convert(state_dict, format, dilations, output_activation, pytorch_tcn_kwargs)[0]


def convert_pytorch_tcn(module: torch.nn.Module) -> TCN:
    """A live pytorch_tcn.TCN -> a folded TCN: its options read from its attributes, and the
    result checked against the module's own forward."""
    kwargs = pytorch_tcn_options.options_of(module)
    net, *_ = _convert(module.state_dict(), "pytorch-tcn", None, "none", kwargs, verify=False)
    training = module.training
    try:
        pytorch_tcn_options.verify(net, module.eval(), kwargs["input_shape"])
    finally:
        module.train(training)
    return net


def convert_file(
    src: str | Path,
    dst: str | Path,
    format: str = "auto",
    dilations: Sequence[int] | None = None,
    output_activation: str = "none",
    pytorch_tcn_kwargs: Mapping[str, Any] | None = None,
) -> TCNConfig:
    """Convert a state_dict file (or a keras-tcn `.keras` model) into a tcnserve checkpoint
    directory; return its config. Nothing is written unless the conversion is exact (as far
    as can be checked here: see the checkpoint metadata's `verified_against`)."""
    if Path(src).suffix == ".keras" or format == "keras-tcn":
        if dilations is not None or output_activation != "none" or pytorch_tcn_kwargs:
            raise ValueError(
                "a .keras file records its own options: give no --dilations, "
                "--output-activation or --pytorch-tcn-kwargs"
            )
        from model import keras_tcn

        net, read = keras_tcn.convert_keras_file(src)
        metadata = {**read, "source_file": Path(src).name, "dilations": "keras-tcn config"}
        metadata |= keras_tcn.verify(net, src)  # where keras-tcn is importable, else null
        save_model(net, dst, metadata=metadata)
        return net.config
    state = load_state_dict_file(src)
    net, fmt, dilations_from, checked = _convert(
        state, format, dilations, output_activation, pytorch_tcn_kwargs
    )
    metadata = {
        "source_format": fmt,
        "source_file": Path(src).name,
        "dilations": dilations_from,
        **checked,
    }
    save_model(net, dst, metadata=metadata)
    return net.config


def _convert(
    state: Mapping[str, torch.Tensor],
    format: str,
    dilations: Sequence[int] | None,
    output_activation: str,
    pytorch_tcn_kwargs: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> tuple[TCN, str, str, dict[str, Any]]:
    """(net, format, where the dilations came from, what the conversion was checked against)."""
    fmt = detect_format(state) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"format must be auto, {' or '.join(FORMATS)}; got {format!r}")
    options = None
    if fmt == "pytorch-tcn":
        if pytorch_tcn_kwargs is None:
            raise ValueError(PYTORCH_TCN_OPTIONS_NEEDED)
        if output_activation != "none":
            raise ValueError(
                "for pytorch-tcn, state the output activation among its options "
                '(pytorch_tcn_kwargs {"output_activation": ...}), as the model was built'
            )
        options = pytorch_tcn_options.parse(pytorch_tcn_kwargs)
        output_activation = options.output_activation
    elif pytorch_tcn_kwargs is not None:
        raise ValueError("pytorch_tcn_kwargs are for pytorch-tcn state_dicts only")
    prefix, blocks, rest = _split_blocks(state)
    skips: dict[int, Tensors] = {}
    if fmt == "locuslab":
        convs = [_locuslab_block(i, b) for i, b in enumerate(blocks)]
        head, embedding = _locuslab_extras(prefix, rest)
        found: list[int | None] = [None] * len(convs)  # the paper's weights do not record them
    else:
        parsed = [_pytorch_tcn_block(i, b) for i, b in enumerate(blocks)]
        convs, found = [conv for conv, _ in parsed], [dilation for _, dilation in parsed]
        skips = _pytorch_tcn_skips(prefix, rest)
        head, embedding = _pytorch_tcn_extras(prefix, rest), None
    if dilations is not None:
        dilations = tuple(dilations)
        if len(dilations) == len(found) and any(
            f not in (None, d) for f, d in zip(found, dilations, strict=True)
        ):
            raise ValueError(
                f"dilations {list(dilations)} contradict the padding buffers: {list(found)}"
            )
        source = "given"
    elif any(f is not None for f in found):
        dilations = tuple(2**i if f is None else f for i, f in enumerate(found))
        source = "padding buffers"
    else:
        source = "default 2**i"
    activation = options.activation if options is not None else "relu"
    skip_connections = bool(options is not None and options.get("use_skip_connections"))
    gate = bool(options is not None and options.get("use_gate"))
    gated = [c["conv1.weight"].shape[0] == 2 * c["conv2.weight"].shape[0] for c in convs]
    if any(gated) and not gate:
        raise ValueError(
            "the stated pytorch-tcn options contradict the weights: use_gate=False (each "
            "block's conv1 has twice conv2's channels: a gate's)"
            if options is not None
            else "network.0: conv1 has twice conv2's channels: a gated block, not served here"
        )
    if skips and not skip_connections:
        raise ValueError(
            "the stated pytorch-tcn options contradict the weights: use_skip_connections=False "
            "(the weights hold downsample_skip_connection convs)"
        )
    embedding_dims = options.embedding_dims if options is not None else None
    _check_embeddings(convs, embedding_dims)
    net = _build(
        convs, head, embedding, dilations, output_activation, activation,
        skips if skip_connections else None, gate, embedding_dims,
        options.embedding_mode if options is not None else "add",
    )  # fmt: skip
    checked: dict[str, Any] = {}
    if options is not None:
        pytorch_tcn_options.check_against_weights(options, net, _norm_shown(state))
        checked = {"pytorch_tcn_kwargs": options.kwargs, "verified_against": None}
        if verify and pytorch_tcn_options.available():
            source_net = pytorch_tcn_options.rebuild(options, net, state)
            difference = pytorch_tcn_options.verify(net, source_net, options.input_shape)
            checked |= {
                "verified_against": f"pytorch-tcn {_version('pytorch-tcn')}",
                "max_abs_difference": difference,
            }
    return net, fmt, source, checked


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _split_blocks(state: Mapping[str, torch.Tensor]) -> tuple[str, list[Tensors], Tensors]:
    """The TCN's key prefix, per-block tensors keyed by name within the block, other keys."""
    prefixes: set[str] = set()
    blocks: dict[int, Tensors] = {}
    rest: Tensors = {}
    for key, tensor in state.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m is None:
            rest[key] = tensor
            continue
        prefixes.add(m[1])
        blocks.setdefault(int(m[2]), {})[m[3]] = tensor
    if len(prefixes) != 1:
        found = sorted(prefixes) if prefixes else "none"
        raise ValueError(
            f"expected the blocks of one TCN under one 'network.' prefix, found {found}"
        )
    if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"block indices must run 0..n-1, got {sorted(blocks)}")
    return prefixes.pop(), [blocks[i] for i in range(len(blocks))], rest


def _fold(g: torch.Tensor, v: torch.Tensor, where: str) -> torch.Tensor:
    """Weight norm with dim=0: g * v / ||v||, the norm over all but the output channel."""
    if v.dim() != 3 or g.shape != (v.shape[0], 1, 1):
        raise ValueError(
            f"{where}: weight norm g {tuple(g.shape)} / v {tuple(v.shape)}: need dim=0"
        )
    g, v = g.float(), v.float()
    return g * v / torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True)


def _fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor, block: Tensors, norm: str, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm1d after a conv, folded into it: per output channel c,
    (conv(x)_c - mean_c) * gamma_c / sqrt(var_c + eps) + beta_c is a conv with the weight scaled
    by gamma_c / sqrt(var_c + eps) and the bias moved and scaled with it (in float64, once)."""
    mean = _take(block, f"{norm}.running_mean", where).double()
    var = _take(block, f"{norm}.running_var", where).double()
    gamma = _take(block, f"{norm}.weight", where).double()
    beta = _take(block, f"{norm}.bias", where).double()
    block.pop(f"{norm}.num_batches_tracked", None)  # training bookkeeping
    if not mean.shape == var.shape == gamma.shape == beta.shape == (weight.shape[0],):
        raise ValueError(f"{where}: {norm} does not match the conv's {weight.shape[0]} channels")
    scale = gamma / torch.sqrt(var + BATCH_NORM_EPS)
    folded_w = weight.double() * scale[:, None, None]
    folded_b = (bias.double() - mean) * scale + beta
    return folded_w.to(weight.dtype), folded_b.to(bias.dtype)


def _take(block: Tensors, name: str, where: str) -> torch.Tensor:
    if name not in block:
        raise ValueError(f"{where}: missing {name}")
    return block.pop(name)


def _locuslab_block(i: int, block: Tensors) -> Tensors:
    where, block, out = f"network.{i}", dict(block), {}
    for conv, alias in _LOCUSLAB_ALIASES.items():
        parts = {}
        for part in ("weight_g", "weight_v", "bias"):
            a, b = block.pop(f"{conv}.{part}", None), block.pop(f"{alias}.{part}", None)
            if a is None and b is None:
                raise ValueError(f"{where}: missing {conv}.{part} (or {alias}.{part})")
            if a is not None and b is not None and not torch.equal(a, b):
                raise ValueError(f"{where}: {conv}.{part} and its duplicate {alias}.{part} differ")
            parts[part] = a if a is not None else b
        out[f"{conv}.weight"] = _fold(parts["weight_g"], parts["weight_v"], f"{where}.{conv}")
        out[f"{conv}.bias"] = parts["bias"]
    return _with_downsample(out, block, where)


def _pytorch_tcn_block(i: int, block: Tensors) -> tuple[Tensors, int | None]:
    where, block, out, pads = f"network.{i}", dict(block), {}, []
    for conv in ("conv1", "conv2"):
        if f"{conv}.weight" in block:  # use_norm=None: a plain conv, nothing to fold
            out[f"{conv}.weight"] = block.pop(f"{conv}.weight")
        else:
            g = _take(block, f"{conv}.parametrizations.weight.original0", where)
            v = _take(block, f"{conv}.parametrizations.weight.original1", where)
            out[f"{conv}.weight"] = _fold(g, v, where)
        out[f"{conv}.bias"] = _take(block, f"{conv}.bias", where)
        norm = f"norm{conv[-1]}"
        if f"{norm}.running_mean" in block:  # use_norm="batch_norm": folded into the conv
            out[f"{conv}.weight"], out[f"{conv}.bias"] = _fold_batch_norm(
                out[f"{conv}.weight"], out[f"{conv}.bias"], block, norm, where
            )
        elif f"{norm}.weight" in block:  # use_norm="layer_norm": per timestep, kept as it is
            out[f"{norm}.weight"] = block.pop(f"{norm}.weight")
            out[f"{norm}.bias"] = _take(block, f"{norm}.bias", where)
        buffer = block.pop(f"{conv}.padder.buffer", None)  # streaming state: only its width
        pads.append(None if buffer is None else buffer.shape[-1])
    for theirs, ours in _EMBEDDING_KEYS.items():  # checked against the options in `_build`
        for part in ("weight", "bias"):
            if f"{theirs}.{part}" in block:
                out[f"{ours}.{part}"] = block.pop(f"{theirs}.{part}")
    k = out["conv1.weight"].shape[-1]
    # The buffers hold (k - 1) * dilation past steps; with k = 1 they say nothing.
    widths = {p for p in pads if p is not None}
    if len(widths) > 1 or any(k > 1 and p % (k - 1) for p in widths):
        raise ValueError(f"{where}: padding buffers {pads} do not fit kernel_size {k}")
    dilation = widths.pop() // (k - 1) if widths and k > 1 else None
    return _with_downsample(out, block, where), dilation


def _with_downsample(out: Tensors, block: Tensors, where: str) -> Tensors:
    for part in ("weight", "bias"):
        if f"downsample.{part}" in block:
            out[f"downsample.{part}"] = block.pop(f"downsample.{part}")
    if block:
        raise ValueError(f"{where}: unrecognised keys {', '.join(sorted(block))}")
    return out


def _norm_shown(state: Mapping[str, torch.Tensor]) -> str | None:
    """The use_norm a pytorch-tcn state_dict shows: weight-norm keys, batch-norm statistics,
    or plain conv weights (None)."""
    if any(k.endswith("norm1.running_mean") for k in state):
        return "batch_norm"
    if any(k.endswith("norm1.weight") for k in state):
        return "layer_norm"
    if any(".parametrizations.weight." in k for k in state):
        return "weight_norm"
    return None


def _check_embeddings(convs: list[Tensors], dims: tuple[int, ...] | None) -> None:
    """The stated embedding_shapes against the blocks' embedding projections."""
    shown = [c["embedding_projection.weight"].shape[1] for c in convs if
             "embedding_projection.weight" in c]  # fmt: skip
    if dims is None and shown:
        raise ValueError(
            "the stated pytorch-tcn options contradict the weights: embedding_shapes=None (the "
            f"blocks hold embedding_projection_1 convs of {shown[0]} input channels: state the "
            "embedding_shapes and embedding_mode the model was built with)"
        )
    if dims is not None and (len(shown) != len(convs) or set(shown) != {sum(dims)}):
        found = f"of {sorted(set(shown))} input channels" if shown else "none"
        raise ValueError(
            f"the stated pytorch-tcn options contradict the weights: embedding_shapes "
            f"{[(d,) for d in dims]} ({sum(dims)} values in all), but the blocks' "
            f"embedding_projection_1 convs are {found}"
        )


def _pytorch_tcn_skips(prefix: str, rest: Tensors) -> dict[int, Tensors]:
    """The skip connections' 1x1 convs (taken out of `rest`), by block index."""
    skip_prefix = f"{prefix.removesuffix('network.')}downsample_skip_connection."
    skips: dict[int, Tensors] = {}
    for key in [k for k in rest if k.startswith(skip_prefix)]:
        index, _, part = key.removeprefix(skip_prefix).partition(".")
        if not index.isdigit():
            raise ValueError(f"unrecognised pytorch-tcn key {key}")
        skips.setdefault(int(index), {})[part] = rest.pop(key)
    return skips


def _pytorch_tcn_extras(prefix: str, rest: Tensors) -> Tensors | None:
    head_prefix = f"{prefix}projection_out."
    unknown = sorted(k for k in rest if k not in (f"{head_prefix}weight", f"{head_prefix}bias"))
    if unknown:
        raise ValueError(f"unrecognised pytorch-tcn keys: {', '.join(unknown)}")
    return {k.removeprefix(head_prefix): v for k, v in rest.items()} or None


def _locuslab_extras(prefix: str, rest: Tensors) -> tuple[Tensors | None, torch.Tensor | None]:
    # The head and embedding are the TCN's siblings: tcn.network.* beside linear.*.
    parent = prefix.rstrip(".").rpartition(".")[0]
    parent = f"{parent}." if parent else ""
    rest = {k.removeprefix(parent) if k.startswith(parent) else k: v for k, v in rest.items()}
    embedding = rest.pop(f"{_LOCUSLAB_EMBEDDING}.weight", None)
    heads = [h for h in _LOCUSLAB_HEADS if f"{h}.weight" in rest]
    if len(heads) > 1:
        raise ValueError(f"ambiguous head: both {' and '.join(heads)}")
    head = {p: rest.pop(f"{heads[0]}.{p}") for p in ("weight", "bias")} if heads else None
    if rest:
        raise ValueError(f"unrecognised keys: {', '.join(sorted(rest))}")
    return head, embedding


def _build(
    convs: list[Tensors],
    head: Tensors | None,
    embedding: torch.Tensor | None,
    dilations: tuple[int, ...] | None,
    output_activation: str,
    activation: str = "relu",
    skips: dict[int, Tensors] | None = None,  # skip connections: their 1x1 convs by block
    gate: bool = False,
    embedding_dims: tuple[int, ...] | None = None,
    embedding_mode: str = "add",
) -> TCN:
    """Infer the config from tensor shapes, check every shape, and load the weights."""
    layer_norm = "norm1.weight" in convs[0]
    w, head_w = convs[0]["conv1.weight"], (head or {}).get("weight")
    if w.dim() != 3 or any(c["conv2.weight"].dim() != 3 for c in convs):
        raise ValueError(f"conv weights must be (out, in, kernel_size), got {tuple(w.shape)}")
    if head is not None and (head_w is None or head_w.dim() not in (2, 3)):
        raise ValueError(f"head weight must be (out, channels), got {sorted(head)}")
    if embedding is not None and embedding.dim() != 2:
        raise ValueError(f"embedding must be (vocab_size, in_channels), got {embedding.shape}")
    config = TCNConfig(
        in_channels=w.shape[1],
        channels=tuple(c["conv2.weight"].shape[0] for c in convs),
        kernel_size=w.shape[2],
        dilations=dilations,
        out_channels=None if head_w is None else head_w.shape[0],
        output_activation=output_activation,
        vocab_size=None if embedding is None else embedding.shape[0],
        activation=activation,
        skip_connections=skips is not None,
        gate=gate,
        layer_norm=layer_norm,
        embedding_dims=embedding_dims,
        embedding_mode=embedding_mode,
    )
    state: dict[str, Any] = {}
    last = config.channels[-1]
    for i, width in enumerate(config.channels[:-1] if skips is not None else ()):
        if width != last:  # pytorch-tcn's 1x1 conv to the last width; none where they agree
            want = {"weight": (last, width, 1), "bias": (last,)}
            state |= _checked(f"downsample_skip_connection.{i}", skips.pop(i, {}), want,
                              f"skips.{i}.")  # fmt: skip
    if skips:
        raise ValueError(
            f"downsample_skip_connection: unexpected convs for blocks {sorted(skips)} (their "
            "width is the last block's)"
        )
    widths, k = (config.in_channels, *config.channels), config.kernel_size
    for i, block in enumerate(convs):
        c_in, c_out = widths[i], widths[i + 1]
        first = 2 * c_out if gate else c_out  # a gate's conv1 has twice the width
        want = {
            "conv1.weight": (first, c_in, k),
            "conv1.bias": (first,),
            "conv2.weight": (c_out, c_out, k),
            "conv2.bias": (c_out,),
        }
        if c_in != c_out:
            want |= {"downsample.weight": (c_out, c_in, 1), "downsample.bias": (c_out,)}
        if layer_norm:
            want |= {"norm1.weight": (first,), "norm1.bias": (first,)}
            want |= {"norm2.weight": (c_out,), "norm2.bias": (c_out,)}
        if embedding_dims is not None:
            width = config.embedding_width
            want |= {"embedding_projection.weight": (first, width, 1),
                     "embedding_projection.bias": (first,)}  # fmt: skip
            if embedding_mode == "concat":
                want |= {"concat_projection.weight": (first, 2 * first, 1),
                         "concat_projection.bias": (first,)}  # fmt: skip
            else:  # pytorch-tcn builds embedding_projection_2 in either mode; "add" never uses it
                block = {k: v for k, v in block.items() if not k.startswith("concat_projection.")}
        state |= _checked(f"network.{i}", block, want, f"blocks.{i}.")
    if head is not None:
        if head_w is not None and head_w.dim() == 3:  # pytorch-tcn's 1x1 conv is a Linear
            head = {**head, "weight": head_w.squeeze(-1)}
        want = {"weight": (config.output_size, config.channels[-1]), "bias": (config.output_size,)}
        state |= _checked("head", head, want, "head.")
    if embedding is not None:
        want = {"weight": (config.vocab_size, config.in_channels)}
        state |= _checked("embedding", {"weight": embedding}, want, "embedding.")
    net = TCN(config).fold_weight_norm()
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def _checked(where: str, tensors: Tensors, want: dict[str, tuple[int, ...]], to: str) -> Tensors:
    """`tensors` renamed under `to`, refused unless it holds exactly `want`'s float shapes."""
    if set(tensors) != set(want):
        raise ValueError(
            f"{where}: expected {sorted(want)}, got {sorted(tensors)} (channel counts imply it)"
        )
    for name, shape in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(
                f"{where}.{name}: expected shape {shape}, got {tuple(t.shape)} {t.dtype}"
            )
    return {f"{to}{name}": t.float() for name, t in tensors.items()}
