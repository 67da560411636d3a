"""GRPO and its variants (DAPO, Dr. GRPO, BNPO, GSPO, GSPO-token): group-relative policy optimisation.

Per step (Shao et al. 2024, arXiv:2402.03300; TRL's ``GRPOTrainer``):

1. rollout: ``train.batch_size`` prompts x ``G = generation.num_generations`` completions (KV-cache generate);
2. score: ``reward_fn`` (``fastpref.rewards``); optional DAPO overlong shaping
   (``overlong_cache_length``: ``fastpref.losses.advantages.overlong_penalty`` times ``overlong_coef``);
   optional DAPO *dynamic sampling* (Yu et al. 2025, arXiv:2503.14476): groups whose rewards all agree carry no
   gradient, so they are dropped and more prompts are drawn and generated (at most ``max_refill_rounds``
   extra rollouts) until the batch holds ``train.batch_size`` informative groups (or whatever was found).
   Refills are fresh prompts (:class:`RefillStream` over the training split that the runtime hands the algorithm
   as ``rt.train_examples``: a seeded order of its own, skipping every prompt this run has already
   rolled out); only when that stream is used up (or absent) do they come from the pool of prompts seen so far
   (the last ``refill_pool_size``, drawn with the seeded sampler);
3. advantages: ``group_advantages`` (``scale_rewards`` group / batch / none);
4. train: ``num_iterations`` (mu) updates on the rollout with the fused ``FusedLinearPolicyLoss`` of
   ``loss_type`` (hidden states + LM head, eager chunked engine: the logits never exist). With mu > 1
   the sampling policy's log-probs are computed once, in ``no_grad``, by the fused LM-head op; with mu = 1 the
   on-policy shortcut (ratio ``exp(logp - sg[logp])``) needs no extra forward, as TRL. ``beta > 0`` adds the
   per-token KL to a frozen reference (its log-probs also from the fused op in ``no_grad``).

The clip range defaults follow the loss type (DAPO's clip-higher: ``eps_high = 0.28``; GSPO's 3e-4 / 4e-4);
override with ``epsilon_low`` / ``epsilon_high``. As in TRL, the mu iterations are mu consecutive trainer steps on
the same rollout (the prompts the trainer hands in meanwhile go to the refill pool and stay fresh for the stream).
Differences from TRL: each trainer step uses the whole rollout (split into ``train.grad_accum`` micro-batches of
whole groups; TRL's ``steps_per_generation`` is not a separate knob), and dynamic sampling is built in (TRL leaves
it to the user). Unlike DAPO's reference implementation, a refill prompt is not taken out of the trainer's data
order: the trainer still hands it in at its own step later in the epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fastpref.losses.advantages import group_advantages, overlong_penalty
from fastpref.losses.fused_policy import FusedLinearPolicyLoss
from fastpref.losses.policy import LOSS_TYPES, resolve_loss_config
from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.modeling import decoder_hidden, lm_head, logit_transform, token_logps
from fastpref.train.online.common import OnlineAlgorithm, OnlineConfig, OnlineMicroBatch, metrics_float, zero_loss
from fastpref.train.rollout import Rollout, pack_rollout, timed


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
    scale_rewards: str | None = None
    """Advantage scaling: group, batch, none; null: the loss type's -- ``none`` for ``dr_grpo`` (Dr. GRPO, Liu et
    al. 2025, drops the std division; TRL needs ``scale_rewards="none"`` set by hand for it), ``group`` for the
    others (TRL's default)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0: entropy is only logged)."""
    dynamic_sampling: bool = False
    """DAPO: drop zero-variance groups and refill with fresh prompts (then with ones seen before)."""
    max_refill_rounds: int = 3
    """At most this many extra rollouts per step when refilling dropped groups."""
    overlong_cache_length: int | None = None
    """DAPO soft overlong punishment buffer L_cache (None: off); L_max is ``generation.max_new_tokens``."""
    overlong_coef: float = 1.0
    """Weight of the overlong penalty added to the rewards."""
    refill_pool_size: int = 1024
    """Prompts seen so far kept for dynamic-sampling refills once no fresh prompt is left."""

    @property
    def resolved_scale_rewards(self) -> str:
        """``scale_rewards``, or the loss type's when null (``none`` for dr_grpo, else ``group``)."""
        if self.scale_rewards is not None:
            return self.scale_rewards
        return "none" if self.loss_type == "dr_grpo" else "group"

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
        if self.scale_rewards is not None and self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"grpo.scale_rewards must be group, batch, none or null, got {self.scale_rewards!r}")
        if self.overlong_cache_length is not None and not (
                0 < self.overlong_cache_length <= self.generation.max_new_tokens):
            raise ValueError(f"grpo.overlong_cache_length must be in (0, generation.max_new_tokens="
                             f"{self.generation.max_new_tokens}], got {self.overlong_cache_length}")


