"""DICE: bootstrapping a DPO model with its own implicit rewards (Chen et al. 2024, arXiv:2406.09760).

Per step: ``generation.num_generations`` (K) samples per prompt from the current policy, scored by the DPO
implicit reward of the current model, length-regularised::

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) - length_penalty * |y|

(sequence log-probs from the fused LM-head op in ``no_grad``; ``pi_ref`` is the *initial* model with
``score_reference=initial`` -- the reference of the DPO model being bootstrapped, as in the paper -- or the
current training reference with ``previous``). Best vs worst pairs are mixed with pairs replayed from earlier
iterations (``replay_ratio``: the fraction of each step's pairs drawn from the buffer, the paper's experience
replay) and trained with DPO against the training reference, which becomes the current policy every
``steps_per_iteration`` steps; the iteration's fresh pairs then enter the replay buffer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.online.common import (Pair, PairDPOAlgorithm, PairDPOConfig, ReplayBuffer, metrics_float,
                                          rollout_pairs, sequence_logps)
from fastpref.train.rollout import pack_rollout, timed


@dataclass
class DICEConfig(PairDPOConfig):
    """DICE settings."""

    reward: str | None = None
    """Only for the held-out reward metric (e.g. ``arith``); DICE scores with its implicit reward."""
    length_penalty: float = 0.0
    """alpha of the length-regularised implicit reward (per completion token)."""
    replay_ratio: float = 0.5
    """Fraction of each step's pairs replayed from earlier iterations (0: no replay)."""
    replay_capacity: int = 10_000
    """Pairs kept in the replay buffer (FIFO)."""
    score_reference: str = "initial"
    """``initial`` (the model at the start, frozen) or ``previous`` (the training reference, last iterate)."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError(f"dice.replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.score_reference not in ("initial", "previous"):
            raise ValueError(f"dice.score_reference must be initial or previous, got {self.score_reference!r}")


@register_algorithm("dice")
class DICE(PairDPOAlgorithm):
    """Implicit-reward scoring, best/worst pairs, replay mixing, iterative DPO."""

    config_class = DICEConfig

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self.buffer = ReplayBuffer(self.sec.replay_capacity, seed=cfg.train.seed)
        self._fresh: list[Pair] = []  # this iteration's pairs, replayable from the next iteration on
        self._initial = None

    def _score_model(self):
        if self.sec.score_reference == "previous":
            return self.ref_module()
        if self._initial is None:  # taken at the first step, before any refresh
            self._initial = copy.deepcopy(self.ref_module())
        return self._initial

    def implicit_rewards(self, ro) -> torch.Tensor:
        """``beta * (log pi - log pi_ref) - length_penalty * |y|`` per completion of ``ro`` (no grad)."""
        batch = pack_rollout(ro, self.device)
        with torch.no_grad():
            pi = sequence_logps(self.rt.model, batch, pad_id=self.pad_id)
            ref = sequence_logps(self._score_model(), batch, pad_id=self.pad_id)
        lens = batch.completion_lengths.to(pi.dtype)
        return (self.sec.beta * (pi - ref) - self.sec.length_penalty * lens).cpu()

    def make_pairs(self, examples: list[dict]) -> list[Pair]:
        ro = self.rollout(examples)
        with timed(self._timings, "score"):
            r = self.implicit_rewards(ro)
        fresh = rollout_pairs(ro, r.tolist())
        self._fresh += fresh
        mixed = self.buffer.mix(fresh, self.sec.replay_ratio)
        self.step_metrics.update(metrics_float({
            "implicit_reward/mean": r.mean(), "implicit_reward/std": r.std(),
            "pairs/replayed": len(mixed) - len(fresh), "replay/size": len(self.buffer),
            "completion/mean_length": ro.lengths().float().mean()}))
        return mixed

    def end_iteration(self) -> None:
        super().end_iteration()
        self.buffer.add(self._fresh)
        self._fresh = []

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update({"replay": self.buffer.state_dict(), "fresh": list(self._fresh),
                   "initial": None if self._initial is None else self._initial.state_dict()})
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["replay"])
        self._fresh = list(state["fresh"])
        if state["initial"] is not None:
            self._initial = copy.deepcopy(self.ref_module())
            self._initial.load_state_dict(state["initial"])
