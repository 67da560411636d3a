"""PNG curves of a run from its ``metrics.jsonl`` (matplotlib, Agg backend): one file per metric, train and
eval on the same axes."""

from __future__ import annotations

import json
import os

_PLOTS = {"loss": "loss", "rewards/margins": "reward_margins", "rewards/accuracies": "reward_accuracy",
          "accuracy": "accuracy", "kl": "kl"}


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """Write ``out_dir/<name>.png`` for each of loss, reward margins and accuracy present; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as fh:
        recs = [json.loads(ln) for ln in fh if ln.strip()]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, name in _PLOTS.items():
        train = [(r["step"], r[key]) for r in recs if key in r]
        ev = [(r["step"], r[f"eval/{key}"]) for r in recs if f"eval/{key}" in r]
        if not train and not ev:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
