"""DICE: bootstrapping a DPO model with its own implicit rewards (Chen, Liu, Du, Pang, Liu, Lin, Lee 2024,
"Bootstrapping Language Models with DPO Implicit Rewards", arXiv:2406.09760; reference implementation
github.com/sail-sg/dice).

Starting point (as the paper): a DPO-trained policy pi_0 (``model.name_or_path``) and the SFT model it was trained
against (``dice.reference_path``). Iteration t: the policy pi_t (frozen: the iteration's dataset is built before
it trains) samples ``generation.num_generations`` responses per prompt of ``iteration_prompts`` prompts, scored
by pi_t's DPO implicit reward with a length penalty::

    r(x, y) = beta * (log pi_t(y|x) - log pi_ref(y|x)) - alpha * |y|

where pi_ref is pi_t's own DPO reference (``score_reference=previous``: the SFT model for pi_0, pi_{t-1} after;
``initial``: always the SFT model). alpha is searched every iteration over ``alpha_grid`` so that the mean length
of the chosen responses minus that of the rejected ones is closest to 0 (the paper's length-regularised reward
shaping and its criterion for alpha; the grid is this project's; a fixed ``length_penalty`` skips the search). The best
and the worst response of each prompt make a pair, and the iteration's pairs are mixed with the offline human
preference pairs of ``offline_files`` so that they make a fraction ``gamma`` (the paper: 0.5) of the data
(experience replay of the offline set). pi_{t+1} is trained with DPO against the reference pi_t. A constant
implicit reward (a policy equal to its reference: no DPO model to bootstrap) stops with a one-line error.
``drop_truncated`` leaves the responses that hit ``max_new_tokens`` unscored, as sail-sg/dice drops the responses
whose generation stopped at the length limit (scripts/data_script/generate_dpo_scores.py, ``filt_invalid_pairs``:
``stop_reason != 'length'``; ``dice/truncated`` counts them either way). Deviations from sail-sg/dice: docs/online.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.online.common import (Pair, PairDPOAlgorithm, PairDPOConfig, ReplayBuffer, best_worst_pairs,
                                          load_preference_pairs, metrics_float, score_signal, sequence_logps)
from fastpref.train.rollout import Rollout, pack_rollout, timed

DEFAULT_ALPHA_GRID = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class DICEConfig(PairDPOConfig):
    """DICE settings."""

    reward: str | None = None
    """Only for the held-out reward metric (e.g. ``arith``); DICE scores with its implicit reward."""
    length_penalty: float | None = None
    """A fixed alpha (per completion token); null: searched every iteration over ``alpha_grid``."""
    alpha_grid: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHA_GRID))
    """Candidate alphas of the search (the one whose pairs have the smallest |mean chosen - rejected length|
    wins; ties: the smallest alpha)."""
    offline_files: list[str] = field(default_factory=list)
    """Offline human preference data (any preference format) mixed into every iteration's pairs."""
    gamma: float = 0.5
    """Fraction of each iteration's pairs drawn from the offline data (the paper: 0.5); 0: none."""
    score_reference: str = "previous"
    """Reference of the implicit reward: ``previous`` (the policy's own DPO reference: the SFT model, then the
    last iterate) or ``initial`` (always the SFT model of ``reference_path``)."""
    drop_truncated: bool = False
    """Leave responses without EOS within ``generation.max_new_tokens`` unscored (no pair uses them), as
    sail-sg/dice's filter of responses stopped at the length limit; false: score every response."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"dice.gamma must be in [0, 1), got {self.gamma}")
        if self.score_reference not in ("initial", "previous"):
            raise ValueError(f"dice.score_reference must be initial or previous, got {self.score_reference!r}")
        if not self.alpha_grid or any(a < 0 for a in self.alpha_grid):
            raise ValueError(f"dice.alpha_grid must be a non-empty list of alphas >= 0, got {self.alpha_grid}")


def search_length_alpha(rewards: list[float | None], lengths: list[int], group_size: int,
                        grid) -> tuple[float, list[tuple[int, int]], float]:
    """``(alpha, pairs, gap)``: the alpha of ``grid`` whose best/worst pairs under ``reward - alpha * length``
    have the mean chosen-minus-rejected length ``gap`` closest to 0 (ties: the smallest alpha; a grid point
    that gives no pair is skipped; none gives a pair: ``(grid[0], [], nan)``). ``None`` rewards (unscored
    responses) are in no pair."""
    best = (float(min(grid)), [], float("nan"))
    for a in sorted(grid):
        pairs = best_worst_pairs([None if r is None else r - a * n for r, n in zip(rewards, lengths)], group_size)
        if not pairs:
            continue
        gap = sum(lengths[w] - lengths[l] for w, l in pairs) / len(pairs)
        if not best[1] or abs(gap) < abs(best[2]) - 1e-12:
            best = (a, pairs, gap)
    return best


@register_algorithm("dice")
class DICE(PairDPOAlgorithm):
    """Implicit-reward scoring with a searched length penalty, offline mixing, iterative DPO."""

    config_class = DICEConfig
    iterative = True

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self.score_ref = None  # the implicit reward's reference, made at the first step (start)
        self.offline = ReplayBuffer(10**9, seed=cfg.train.seed)
        if self.sec.offline_files:
            self.offline.add(load_preference_pairs(cfg, rt.tokenizer, self.sec.offline_files))
            if not len(self.offline):
                raise ValueError(f"dice.offline_files={self.sec.offline_files}: no preference pairs")

    def start(self) -> None:
        """super() puts ``reference_path`` (the SFT model) into the reference; that is the implicit reward's
        reference, and the DPO training reference of iteration 0 is pi_0 itself."""
        super().start()
        self.score_ref = copy.deepcopy(self.ref_module()).eval().requires_grad_(False)
        self.rt.reference.refresh(self.rt.model)

    def implicit_rewards(self, ro: Rollout) -> torch.Tensor:
        """``beta * (log pi - log pi_ref)`` per completion of ``ro`` (no grad; no length term)."""
        batch = pack_rollout(ro, self.device)
        with torch.no_grad():
            pi = sequence_logps(self.rt.model, batch)
            ref = sequence_logps(self.score_ref, batch)
        return (self.sec.beta * (pi - ref)).cpu()

    def build_iteration(self, prompts: list[dict]) -> list[Pair]:
        sec = self.sec
        parts, r = [], []
        for chunk in self.chunks(prompts):
            ro = self.rollout(chunk)
            with timed(self._timings, "score"):
                r += self.implicit_rewards(ro).tolist()
            parts.append(ro)
        ro = Rollout.concat(parts)
        if sec.drop_truncated:
            r = [None if cut else x for x, cut in zip(r, ro.truncated)]
        lens = [len(c) for c in ro.completion_ids]
        grid = [sec.length_penalty] if sec.length_penalty is not None else sec.alpha_grid
        alpha, idx, gap = search_length_alpha(r, lens, ro.group_size, grid)
        fresh = [Pair(ro.prompt_ids[w], ro.completion_ids[w], ro.completion_ids[l]) for w, l in idx]
        counts = score_signal(r, ro.group_size)
        if sec.drop_truncated:  # unscored on purpose: a can't-learn signal only when every response was cut
            counts.pop("unscored samples", None)
            counts["truncated responses"] = (sum(ro.truncated), len(r))
        if "constant reward" in counts:  # policy == its reference: the implicit reward says nothing
            fresh = []
            counts["constant reward"] = (len(r), len(r))
        mixed = self.offline.mix(fresh, sec.gamma) if fresh else []
        t = torch.tensor([x for x in r if x is not None] or [float("nan")])
        self.step_metrics.update(metrics_float({
            "implicit_reward/mean": t.mean(), "implicit_reward/std": t.std(), "dice/alpha": alpha,
            "dice/truncated": sum(ro.truncated),
            "dice/length_gap": gap, "pairs/offline": len(mixed) - len(fresh), "pairs/generated": len(fresh),
            "completion/mean_length": ro.lengths().float().mean()}))
        self.report_signal(counts, len(fresh))
        return mixed

    def end_iteration(self) -> None:
        if self.sec.score_reference == "previous":  # pi_{t+1}'s own DPO reference is pi_t
            self.score_ref.load_state_dict(self.ref_module().state_dict())
        super().end_iteration()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update({"offline": self.offline.state_dict(),
                   "score_ref": None if self.score_ref is None else self.score_ref.state_dict()})
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.offline.load_state_dict(state["offline"])
        if state["score_ref"] is not None:
            self.score_ref = copy.deepcopy(self.ref_module()).eval().requires_grad_(False)
            self.score_ref.load_state_dict(state["score_ref"])
