"""The algorithm interface of ``fastpref train`` and its registry.

An algorithm is a small class that turns examples into micro-batches and a micro-batch into ``(loss, metrics)``;
the trainer (:mod:`fastpref.train.trainer`) owns everything else: model and reference set-up, data loading and
validation, the optimizer/schedule, gradient accumulation, evaluation, logging, checkpoints and resume.

Off-line algorithms (sft, dpo, kto, orpo, simpo, cpo, rm) only implement :meth:`Algorithm.collate` and
:meth:`Algorithm.compute_loss`. The trainer's step is::

    examples = next global batch of rows (train.batch_size * train.grad_accum, data order fixed by the seed)
    micro = algo.micro_batches(examples, step)        # default: split into grad_accum parts, collate each
    for mb in micro:
        loss, metrics = algo.compute_loss(mb)         # fused loss from fastpref.losses, no full logits
        (loss / len(micro)).backward()
    clip, optimizer.step(), scheduler.step()
    algo.on_step_end(step)                            # hook (refresh a reference, advance a round, ...)

How an on-line algorithm (``fastpref/train/online/*``: grpo, ppo, online_dpo, ...) plugs in:

1. **Register**: decorate the class with ``@register_algorithm("grpo")`` in a module that
   :func:`load_builtin_algorithms` imports (or that the user imports before calling the trainer). Its
   ``data_kind = "prompt"`` makes the trainer load rows with only a prompt (``prompt`` string or ``messages``)
   and tokenize the prompt; the examples it receives are ``{"prompt_ids": [...], "row": {...raw row...},
   "source": "file:row"}``.
2. **Own config section**: set ``config_class = GRPOConfig`` (a dataclass, a docstring per field, all fields
   with defaults). Registration makes ``grpo:`` a valid YAML section and ``grpo.num_generations=8`` a valid
   override; the instance is ``self.cfg.sections["grpo"]`` (or ``self.section``).
3. **Generate before the loss**: override :meth:`micro_batches` to roll out (``self.rt.model.generate`` with the
   KV cache under ``torch.no_grad()``), score, compute advantages / old and reference log-probs (under
   no_grad), and return the micro-batches :meth:`compute_loss` consumes. Put timings (``time/generate``...) into
   ``self.step_metrics`` and the step's trained token count into ``self.rt.step_tokens``; the trainer logs them
   with the step. The training split is ``self.rt.train_examples``, the process's place ``rt.rank`` / ``rt.world``.
4. **State**: everything that must survive a resume (round index, replay buffer, a refreshed reference's
   weights, RNG of the sampler) goes in :meth:`state_dict` / :meth:`load_state_dict`; the trainer saves it in
   every checkpoint (``algorithm.safetensors`` + ``algorithm.json``, see ``fastpref.train.checkpoint``) and restores it before the first step after a resume.
   An extra trainable module (a critic, a reward model) gets its optimizer from
   :meth:`Runtime.build_optimizer` and is stepped with its ``update()``: averaged over ranks, clipped, scheduled
   like the policy, and checkpointed by the trainer (its weights and optimizer state are not the algorithm's).
5. **Reference**: ``self.rt.reference`` is a :class:`fastpref.train.reference.ReferenceMode` (one class per
   ``copy``, ``lora_base``, ``precompute`` or ``none``) with ``sequence_logps(batch)``, ``network()`` (the frozen
   network for per-token log-probs) and ``refresh(model)`` (copies the current policy into a ``copy`` reference;
   iterative methods).

Interface stability: the names on this page (``Algorithm``, ``Runtime``, ``register_algorithm``, ``ALGORITHMS``
(both from :mod:`fastpref.train.registry`, re-exported here), the method signatures) are what other modules code
against; do not change them lightly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fastpref.train.config import Config
from fastpref.train.registry import ALGORITHMS, load_builtin_algorithms, register_algorithm  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from fastpref.train.distributed import ExtraOptimizer


@dataclass
class FusedLossOptions:
    """Options of the fused hidden-state losses that every off-line preference section (``dpo``, ``kto``,
    ``orpo``, ``simpo``, ``cpo``) inherits; how the loss is computed, not what."""

    skip_unscored: bool = True
    """Drop the prompt and padding positions before the LM head, for the policy and the reference (the fused
    losses' ``skip_unscored``): the head's work on those positions is wasted (their targets are ignored), so this
    is on by default -- the same results up to float summation order, no host sync (the collator counts the scored
    tokens on the host). false: the head runs on every position (the loss classes' own default)."""

    def fused_kwargs(self) -> dict:
        """The fused loss's constructor arguments this mixin stands for."""
        return {"skip_unscored": bool(self.skip_unscored)}


@dataclass
class Runtime:
    """What the trainer hands an algorithm: the models, the tokenizer, the device, the process's place in the run,
    the training split, and the one way to build an optimizer for an extra trainable module.

    ``model`` is the trained module (a ``PreTrainedModel`` or a PEFT wrapper around one); ``reference`` a
    :class:`fastpref.train.reference.ReferenceMode`; ``tokenizer`` has ``encode(text, add_special_tokens=False)``,
    ``decode(ids)``, ``eos_token_id`` and ``pad_token_id`` (a Hugging Face tokenizer or the built-in
    :class:`fastpref.data.tokenizer.CharTokenizer`).
    """

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    reference: Any = None
    rank: int = 0
    """This process's rank (0 without a launcher)."""
    world: int = 1
    """Number of processes of the run."""
    train_examples: list[dict] = field(default_factory=list)
    """The whole training split (every rank's rows; empty: not handed over). GRPO's dynamic sampling draws fresh
    refill prompts from it, the iterative on-line methods their iteration prompts, PPO its reward-normaliser
    samples."""
    total_steps: int = 0
    """Optimizer steps of the whole run (the trainer's count, SFT warm-up included); 0: unknown, read
    ``train.max_steps``. Extra optimizers follow the run's schedule over it."""
    steps_done: int = 0
    """Optimizer steps the policy has taken so far (the trainer sets it before each step): where the extra
    optimizers read the run's schedule."""
    step_tokens: int | None = None
    """Tokens the current step trains on, when the algorithm knows them (on-line algorithms: prompt + completion
    of the rollout's micro-batches); the trainer reads it for tokens/s and resets it to None after every step
    (None: it counts the step's examples)."""
    optimizers: dict[str, ExtraOptimizer] = field(default_factory=dict)
    """The extra optimizers built by :meth:`build_optimizer`, by name (the trainer checkpoints them)."""

    def build_optimizer(self, module: torch.nn.Module, lr: float, *, name: str) -> ExtraOptimizer:
        """The AdamW of an extra trainable ``module`` (PPO's separate critic, APO's reward model) at base learning
        rate ``lr``: gradients averaged over ranks, clipped to ``optim.max_grad_norm``, the run's schedule at
        :attr:`steps_done`, checkpointed and resumed with the run (its weights and optimizer state: keep them out
        of the algorithm's own ``state_dict``). Step it with ``.update()`` (see
        :class:`fastpref.train.distributed.ExtraOptimizer`); ``name`` prefixes its metrics and keys its state (one
        module per name: building a name again, as an algorithm rebuilt on the same runtime does, replaces it)."""
        from fastpref.train.distributed import ExtraOptimizer

        opt = ExtraOptimizer(name, module, lr, self.cfg, self.total_steps or self.cfg.train.max_steps,
                             position=lambda: self.steps_done)
        self.optimizers[name] = opt
        return opt

    def optimizer_state(self) -> dict:
        """Every extra optimizer's :meth:`~fastpref.train.distributed.ExtraOptimizer.checkpoint_state`, by name."""
        return {name: opt.checkpoint_state() for name, opt in self.optimizers.items()}

    def load_optimizer_state(self, state: dict) -> None:
        """Inverse of :meth:`optimizer_state`; the names must be this run's (``ValueError`` naming them)."""
        if set(state) != set(self.optimizers):
            raise ValueError(f"extra optimizers: the checkpoint holds {sorted(state)}, this run builds "
                             f"{sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_checkpoint_state(state[name])


class Algorithm:
    """Base class of every training algorithm. Subclasses set the class attributes and implement
    :meth:`collate` and :meth:`compute_loss`; on-line algorithms also override :meth:`micro_batches`."""

    name: ClassVar[str] = ""
    """Registry name (set by :func:`register_algorithm`)."""
    data_kind: ClassVar[str] = "preference"
    """Rows this algorithm reads: ``preference`` (prompt, chosen, rejected), ``sft`` (prompt, completion),
    ``kto`` (prompt, completion, label) or ``prompt`` (prompt only; on-line algorithms)."""
    needs_reference: ClassVar[bool] = False
    """Whether the loss uses reference log-probs (``reference.mode=auto`` then picks copy / lora_base)."""
    model_kind: ClassVar[str] = "causal_lm"
    """``causal_lm`` or ``sequence_classification`` (reward models: a scalar head on the last token)."""
    config_class: ClassVar[type | None] = None
    """Optional dataclass for the algorithm's own top-level config section (named like the algorithm). Every
    built-in algorithm has one holding all the options of its loss (``dpo.beta``, ``kto.desirable_weight``, ...);
    its ``validate()`` checks them (loss types, combinations) when the config is loaded."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse option combinations across sections this algorithm cannot run, before any model is built (called
        by :func:`fastpref.train.config.validate_config` before the section's own ``validate()``; raise
        ``ValueError`` naming the key). Default: nothing to check."""

    def __init__(self, cfg: Config, rt: Runtime):
        self.cfg = cfg
        self.rt = rt
        self.step_metrics: dict[str, float] = {}
        """Extra per-step scalars (timings, reward stats) logged with the step; cleared by the trainer."""

    @property
    def loss_type(self):
        """This algorithm's ``<name>.loss_type`` (None when its section has none)."""
        return getattr(self.section, "loss_type", None)

    @property
    def section(self):
        """This algorithm's config section (``cfg.sections[name]``), or None."""
        return self.cfg.sections.get(self.name)

    # ---- batches
    def collate(self, examples: list[dict]) -> Any:
        """Tokenized examples -> one micro-batch on ``self.rt.device``: a ``fastpref.data.batch.Batch`` (built by
        ``fastpref.data.collate``), or an algorithm's own typed micro-batch holding one. The trainer reads only its
        ``num_seqs``."""
        raise NotImplementedError

    def micro_batches(self, examples: list[dict], step: int) -> list[Any]:
        """The micro-batches of one optimizer step from its ``examples`` (``grad_accum`` equal parts)."""
        n = self.cfg.train.grad_accum
        size = -(-len(examples) // n)
        return [self.collate(examples[i:i + size]) for i in range(0, len(examples), size)]

    # ---- loss
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of one micro-batch; metrics are detached 0-dim tensors with TRL's names."""
        raise NotImplementedError

    def eval_metrics(self, batch: Any) -> dict[str, torch.Tensor]:
        """Metrics of one held-out micro-batch (called under ``torch.no_grad()``); default: the loss and its
        metrics."""
        loss, metrics = self.compute_loss(batch)
        return {"loss": loss.detach(), **metrics}

    # ---- hooks and state
    def on_train_start(self) -> None:
        """Called once before the first step (after a resume has restored the state)."""

    def on_step_end(self, step: int) -> None:
        """Called after each optimizer step (``step`` counts from 1)."""

    def state_dict(self) -> dict:
        """Resumable state: tensors, numbers, strings, lists and dicts (saved in each checkpoint as safetensors + JSON)."""
        return {}

    def save_final(self, directory: str) -> None:
        """Write trained weights the algorithm owns (not part of the policy's own files) into ``final/``
        (``directory``; rank 0, before the directory is renamed into place). PPO writes its critic here."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
