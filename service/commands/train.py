"""`tcnserve train TASK --out DIR`: train a TCN on one of the paper's synthetic tasks."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

from model.checkpoint import check_destination
from model.train import STATE_FILE, TASKS, TrainOptions, check_resumable, train

# CLI flag -> argparse dest, in the order the reproducing command lists them.
_FLAGS = {
    "--seq-len": "seq_len",
    "--epochs": "epochs",
    "--steps-per-epoch": "steps_per_epoch",
    "--batch-size": "batch_size",
    "--lr": "lr",
    "--lr-decay": "lr_decay",
    "--lr-decay-after": "lr_decay_after",
    "--curriculum": "curriculum",
    "--clip": "clip",
    "--hidden": "hidden",
    "--levels": "levels",
    "--kernel-size": "kernel_size",
    "--seed": "seed",
    "--device": "device",
    "--val-size": "val_size",
    "--test-size": "test_size",
    "--max-minutes": "max_minutes",
    "--threads": "threads",
}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = (
        "Defaults follow the paper (Bai, Kolter & Koltun 2018) and locuslab/TCN: "
        "adding: T=600, kernel 8, 8 levels x 24, Adam 2e-3, batch 32, no clipping, "
        "10 epochs x 1563 steps; copy: T=1000, kernel 8, 8 levels x 10, dropout 0.05, "
        "RMSprop 5e-4, clip 1.0, batch 32, 50 epochs x 313 steps."
    )
    parser.add_argument("task", choices=sorted(TASKS), help="which synthetic task")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint already in --out"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run whose {STATE_FILE} is in --out (saved after every epoch), with "
        "the same options; a larger --epochs extends a finished run",
    )
    parser.add_argument(
        "--seq-len", type=int, help="adding: sequence length; copy: blank length T (input T+20)"
    )
    parser.add_argument("--epochs", type=int, help="epochs (validation after each)")
    parser.add_argument("--steps-per-epoch", type=int, help="optimizer steps per epoch")
    parser.add_argument("--batch-size", type=int, help="sequences per step")
    parser.add_argument("--lr", type=float, help="initial learning rate")
    parser.add_argument(
        "--lr-decay", type=float, default=1.0, help="multiply lr by this after each epoch [1.0]"
    )
    parser.add_argument(
        "--lr-decay-after", type=int, default=0, help="epochs at the initial lr before decay [0]"
    )
    parser.add_argument(
        "--curriculum",
        type=parse_curriculum,
        metavar="T:STEPS,...",
        help="warm-up stages at shorter T before the epochs, e.g. 20:400,100:300",
    )
    parser.add_argument("--clip", type=float, help="gradient-norm clip; <= 0 disables")
    parser.add_argument("--hidden", type=int, help="channels per TemporalBlock")
    parser.add_argument("--levels", type=int, help="number of TemporalBlocks")
    parser.add_argument("--kernel-size", type=int, help="conv kernel size")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data [0]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    parser.add_argument("--val-size", type=int, default=1000, help="validation sequences [1000]")
    parser.add_argument("--test-size", type=int, default=2000, help="test sequences [2000]")
    parser.add_argument(
        "--max-minutes", type=float, help="wall-clock budget: then evaluate and save"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads [torch's default]")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (also off when not a TTY)"
    )


def parse_curriculum(text: str) -> tuple[tuple[int, int], ...]:
    try:
        stages = tuple((int(t), int(n)) for t, n in (stage.split(":") for stage in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected T:STEPS pairs like 20:400,100:300, got {text!r}"
        ) from None
    return stages


def reproducing_command(args: argparse.Namespace) -> str:
    """The command line that reruns this training, with every given option spelled out."""
    parts = ["tcnserve", "train", args.task, "--out", str(args.out)]
    for flag, attr in _FLAGS.items():
        value = getattr(args, attr)
        if isinstance(value, tuple):
            value = ",".join(f"{t}:{n}" for t, n in value)
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            print(f"tcnserve train: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        # Before the training, not after it. A resumed run replaces its own checkpoint.
        check_destination(args.out, args.overwrite or args.resume)
        check_resumable(args.out, args.resume, args.overwrite)
        options = TrainOptions(
            task=args.task,
            out=args.out,
            seq_len=args.seq_len,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_decay=args.lr_decay,
            lr_decay_after=args.lr_decay_after,
            curriculum=args.curriculum or (),
            grad_clip=args.clip,
            hidden=args.hidden,
            levels=args.levels,
            kernel_size=args.kernel_size,
            seed=args.seed,
            device=args.device,
            val_size=args.val_size,
            test_size=args.test_size,
            max_minutes=args.max_minutes,
            progress=False if args.no_progress else None,
            command=reproducing_command(args),
            resume=args.resume,
        )
        result = train(options)
    except ValueError as e:
        print(f"tcnserve train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if (args.out / STATE_FILE).is_file():
            kept, again = "the last finished phase is kept: continue with", " --resume"
        else:
            kept, again = "no phase had finished, nothing is kept: rerun with", ""
        again += " --overwrite" if args.overwrite and not again else ""
        print(f"tcnserve train: interrupted; {kept} {reproducing_command(args)}{again}",
              file=sys.stderr)  # fmt: skip
        return 130
    print(
        f"{result['task']} T={result['seq_len']}: held-out {result['metric']} "
        f"{result['value']:.3g} (paper {result['paper_value']:g} at T={result['paper_seq_len']}) "
        f"after {result['steps']} steps in {result['wall_time_s']:.0f} s -> {args.out}"
    )
    if not result["beats_baseline"]:
        print(
            f"tcnserve train: WARNING: that is no better than {result['baseline']} "
            f"({result['metric']} {result['baseline_value']:.3g}): the model has not learned the "
            "task; train longer or with a --curriculum (see docs/training.md)",
            file=sys.stderr,
        )
    return 0
