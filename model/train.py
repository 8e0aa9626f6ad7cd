"""Training on the paper's synthetic tasks: fresh batches every step, held-out val and test sets.

`train(options)` builds the task's TCN, trains it with the paper's optimizer settings (or the
overrides in `TrainOptions`), evaluates on a validation set after every epoch, keeps the weights
with the best validation metric, reports that model's metric on a separate test set, and writes
`save_model` + metrics.json to `options.out`. Given a seed the run is deterministic (on CPU, one
thread), unless `max_minutes` cuts it short.

After every warm-up stage and epoch the whole training state (weights, optimizer, schedule, both
random generators, the best weights so far, the history) goes to `STATE_FILE` in `options.out`,
so `resume=True` continues an interrupted run exactly where its last finished phase left it, or
extends a finished one by more epochs: the result equals one uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.checkpoint import save_model
from model.config import TCNConfig
from model.learning_curve import write_learning_curve
from model.tasks import TASKS, Batch, PerSample, TaskSpec
from model.tcn import TCN

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
STATE_FILE = "training_state.pt"  # torch.save of tensors and plain values: weights_only loads it
STATE_FORMAT = 1
# Options that may differ between a run and its resumption: the rest must be equal.
RESUMABLE_CHANGES = frozenset(("out", "epochs", "max_minutes", "progress", "command", "resume"))
CURVE_FILE = "learning_curve.png"
CURVE_EVERY = 20  # steps between the points of the training-loss curve
# Held-out sets are drawn from seeds far from the training seed, so no run's val/test data
# is another nearby seed's training data.
VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
EVAL_CHUNK = 250  # sequences per forward pass when evaluating


@dataclass(frozen=True)
class TrainOptions:
    """One training run; None means the task's paper default."""

    task: str
    out: Path
    seq_len: int | None = None  # adding: sequence length; copy: blank length T
    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_decay: float = 1.0  # multiply the learning rate by this after every epoch...
    lr_decay_after: int = 0  # ...once this many epochs have run at the initial rate
    curriculum: tuple[tuple[int, int], ...] = ()  # (seq_len, steps) warm-up stages, in order
    grad_clip: float | None = None  # None: task default; <= 0: no clipping
    hidden: int | None = None
    levels: int | None = None
    kernel_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    val_size: int = 1000
    test_size: int = 2000
    max_minutes: float | None = None
    progress: bool | None = None  # None: only when stderr is a terminal
    command: str = ""
    resume: bool = False  # continue from STATE_FILE in `out` (more epochs allowed)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "hidden", "levels", "kernel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if any(t < 2 or n < 1 for t, n in self.curriculum):
            raise ValueError(
                f"curriculum stages need seq_len >= 2 and steps >= 1: {self.curriculum}"
            )
        if self.lr_decay_after < 0:
            raise ValueError(f"lr_decay_after must be >= 0, got {self.lr_decay_after}")
        if self.val_size < 1 or self.test_size < 1:
            raise ValueError("val_size and test_size must be >= 1")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


