"""`tcnserve convert`: a locuslab/TCN or pytorch-tcn state_dict into a tcnserve checkpoint."""

from __future__ import annotations

import argparse
import sys

from model.checkpoint import read_checkpoint_info
from model.config import OUTPUT_ACTIVATIONS
from model.convert import FORMATS, convert_file

EPILOG = """\
The file is loaded with torch.load(weights_only=True) (or as .safetensors): a whole pickled
model is refused; save its state_dict instead. A state_dict holds no hyperparameters:
locuslab dilations default to the paper's 2**i (pass --dilations if yours differ); pytorch-tcn
dilations are read from its padding buffers, and its activation, causal and output_activation
options are assumed to be the defaults (relu, causal, none) unless given here.
"""


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", help="state_dict file (torch.save output or .safetensors)")
    parser.add_argument("dst", help="checkpoint directory to write")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto")
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
        help="activation over channels after the head (not stored in a state_dict)",
    )


def parse_dilations(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        config = convert_file(
            args.src,
            args.dst,
            format=args.format,
            dilations=args.dilations,
            output_activation=args.output_activation,
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
    return 0
