"""Pieces shared by every on-line method: the algorithm base (rollout, scoring, timing, round state), per-token
log-probs through the fused LM-head op, best/worst pairing, the replay buffer, judge-score parsing, the DPO
update on generated pairs, the iteration machinery of the self-improvement loops (a frozen M_t builds each
iteration's dataset once; ``PairDPOAlgorithm``) and the can't-learn signals (``score_signal``, ``CannotLearn``).

An on-line algorithm is a :class:`fastpref.train.algorithms.base.Algorithm` whose ``micro_batches`` runs the
rollout (generate with the KV cache), the scorer and whatever needs no gradient (old-policy and reference
log-probs, advantages), then hands packed micro-batches to ``compute_loss``; the trainer does backward, clipping,
the optimizer step, logging and checkpoints. ``state_dict`` carries the round state (round index, buffered
rollout, replay buffer, refreshed reference weights, sampler RNG), saved by the trainer in every checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from fastpref.data.batch import Batch
from fastpref.losses.fused_preference import FusedLinearDPOLoss
from fastpref.losses.preference import DPOOptionError, check_dpo_options
from fastpref.rewards import get_reward_fn, is_messages, score_rewards
from fastpref.train.algorithms.base import Algorithm
from fastpref.train.config import ConfigError
from fastpref.train.modeling import decoder_hidden, lm_head, logit_transform, sequence_logps
from fastpref.train.rollout import GenerationConfig, Rollout, generate, pack, timed

log = logging.getLogger("fastpref.train")

@dataclass
class OnlineConfig:
    """Settings every on-line method shares (prompts per step = ``train.batch_size``)."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings of the rollout."""
    reward: str | None = "arith"
    """Reward function: a name of ``fastpref.rewards`` (``arith``, ``exact_match``, ``math_answer``),
    ``format:<regex>``, ``length:<chars>``, or ``module:function`` of your own; null: none (methods that score
    otherwise; then no held-out reward)."""

    def validate(self) -> None:
        self.generation.validate()


# --------------------------------------------------------------------------------------------- pairing

def best_worst_pairs(scores: list[float | None], group_size: int) -> list[tuple[int, int]]:
    """``(best, worst)`` completion indices for each group of ``group_size`` consecutive completions.

    ``None`` scores (an unparseable judgement) are ignored. A group whose valid scores are all equal (or that
    has fewer than two) yields no pair: it carries no preference. Ties go to the lowest index.
    """
    if group_size < 2 or len(scores) % group_size:
        raise ValueError(f"best_worst_pairs: group_size must be >= 2 and divide {len(scores)}, got {group_size}")
    pairs = []
    for g in range(0, len(scores), group_size):
        valid = [(s, i) for i, s in enumerate(scores[g:g + group_size], start=g) if s is not None]
        if len(valid) < 2:
            continue
        best = max(valid, key=lambda x: (x[0], -x[1]))
        worst = min(valid, key=lambda x: (x[0], x[1]))
        if best[0] > worst[0]:
            pairs.append((best[1], worst[1]))
    return pairs


