"""iLR-DPO, iterative length-regularised DPO (Liu, Zhou, Liu, Bu, Yang, Zhong, Ouyang 2024, "Iterative
Length-Regularized Direct Preference Optimization: A Case Study on Improving 7B Language Models to GPT-4 Level",
arXiv:2406.11817; code: github.com/zhziszz/iLR-DPO, not read for this module).

The paper's loop, per iteration t: the current model M_t (frozen: the iteration's whole dataset is built before
it trains) samples ``generation.num_generations`` responses per prompt of ``iteration_prompts`` training prompts,
a reward model (``reward_model``, or the reward function ``reward``) scores them, the best and the worst of each
prompt make a pair (ties give none), and M_{t+1} is trained from M_t with the length-regularised DPO loss against
the reference M_t::

    L = -log sigma(beta * (log pi(y_w)/pi_t(y_w) - log pi(y_l)/pi_t(y_l)) + alpha * (|y_w| - |y_l|))

the paper's "margin-based cross-entropy" with a preference margin and a length margin (the multi-objective DPO
form of reward - alpha * length; the same pair logit as R-DPO's, ``dpo_loss(rdpo_alpha=alpha)``): a longer chosen
response needs less preference margin, so length alone is not rewarded. ``length_alpha`` is alpha (default 0.01,
this project's choice for the tiny task; the paper tunes it per setting). Deviations: see docs/online.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.online.common import Pair
from fastpref.train.online.online_dpo import OnlineDPO, OnlineDPOConfig


@dataclass
class ILRDPOConfig(OnlineDPOConfig):
    """iLR-DPO settings (K = ``generation.num_generations``)."""

    length_alpha: float = 0.01
    """alpha of the length margin (``dpo_loss(rdpo_alpha=...)``, added to the pair logit)."""


@register_algorithm("ilr_dpo")
class ILRDPO(OnlineDPO):
    """Iterative DPO with a frozen M_t per iteration and the length-regularised loss."""

    config_class = ILRDPOConfig
    iterative = True

    def build_iteration(self, prompts: list[dict]) -> list[Pair]:
        return self.pairs_of(*self.scored_rollout(prompts))
