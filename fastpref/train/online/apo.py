"""APO, adversarial preference optimisation (Cheng, Yang, Li, Dai, Du 2023, "Adversarial Preference Optimization:
Enhancing Your Alignment via RM-LLM Game", arXiv:2311.08045; reference implementation github.com/Linear95/APO):
a game between a reward model and the policy, on SFT data (prompt + gold "annotated" response) plus human
preference data.

Iteration t: the policy M_t (frozen: the iteration's dataset is built before it trains) samples
``generation.num_generations`` responses (default 4) for each of ``iteration_prompts`` SFT prompts. The reward
model then takes ``rm_steps`` AdamW steps (``rm_lr``, scaled by the run's learning-rate schedule) on the paper's
APO RM objective::

    L_RM = E[-log sigma(r(x, y_gold) - r(x, y_sample))]  +  rm_pref_coef * E_{D_P}[-log sigma(r(x, y_w) - r(x, y_l))]

the adversarial gold-vs-sample term plus the Bradley-Terry loss on the human preference data D_P
(``preference_files``; the paper's regulariser that keeps the RM a preference model). The samples are scored
by the updated RM, the best and the worst of each prompt make a pair, and M_{t+1} is trained with DPO against
the reference M_t (the paper's policy step is rejection sampling / any preference method on RM-ranked samples).
The RM is ``reward_model`` (a sequence-classification checkpoint, e.g. ``final/`` of ``algorithm=rm``) or,
without one, a model of the policy's architecture with a scalar head trained first on D_P for
``rm_init_steps`` Bradley-Terry steps (the tiny-model setting; the paper starts from a trained RM). Its AdamW
comes from ``Runtime.build_optimizer`` (the ``optim`` betas, eps, weight decay and ``max_grad_norm``, gradients
averaged over ranks so every rank keeps the same RM), and the trainer checkpoints its weights and optimizer with
the run. Deviations: docs/online.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from fastpref.losses.preference import reward_model_loss
from fastpref.rewards import reward_model_scores
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.modeling import base_model
from fastpref.train.online.common import (Pair, PairDPOAlgorithm, PairDPOConfig, load_preference_pairs, metrics_float,
                                          rollout_pairs, score_signal)
from fastpref.train.rollout import GenerationConfig, Rollout, timed


@dataclass
class APOConfig(PairDPOConfig):
    """APO settings (data: prompt + gold completion rows)."""

    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(num_generations=4))
    """Sampling; ``num_generations`` samples per prompt (default 4)."""
    reward: str | None = None
    """Only for the held-out reward metric (e.g. ``arith``); APO scores with its reward model."""
    reward_model: str | None = None
    """Path of the initial sequence-classification reward model (None: trained first on ``preference_files``)."""
    preference_files: list[str] = field(default_factory=list)
    """Human preference data D_P (any preference format): the Bradley-Terry regulariser of every RM step."""
    rm_steps: int = 4
    """Reward-model updates at the start of every iteration."""
    rm_lr: float = 1e-4
    """Base learning rate of the reward model's AdamW (it follows the run's schedule, as the policy's)."""
    rm_pref_coef: float = 1.0
    """Weight of the Bradley-Terry loss on D_P in the RM objective."""
    rm_batch_size: int = 32
    """Sequences per RM step of each term (a seeded draw)."""
    rm_init_steps: int = 50
    """Without ``reward_model``: Bradley-Terry steps on D_P before training starts."""

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.rm_steps, int) and self.rm_steps >= 0):
            raise ValueError(f"apo.rm_steps must be an int >= 0, got {self.rm_steps!r}")
        if not self.rm_lr > 0 or self.rm_pref_coef < 0:
            raise ValueError(f"apo.rm_lr must be > 0 and apo.rm_pref_coef >= 0, got {self.rm_lr}, "
                             f"{self.rm_pref_coef}")
        if not self.reward_model and not self.preference_files:
            raise ValueError("apo: needs apo.reward_model (an RM checkpoint) or apo.preference_files (human "
                             "preference data to train the RM on first)")