@dataclass
class Pair:
    """One preference pair in token ids (the prompt is shared)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def rollout_pairs(ro: Rollout, scores: list[float | None]) -> list[Pair]:
    """Best-vs-worst ``Pair`` of each group of ``ro`` (see ``best_worst_pairs``)."""
    return [Pair(ro.prompt_ids[b], ro.completion_ids[b], ro.completion_ids[w])
            for b, w in best_worst_pairs(scores, ro.group_size)]


def pack_pairs(pairs: list[Pair], device=None) -> Batch:
    """Pack pairs INTERLEAVED (sequence ``2i`` chosen, ``2i+1`` rejected of pair ``i``), as ``fastpref.ops``."""
    if not pairs:
        raise ValueError("pack_pairs: no pairs")
    prompts, comps = [], []
    for p in pairs:
        prompts += [p.prompt_ids, p.prompt_ids]
        comps += [p.chosen_ids, p.rejected_ids]
    return pack(prompts, comps, device)


class ReplayBuffer:
    """FIFO buffer of past items (pairs) with seeded sampling, for replay mixing (DICE).

    ``mix(fresh, ratio)`` returns ``fresh`` plus ``n = round(len(fresh) * ratio / (1 - ratio))`` replayed items
    (fewer when the buffer holds fewer), so replayed items make up a fraction ``ratio`` of the result.
    """

    def __init__(self, capacity: int = 10_000, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity, self.items, self.rng = capacity, [], random.Random(seed)

    def add(self, items: list) -> None:
        self.items.extend(items)
        del self.items[:max(0, len(self.items) - self.capacity)]

    def __len__(self) -> int:
        return len(self.items)

    def mix(self, fresh: list, ratio: float) -> list:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ReplayBuffer.mix: ratio must be in [0, 1), got {ratio}")
        n = min(len(self.items), round(len(fresh) * ratio / (1.0 - ratio)))
        return list(fresh) + (self.rng.sample(self.items, n) if n else [])

    def state_dict(self) -> dict:
        return {"items": list(self.items), "rng": self.rng.getstate(), "capacity": self.capacity}

    def load_state_dict(self, sd: dict) -> None:
        self.items, self.capacity = list(sd["items"]), sd["capacity"]
        self.rng.setstate(sd["rng"])


# --------------------------------------------------------------------------------------------- judge

_SCORE_LINE = re.compile(r"score\s*(?:is|[:=])?\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
_ANY_NUM = re.compile(r"-?\d+(?:\.\d+)?")


_PAPER_SCORE = re.compile(r"Score:[ \t]*(\d+(?:\.\d+)?)")


def parse_judge_score(text: str, max_score: float = 5.0, *, require_score_line: bool = False) -> float | None:
    """The score in an LLM judge's answer, or None when there is none in ``[0, max_score]``.

    ``require_score_line=True`` (Self-Rewarding, Yuan et al. 2024, whose judge prompt ends with 'Conclude with the
    score using the format: "Score: <total points>"'): only the last ``Score: N`` counts (that exact spelling, as
    the reference parsers' ``Score: ([0-9.]+)``); anything else is no score. Otherwise, lenient: the last
    ``Score: x`` (also ``score = x``, ``score is x``, ``Score: x/5``, any case); without one, the last number of the
    text. A fraction ``x/d`` with ``d != max_score`` is rescaled to ``max_score``.
    """
    if require_score_line:
        hits = _PAPER_SCORE.findall(text)
        val = float(hits[-1]) if hits else None
        return val if val is not None and 0.0 <= val <= max_score else None
    hits = _SCORE_LINE.findall(text)
    if hits:
        num, den = hits[-1]
        val = float(num)
        if den and float(den) > 0 and float(den) != max_score:
            val = val / float(den) * max_score
    else:
        nums = _ANY_NUM.findall(text)
        if not nums:
            return None
        val = float(nums[-1])
    return val if math.isfinite(val) and 0.0 <= val <= max_score else None


# --------------------------------------------------------------------------------------------- the base

@dataclass
class OnlineMicroBatch:
    """What an on-line algorithm's ``micro_batches`` hands the trainer and its ``compute_loss`` reads: the packed
    :class:`fastpref.data.batch.Batch` of generated sequences (``None``: a step with nothing to train on;
    ``compute_loss`` returns a zero loss) plus the algorithm's own per-row payloads, as fields of a subclass
    (GRPO's advantages and old log-probs, PPO's values and returns, the pair methods' reference log-probs).
    The trainer reads only :attr:`num_seqs`. Buffered micro-batches are checkpointed through :meth:`state` /
    :meth:`from_state` (plain dicts of tensors and host values)."""

    batch: Batch | None = None

    @property
    def num_seqs(self) -> int:
        """Sequences in the micro-batch (the trainer's weight for its metrics); 1 for an empty step."""
        return self.batch.num_seqs if self.batch is not None else 1

    @property
    def num_tokens(self) -> int:
        """Packed tokens trained on (prompt + completion); 0 for an empty step."""
        return self.batch.num_tokens if self.batch is not None else 0

    def state(self) -> dict:
        """The fields as a checkpointable dict (the batch as a dict of its fields)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["batch"] = _batch_state(self.batch)
        return out

    @classmethod
    def from_state(cls, state: dict) -> "OnlineMicroBatch":
        """Inverse of :meth:`state`."""
        return cls(**{**state, "batch": _batch_from_state(state.get("batch"))})


def _batch_state(b: Batch | None) -> dict | None:
    if b is None:
        return None
    return {f.name: (_batch_state(v) if isinstance(v := getattr(b, f.name), Batch) else v) for f in fields(Batch)}


def _batch_from_state(d: dict | None) -> Batch | None:
    if d is None:
        return None
    return Batch(**{**d, "kl": _batch_from_state(d.get("kl"))})


@dataclass
class PromptBatch:
    """A held-out evaluation batch of an on-line algorithm: the prompts' examples, generated from at evaluation."""

    examples: list[dict]

    @property
    def num_seqs(self) -> int:
        return len(self.examples)


@dataclass
class PairMicroBatch(OnlineMicroBatch):
    """A micro-batch of generated preference pairs (packed interleaved) and their reference log-probs."""

    ref: torch.Tensor | None = None
    """``[S]`` reference log-probs of the sequences (no grad)."""


def zero_loss(model) -> torch.Tensor:
    """A differentiable 0 (every trainable parameter gets a zero gradient) for a step with nothing to learn."""
    return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)


def metrics_float(metrics: dict) -> dict[str, float]:
    """Tensors to floats (one host sync per step, off the training hot path)."""
    return {k: float(v) for k, v in metrics.items()}


class OnlineAlgorithm(Algorithm):
    """Base of the on-line methods: rollout, scoring, per-stage timing, the reference, round state.

    Timings go to ``step_metrics`` as ``time/<stage>`` (seconds); ``time/train`` is the time from the end of
    ``micro_batches`` to ``on_step_end`` (forward, backward, optimizer step), and ``time_share/<stage>`` and
    ``train_tokens_per_s`` are derived from them.
    """

    data_kind = "prompt"
    micro_batch_type: ClassVar[type[OnlineMicroBatch]] = OnlineMicroBatch
    """The class of this algorithm's micro-batches (rebuilt from a checkpoint's buffered state)."""

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        self.sec.validate()
        self.round = 0
        self.rng = random.Random(cfg.train.seed)
        tok = rt.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.reward_fn = get_reward_fn(self.sec.reward) if getattr(self.sec, "reward", None) else None
        self._timings: dict[str, float] = {}
        self._train_tokens = 0
        self._t_train = None
        self._buffer: list[OnlineMicroBatch] = []  # the micro-batches of the current rollout
        self._uses_left = 0  # trainer steps left on the buffered rollout
        self._said_no_signal = False

    @property
    def sec(self):
        return self.section

    @property
    def device(self):
        return self.rt.device

    @contextmanager
    def reference(self):
        """The frozen reference network for per-token log-probs: the ``copy`` reference's model, or the policy
        itself with its LoRA adapters disabled (``reference.mode=lora_base``, no second copy)."""
        ref = self.rt.reference
        if ref is None or not ref.live:
            raise self._no_reference_model()
        with ref.network() as net:
            yield net

    def ref_module(self):
        """The frozen reference copy (``reference.mode=copy``; iterative methods refresh it)."""
        mod = getattr(self.rt.reference, "model", None)
        if mod is None:
            raise self._no_reference_model()
        return mod

    def _no_reference_model(self) -> ValueError:
        return ValueError(f"{self.name}: needs a reference model (reference.mode=copy, or lora_base with LoRA "
                          f"for grpo/ppo; got {getattr(self.rt.reference, 'mode', None)!r})")

    # ---- stages
    def rollout(self, examples: list[dict], *, model=None, num_generations: int | None = None) -> Rollout:
        """Generate for the examples' ``prompt_ids`` (timed as ``generate``)."""
        model = model if model is not None else self.rt.model
        prompts = [ex["row"]["prompt"] if isinstance(ex.get("row", {}).get("prompt"), str) else None
                   for ex in examples]
        ro = generate(model, self.rt.tokenizer, [ex["prompt_ids"] for ex in examples], self.sec.generation,
                      prompts=None if None in prompts else prompts, num_generations=num_generations)
        self._add_timings(ro.timings)
        return ro

    def score(self, ro: Rollout, examples: list[dict]) -> torch.Tensor:
        """Rewards ``[len(ro)]`` of the reward function (timed as ``score``), called as TRL's GRPOTrainer calls
        one (``fastpref.rewards.call_reward``): the other row fields are columns; a conversational row passes its
        prompt messages (and the completions as assistant messages)."""
        if self.reward_fn is None:
            raise ValueError(f"{self.name}: no reward function configured ({self.name}.reward)")
        G = ro.group_size
        rows = [ex.get("row", {}) for ex in examples]
        keys = sorted({k for r in rows for k in r if k not in ("prompt", "completion", "completion_ids")})
        cols = {k: [r.get(k) for r in rows for _ in range(G)] for k in keys}
        chats = [r.get("prompt") for r in rows]
        prompts = [p for p in chats for _ in range(G)] if chats and all(map(is_messages, chats)) else ro.prompts
        with timed(self._timings, "score"):
            return score_rewards(self.reward_fn, prompts, ro.completions, cols, completion_ids=ro.completion_ids,
                                 group_size=G)

    def reuse_rollout(self, examples: list[dict], uses: int, build) -> list[OnlineMicroBatch]:
        """``build(examples)`` (rollout -> micro-batches) every ``uses`` steps, the buffered micro-batches in
        between (GRPO's mu iterations, PPO's epochs); the buffer is part of the checkpointed state."""
        if self._uses_left == 0:
            self._buffer = build(examples)
            self._uses_left = uses
        self._uses_left -= 1
        self.begin_train_phase(sum(mb.num_tokens for mb in self._buffer))
        return self._buffer

    @staticmethod
    def group_slices(n_seqs: int, group_size: int, n_micro: int) -> list[list[int]]:
        """Sequence indices of up to ``n_micro`` micro-batches made of whole groups."""
        n_groups = n_seqs // group_size
        n = max(1, min(n_micro, n_groups))
        per = -(-n_groups // n)
        return [list(range(g * group_size, min(n_groups, g + per) * group_size)) for g in range(0, n_groups, per)]

    def no_signal(self, why: str) -> None:
        """Mark this step as one with nothing to learn from (metric ``no_signal = 1``) and say so once per run
        (a warning on the ``fastpref.train`` logger), instead of silently training on nothing."""
        self.step_metrics["no_signal"] = 1.0
        if not self._said_no_signal:
            self._said_no_signal = True
            log.warning("%s: %s, so the step trains on nothing (logged as no_signal=1 in metrics.jsonl; said once)",
                        self.name, why)

    def _add_timings(self, t: dict) -> None:
        for k, v in t.items():
            self._timings[k] = self._timings.get(k, 0.0) + v

    def begin_train_phase(self, train_tokens: int) -> None:
        """Call at the end of ``micro_batches`` with the tokens trained on (prompt + completion): starts the
        ``train`` timer and reports the count for the trainer's tokens/s."""
        self._train_tokens = train_tokens
        self.rt.step_tokens = train_tokens
        self._t_train = time.perf_counter()

    def on_step_end(self, step: int) -> None:
        t = self._timings
        if self._t_train is not None:
            t["train"] = time.perf_counter() - self._t_train
        total = sum(t.values()) or 1.0
        m = {f"time/{k}": v for k, v in t.items()}
        m.update({f"time_share/{k}": v / total for k, v in t.items()})
        if t.get("train"):
            m["train_tokens_per_s"] = self._train_tokens / t["train"]
        self.step_metrics.update(m)
        self._timings, self._t_train = {}, None

    # ---- held-out evaluation (the trainer calls eval_metrics(collate(chunk)) under no_grad)
    def collate(self, examples: list[dict]) -> PromptBatch:
        return PromptBatch(examples)

    def eval_metrics(self, batch: PromptBatch) -> dict[str, torch.Tensor]:
        """One sampled completion per held-out prompt: ``reward/mean`` (when a reward function is configured)
        and ``completion/mean_length``. Timings of this pass are not counted in the next step's."""
        saved, self._timings = self._timings, {}
        try:
            examples = batch.examples
            ro = self.rollout(examples, num_generations=1)
            out = {"completion/mean_length": ro.lengths().float().mean()}
            if self.reward_fn is not None:
                out["reward/mean"] = self.score(ro, examples).mean()
            return out
        finally:
            self._timings = saved

    # ---- state
    def state_dict(self) -> dict:
        return {"round": self.round, "rng": self.rng.getstate(), "buffer": [mb.state() for mb in self._buffer],
                "uses_left": self._uses_left}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.rng.setstate(state["rng"])
        self._buffer = [self.micro_batch_type.from_state(mb) for mb in state["buffer"]]
        self._uses_left = state["uses_left"]


# --------------------------------------------------------------------------------------------- can't-learn signals

def score_signal(scores: list[float | None], group_size: int) -> dict[str, tuple[int, int]]:
    """What in a step's (or an iteration's) scores gives nothing to learn, as ``{what: (count, total)}``:
    ``zero-variance groups`` (groups whose scored samples all scored the same, or with fewer than two scored),
    ``constant reward`` (every scored sample the same value: ``(n, n)``, else absent) and ``unscored samples``
    (e.g. unparseable judgements; absent when there are none)."""
    groups = [[v for v in scores[g:g + group_size] if v is not None] for g in range(0, len(scores), group_size)]
    out = {"zero-variance groups": (sum(len(set(g)) < 2 for g in groups), len(groups))}
    valid = [v for g in groups for v in g]
    if valid and len(set(valid)) == 1:
        out["constant reward"] = (len(valid), len(valid))
    if len(valid) < len(scores):
        out["unscored samples"] = (len(scores) - len(valid), len(scores))
    return out


_WARN_ANY = ("unscored samples", "unparseable judgements")  # warned about at any count, not only when complete


class CannotLearn(ConfigError):
    """A whole iteration had nothing to learn from (no pair, every group tied, a constant reward, no parseable
    judgement); a ``ConfigError``, so the CLI prints it as one line."""


# --------------------------------------------------------------------------------------------- DPO on pairs

@dataclass
class PairDPOConfig(OnlineConfig):
    """Settings of the methods that train DPO on generated pairs."""

    loss_type: str = "sigmoid"
    """Any DPO loss type of ``fastpref.losses.preference.dpo_loss`` (sigmoid, ipo, hinge, ...)."""
    beta: float = 0.1
    """DPO beta."""
    steps_per_iteration: int = 10
    """Optimizer steps per iteration; after each iteration the reference becomes the current policy."""
    epochs_per_iteration: int = 1
    """Methods with a frozen generator per iteration (spin, self_rewarding, dice, apo, ilr_dpo): passes over the
    iteration's dataset, each in a fresh seeded order, within its ``steps_per_iteration`` steps (which it must
    divide: ``steps_per_iteration / epochs_per_iteration`` steps per pass). uclaml/SPIN trains 3 epochs at
    iteration 0 and 6 later; 1: one pass. online_dpo (a fresh batch every step) takes only 1."""
    length_alpha: float = 0.0
    """Length regularisation: R-DPO's ``alpha`` (Park et al. 2024; ``dpo_loss(rdpo_alpha=...)`` adds
    ``alpha * (|y_w| - |y_l|)`` to the pair logit, so length alone earns no margin); 0: off."""
    reference_path: str | None = None
    """Initial reference weights: a local Hugging Face model directory of the policy's architecture (e.g. the SFT
    model a DPO policy was trained from; the policy itself is ``model.name_or_path``). None: the policy's own
    starting weights. Iterative methods replace the reference by the policy after each iteration."""
    iteration_prompts: int | None = None
    """Methods with a frozen generator per iteration (spin, self_rewarding, dice, apo, ilr_dpo): prompts of the
    training split that M_t answers when the iteration starts (a seeded draw, without repeats until the split is
    used up). None: ``steps_per_iteration / epochs_per_iteration * train.batch_size``, the prompts one pass of the
    iteration's steps stands for."""

    def validate(self) -> None:
        super().validate()
        try:  # the one check of the loss options, shared with dpo_loss and the offline dpo section
            check_dpo_options(self.loss_type, beta=self.beta, rdpo_alpha=self.length_alpha)
        except DPOOptionError as e:
            key, msg = e.option, str(e)
            if key == "rdpo_alpha":  # this section's name for R-DPO's alpha
                key, msg = "length_alpha", msg.replace("rdpo_alpha", "length_alpha (R-DPO's rdpo_alpha)", 1)
            raise ValueError(msg if msg.startswith(key) else f"{key}={getattr(self, key)!r}: {msg}") from None
        if not (isinstance(self.steps_per_iteration, int) and self.steps_per_iteration >= 1):
            raise ValueError(f"steps_per_iteration must be an int >= 1, got {self.steps_per_iteration!r}")
        e = self.epochs_per_iteration
        if not (isinstance(e, int) and not isinstance(e, bool) and e >= 1):
            raise ValueError(f"epochs_per_iteration must be an int >= 1, got {e!r}")
        if self.steps_per_iteration % e:
            raise ValueError(f"epochs_per_iteration={e} must divide steps_per_iteration={self.steps_per_iteration} "
                             "(the same number of steps per pass over the iteration's dataset)")
        if self.iteration_prompts is not None and not (isinstance(self.iteration_prompts, int)
                                                       and self.iteration_prompts >= 1):
            raise ValueError(f"iteration_prompts must be null or an int >= 1, got {self.iteration_prompts!r}")


def load_causal_lm(path: str, like: torch.nn.Module, what: str) -> torch.nn.Module:
    """A causal LM from a local directory, in ``like``'s dtype and device, checked to have ``like``'s parameter
    names and shapes (one-line error otherwise)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ValueError(f"{what}={path!r}: no such directory")
    p0 = next(like.parameters())
    m = AutoModelForCausalLM.from_pretrained(path, dtype=p0.dtype).to(p0.device)
    want = {k: v.shape for k, v in like.state_dict().items()}
    got = {k: v.shape for k, v in m.state_dict().items()}
    if want != got:
        bad = sorted(set(want.items()) ^ set(got.items()))[:1]
        raise ValueError(f"{what}={path!r}: not the policy's architecture (first difference: {bad})")
    return m


def load_preference_pairs(cfg, tokenizer, files: list[str]) -> list[Pair]:
    """The (prompt, chosen, rejected) pairs of preference files (any preference format of ``fastpref.data``,
    tokenised as the trainer tokenises its data: ``data.max_length``, truncation, chat template)."""
    from fastpref.data.dataset import Tokenization, load_examples

    d = cfg.data
    tok = Tokenization(tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                       truncation=d.truncation, chat_template=d.chat_template)
    exs = load_examples(list(files), "preference", tok, fmt="auto", on_bad_row=d.on_bad_row)
    return [Pair(list(e["prompt_ids"]), list(e["chosen_ids"]), list(e["rejected_ids"])) for e in exs]


class PairDPOAlgorithm(OnlineAlgorithm):
    """Base of online DPO, Self-Rewarding, SPIN, DICE, APO and iLR-DPO: make pairs from generations, train DPO on
    them (``FusedLinearDPOLoss`` on the interleaved packed pairs: hidden states + LM head, no logits) against a
    reference that is refreshed to the current policy every ``steps_per_iteration`` steps.

    Two schemes, one machinery:

    * on-line (``iterative = False``, online DPO): ``make_pairs(examples)`` on every step's prompts, generated
      by the current policy;
    * the papers' iterations (``iterative = True``): when iteration t starts, the policy as it is then (M_t:
      nothing has trained it yet in this iteration, so it is frozen for what follows) answers
      ``iteration_prompts`` prompts of the training split and ``build_iteration(prompts) -> list[Pair]`` makes
      the iteration's whole dataset once (generations, judgements, mixing); the iteration's steps then train on
      consecutive shuffled slices of it (the trainer's batch only paces the steps). The dataset and the
      position in it are in the checkpointed state.

    Can't-learn signals: every step (on-line) or every iteration dataset (iterative) is checked with
    ``score_signal``; a step with no pair, every group tied, a constant reward or unparseable judgements logs a
    warning with the counts at that step (metrics ``signal/<what>``), and when it lasts a whole iteration
    (the iterative dataset has no pair; or every on-line step of the iteration had none) training stops with a
    one-line ``CannotLearn`` error.
    """

    needs_reference = True
    micro_batch_type = PairMicroBatch
    iterative = False

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        sec = cfg.sections.get(cls.name) if getattr(cls, "name", None) else None
        if sec is not None and not cls.iterative and sec.epochs_per_iteration != 1:
            raise ValueError(f"{cls.name}.epochs_per_iteration={sec.epochs_per_iteration}: only the methods with an "
                             "iteration dataset (spin, self_rewarding, dice, apo, ilr_dpo) make passes over one; "
                             f"{cls.name} trains on fresh pairs every step (use 1)")

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        sec = self.sec
        self.loss_fn = FusedLinearDPOLoss(beta=sec.beta, loss_type=sec.loss_type, rdpo_alpha=sec.length_alpha,
                                          validate=False,  # checked once by PairDPOConfig.validate; no host sync
                                          **logit_transform(rt.model).kwargs())
        if sec.reference_path and not os.path.isdir(sec.reference_path):
            raise ValueError(f"{self.name}.reference_path={sec.reference_path!r}: no such directory")
        self._started = False  # the reference is taken by the trainer after construction: start at step 1
        self._iter_data: list[Pair] | None = None  # the iteration's dataset (iterative scheme)
        self._iter_step = 0  # steps taken in the current iteration
        self._empty_steps = 0  # on-line steps of this iteration without a pair
        self._step = 0
        self._signal_counts: dict = {}
        self._fresh_pairs: int | None = None

    def report_signal(self, counts: dict[str, tuple[int, int]], fresh_pairs: int | None = None) -> None:
        """Subclasses: the ``score_signal`` counts of this step / iteration, and (when the dataset also holds
        pairs that were not generated, e.g. DICE's offline pairs) how many pairs were generated."""
        self._signal_counts, self._fresh_pairs = counts, fresh_pairs

    def _take_signal(self):
        out = (self._signal_counts, self._fresh_pairs)
        self._signal_counts, self._fresh_pairs = {}, None
        return out

    # ---- pairs of a step
    def make_pairs(self, examples: list[dict]) -> list[Pair]:
        """On-line scheme: the pairs of one step's prompts."""
        raise NotImplementedError

    def build_iteration(self, prompts: list[dict]) -> list[Pair]:
        """Iterative scheme: the whole dataset of the iteration that starts, made by the policy as it is now."""
        raise NotImplementedError

    def iteration_prompt_examples(self, examples: list[dict]) -> list[dict]:
        """The prompts M_t answers: ``iteration_prompts`` (default: the steps of one pass x ``len(examples)``) of
        the training split (``rt.train_examples``, else the step's examples), in a seeded order that
        goes through the split before repeating."""
        pool = self.rt.train_examples or examples
        per_pass = self.sec.steps_per_iteration // self.sec.epochs_per_iteration
        n = self.sec.iteration_prompts or per_pass * len(examples)
        out: list[dict] = []
        while len(out) < n:
            order = list(range(len(pool)))
            self.rng.shuffle(order)
            out += [pool[i] for i in order[:n - len(out)]]
        return out

    def chunks(self, items: list) -> list[list]:
        """``items`` in generation-sized chunks (``train.batch_size``)."""
        b = max(1, self.cfg.train.batch_size)
        return [items[i:i + b] for i in range(0, len(items), b)]

    def signal(self, counts: dict[str, tuple[int, int]], pairs: int, *, whole_iteration: bool) -> None:
        """Log ``signal/<what>`` for each count and warn, at this step, about what gives nothing to learn:
        no pair, every group tied, a constant reward (each when complete), unscored samples (any); with
        ``whole_iteration`` (an iteration's dataset) a complete one raises ``CannotLearn``."""
        counts = dict(counts)
        counts["pairs"] = (pairs, counts.get("zero-variance groups", (0, pairs))[1])
        for what, (c, _) in counts.items():
            self.step_metrics[f"signal/{what.replace(' ', '_')}"] = float(c)
        bad = {w: (c, t) for w, (c, t) in counts.items()
               if (w == "pairs" and c == 0) or (w != "pairs" and t and (c == t or (w in _WARN_ANY and c)))}
        if not bad:
            return
        where = f"iteration {self.round}'s dataset" if whole_iteration else f"step {self._step}"
        text = "; ".join("no pair" if w == "pairs" else f"{w}: {c}/{t}" for w, (c, t) in bad.items())
        full = [w for w, (c, t) in bad.items() if w == "pairs" or c == t]
        if whole_iteration and "pairs" in bad:
            raise CannotLearn(f"{self.name}: nothing to learn for a whole iteration ({where}: {text})")
        log.warning("%s: %s: %s", self.name, where, text + (" (nothing to learn at this step)" if full else ""))

    # ---- the step
    def step_pairs(self, examples: list[dict]) -> list[Pair]:
        if not self.iterative:
            pairs = self.make_pairs(examples)
            self.signal(self._take_signal()[0], len(pairs), whole_iteration=False)
            self._empty_steps += not pairs
            return pairs
        if self._iter_step == 0 or self._iter_data is None:
            with timed(self._timings, "build_iteration"):
                data = self.build_iteration(self.iteration_prompt_examples(examples))
            counts, fresh = self._take_signal()
            self.signal(counts, len(data) if fresh is None else fresh, whole_iteration=True)
            self.rng.shuffle(data)
            self._iter_data = data
            self.step_metrics["iteration/pairs"] = float(len(data))
        per_pass = self.sec.steps_per_iteration // self.sec.epochs_per_iteration  # steps per pass over the data
        k = self._iter_step % self.sec.steps_per_iteration
        if k and k % per_pass == 0:  # a new pass (epochs_per_iteration > 1): a fresh seeded order
            self.rng.shuffle(self._iter_data)
        per = -(-len(self._iter_data) // per_pass)
        j = k % per_pass
        return self._iter_data[j * per:(j + 1) * per]

    def start(self) -> None:
        """Once, at the first step (the trainer takes the reference after building the algorithm; a resumed run
        has it from the checkpoint): the reference <- ``reference_path``."""
        if self.sec.reference_path:
            ref = self.ref_module()
            ref.load_state_dict(load_causal_lm(self.sec.reference_path, ref,
                                               f"{self.name}.reference_path").state_dict())

    def micro_batches(self, examples: list[dict], step: int) -> list[PairMicroBatch]:
        if not self._started:
            self.start()
            self._started = True
        self._step = step
        pairs = self.step_pairs(examples)
        self._iter_step += 1
        self.step_metrics["pairs/count"] = float(len(pairs))
        if not pairs:
            self.no_signal("no usable pair in this step (every group's completions scored the same)")
            self.begin_train_phase(0)
            return [PairMicroBatch(None)]
        n = max(1, min(self.cfg.train.grad_accum, len(pairs)))
        size = -(-len(pairs) // n)
        out = []
        with timed(self._timings, "ref_logps"):
            for i in range(0, len(pairs), size):
                batch = pack_pairs(pairs[i:i + size], self.device)
                with torch.no_grad():
                    ref = sequence_logps(self.ref_module(), batch)
                out.append(PairMicroBatch(batch, ref=ref))
        self.begin_train_phase(sum(mb.num_tokens for mb in out))
        return out

    def compute_loss(self, mb: PairMicroBatch):
        if mb.batch is None:
            return zero_loss(self.rt.model), {}
        packed, ref = mb.batch, mb.ref
        w, b = lm_head(self.rt.model)
        return self.loss_fn(decoder_hidden(self.rt.model, packed), w, packed.targets, bias=b,
                            ref_logps=(ref[0::2], ref[1::2]), **packed.loss_layout())

    def on_step_end(self, step: int) -> None:
        super().on_step_end(step)
        if step % self.sec.steps_per_iteration == 0:
            self.end_iteration()
        self.step_metrics["round"] = float(self.round)

    def end_iteration(self) -> None:
        """Reference <- current policy (M_{t+1}); next round. On-line: an iteration whose every step had no pair
        is an error."""
        if not self.iterative and self._empty_steps >= self.sec.steps_per_iteration:
            raise CannotLearn(f"{self.name}: nothing to learn for a whole iteration (iteration {self.round}: no pair "
                              f"in any of its {self._empty_steps} steps)")
        self.rt.reference.refresh(self.rt.model)
        self.round += 1
        self._iter_step, self._empty_steps, self._iter_data = 0, 0, None

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update({"iter_data": self._iter_data, "iter_step": self._iter_step, "empty_steps": self._empty_steps,
                   "started": self._started})
        return sd

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._iter_data, self._iter_step = state.get("iter_data"), state.get("iter_step", 0)
        self._empty_steps, self._started = state.get("empty_steps", 0), state.get("started", self._started)