def task_config(spec: TaskSpec, options: TrainOptions) -> TCNConfig:
    """The task's paper architecture with the run's size overrides."""
    levels = options.levels or spec.config.num_blocks
    hidden = options.hidden or spec.config.channels[0]
    return replace(
        spec.config,
        channels=(hidden,) * levels,
        dilations=tuple(2**i for i in range(levels)),
        kernel_size=options.kernel_size or spec.config.kernel_size,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@torch.no_grad()
def evaluate(
    net: TCN, data: Batch, metrics: dict[str, PerSample], device: torch.device
) -> dict[str, float]:
    """Mean of each per-sequence metric over a held-out set, in eval mode."""
    was_training = net.training
    net.eval()
    inputs, targets = data
    totals = dict.fromkeys(metrics, 0.0)
    for start in range(0, inputs.shape[0], EVAL_CHUNK):
        x = inputs[start : start + EVAL_CHUNK].to(device)
        y = targets[start : start + EVAL_CHUNK].to(device)
        out = net(x)
        for name, fn in metrics.items():
            totals[name] += float(fn(out, y).double().sum())
    net.train(was_training)
    return {name: total / inputs.shape[0] for name, total in totals.items()}


def _make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def train(options: TrainOptions) -> dict[str, Any]:
    """Train, keep the best-on-validation weights, test them, save; returns the metrics."""
    spec = TASKS[options.task]
    seq_len = options.seq_len or spec.paper_seq_len
    epochs = options.epochs or spec.epochs
    steps_per_epoch = options.steps_per_epoch or spec.steps_per_epoch
    batch_size = options.batch_size or spec.batch_size
    lr = options.lr or spec.lr
    clip = spec.grad_clip if options.grad_clip is None else options.grad_clip
    clip = clip if clip is not None and clip > 0 else None
    device = resolve_device(options.device)
    config = task_config(spec, options)
    metrics = {spec.metric: spec.metric_fn, **spec.extra_metrics}

    torch.manual_seed(options.seed)  # weight init and dropout
    net = TCN(config).to(device).train()
    optimizer = _make_optimizer(spec.optimizer, net.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=options.lr_decay)
    train_gen = torch.Generator().manual_seed(options.seed)
    val_data = spec.make_batch(
        options.val_size, seq_len, torch.Generator().manual_seed(options.seed + VAL_SEED_OFFSET)
    )
    test_data = spec.make_batch(
        options.test_size, seq_len, torch.Generator().manual_seed(options.seed + TEST_SEED_OFFSET)
    )
    logger.info(
        "training %s: T=%d, receptive field %d, %d parameters, %d epochs x %d steps of batch %d",
        spec.name, seq_len, config.receptive_field, sum(p.numel() for p in net.parameters()),
        epochs, steps_per_epoch, batch_size,
    )  # fmt: skip

    start = time.monotonic()
    deadline = start + options.max_minutes * 60 if options.max_minutes else math.inf
    best_value, best_state, best_step = math.inf, copy.deepcopy(net.state_dict()), 0
    history: list[dict[str, Any]] = []
    curve: list[tuple[int, float]] = []  # (step, running loss) every CURVE_EVERY steps
    step, out_of_time, done_phases = 0, False, 0
    # Warm-up stages at shorter T (no validation), then the epochs at the task's T.
    phases = [(f"warm-up T={t}", t, n, 0) for t, n in options.curriculum]
    phases += [(f"epoch {e}/{epochs}", seq_len, steps_per_epoch, e) for e in range(1, epochs + 1)]
    if not options.resume:  # a new run: a state left in `out` is not this run's
        (Path(options.out) / STATE_FILE).unlink(missing_ok=True)
    else:
        state = load_state(options, len(phases))
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train_gen.set_state(state["train_gen"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        best_value, best_state, best_step = (
            state["best_value"],
            state["best_state"],
            state["best_step"],
        )
        history, curve, step = state["history"], [tuple(p) for p in state["curve"]], state["step"]
        done_phases = state["phases"]
        start -= state["elapsed_s"]  # elapsed and wall time count the whole run
        logger.info("resuming after %s (step %d)", history[-1]["phase"], step)
    for index, (label, phase_len, phase_steps, epoch) in enumerate(phases):
        if index < done_phases:
            continue
        phase_lr = optimizer.param_groups[0]["lr"]
        running, phase_loss, done = None, 0.0, 0
        bar = tqdm(
            total=phase_steps,
            desc=label,
            disable=None if options.progress is None else not options.progress,
            leave=False,
        )
        with bar:
            for _ in range(phase_steps):
                x, y = spec.make_batch(batch_size, phase_len, train_gen)
                loss = spec.loss(net(x.to(device)), y.to(device)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                optimizer.step()
                value = loss.item()
                step, done, phase_loss = step + 1, done + 1, phase_loss + value
                running = value if running is None else 0.98 * running + 0.02 * value
                bar.update()
                bar.set_postfix(loss=f"{running:.3g}")
                if step % CURVE_EVERY == 0:
                    curve.append((step, running))
                # Without a terminal: a log line soon after the start, then every 100 steps.
                if bar.disable and (step % 100 == 0 or step in (1, 10)):
                    logger.info("step %d (%s): running loss %.4g", step, label, running)
                if time.monotonic() > deadline:
                    out_of_time = True
                    break
        entry: dict[str, Any] = {
            "phase": label, "seq_len": phase_len, "steps": step, "lr": phase_lr,
            "train_loss": phase_loss / max(done, 1),
        }  # fmt: skip
        if epoch:
            if epoch >= options.lr_decay_after:
                scheduler.step()
            val = evaluate(net, val_data, metrics, device)
            if val[spec.metric] < best_value:
                best_value, best_step = val[spec.metric], step
                best_state = copy.deepcopy(net.state_dict())
            entry.update({f"val_{name}": v for name, v in val.items()})
        entry["elapsed_s"] = round(time.monotonic() - start, 1)
        history.append(entry)
        logger.info(
            "%s: %d steps, lr %.3g, train loss %.4g%s", label, step, phase_lr,
            entry["train_loss"], f", val {spec.metric} {val[spec.metric]:.4g}" if epoch else "",
        )  # fmt: skip
        if not out_of_time:  # a finished phase: what a resumed run starts from
            state = {
                "format": STATE_FORMAT, "options": _fingerprint(options), "phases": index + 1,
                "step": step, "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "train_gen": train_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "best_value": best_value,
                "best_state": best_state, "best_step": best_step, "history": history,
                "curve": curve, "elapsed_s": time.monotonic() - start,
            }  # fmt: skip
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            _save_state(state, Path(options.out))
        if out_of_time:
            logger.info("stopping: the %.1f-minute budget is spent", options.max_minutes)
            break

    net.load_state_dict(best_state)
    test = evaluate(net, test_data, metrics, device)
    wall_time = time.monotonic() - start
    baseline = spec.baseline_fn(test_data[1])
    beats_baseline = test[spec.metric] < baseline
    deviations = [*_deviations(spec, seq_len, step, batch_size, lr, clip, options, config)]
    if out_of_time:
        deviations.append(f"stopped by the {options.max_minutes}-minute wall-clock budget")
    result: dict[str, Any] = {
        "task": spec.name,
        "seq_len": seq_len,
        "metric": spec.metric,
        "value": test[spec.metric],
        "steps": step,
        "wall_time_s": round(wall_time, 1),
        "paper_value": spec.paper_value,
        "paper_seq_len": spec.paper_seq_len,
        "seed": options.seed,
        "command": options.command,
        "extra_metrics": {k: v for k, v in test.items() if k != spec.metric},
        "baseline_value": baseline,
        "baseline": spec.baseline_name,
        "beats_baseline": beats_baseline,
        "best_step": best_step,
        "best_val_value": best_value,
        "batch_size": batch_size,
        "optimizer": spec.optimizer,
        "lr": lr,
        "lr_decay_per_epoch": options.lr_decay,
        "lr_decay_after_epochs": options.lr_decay_after,
        "grad_clip": clip,
        "val_size": options.val_size,
        "test_size": options.test_size,
        "val_seed": options.seed + VAL_SEED_OFFSET,
        "test_seed": options.seed + TEST_SEED_OFFSET,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "deviations": deviations,
        "history": history,
        "curve": curve,
    }
    metadata = {
        "task": spec.name,
        "trained": True,
        "metric": spec.metric,
        "value": test[spec.metric],
        "baseline_value": baseline,
        "beats_baseline": beats_baseline,
        "paper_value": spec.paper_value,
        "paper_seq_len": spec.paper_seq_len,
        "seq_len": seq_len,
        "steps": step,
        "seed": options.seed,
        "description": (
            f"TCN trained on the {spec.name} task at T={seq_len}: held-out {spec.metric} "
            f"{test[spec.metric]:.3g} (paper: {spec.paper_value:g} at T={spec.paper_seq_len})"
        ),
    }
    if not beats_baseline:
        metadata["description"] += (
            f"; NO BETTER than {spec.baseline_name} ({spec.metric} {baseline:.3g})"
        )
        logger.warning(
            "held-out %s %.4g is no better than %s (%.4g): the model has not learned the task; "
            "train longer (more --epochs or --steps-per-epoch) or with a --curriculum",
            spec.metric, test[spec.metric], spec.baseline_name, baseline,
        )  # fmt: skip
    save_model(net, options.out, metadata)
    (Path(options.out) / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    write_learning_curve(result, Path(options.out) / CURVE_FILE)
    logger.info("test %s %.4g after %d steps in %.0f s", spec.metric, test[spec.metric], step,
                wall_time)  # fmt: skip
    return result


def _fingerprint(options: TrainOptions) -> dict[str, Any]:
    """The options a resumed run must share with the run it continues."""
    values = asdict(options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()
            if k not in RESUMABLE_CHANGES}  # fmt: skip


def _save_state(state: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)  # whole or not at all, if the run dies while writing


def load_state(options: TrainOptions, phases: int) -> dict[str, Any]:
    """The saved state `options.resume` continues from; ValueError when it cannot continue it."""
    path = Path(options.out) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"nothing to resume: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state this version reads")
    saved, given = state["options"], _fingerprint(options)
    differ = [f"{k} {saved.get(k)!r} -> {given[k]!r}" for k in given if saved.get(k) != given[k]]
    if differ:
        raise ValueError(
            f"{path} was written by a run with other options ({'; '.join(differ)}): resume with "
            "the same options (only --epochs and --max-minutes may change)"
        )
    if state["phases"] > phases:
        raise ValueError(
            f"{path} has finished {state['history'][-1]['phase']}: it ran more epochs than "
            "--epochs gives; resume with at least as many"
        )
    return state


def check_resumable(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Before any work: `resume` needs a saved state, and a new run must not silently replace
    one, finished or interrupted (ValueError saying what to pass)."""
    path = Path(out) / STATE_FILE
    if resume and not path.is_file():
        raise ValueError(f"nothing to resume: {path} does not exist")
    if not resume and not overwrite and path.is_file():
        finished = (Path(out) / METRICS_FILE).is_file()
        run, verb = ("a finished", "extend it with more --epochs") if finished else (
            "an unfinished", "continue it")  # fmt: skip
        raise ValueError(
            f"{out} holds {run} training run ({STATE_FILE}): pass --resume to {verb}, or "
            "--overwrite to start again"
        )


def _deviations(
    spec: TaskSpec,
    seq_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    clip: float | None,
    options: TrainOptions,
    config: TCNConfig,
) -> list[str]:
    """How this run differs from the paper's setup, in words for metrics.json."""
    notes = [
        "fresh sequences every step from a seeded generator, not a fixed training set",
        "model chosen by the best validation metric after each epoch; value is on a test set",
    ]
    paper_steps = spec.epochs * spec.steps_per_epoch
    if steps < paper_steps:
        notes.append(f"{steps} optimizer steps instead of the paper code's {paper_steps}")
    if options.curriculum:
        stages = ", ".join(f"{n} steps at T={t}" for t, n in options.curriculum)
        notes.append(f"curriculum warm-up before training at T={seq_len}: {stages}")
    if seq_len != spec.paper_seq_len:
        notes.append(f"T={seq_len} instead of the paper's T={spec.paper_seq_len}")
    if options.lr_decay != 1.0:
        notes.append(
            f"learning rate x{options.lr_decay} after every epoch from epoch "
            f"{max(options.lr_decay_after, 1)} on (paper: constant)"
        )
    if batch_size != spec.batch_size or lr != spec.lr or clip != spec.grad_clip:
        notes.append(f"batch {batch_size}, lr {lr:g}, clip {clip} (paper: batch "
                     f"{spec.batch_size}, lr {spec.lr:g}, clip {spec.grad_clip})")  # fmt: skip
    if config != spec.config:
        notes.append(f"architecture {config.channels[0]} x {config.num_blocks} blocks, kernel "
                     f"{config.kernel_size} (paper: {spec.config.channels[0]} x "
                     f"{spec.config.num_blocks}, kernel {spec.config.kernel_size})")  # fmt: skip
    return notes
