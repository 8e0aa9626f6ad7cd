"""`tcnserve convert`: a locuslab/TCN or pytorch-tcn state_dict, or a keras-tcn `.keras`
model, into a tcnserve checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

from model.checkpoint import check_destination, read_checkpoint_info
from model.config import OUTPUT_ACTIVATIONS
from model.convert import FORMATS, convert_file

EPILOG = """\
The file is loaded with torch.load(weights_only=True) (or as .safetensors): a whole pickled
model is refused; save its state_dict instead. A state_dict holds no hyperparameters, and
nothing it cannot show is guessed:
  locuslab/TCN: the TemporalConvNet fixes relu, causal and dilations 2**i (pass --dilations if
  yours differ); state the head's activation with --output-activation.
  pytorch-tcn: --pytorch-tcn-kwargs is required: the JSON object of keyword arguments the
  model was built with ('{}' for the defaults), e.g.
      --pytorch-tcn-kwargs '{"use_norm": null, "output_activation": "tanh"}'
  Options tcnserve cannot serve exactly are refused by name. With pytorch-tcn installed, the
  model is rebuilt from them and both forwards are compared (max |difference| <= 1e-5 +
  1e-5 * max |output|) before the checkpoint is written; without it, the checkpoint records
  that it was not verified.
  keras-tcn: a .keras file (model.save("x.keras")) records its options; TensorFlow is not
  needed (docs/bring_your_own_model.md).
"""


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "src", help="state_dict file (torch.save output or .safetensors), or a keras-tcn .keras"
    )
    parser.add_argument("dst", help="checkpoint directory to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint already in dst"
    )
    parser.add_argument(
        "--format",
        choices=("auto", *FORMATS, "keras-tcn"),
        default="auto",
        help="auto: a .keras file is keras-tcn, a state_dict is told apart by its keys",
    )
    parser.add_argument(
        "--dilations",
        type=parse_dilations,
        default=None,
        metavar="D1,D2,...",
        help="one dilation per TemporalBlock, e.g. 1,2,4 (default: 2**i or read from weights)",
    )
    parser.add_argument(
        "--output-activation",
        choices=OUTPUT_ACTIVATIONS,
        default="none",
        help="locuslab: activation over channels after the head (not stored in a state_dict)",
    )
    parser.add_argument(
        "--pytorch-tcn-kwargs",
        type=parse_kwargs,
        default=None,
        metavar="JSON",
        help="pytorch-tcn: the TCN(...) keyword arguments the model was built with (required)",
    )


def parse_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, like \'{"activation": "relu"}\'')
    return value


def parse_dilations(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        check_destination(args.dst, args.overwrite)
        config = convert_file(
            args.src,
            args.dst,
            format=args.format,
            dilations=args.dilations,
            output_activation=args.output_activation,
            pytorch_tcn_kwargs=args.pytorch_tcn_kwargs,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, metadata = read_checkpoint_info(args.dst)
    print(
        f"converted {metadata['source_format']} {args.src} -> {args.dst}: "
        f"in_channels={config.in_channels} channels={list(config.channels)} "
        f"kernel_size={config.kernel_size} dilations={list(config.dilations)} "
        f"({metadata['dilations']}) output_size={config.output_size} "
        f"output_activation={config.output_activation} "
        f"receptive_field={config.receptive_field}"
    )
    if metadata["source_format"] == "keras-tcn" and not metadata.get("verified_against"):
        print(
            "note: keras-tcn (with TensorFlow) is not installed here, so the conversion was not "
            "run against its forward; the converter is tested against models saved by real "
            "keras-tcn (docs/bring_your_own_model.md)",
            file=sys.stderr,
        )
    if metadata["source_format"] == "pytorch-tcn":
        if metadata.get("verified_against"):
            print(
                f"verified against {metadata['verified_against']}: max |difference| "
                f"{metadata['max_abs_difference']:.3g} on random input"
            )
        else:
            print(
                "warning: pytorch-tcn is not installed here, so the conversion was not checked "
                "against its forward (pip install pytorch-tcn==1.2.3, then convert again)",
                file=sys.stderr,
            )
    return 0