def _rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised process group (torchrun), else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RefillStream:
    """Fresh prompts for dynamic-sampling refills: the training examples in a seeded order of their own (not the
    trainer's), read front to back, skipping every example already rolled out in this run (by ``uid``, which the
    trainer gives each example). Under torchrun, rank ``r`` of ``w`` reads every ``w``-th example of the order.
    ``state_dict`` (the read position and the seen uids) makes it resumable."""

    def __init__(self, examples: list[dict], seed: int, rank: int = 0, world: int = 1):
        if any("uid" not in ex for ex in examples):
            raise ValueError("grpo dynamic sampling: the training examples need a 'uid' (the trainer sets it)")
        order = list(range(len(examples)))
        random.Random(f"grpo-refill:{seed}").shuffle(order)
        self.examples, self.order = examples, order[rank::world]
        self.pos, self.seen = 0, set()

    def mark_seen(self, examples: list[dict]) -> None:
        self.seen.update(ex["uid"] for ex in examples)

    def draw(self, n: int) -> list[dict]:
        """Up to ``n`` examples not seen yet (fewer, possibly none, once the stream is used up); marks them seen."""
        out = []
        while len(out) < n and self.pos < len(self.order):
            ex = self.examples[self.order[self.pos]]
            self.pos += 1
            if ex["uid"] not in self.seen:
                self.seen.add(ex["uid"])
                out.append(ex)
        return out

    def state_dict(self) -> dict:
        return {"pos": self.pos, "seen": sorted(self.seen), "size": len(self.order)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.order):
            raise ValueError(f"resume: the checkpoint's refill stream has {state['size']} examples, this run's "
                             f"{len(self.order)}")
        self.pos, self.seen = state["pos"], set(state["seen"])


@dataclass
class GRPOMicroBatch(OnlineMicroBatch):
    """A GRPO training micro-batch: whole groups of a rollout, packed, with what the loss needs besides the
    policy's own forward."""

    advantages: torch.Tensor | None = None
    """``[S]`` group-relative advantage of each completion."""
    old: torch.Tensor | None = None
    """``[N]`` per-token log-probs of the sampling policy (``num_iterations > 1``; else None: on-policy)."""
    ref: torch.Tensor | None = None
    """``[N]`` per-token reference log-probs (``beta > 0``; else None)."""
    num_items: float | None = None
    """The loss normaliser of the whole step (DAPO's token count / micro-batches)."""


