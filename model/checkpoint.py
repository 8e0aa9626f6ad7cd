"""Checkpoints: config.json + model.safetensors. Loading never unpickles anything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import TCNConfig
from model.tcn import TCN

CHECKPOINT_FORMAT = "tcnserve/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def check_destination(directory: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, a checkpoint directory that cannot or should not be written: a
    path that is a file, a directory holding a checkpoint (unless `overwrite`), or a place this
    process cannot create it in. ValueError names the problem and the way out."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: name a directory for the checkpoint")
    if (
        out.is_dir()
        and not overwrite
        and any((out / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE))
    ):
        raise ValueError(f"{out} already holds a checkpoint: pass --overwrite to replace it")
    parent = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out}: {parent} is not a directory this user may write")
    return out


def save_model(net: TCN, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the folded inference weights and the config (plus free-form metadata) to a dir."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.folded_state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
    # safetensors writes through a private temporary file (mode 0600), and a umask may hide
    # the config: a checkpoint is data to share, e.g. mounted into a container of another user.
    doc = {"format": CHECKPOINT_FORMAT, "config": net.config.to_dict(), "metadata": metadata or {}}
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        (out / name).chmod(0o644)
    return out


def read_checkpoint_info(directory: str | Path) -> tuple[TCNConfig, dict[str, Any]]:
    """The config and metadata of a checkpoint, without loading weights."""
    path = Path(directory) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {CONFIG_FILE} in {directory}: not a tcnserve checkpoint"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint config")
    try:
        config = TCNConfig.from_dict(doc["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: invalid config: {e}") from None
    return config, dict(doc.get("metadata") or {})


def load_model(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> TCN:
    """A ready model: weight norm folded, eval mode, on `device` (and `dtype` if given)."""
    config, _ = read_checkpoint_info(directory)
    net = TCN(config).fold_weight_norm()
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{directory}: weights do not match config.json (missing: {missing}, "
            f"unexpected: {unexpected}, shape mismatches: {reshaped})"
        )
    net.load_state_dict(state)
    net = net.to(device=device, dtype=dtype) if dtype is not None else net.to(device)
    return net.eval().requires_grad_(False)
