"""Online / iterative DPO (Xu et al. 2023 "Some things are more CRINGE than others"; Xiong et al. 2024
"Iterative preference learning from human feedback"; Guo et al. 2024 "Direct language model alignment from online
AI feedback").

Per step: ``generation.num_generations`` (K) samples per prompt, scored by the reward function or a reward model
(``reward_model``), best vs worst of each prompt's samples (groups with all-equal scores give no pair), DPO with
any loss type of ``dpo_loss`` against the reference; every ``steps_per_iteration`` steps the reference becomes
the current policy (the iteration's last iterate). ``length_alpha`` adds R-DPO's length regularisation.
Differences from TRL's ``OnlineDPOTrainer``: TRL pairs two samples per prompt and keeps the initial reference;
here K >= 2 samples give a best/worst pair and the reference is refreshed per iteration (iterative DPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.rewards import RewardModelScorer
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.online.common import (Pair, PairDPOAlgorithm, PairDPOConfig, metrics_float, rollout_pairs,
                                          score_signal)
from fastpref.train.rollout import Rollout


@dataclass
class OnlineDPOConfig(PairDPOConfig):
    """Online / iterative DPO settings (K = ``generation.num_generations``)."""

    reward_model: str | None = None
    """Path of a sequence-classification reward model (uses the policy's tokenizer); overrides ``reward``."""


@register_algorithm("online_dpo")
class OnlineDPO(PairDPOAlgorithm):
    """Sample K, score, best-vs-worst pairs, DPO; reference refreshed every iteration."""

    config_class = OnlineDPOConfig

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        if self.sec.reward_model:
            from transformers import AutoModelForSequenceClassification

            rm = AutoModelForSequenceClassification.from_pretrained(self.sec.reward_model).to(rt.device).eval()
            self.reward_fn = RewardModelScorer(rm, rt.tokenizer)
        if self.sec.generation.num_generations < 2:
            raise ValueError("online_dpo needs generation.num_generations >= 2 (a best and a worst sample)")

    def scored_rollout(self, examples: list[dict]) -> tuple[Rollout, list[float]]:
        """K samples per prompt of ``examples`` (in generation-sized chunks) and their rewards."""
        parts, scores = [], []
        for chunk in self.chunks(examples):
            ro = self.rollout(chunk)
            parts.append(ro)
            scores += self.score(ro, chunk).tolist()
        return Rollout.concat(parts), scores

    def pairs_of(self, ro: Rollout, scores: list[float]) -> list[Pair]:
        """Best-vs-worst pairs, with the reward metrics and the can't-learn counts of these samples."""
        t = torch.tensor(scores)
        self.step_metrics.update(metrics_float({"reward/mean": t.mean(), "reward/std": t.std(),
                                                "completion/mean_length": ro.lengths().float().mean()}))
        self.report_signal(score_signal(scores, ro.group_size))
        return rollout_pairs(ro, scores)

    def make_pairs(self, examples: list[dict]) -> list[Pair]:
        return self.pairs_of(*self.scored_rollout(examples))
