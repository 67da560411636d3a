"""What a training run reports and where: the metrics of a step and of an evaluation, ``metrics.jsonl``, the
experiment trackers (:class:`fastpref.train.reporting.Reporter`, ``train.report_to``), the progress bar, the printed
lines and the tokens/s window.

A step's metrics are the weighted mean over its micro-batches (weights: sequences per micro-batch,
:func:`mean_metrics`), then the mean over ranks (:func:`ranks_mean`: one all-reduce, so every rank calls it at the
same steps); a train record is ``step``, ``phase``, those means, ``lr``, ``grad_norm`` (with clipping),
``amp/loss_scale`` (fp16), the algorithm's ``step_metrics`` and ``tokens_per_s`` (tokens of the steps since the
last logged one over their wall time). Every rank builds a :class:`RunLog` and calls it alike; only rank 0 prints,
writes ``metrics.jsonl`` (one JSON record per line, always) and feeds the trackers and the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from fastpref.train.distributed import all_reduce_mean


def count_tokens(examples: list[dict]) -> int:
    """Tokens of a step's examples (every response with its prompt): the tokens/s count of an algorithm that does
    not report its own (``Runtime.step_tokens``)."""
    n = 0
    for e in examples:
        resp = [len(v) for k, v in e.items() if k.endswith("_ids") and k != "prompt_ids"]
        n += sum(resp) + len(e.get("prompt_ids", ())) * max(1, len(resp))
    return n


def mean_metrics(items: list[tuple[int, dict]]) -> dict[str, float]:
    """Weighted means (weights = examples per micro-batch) of metric dicts of tensors or floats; NaN values are
    left out of their key's mean."""
    tot: dict[str, float] = {}
    wsum: dict[str, float] = {}
    for w, m in items:
        for k, v in m.items():
            v = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
            if math.isnan(v):
                continue
            tot[k] = tot.get(k, 0.0) + w * v
            wsum[k] = wsum.get(k, 0.0) + w
    return {k: tot[k] / wsum[k] for k in tot}


def ranks_mean(metrics: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """``metrics`` averaged over ranks (every rank logs the same keys: same algorithm, same batch shape); a
    collective when ``world > 1``."""
    if world == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_mean([t])
    return dict(zip(keys, t.tolist()))


class TokenRate:
    """Tokens per second over a window: :meth:`add` each step's tokens, :meth:`rate` ends the window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens, self.t0 = 0, time.time()

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        """Tokens per second since the window started; starts the next window."""
        r = self.tokens / max(time.time() - self.t0, 1e-9)
        self.reset()
        return r


class RunLog:
    """A run's reporting (see the module docstring). ``say`` works from construction (before ``open``: plain
    prints); ``open`` starts the trackers and the progress bar, ``close`` ends them."""

    def __init__(self, out_dir: str, *, quiet: bool = False):
        self.out, self.quiet = out_dir, quiet
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        self.bar = None  # tqdm, rank 0 and not quiet
        self.trackers = None  # the Reporter of train.report_to, rank 0
        self.tokens = TokenRate()

    def say(self, msg: str) -> None:
        """Print ``msg`` on rank 0 (through the progress bar while it runs)."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def open(self, cfg, *, start: int, total: int, own) -> None:
        """Rank 0: the trackers (TensorBoard drops events after ``start``) and, unless quiet, the progress bar."""
        if self.rank != 0:
            return
        from fastpref.train.config import config_to_dict
        from fastpref.train.reporting import Reporter, check_report_to

        self.trackers = Reporter(check_report_to(cfg.train.report_to), self.out, config=config_to_dict(cfg),
                                 run_name=os.path.basename(os.path.abspath(self.out)), start_step=start, own=own)
        if not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=cfg.algorithm, dynamic_ncols=True)

    def write(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl`` and log it to the trackers (rank 0)."""
        if self.rank != 0:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def train_record(self, step: int, phase: str, items: list[tuple[int, dict]], *, lr: float,
                     grad_norm: float | None, loss_scale: float | None, step_metrics: dict) -> dict:
        """The train record of ``step`` (every rank: the rank mean is a collective); ends the tokens/s window."""
        rec = {"step": step, "phase": phase, **ranks_mean(mean_metrics(items), self.world, self.device), "lr": lr}
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        if loss_scale is not None:
            rec["amp/loss_scale"] = loss_scale
        rec.update({k: float(v) for k, v in step_metrics.items()})
        rec["tokens_per_s"] = self.tokens.rate()
        return rec

    def show(self, rec: dict) -> None:
        """A logged train record on the progress bar (loss, tok/s, accuracy / margins), or as a printed line."""
        if self.bar is not None:
            post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            for k in ("rewards/accuracies", "rewards/margins", "accuracy"):
                if k in rec:
                    post[k.split("/")[-1][:6]] = f"{rec[k]:.3f}"
            self.bar.set_postfix(post, refresh=False)
        else:
            self.say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    def eval_record(self, step: int, ev: dict[str, float], *, echo: bool = True) -> None:
        """Write the evaluation ``ev`` of ``step`` (nothing when empty) and, with ``echo``, print it."""
        if not ev:
            return
        self.write({"step": step, "phase": "eval", **ev})
        if echo:
            self.say(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))

    def advance(self) -> None:
        """One step done (the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def summary(self, last_eval: dict, rows: int, step: int, secs: float) -> None:
        """The run's last line: the held-out preference accuracy when there is one (rank 0)."""
        if self.rank != 0:
            return
        acc = last_eval.get("eval/rewards/accuracies", last_eval.get("eval/accuracy"))
        if acc is not None:
            print(f"held-out preference accuracy: {acc:.3f}  ({rows} pairs, step {step}, {secs:.1f}s) -> {self.out}",
                  flush=True)
        else:
            print(f"done: step {step}, {secs:.1f}s -> {self.out}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
