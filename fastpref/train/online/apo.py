"""APO, adversarial preference optimisation (Cheng et al. 2023, arXiv:2311.08045): a game between the reward
model and the policy, from SFT data (prompt + gold response).

Each iteration of ``steps_per_iteration`` trainer steps starts with ``rm_steps`` reward-model updates that widen
the score gap between the gold responses and the policy's own samples (Bradley-Terry, gold > sample), kept close
to the initial reward model by a KL term on the pair probabilities::

    L_RM = -log sigma(r(x, y_gold) - r(x, y_pi)) + rm_kl_coef * KL(Bern(p_0) || Bern(p)),
    p = sigma(r(x, y_gold) - r(x, y_pi)),  p_0 the same under the frozen initial reward model

(the paper regularises toward the initial RM on its original preference data; with SFT data only, the KL on the
same pairs is what can be computed). The policy steps then close the gap: ``generation.num_generations`` samples
per prompt, scored by the current reward model, best vs worst pair, DPO against the reference (refreshed to the
current policy at the end of every iteration). The reward model is ``reward_model`` (a sequence-classification
checkpoint, e.g. from ``algorithm=rm``) or, without one, a fresh model of the policy's architecture with a
scalar head (a demo setting: its first scores are arbitrary). It has its own AdamW (``rm_lr``); its weights,
optimizer and the initial copy are in the checkpointed state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpref.losses.preference import reward_model_loss
from fastpref.rewards import reward_model_scores
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.modeling import base_model
from fastpref.train.online.common import Pair, PairDPOAlgorithm, PairDPOConfig, metrics_float, rollout_pairs
from fastpref.train.rollout import timed


@dataclass
class APOConfig(PairDPOConfig):
    """APO settings (data: prompt + gold completion rows)."""

    reward: str | None = None
    """Only for the held-out reward metric (e.g. ``arith``); APO scores with its reward model."""
    reward_model: str | None = None
    """Path of the initial sequence-classification reward model (None: a fresh one of the policy's shape)."""
    rm_steps: int = 2
    """Reward-model updates at the start of every iteration."""
    rm_lr: float = 1e-4
    """Learning rate of the reward model's AdamW."""
    rm_kl_coef: float = 0.1
    """Weight of the KL term toward the initial reward model."""

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.rm_steps, int) and self.rm_steps >= 0):
            raise ValueError(f"apo.rm_steps must be an int >= 0, got {self.rm_steps!r}")
        if not self.rm_lr > 0 or self.rm_kl_coef < 0:
            raise ValueError(f"apo.rm_lr must be > 0 and apo.rm_kl_coef >= 0, got {self.rm_lr}, {self.rm_kl_coef}")


def bernoulli_kl(logit_p0: torch.Tensor, logit_p: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(sigma(a)) || Bern(sigma(b)))`` elementwise, from logits, stable."""
    p0 = torch.sigmoid(logit_p0)
    return (p0 * (F.logsigmoid(logit_p0) - F.logsigmoid(logit_p))
            + (1 - p0) * (F.logsigmoid(-logit_p0) - F.logsigmoid(-logit_p)))


@register_algorithm("apo")
class APO(PairDPOAlgorithm):
    """Alternating reward-model epochs (gold vs sample) and policy DPO epochs against the current RM."""

    config_class = APOConfig
    data_kind = "sft"

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        from transformers import AutoModelForSequenceClassification

        if self.sec.reward_model:
            rm = AutoModelForSequenceClassification.from_pretrained(self.sec.reward_model)
        else:
            conf = copy.deepcopy(base_model(rt.model).config)
            conf.num_labels = 1
            torch.manual_seed(cfg.train.seed + 1)
            rm = AutoModelForSequenceClassification.from_config(conf)
        if rm.config.pad_token_id is None:
            rm.config.pad_token_id = self.pad_id
        self.rm = rm.to(rt.device)
        self.rm_initial = copy.deepcopy(self.rm).eval().requires_grad_(False)
        self.rm_opt = torch.optim.AdamW(self.rm.parameters(), lr=self.sec.rm_lr)

    def _scores(self, model, prompt_ids, completion_ids) -> torch.Tensor:
        return reward_model_scores(model, [p + c for p, c in zip(prompt_ids, completion_ids)], self.pad_id)

    def train_reward_model(self, examples: list[dict]) -> dict:
        """``rm_steps`` updates on (gold, own sample) pairs of ``examples``; returns the last step's metrics."""
        sec = self.sec
        ro = self.rollout(examples, num_generations=1)
        prompts = [ex["prompt_ids"] for ex in examples]
        gold = [ex["completion_ids"] for ex in examples]
        with torch.no_grad():
            logit0 = self._scores(self.rm_initial, prompts, gold) - self._scores(self.rm_initial, prompts,
                                                                                 ro.completion_ids)
        self.rm.train()
        m = {}
        for _ in range(sec.rm_steps):
            r_gold = self._scores(self.rm, prompts, gold)
            r_own = self._scores(self.rm, prompts, ro.completion_ids)
            bt, m = reward_model_loss(r_gold, r_own)
            kl = bernoulli_kl(logit0, r_gold - r_own).mean()
            loss = bt + sec.rm_kl_coef * kl
            self.rm_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.rm_opt.step()
            m = {**{f"rm/{k}": v for k, v in m.items()}, "rm/loss": loss.detach(), "rm/kl_to_initial": kl.detach()}
        self.rm.eval()
        return m

    def make_pairs(self, examples: list[dict]) -> list[Pair]:
        if self._step_in_iteration == 0 and self.sec.rm_steps:
            with timed(self._timings, "reward_model_train"):
                self.step_metrics.update(metrics_float(self.train_reward_model(examples)))
        ro = self.rollout(examples)
        with timed(self._timings, "score"), torch.no_grad():
            scores = self._scores(self.rm, ro.prompt_ids, ro.completion_ids).cpu()
        self.step_metrics.update(metrics_float({"rm_score/mean": scores.mean(), "rm_score/std": scores.std()}))
        return rollout_pairs(ro, scores.tolist())

    @property
    def _step_in_iteration(self) -> int:
        return self._steps_done % self.sec.steps_per_iteration

    def micro_batches(self, examples: list[dict], step: int) -> list[dict]:
        self._steps_done = step - 1  # the trainer counts steps from 1
        return super().micro_batches(examples, step)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update({"rm": self.rm.state_dict(), "rm_opt": self.rm_opt.state_dict(),
                   "rm_initial": self.rm_initial.state_dict()})
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rm.load_state_dict(state["rm"])
        self.rm_opt.load_state_dict(state["rm_opt"])
        self.rm_initial.load_state_dict(state["rm_initial"])
