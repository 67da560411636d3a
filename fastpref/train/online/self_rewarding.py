"""Self-Rewarding language models (Yuan et al. 2024, arXiv:2401.10020): the policy judges its own samples.

Per step: ``generation.num_generations`` (K) samples per prompt; each is scored by the policy itself through an
LLM-as-a-judge prompt (``judge_template`` with ``{prompt}`` and ``{response}``; by default an additive 5-point
rubric in the spirit of the paper's, written for this project), ``judge_samples`` judgements per response averaged
(the paper uses 3), parsed robustly by ``parse_judge_score`` (``Score: x``, ``x/5``, the last number; out of
range or missing -> no score). Highest vs lowest scored sample of each prompt (ties and unscored samples give no
pair), DPO against the reference, which becomes the current policy every ``steps_per_iteration`` steps (the
paper's M_t -> M_{t+1}). Metrics: ``judge/parse_rate``, ``judge/mean_score``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.online.common import (Pair, PairDPOAlgorithm, PairDPOConfig, parse_judge_score, rollout_pairs)
from fastpref.train.rollout import GenerationConfig, encode, generate

DEFAULT_JUDGE_TEMPLATE = (
    "Rate the response to the user's request below on an additive scale of 0 to 5 points:\n"
    "- add 1 point if the response is relevant to the request, even if incomplete;\n"
    "- add 1 point if it addresses a substantial part of the request;\n"
    "- add 1 point if it answers the basic question usefully;\n"
    "- add 1 point if it is clear, direct and well organised;\n"
    "- add 1 point if it is accurate, complete and could not easily be improved.\n\n"
    "Request: {prompt}\nResponse: {response}\n\n"
    "Briefly justify the total, then end with the line \"Score: <points>\".\n")


@dataclass
class SelfRewardingConfig(PairDPOConfig):
    """Self-Rewarding settings."""

    reward: str | None = None
    """Only for the held-out reward metric (e.g. ``arith``); training uses the policy's own judgements."""
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    """Judge prompt with ``{prompt}`` and ``{response}`` placeholders."""
    judge_max_new_tokens: int = 64
    """Longest judgement."""
    judge_temperature: float = 0.7
    """Sampling temperature of the judge."""
    judge_samples: int = 1
    """Judgements per response (averaged over the parseable ones)."""
    max_score: float = 5.0
    """Top of the rubric's scale; parsed scores outside ``[0, max_score]`` are discarded."""

    def validate(self) -> None:
        super().validate()
        if "{prompt}" not in self.judge_template or "{response}" not in self.judge_template:
            raise ValueError("self_rewarding.judge_template must contain {prompt} and {response}")
        self.judge_generation().validate()

    def judge_generation(self) -> GenerationConfig:
        return GenerationConfig(num_generations=self.judge_samples, max_new_tokens=self.judge_max_new_tokens,
                                temperature=self.judge_temperature, backend=self.generation.backend)


@register_algorithm("self_rewarding")
class SelfRewarding(PairDPOAlgorithm):
    """The policy samples, judges its samples, and trains DPO on its highest- vs lowest-judged sample."""

    config_class = SelfRewardingConfig

    def judge(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        """The policy's mean parsed score of each response (None when no judgement parses)."""
        sec, tok = self.sec, self.rt.tokenizer
        texts = [sec.judge_template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        jro = generate(self.rt.model, tok, [encode(tok, t) for t in texts], sec.judge_generation(), prompts=texts)
        self._timings["judge"] = self._timings.get("judge", 0.0) + jro.timings.get("generate", 0.0)
        n = sec.judge_samples
        out = []
        for i in range(len(texts)):
            vals = [parse_judge_score(t, sec.max_score) for t in jro.completions[i * n:(i + 1) * n]]
            vals = [v for v in vals if v is not None]
            out.append(sum(vals) / len(vals) if vals else None)
        return out

    def make_pairs(self, examples: list[dict]) -> list[Pair]:
        ro = self.rollout(examples)
        scores = self.judge(ro.prompts, ro.completions)
        valid = [s for s in scores if s is not None]
        self.step_metrics["judge/parse_rate"] = len(valid) / len(scores)
        if valid:
            self.step_metrics["judge/mean_score"] = sum(valid) / len(valid)
        return rollout_pairs(ro, scores)