@register_algorithm("grpo")
class GRPO(OnlineAlgorithm):
    """Group-relative policy optimisation with every TRL loss type (see the module docstring)."""

    config_class = GRPOConfig
    micro_batch_type = GRPOMicroBatch

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self._pool: list[dict] = []  # prompts seen (refill candidates once the stream is used up)
        sec = self.sec
        train = rt.train_examples
        self._stream = RefillStream(train, cfg.train.seed, *_rank_world()) if sec.dynamic_sampling and train else None
        if sec.beta > 0 and getattr(rt.reference, "mode", "none") not in ("copy", "lora_base"):
            raise ValueError(f"grpo.beta={sec.beta} needs a reference: set reference.mode=copy (or lora_base with "
                             f"LoRA); got {getattr(rt.reference, 'mode', None)!r}")
        self.loss_fn = FusedLinearPolicyLoss(
            sec.loss_type, eps_low=sec.epsilon_low, eps_high=sec.epsilon_high, beta=sec.beta,
            kl_estimator=sec.kl_estimator, delta=sec.delta, max_completion_length=sec.generation.max_new_tokens,
            entropy_coef=sec.entropy_coef, temperature=sec.generation.temperature,
            **logit_transform(rt.model).kwargs())

    def _remember(self, examples: list[dict]) -> None:
        self._pool.extend({"prompt_ids": ex["prompt_ids"], "row": ex.get("row", {}),
                           **({"uid": ex["uid"]} if "uid" in ex else {})} for ex in examples)
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
        if self._stream is not None:
            self._stream.mark_seen(examples)
        parts, kept, n_groups, refills, dropped, fresh = [], [], 0, 0, 0, 0
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
            more = self._stream.draw(P - n_groups) if self._stream is not None else []
            fresh += len(more)
            more += [self._pool[self.rng.randrange(len(self._pool))] for _ in range(P - n_groups - len(more))]
            ro = self.rollout(more)
            rewards = self.score(ro, more)
        stats.update({"dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/refills": refills,
                      "dynamic_sampling/kept_groups": n_groups, "dynamic_sampling/fresh_prompts": fresh})
        if not parts:
            return None, None, stats
        return Rollout.concat(parts), torch.cat(kept), stats

    def _new_rollout(self, examples: list[dict]) -> list[dict]:
        sec, gen = self.sec, self.sec.generation
        G = gen.num_generations
        ro, rewards, stats = self.collect(examples)
        if ro is None:  # every group had zero reward variance: nothing to learn from this step
            self.step_metrics.update(metrics_float({**stats, "skipped": 1.0}))
            self.no_signal("every group had the same reward for all its completions, also after refills")
            return [GRPOMicroBatch(None)]
        lengths = ro.lengths()
        if sec.overlong_cache_length is not None:
            rewards = rewards + sec.overlong_coef * overlong_penalty(lengths, gen.max_new_tokens,
                                                                     sec.overlong_cache_length)
        adv = group_advantages(rewards, G, scale_rewards=sec.resolved_scale_rewards)
        grouped = rewards.view(-1, G)
        self.step_metrics.update(metrics_float({
            # TRL's GRPOTrainer names where TRL has the metric (reward, reward_std, frac_reward_zero_std, completions/*)
            **stats, "reward": rewards.mean(), "reward_std": rewards.std(),
            "reward/group_std_mean": grouped.std(dim=1).mean(),
            "frac_reward_zero_std": (grouped.std(dim=1) == 0).float().mean(),
            "advantages/mean": adv.mean(), "advantages/std": adv.std(), "advantages/abs_max": adv.abs().max(),
            "completions/mean_length": lengths.float().mean(), "completions/max_length": lengths.max(),
            "completions/min_length": lengths.min(),
            "completions/clipped_ratio": torch.tensor(sum(ro.truncated) / len(ro.truncated))}))
        if self.step_metrics["frac_reward_zero_std"] == 1.0:  # already a float: no extra sync
            self.no_signal("every group had the same reward for all its completions (all advantages 0)")
        slices = self.group_slices(len(ro), G, self.cfg.train.grad_accum)
        n_micro = len(slices)
        total_tokens = float(lengths.sum())
        out = []
        for idx in slices:
            part = ro.select(idx)
            with timed(self._timings, "pack"):
                batch = pack_rollout(part, self.device)
            # dapo: normalise by the token count of the whole step (the trainer divides by len(micro))
            mb = GRPOMicroBatch(batch, advantages=adv[idx].to(self.device), num_items=total_tokens / n_micro)
            with timed(self._timings, "old_ref_logps"), torch.no_grad():
                if sec.num_iterations > 1:
                    mb.old = token_logps(self.rt.model, batch, temperature=gen.temperature)
                if sec.beta > 0:
                    with self.reference() as ref_model:
                        mb.ref = token_logps(ref_model, batch, temperature=gen.temperature)
            out.append(mb)
        return out

    def micro_batches(self, examples: list[dict], step: int) -> list[GRPOMicroBatch]:
        self._remember(examples)
        return self.reuse_rollout(examples, self.sec.num_iterations, self._new_rollout)

    def compute_loss(self, mb: GRPOMicroBatch):
        if mb.batch is None:
            return zero_loss(self.rt.model), {}
        packed = mb.batch
        w, b = lm_head(self.rt.model)
        return self.loss_fn(decoder_hidden(self.rt.model, packed), w, packed.targets, mb.advantages,
                            cu_seqlens=packed.cu_seqlens_host, old_logps=mb.old, ref_logps=mb.ref, bias=b,
                            num_items_in_batch=mb.num_items, need_entropy=True)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["pool"] = list(self._pool)
        sd["stream"] = self._stream.state_dict() if self._stream is not None else None
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pool = list(state["pool"])
        if (self._stream is None) != (state.get("stream") is None):
            raise ValueError("resume: the checkpoint and this run disagree on the fresh-prompt refill stream (one has "
                             "grpo.dynamic_sampling with the training examples, the other not)")
        if self._stream is not None:
            self._stream.load_state_dict(state["stream"])

