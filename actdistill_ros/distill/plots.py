"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss", "task", "distill", "semantic", "action", "balance", "budget", "keep")


def plot_losses(records: list[dict], path: Path) -> Path:
    """One panel per stage: every logged loss component against the step."""
    stages = defaultdict(list)
    for record in records:
        stages[record["stage"]].append(record)
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], stages.items()):
        for key in LOSS_KEYS:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_layer_usage(usage: list[float], routing: str, path: Path) -> Path:
    """Fraction of held-out observations that execute each backbone layer under ``routing``
    (e.g. "keep 0.5" or "threshold 0.5")."""
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(usage) + 2), 3))
    ax.bar(range(len(usage)), usage, color="tab:blue")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("backbone layer")
    ax.set_ylabel("fraction executed")
    ax.set_title(f"layer usage at {routing} (mean {sum(usage) / len(usage):.2f})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
