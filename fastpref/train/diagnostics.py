"""Warnings for preference runs that are going wrong, from the metrics the losses already log.

Four conditions, each checked on the logged records of the main phase (the SFT warm-up is skipped; its
reference has not been taken yet). A *baseline* is the mean of the first ``window`` records of the main phase;
*recent* is the mean of the last ``window`` records (so one noisy batch neither triggers nor clears a condition).
Lengths are token counts (``lengths/chosen``, ``lengths/rejected``: scored tokens per response, logged by the
paired algorithms and KTO), so the log-prob thresholds are per token and mean the same for short and long data.

=====================  ================================================================  =========================
name                   holds when (recent vs baseline)                                   default threshold
=====================  ================================================================  =========================
``logps_falling``      ``logps/chosen`` and ``logps/rejected`` per token are both below  ``logp_drop = 0.5`` nats
                       their baselines by more than ``logp_drop``: the policy pushes the  per token
                       rejected response down by taking mass from the chosen one too
                       (likelihood displacement; Pal et al. 2024, "Smaug", DPOP;
                       Razin et al. 2024)
``length_drift``       the mean completion length (``completion/mean_length`` of the     ``length_ratio = 1.5``
                       on-line algorithms) differs from its baseline by more than a
                       factor ``length_ratio`` either way (verbosity exploitation; Park
                       et al. 2024, R-DPO)
``kl_blowup``          the policy's mean log-ratio to the reference on the chosen        ``kl_per_token = 2.0``
                       responses, ``|rewards/chosen| / (beta * lengths/chosen)`` (the     nats per token
                       DPO implicit reward read back as nats per token), exceeds
                       ``kl_per_token`` (reference-based algorithms only; KTO's
                       ``kl`` estimate, per token, when it is logged)
``margin_saturation``  ``rewards/accuracies`` >= ``saturated_accuracy`` and              ``saturated_accuracy =
                       ``rewards/margins`` >= ``saturated_margin``: the sigmoid loss is   0.99``, ``saturated_margin
                       ~0, its gradient vanishes and further steps only inflate the       = 5.0`` (loss < 0.007)
                       margin on deterministic preferences (Azar et al. 2023, IPO)
=====================  ================================================================  =========================

Each condition warns once, with the step, the first time it holds; on every logged step where it holds the
record gets ``diag/<name> = 1``. What to do about each: ``docs/trainer.md``, section "Diagnostics". After a
resume the state is rebuilt from the records already in ``metrics.jsonl`` (truncated to the checkpoint), so a
resumed run flags the same steps as an uninterrupted one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastpref.data.batch import Batch

NAMES = ("logps_falling", "length_drift", "kl_blowup", "margin_saturation")
"""The conditions, in the order they are checked; each logs ``diag/<name>``."""


@dataclass
class Thresholds:
    """Thresholds of the four conditions (see the module docstring)."""

    window: int = 5
    """Logged records in the baseline and in the recent mean."""
    logp_drop: float = 0.5
    """``logps_falling``: drop of both per-token log-probs below their baselines, in nats per token."""
    length_ratio: float = 1.5
    """``length_drift``: factor by which the recent mean completion length may differ from its baseline."""
    kl_per_token: float = 2.0
    """``kl_blowup``: mean absolute log-ratio policy/reference on the chosen responses, nats per token."""
    saturated_accuracy: float = 0.99
    """``margin_saturation``: reward accuracy at or above which preferences count as separated."""
    saturated_margin: float = 5.0
    """``margin_saturation``: reward margin (beta-scaled) at or above which the sigmoid loss is < 0.007."""


def response_lengths(batch: Batch) -> torch.Tensor:
    """Scored tokens of each sequence of a collated batch (``[rows]`` float32, padded or packed layout), on the
    batch's device (``batch.scored_lengths``, counted on the host by the collator: no device work)."""
    return batch.scored_lengths.float()


