"""SPIN, self-play fine-tuning (Chen et al. 2024, arXiv:2401.01335), from SFT data only.

Each pair is the gold response (chosen) against the *opponent's* generation (rejected) for the same prompt; the
opponent is the previous iterate, i.e. the frozen reference, which is also the DPO reference. The loss is the DPO
form of ``fastpref.losses.preference.spin_loss`` (computed fused, by ``FusedLinearDPOLoss``; ``loss_type`` sigmoid
= the paper's logistic loss, hinge its other choice). Every ``steps_per_iteration`` steps the reference/opponent
becomes the current policy. Pairs whose generation equals the gold response carry no gradient and are dropped
(counted in ``spin/identical``). The paper generates the whole SFT set once per iteration; here the opponent
generates for each step's prompts, which is the same distribution (the opponent is frozen within an iteration).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.online.common import Pair, PairDPOAlgorithm, PairDPOConfig


def spin_pairs(prompt_ids: list[list[int]], gold_ids: list[list[int]],
               generated_ids: list[list[int]]) -> tuple[list[Pair], int]:
    """``(pairs, identical)``: (gold = chosen, generation = rejected) per prompt, without the pairs where the
    generation equals the gold response."""
    if not len(prompt_ids) == len(gold_ids) == len(generated_ids):
        raise ValueError(f"spin_pairs: need one gold and one generated response per prompt, got "
                         f"{len(prompt_ids)}, {len(gold_ids)}, {len(generated_ids)}")
    pairs = [Pair(p, g, o) for p, g, o in zip(prompt_ids, gold_ids, generated_ids) if list(g) != list(o)]
    return pairs, len(prompt_ids) - len(pairs)


@dataclass
class SPINConfig(PairDPOConfig):
    """SPIN settings (data: prompt + gold completion rows)."""

    reward: str | None = None
    """Only for the held-out reward metric (e.g. ``arith``); SPIN itself needs no reward."""


@register_algorithm("spin")
class SPIN(PairDPOAlgorithm):
    """Gold vs the previous iterate's generation; DPO-form SPIN loss."""

    config_class = SPINConfig
    data_kind = "sft"

    def make_pairs(self, examples: list[dict]) -> list[Pair]:
        ro = self.rollout(examples, model=self.ref_module(), num_generations=1)
        pairs, same = spin_pairs([ex["prompt_ids"] for ex in examples], [ex["completion_ids"] for ex in examples],
                                 ro.completion_ids)
        self.step_metrics["spin/identical"] = float(same)
        return pairs
