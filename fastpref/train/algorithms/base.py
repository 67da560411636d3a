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
   KV cache under ``torch.no_grad()``), score, compute advantages / old and reference log-probs (with
   :meth:`Runtime.sequence_logps` under no_grad), and return the micro-batches :meth:`compute_loss` consumes.
   Put timings (``time/generate``...) into ``self.step_metrics``; the trainer logs them with the step.
4. **State**: everything that must survive a resume (round index, replay buffer, a refreshed reference's
   weights, RNG of the sampler) goes in :meth:`state_dict` / :meth:`load_state_dict`; the trainer saves it in
   every checkpoint (``algorithm.safetensors`` + ``algorithm.json``, see ``fastpref.train.checkpoint``) and restores it before the first step after a resume.
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
from typing import Any, ClassVar

import torch

from fastpref.train.config import Config
from fastpref.train.registry import ALGORITHMS, load_builtin_algorithms, register_algorithm  # noqa: F401  (re-exported)


@dataclass
class Runtime:
    """What the trainer hands an algorithm: the models, the tokenizer and the device.

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
    extras: dict = field(default_factory=dict)
    """Free slot for algorithm-specific objects (a critic, a reward model, a generation backend). The trainer
    puts the training split there as ``"train_examples"`` (GRPO's dynamic sampling draws fresh refill prompts
    from it)."""
    total_steps: int = 0
    """Optimizer steps of the whole run (the trainer's count, SFT warm-up included); 0: unknown, read
    ``train.max_steps``. Extra optimizers (PPO's separate critic) follow the run's schedule over it."""

    def sequence_logps(self, batch: dict, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence summed log-probs of the scored tokens and their counts, ``([S] fp32, [S] int)``.

        From the last hidden state and the LM head weight via ``fastpref.ops.linear_logprobs`` (never full
        logits); differentiable unless called under ``torch.no_grad()``.
        """
        from fastpref.train.modeling import sequence_logps

        return sequence_logps(self.model if model is None else model, batch)


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
    """Optional dataclass for the algorithm's own top-level config section (named like the algorithm)."""

    default_loss_type: ClassVar[str | None] = None
    """What ``loss.type=auto`` means for this algorithm (None: the algorithm has no loss types)."""
    loss_types: ClassVar[tuple[str, ...] | None] = None
    """The valid ``loss.type`` values besides ``auto`` (None: not checked, the loss ignores ``loss.type``)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse option combinations this algorithm cannot run, before any model is built (called by
        :func:`fastpref.train.config.validate_config`; raise ``ValueError`` naming the key). Default: ``loss.type``
        must be ``auto`` or one of :attr:`loss_types`."""
        t = cfg.loss.type
        if cls.loss_types is not None and t != "auto" and t not in cls.loss_types:
            raise ValueError(f"loss.type={t!r} is not a {cls.name} loss type (expected auto or one of "
                             f"{', '.join(cls.loss_types)})")

    def __init__(self, cfg: Config, rt: Runtime):
        self.cfg = cfg
        self.rt = rt
        self.step_metrics: dict[str, float] = {}
        """Extra per-step scalars (timings, reward stats) logged with the step; cleared by the trainer."""

    @property
    def loss_type(self) -> str | None:
        """``loss.type`` with ``auto`` resolved to :attr:`default_loss_type`."""
        t = self.cfg.loss.type
        return self.default_loss_type if t == "auto" else t

    @property
    def section(self):
        """This algorithm's config section (``cfg.sections[name]``), or None."""
        return self.cfg.sections.get(self.name)

    # ---- batches
    def collate(self, examples: list[dict]) -> dict:
        """Tokenized examples -> one micro-batch (a dict of tensors on ``self.rt.device``)."""
        raise NotImplementedError

    def micro_batches(self, examples: list[dict], step: int) -> list[dict]:
        """The micro-batches of one optimizer step from its ``examples`` (``grad_accum`` equal parts)."""
        n = self.cfg.train.grad_accum
        size = -(-len(examples) // n)
        return [self.collate(examples[i:i + size]) for i in range(0, len(examples), size)]

    # ---- loss
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of one micro-batch; metrics are detached 0-dim tensors with TRL's names."""
        raise NotImplementedError

    def eval_metrics(self, batch: dict) -> dict[str, torch.Tensor]:
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
