"""SPIN, self-play fine-tuning (Chen, Deng, Yuan, Ji, Gu 2024, "Self-Play Fine-Tuning Converts Weak Language Models
to Strong Language Models", arXiv:2401.01335; reference implementation github.com/uclaml/SPIN), from SFT data.

The paper's iteration t: the opponent p_{theta_t} (the model at the start of the iteration, frozen: the
iteration's dataset is built before it trains) generates one response for each prompt of ``iteration_prompts``
SFT rows; each pair is the gold response (chosen, "real") against the opponent's generation (rejected,
"generated"); the new model is trained with the SPIN loss against the reference = the opponent, and becomes the
next opponent. The loss is the DPO form of ``fastpref.losses.preference.spin_loss`` (computed fused by
``FusedLinearDPOLoss``; ``loss_type`` sigmoid = the paper's logistic loss, hinge its other choice). Data mixing
as in the paper's experiments and uclaml/SPIN's configs (configs/config_iter1.yaml mixes SPIN_iter0 + SPIN_iter1,
config_iter2.yaml SPIN_iter1 + SPIN_iter2, config_iter3.yaml SPIN_iter2 + SPIN_iter3): from iteration 1 on, the
iteration's pairs are joined by the previous iteration's pairs (``mix_previous``); one generation per prompt, as
spin/generate.py. Pairs whose generation equals the gold response carry no gradient and are dropped (counted in
``spin/identical``). Deviations from uclaml/SPIN (its sampling, epochs and per-iteration schedule): docs/online.md.
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
    mix_previous: bool = True
    """Iteration t >= 1 also trains on iteration t-1's pairs (the paper; uclaml/SPIN configs/config_iter*.yaml);
    false: only its own."""


@register_algorithm("spin")
class SPIN(PairDPOAlgorithm):
    """Gold vs the frozen opponent's generation, iteration by iteration; DPO-form SPIN loss."""

    config_class = SPINConfig
    data_kind = "sft"
    iterative = True

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self._previous: list[Pair] = []

    def build_iteration(self, prompts: list[dict]) -> list[Pair]:
        pairs, same = [], 0
        for chunk in self.chunks(prompts):  # the policy now is the opponent p_theta_t (nothing trained it yet)
            ro = self.rollout(chunk, num_generations=1)
            p, s = spin_pairs([ex["prompt_ids"] for ex in chunk], [ex["completion_ids"] for ex in chunk],
                              ro.completion_ids)
            pairs, same = pairs + p, same + s
        self.step_metrics["spin/identical"] = float(same)
        self.report_signal({"generations equal to the gold response": (same, len(prompts))}, len(pairs))
        mixed = pairs + (self._previous if self.sec.mix_previous else [])
        self.step_metrics["spin/previous_pairs"] = float(len(mixed) - len(pairs))
        self._previous = pairs
        return mixed

    def state_dict(self) -> dict:
        return {**super().state_dict(), "previous": list(self._previous)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._previous = list(state["previous"])
