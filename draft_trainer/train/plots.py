"""PNG plots of a run directory (loss, per-position accuracy). Needs matplotlib (the `plots` extra)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _series(records: list[dict], key: str) -> list[list[float]]:
    """Per-TTT-position series of a list-valued metric: [position][step]."""
    k = max((len(r.get(key) or []) for r in records), default=0)
    return [[(r.get(key) or [float("nan")] * k)[i] for r in records] for i in range(k)]


def plot_run(run_dir: Path) -> list[Path]:
    """Write loss.png and accuracy.png from metrics.jsonl; returns the files (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping plots (pip install 'specrelay[plots]')")
        return []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train:
        return []
    out = []
    steps = [r["step"] for r in train]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in train], label="train loss (weighted TTT sum)", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.append(run_dir / "loss.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "acc", "accuracy per TTT position"),
                           (axes[1], "cond_acc", "conditional accuracy (earlier positions right)")):
        for i, ys in enumerate(_series(train, key)):
            ax.plot(steps, ys, lw=1, label=f"position {i}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out.append(run_dir / "accuracy.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out
