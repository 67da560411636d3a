"""GRPO and its variants (DAPO, Dr. GRPO, BNPO, GSPO, GSPO-token): group-relative policy optimisation.

Per step (Shao et al. 2024, arXiv:2402.03300; TRL's ``GRPOTrainer``):

1. rollout: ``train.batch_size`` prompts x ``G = generation.num_generations`` completions (KV-cache generate);
2. score: ``reward_fn`` (``fastpref.rewards``); optional DAPO overlong shaping
   (``overlong_cache_length``: ``fastpref.losses.advantages.overlong_penalty`` times ``overlong_coef``);
   optional DAPO *dynamic sampling* (Yu et al. 2025, arXiv:2503.14476): groups whose rewards all agree carry no
   gradient, so they are dropped and more prompts are drawn and generated (at most ``max_refill_rounds``
   extra rollouts) until the batch holds ``train.batch_size`` informative groups (or whatever was found);
3. advantages: ``group_advantages`` (``scale_rewards`` group / batch / none);
4. train: ``num_iterations`` (mu) updates on the rollout with the fused ``FusedLinearPolicyLoss`` of
   ``loss_type`` (hidden states + LM head, eager chunked engine: the logits never exist). With mu > 1
   the sampling policy's log-probs are computed once, in ``no_grad``, by the fused LM-head op; with mu = 1 the
   on-policy shortcut (ratio ``exp(logp - sg[logp])``) needs no extra forward, as TRL. ``beta > 0`` adds the
   per-token KL to a frozen reference (its log-probs also from the fused op in ``no_grad``).

The clip range defaults follow the loss type (DAPO's clip-higher: ``eps_high = 0.28``; GSPO's 3e-4 / 4e-4);
override with ``epsilon_low`` / ``epsilon_high``. As in TRL, the mu iterations are mu consecutive trainer steps on
the same rollout (the prompts the trainer hands in meanwhile go to the refill pool). Differences from TRL: each
trainer step uses the whole rollout (split into ``train.grad_accum`` micro-batches of whole groups; TRL's
``steps_per_generation`` is not a separate knob), and dynamic sampling is built in (TRL leaves it to the user):
refills draw, with the seeded sampler, from the prompts seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.losses.advantages import group_advantages, overlong_penalty
from fastpref.losses.fused_policy import FusedLinearPolicyLoss
from fastpref.losses.policy import LOSS_TYPES, resolve_loss_config
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.modeling import lm_head
from fastpref.train.online.common import (OnlineAlgorithm, OnlineConfig, metrics_float, micro_batch, token_logps,
                                          zero_loss)
from fastpref.train.rollout import Rollout, pack_rollout, policy_hidden, timed


@dataclass
class GRPOConfig(OnlineConfig):
    """GRPO / DAPO / GSPO settings (prompts per step: ``train.batch_size``)."""

    loss_type: str = "dapo"
    """grpo, bnpo, dr_grpo, dapo (TRL's default), gspo, gspo_token (see ``fastpref.losses.policy``)."""
    num_iterations: int = 1
    """mu: trainer steps per rollout; > 1 computes the sampling policy's log-probs once (no grad)."""
    beta: float = 0.0
    """KL coefficient to the frozen reference (0: no KL term, as TRL's default)."""
    kl_estimator: str = "k3"
    """KL estimator of the penalty: k1, k2, k3."""
    epsilon_low: float | None = None
    """Lower clip (None: the loss type's default)."""
    epsilon_high: float | None = None
    """Upper clip (None: the loss type's default; DAPO's clip-higher is 0.28)."""
    delta: float | None = None
    """Dual-clip bound on the ratio (> 1 + epsilon_high), or None."""
    scale_rewards: str = "group"
    """Advantage scaling: group, batch, none (Dr. GRPO)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0: entropy is only logged)."""
    dynamic_sampling: bool = False
    """DAPO: drop zero-variance groups and refill from other prompts."""
    max_refill_rounds: int = 3
    """At most this many extra rollouts per step when refilling dropped groups."""
    overlong_cache_length: int | None = None
    """DAPO soft overlong punishment buffer L_cache (None: off); L_max is ``generation.max_new_tokens``."""
    overlong_coef: float = 1.0
    """Weight of the overlong penalty added to the rewards."""
    refill_pool_size: int = 1024
    """Prompts remembered for dynamic-sampling refills."""

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in LOSS_TYPES or self.loss_type == "ppo":
            raise ValueError(f"grpo.loss_type must be one of {[t for t in LOSS_TYPES if t != 'ppo']}, "
                             f"got {self.loss_type!r}")
        resolve_loss_config(self.loss_type, self.epsilon_low, self.epsilon_high, None)
        if not (isinstance(self.num_iterations, int) and self.num_iterations >= 1):
            raise ValueError(f"grpo.num_iterations must be an int >= 1, got {self.num_iterations!r}")
        if self.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.generation.num_generations < 2:
            raise ValueError(f"grpo needs generation.num_generations >= 2 (a group), got "
                             f"{self.generation.num_generations}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"grpo.scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.overlong_cache_length is not None and not (
                0 < self.overlong_cache_length <= self.generation.max_new_tokens):
            raise ValueError(f"grpo.overlong_cache_length must be in (0, generation.max_new_tokens="
                             f"{self.generation.max_new_tokens}], got {self.overlong_cache_length}")


@register_algorithm("grpo")
class GRPO(OnlineAlgorithm):
    """Group-relative policy optimisation with every TRL loss type (see the module docstring)."""

    config_class = GRPOConfig

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self._pool: list[dict] = []  # prompts seen (refill candidates)
        sec = self.sec
        if sec.beta > 0 and getattr(rt.reference, "mode", "none") not in ("copy", "lora_base"):
            raise ValueError(f"grpo.beta={sec.beta} needs a reference: set reference.mode=copy (or lora_base with "
                             f"LoRA); got {getattr(rt.reference, 'mode', None)!r}")
        self.loss_fn = FusedLinearPolicyLoss(
            sec.loss_type, eps_low=sec.epsilon_low, eps_high=sec.epsilon_high, beta=sec.beta,
            kl_estimator=sec.kl_estimator, delta=sec.delta, max_completion_length=sec.generation.max_new_tokens,
            entropy_coef=sec.entropy_coef, temperature=sec.generation.temperature)

    def _remember(self, examples: list[dict]) -> None:
        self._pool.extend({"prompt_ids": ex["prompt_ids"], "row": ex.get("row", {})} for ex in examples)
        del self._pool[:max(0, len(self._pool) - self.sec.refill_pool_size)]

    def collect(self, examples: list[dict]) -> tuple[Rollout | None, torch.Tensor | None, dict]:
        """Rollout + rewards, with DAPO dynamic sampling when enabled: ``(rollout, rewards, stats)``."""
        sec = self.sec
        G, P = sec.generation.num_generations, len(examples)
        ro = self.rollout(examples)
        rewards = self.score(ro, examples)
        stats = {"reward/sampled_mean": rewards.mean()}
        if not sec.dynamic_sampling:
            return ro, rewards, stats
        parts, kept, n_groups, refills, dropped = [], [], 0, 0, 0
        while True:
            std = rewards.view(-1, G).std(dim=1).tolist()
            keep = [g for g, s in enumerate(std) if s > 0][:P - n_groups]
            dropped += len(std) - len(keep)
            idx = [g * G + j for g in keep for j in range(G)]
            if idx:
                parts.append(ro.select(idx))
                kept.append(rewards[idx])
                n_groups += len(keep)
            if n_groups >= P or refills >= sec.max_refill_rounds:
                break
            refills += 1
            more = [self._pool[self.rng.randrange(len(self._pool))] for _ in range(P - n_groups)]
            ro = self.rollout(more)
            rewards = self.score(ro, more)
        stats.update({"dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/refills": refills,
                      "dynamic_sampling/kept_groups": n_groups})
        if not parts:
            return None, None, stats
        return Rollout.concat(parts), torch.cat(kept), stats

    def _new_rollout(self, examples: list[dict]) -> list[dict]:
        sec, gen = self.sec, self.sec.generation
        G = gen.num_generations
        ro, rewards, stats = self.collect(examples)
        if ro is None:  # every group had zero reward variance: nothing to learn from this step
            self.step_metrics.update(metrics_float({**stats, "skipped": 1.0}))
            return [micro_batch(None)]
        lengths = ro.lengths()
        if sec.overlong_cache_length is not None:
            rewards = rewards + sec.overlong_coef * overlong_penalty(lengths, gen.max_new_tokens,
                                                                     sec.overlong_cache_length)
        adv = group_advantages(rewards, G, scale_rewards=sec.scale_rewards)
        grouped = rewards.view(-1, G)
        self.step_metrics.update(metrics_float({
            **stats, "reward/mean": rewards.mean(), "reward/std": rewards.std(),
            "reward/group_std_mean": grouped.std(dim=1).mean(),
            "reward/zero_std_frac": (grouped.std(dim=1) == 0).float().mean(),
            "advantages/mean": adv.mean(), "advantages/std": adv.std(), "advantages/abs_max": adv.abs().max(),
            "completion/mean_length": lengths.float().mean(), "completion/max_length": lengths.max(),
            "completion/truncated_frac": torch.tensor(sum(ro.truncated) / len(ro.truncated))}))
        slices = self.group_slices(len(ro), G, self.cfg.train.grad_accum)
        n_micro = len(slices)
        total_tokens = float(lengths.sum())
        out = []
        for idx in slices:
            part = ro.select(idx)
            with timed(self._timings, "pack"):
                batch = pack_rollout(part, self.device)
            # dapo: normalise by the token count of the whole step (the trainer divides by len(micro))
            mb = micro_batch(batch, advantages=adv[idx].to(self.device), old=None, ref=None,
                             num_items=total_tokens / n_micro)
            with timed(self._timings, "old_ref_logps"), torch.no_grad():
                if sec.num_iterations > 1:
                    mb["old"] = token_logps(self.rt.model, batch, temperature=gen.temperature, pad_id=self.pad_id)
                if sec.beta > 0:
                    with self.reference() as ref_model:
                        mb["ref"] = token_logps(ref_model, batch, temperature=gen.temperature, pad_id=self.pad_id)
            out.append(mb)
        return out

    def micro_batches(self, examples: list[dict], step: int) -> list[dict]:
        self._remember(examples)
        return self.reuse_rollout(examples, self.sec.num_iterations, self._new_rollout)

    def compute_loss(self, batch: dict):
        if batch["packed"] is None:
            return zero_loss(self.rt.model), {}
        packed = batch["packed"]
        w, b = lm_head(self.rt.model)
        return self.loss_fn(policy_hidden(self.rt.model, packed, self.pad_id), w, packed.targets, batch["advantages"],
                            cu_seqlens=packed.cu_seqlens_cpu, old_logps=batch["old"], ref_logps=batch["ref"], bias=b,
                            num_items_in_batch=batch["num_items"], need_entropy=True)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["pool"] = list(self._pool)
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pool = list(state["pool"])