def paired_length_metrics(batch: Batch) -> dict[str, torch.Tensor]:
    """``lengths/chosen`` and ``lengths/rejected`` (mean scored tokens) of a preference batch."""
    c, r = batch.split_pairs(response_lengths(batch))
    return {"lengths/chosen": c.mean(), "lengths/rejected": r.mean()}


def labelled_length_metrics(batch: Batch) -> dict[str, torch.Tensor]:
    """``lengths/chosen`` (desirable) and ``lengths/rejected`` (undesirable) of a KTO batch with ``labels``."""
    n = response_lengths(batch)
    lab = batch.labels.float()
    return {"lengths/chosen": (n * lab).sum() / lab.sum().clamp(min=1),
            "lengths/rejected": (n * (1 - lab)).sum() / (1 - lab).sum().clamp(min=1)}


_LENGTH_KEYS = ("completion/mean_length", "completions/mean_length")
"""The on-line algorithms' mean completion length (the pair methods' name, then TRL's name that GRPO/PPO log)."""


def _completion_length(rec: dict) -> float | None:
    return next((rec[k] for k in _LENGTH_KEYS if k in rec), None)


class Diagnostics:
    """Feed it each logged record (:meth:`update`); it returns the ``diag/*`` flags of that record and reports
    each condition once through ``warn``.

    ``beta``: the implicit-reward scale (the algorithm section's ``beta``); ``reference_based``: whether the
    rewards are log-ratios to a reference (the DPO family, KTO), so ``kl_blowup`` applies.
    """

    def __init__(self, *, beta: float, reference_based: bool, thresholds: Thresholds | None = None,
                 warn: Callable[[str], None] | None = None):
        self.beta = beta
        self.reference_based = reference_based
        self.t = thresholds or Thresholds()
        self.warn = warn or (lambda msg: None)
        self.baseline_recs: list[dict] = []
        self.recent: deque = deque(maxlen=self.t.window)
        self.warned: set[str] = set()

    @staticmethod
    def _length(rec: dict, side: str) -> float:
        """Tokens per response of ``side``: ``lengths/<side>``, else the on-line mean completion length, else 1."""
        return rec.get(f"lengths/{side}") or _completion_length(rec) or 1.0

    def _features(self, rec: dict) -> dict[str, float]:
        f: dict[str, float] = {}
        for side in ("chosen", "rejected"):
            if f"logps/{side}" in rec:
                f[f"logp_{side}"] = rec[f"logps/{side}"] / self._length(rec, side)
        if _completion_length(rec) is not None:
            f["length"] = _completion_length(rec)
        if self.reference_based:
            if "rewards/chosen" in rec:
                f["kl"] = abs(rec["rewards/chosen"]) / (self.beta * self._length(rec, "chosen"))
            elif "kl" in rec:
                f["kl"] = rec["kl"] / self._length(rec, "chosen")
        for key, name in (("rewards/accuracies", "acc"), ("rewards/margins", "margin")):
            if key in rec:
                f[name] = rec[key]
        return f

    @staticmethod
    def _mean(recs, key: str) -> float | None:
        vals = [r[key] for r in recs if key in r]
        return sum(vals) / len(vals) if vals else None

    def _holds(self) -> dict[str, str]:
        """``{name: why}`` of the conditions holding for the current recent window."""
        t, base, rec = self.t, self.baseline_recs, list(self.recent)
        m = {k: self._mean(rec, k) for k in ("logp_chosen", "logp_rejected", "length", "kl", "acc", "margin")}
        b = {k: self._mean(base, k) for k in ("logp_chosen", "logp_rejected", "length")}
        out: dict[str, str] = {}
        if None not in (m["logp_chosen"], m["logp_rejected"], b["logp_chosen"], b["logp_rejected"]):
            dc, dr = b["logp_chosen"] - m["logp_chosen"], b["logp_rejected"] - m["logp_rejected"]
            if dc > t.logp_drop and dr > t.logp_drop:
                out["logps_falling"] = (f"chosen and rejected log-probs both falling ({dc:.2f} and {dr:.2f} nats/token "
                                        f"below their start, threshold {t.logp_drop})")
        if m["length"] is not None and b["length"]:
            ratio = m["length"] / b["length"]
            if ratio > t.length_ratio or ratio < 1 / t.length_ratio:
                out["length_drift"] = (f"completion length drifted x{ratio:.2f} from its start "
                                       f"({b['length']:.1f} -> {m['length']:.1f} tokens, threshold x{t.length_ratio})")
        if m["kl"] is not None and m["kl"] > t.kl_per_token:
            out["kl_blowup"] = (f"policy moved {m['kl']:.2f} nats/token from the reference on the chosen responses "
                                f"(threshold {t.kl_per_token})")
        if m["acc"] is not None and m["margin"] is not None and m["acc"] >= t.saturated_accuracy \
                and m["margin"] >= t.saturated_margin:
            out["margin_saturation"] = (f"reward margins saturated (accuracy {m['acc']:.3f}, margin {m['margin']:.2f}; "
                                        f"thresholds {t.saturated_accuracy}, {t.saturated_margin})")
        return out

    def update(self, step: int, record: dict) -> dict[str, float]:
        """Take the logged ``record`` of ``step``; return its ``diag/<name>: 1.0`` flags (empty while nothing
        holds, and until the baseline window is full)."""
        f = self._features(record)
        if not f:
            return {}
        self.recent.append(f)
        if len(self.baseline_recs) < self.t.window:
            self.baseline_recs.append(f)
            return {}
        flags = {}
        for name, why in self._holds().items():
            flags[f"diag/{name}"] = 1.0
            if name not in self.warned:
                self.warned.add(name)
                self.warn(f"warning: step {step}: {why} -- see docs/trainer.md#diagnostics")
        return flags


