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

from fastpref.rewards import RewardModelScorer
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.online.common import Pair, PairDPOAlgorithm, PairDPOConfig, metrics_float, rollout_pairs


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

    def make_pairs(self, examples: list[dict]) -> list[Pair]:
        ro = self.rollout(examples)
        scores = self.score(ro, examples)
        self.step_metrics.update(metrics_float({"reward/mean": scores.mean(), "reward/std": scores.std(),
                                                "completion/mean_length": ro.lengths().float().mean()}))
        return rollout_pairs(ro, scores.tolist())