@register_algorithm("apo")
class APO(PairDPOAlgorithm):
    """RM steps (gold > sample, BT on D_P), then DPO policy steps on RM-ranked pairs, every iteration."""

    config_class = APOConfig
    data_kind = "sft"
    iterative = True

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        from transformers import AutoModelForSequenceClassification

        sec = self.sec
        self.pref = load_preference_pairs(cfg, rt.tokenizer, sec.preference_files) if sec.preference_files else []
        if sec.preference_files and not self.pref:
            raise ValueError(f"apo.preference_files={sec.preference_files}: no preference pairs")
        if sec.reward_model:
            rm = AutoModelForSequenceClassification.from_pretrained(sec.reward_model)
        else:
            conf = copy.deepcopy(base_model(rt.model).config)
            conf.num_labels = 1
            torch.manual_seed(cfg.train.seed + 1)
            rm = AutoModelForSequenceClassification.from_config(conf)
        if rm.config.pad_token_id is None:
            rm.config.pad_token_id = self.pad_id
        self.rm = rm.to(rt.device)
        self.rm_opt = rt.build_optimizer(self.rm, sec.rm_lr, name="rm")
        self.rm_rng = torch.Generator().manual_seed(cfg.train.seed)
        if not sec.reward_model:
            for _ in range(sec.rm_init_steps):
                self._rm_step(None)
            self.rm_init_accuracy = self.preference_accuracy()

    def _scores(self, model, prompt_ids, completion_ids) -> torch.Tensor:
        return reward_model_scores(model, [p + c for p, c in zip(prompt_ids, completion_ids)], self.pad_id)

    def _draw(self, n: int) -> list[int]:
        k = min(n, self.sec.rm_batch_size)
        return torch.randperm(n, generator=self.rm_rng)[:k].tolist()

    def preference_accuracy(self) -> float:
        """Share of D_P pairs the RM ranks right (no grad)."""
        with torch.no_grad():
            rw = self._scores(self.rm, [p.prompt_ids for p in self.pref], [p.chosen_ids for p in self.pref])
            rl = self._scores(self.rm, [p.prompt_ids for p in self.pref], [p.rejected_ids for p in self.pref])
        return float((rw > rl).float().mean())

    def _rm_step(self, adv: list[Pair] | None) -> dict:
        """One optimizer step of the RM on ``adv`` (gold vs sample; None: only the BT term) + the BT loss on D_P
        (every rank takes it: its gradients are averaged over ranks)."""
        self.rm.train()
        loss, m = torch.zeros(()), {}
        if adv:
            b = [adv[i] for i in self._draw(len(adv))]
            r_g = self._scores(self.rm, [p.prompt_ids for p in b], [p.chosen_ids for p in b])
            r_s = self._scores(self.rm, [p.prompt_ids for p in b], [p.rejected_ids for p in b])
            apo, _ = reward_model_loss(r_g, r_s)
            loss = loss + apo
            m["rm/apo_loss"] = apo.detach()
        if self.pref and (adv is None or self.sec.rm_pref_coef):
            b = [self.pref[i] for i in self._draw(len(self.pref))]
            r_w = self._scores(self.rm, [p.prompt_ids for p in b], [p.chosen_ids for p in b])
            r_l = self._scores(self.rm, [p.prompt_ids for p in b], [p.rejected_ids for p in b])
            bt, _ = reward_model_loss(r_w, r_l)
            loss = loss + (1.0 if adv is None else self.sec.rm_pref_coef) * bt
            m["rm/bt_loss"] = bt.detach()
        self.rm_opt.zero_grad(set_to_none=True)
        loss.backward()
        m.update(self.rm_opt.update())
        self.rm.eval()
        return {**m, "rm/loss": loss.detach()}

    def train_reward_model(self, ro: Rollout, gold: list[list[int]]) -> dict:
        """``rm_steps`` RM steps on (gold, sample) pairs of ``ro`` and the BT term; the last step's metrics."""
        G = ro.group_size
        adv = [Pair(ro.prompt_ids[i], gold[i // G], ro.completion_ids[i]) for i in range(len(ro))]
        m = {}
        for _ in range(self.sec.rm_steps):
            m = self._rm_step(adv)
        if self.pref:
            m["rm/preference_accuracy"] = self.preference_accuracy()
        return m

    def build_iteration(self, prompts: list[dict]) -> list[Pair]:
        ro = Rollout.concat([self.rollout(chunk) for chunk in self.chunks(prompts)])
        with timed(self._timings, "reward_model_train"):
            self.step_metrics.update(metrics_float(self.train_reward_model(ro, [e["completion_ids"] for e in prompts])))
        with timed(self._timings, "score"), torch.no_grad():
            scores = self._scores(self.rm, ro.prompt_ids, ro.completion_ids).cpu()
        self.step_metrics.update(metrics_float({"rm_score/mean": scores.mean(), "rm_score/std": scores.std()}))
        self.report_signal(score_signal(scores.tolist(), ro.group_size))
        return rollout_pairs(ro, scores.tolist())

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rm_rng"] = self.rm_rng.get_state()  # the RM's weights and optimizer: the trainer's extra state
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rm_rng.set_state(state["rm_rng"])