def observe(trainer, record: dict, step: int) -> dict[str, float]:
    """The trainer's hook: the ``diag/*`` flags of a logged ``record`` (main phase of a run whose algorithm logs
    preference metrics: the DPO family, KTO, ORPO / SimPO / CPO, the on-line pair methods), warnings through
    ``trainer.say``. The :class:`Diagnostics` lives on the trainer (``beta``: the algorithm section's (``dpo.beta``,
    ``kto.beta``, ...), else TRL's default 0.1)."""
    if record.get("phase") == "sft_warmup" or not ("rewards/margins" in record or "logps/chosen" in record):
        return {}  # the warm-up, and algorithms without preference metrics (sft, rm, grpo, ppo)
    diag = getattr(trainer, "_diagnostics", None)
    if diag is None:
        algo = getattr(trainer, "algo", None)
        beta = getattr(getattr(algo, "section", None), "beta", None) or 0.1  # the section's beta, else TRL's default
        diag = Diagnostics(beta=beta, reference_based=bool(getattr(algo, "needs_reference", False)))
        _replay(diag, getattr(trainer, "metrics_path", None), step)
        diag.warn = trainer.say
        trainer._diagnostics = diag
    return diag.update(step, record)


def _replay(diag: Diagnostics, metrics_path: str | None, step: int) -> None:
    """Feed ``diag`` the train records before ``step`` already in ``metrics.jsonl`` (a resumed run: the file was
    truncated to the checkpoint), silently, so the resumed run flags exactly the steps the uninterrupted one
    does."""
    import json
    import os

    if not metrics_path or not os.path.exists(metrics_path):
        return
    with open(metrics_path) as fh:
        for line in fh:
            rec = json.loads(line) if line.strip() else {}
            if rec.get("phase") not in (None, "eval", "sft_warmup") and rec.get("step", step) < step and (
                    "rewards/margins" in rec or "logps/chosen" in rec):
                diag.update(rec["step"], rec)
