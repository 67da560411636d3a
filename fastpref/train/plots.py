"""PNG curves of a run from its ``metrics.jsonl`` (matplotlib, Agg backend): one file per metric, train and
eval on the same axes, and for preference runs a ``diagnostics.png`` panel (chosen / rejected log-probs, reward
margins, lengths; the steps where a ``diag/*`` condition of :mod:`fastpref.train.diagnostics` held are marked)."""

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
    panel = plot_diagnostics(recs, os.path.join(out_dir, "diagnostics.png"), plt)
    if panel:
        written.append(panel)
    return written


_PANELS = (("log-prob (nats)", ("logps/chosen", "logps/rejected")), ("reward margin", ("rewards/margins",)),
           ("length (tokens)", ("lengths/chosen", "lengths/rejected", "completion/mean_length")))


def plot_diagnostics(recs: list[dict], path: str, plt) -> str | None:
    """The diagnostics panel of a preference run (train records), or None when the run logged none of its
    metrics; a vertical line at each step where a ``diag/*`` flag is set, one colour per condition."""
    train = [r for r in recs if r.get("phase") != "eval"]
    if not any("logps/chosen" in r or "rewards/margins" in r for r in train):
        return None
    from fastpref.train.diagnostics import NAMES

    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(7, 7), sharex=True)
    for ax, (label, keys) in zip(axes, _PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in train if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, lw=1)
        for i, name in enumerate(NAMES):
            steps = [r["step"] for r in train if r.get(f"diag/{name}")]
            for j, st in enumerate(steps):
                ax.axvline(st, color=f"C{i + 3}", alpha=0.25, lw=2, label=f"diag/{name}" if j == 0 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
