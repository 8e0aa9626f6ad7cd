"""The learning curve of a training run as a PNG: training loss, validation metric per epoch,
the paper's value and the useless-model baseline, on one log scale.

matplotlib is imported only here, and only when a curve is drawn (`pip install matplotlib`, or
the project's `train` extra); without it the run still saves its checkpoint and metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_learning_curve(result: dict[str, Any], path: Path) -> bool:
    """Draw metrics.json's `curve` and `history` into `path`; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            "no learning curve written: matplotlib is not installed "
            "(pip install matplotlib, or pip install 'tcnserve[train]')"
        )
        return False
    metric = result["metric"]
    history = result["history"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    curve = result.get("curve") or [(h["steps"], h["train_loss"]) for h in history]
    if curve:
        steps, losses = zip(*curve, strict=True)
        ax.plot(steps, losses, color="tab:blue", lw=1, alpha=0.8, label="training loss (running)")
    val = [(h["steps"], h[f"val_{metric}"]) for h in history if f"val_{metric}" in h]
    if val:
        steps, values = zip(*val, strict=True)
        ax.plot(steps, values, "o-", color="tab:orange", ms=4, label=f"validation {metric}")
    warmup_end = max((h["steps"] for h in history if h["phase"].startswith("warm-up")), default=0)
    if warmup_end:
        ax.axvspan(0, warmup_end, color="0.92", label="warm-up at shorter T")
    ax.axhline(
        result["paper_value"],
        color="tab:green",
        ls="--",
        label=f"paper: {result['paper_value']:g} (T={result['paper_seq_len']})",
    )
    if "baseline_value" in result:
        ax.axhline(
            result["baseline_value"],
            color="tab:red",
            ls=":",
            label=f"{result.get('baseline', 'baseline')}: {result['baseline_value']:.3g}",
        )
    ax.axhline(result["value"], color="black", lw=0.8, label=f"held-out: {result['value']:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(
        f"{result['task']}, T={result['seq_len']}: held-out {metric} {result['value']:.3g}"
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.text(
        0.01,
        0.01,
        f"{result['steps']} steps, {result['wall_time_s'] / 60:.0f} min on {result['device']}, "
        f"{result.get('threads', '?')} thread(s), torch {result.get('torch', '?')}, "
        f"seed {result['seed']}",
        fontsize=7,
        color="0.4",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return True
