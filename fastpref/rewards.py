"""Reward functions for on-line RL: plain Python callables, composable with weights.

A reward function has the TRL signature ``fn(prompts, completions, **columns) -> list[float]``: one float per
completion; ``columns`` are extra per-completion dataset fields (e.g. ``answer``), already repeated to line up
with ``completions``. ``score_rewards`` calls one and checks the result (length, finiteness), so a NaN/inf
reward is an error naming the prompt index instead of a silently poisoned advantage. A function declares the
columns it reads as a ``columns`` attribute (``exact_match.columns == ("answer",)``; ``combine`` takes the union;
:func:`reward_columns` reads it), and the trainer checks every data row for them before training starts.

Provided: ``exact_match`` / ``math_answer`` (number extraction, ``\\boxed{}`` and ``#### x`` aware),
``format_reward`` (regex), ``length_penalty``, ``combine`` (weighted sum), and ``RewardModelScorer`` (a
sequence-classification reward model, e.g. one trained with ``algorithm=rm``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

RewardFn = Callable[..., Sequence[float]]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*(.+)")


def extract_number(text: str) -> Fraction | None:
    """The final numeric answer in ``text`` as an exact ``Fraction``, or None.

    Looks, in order, for ``\\boxed{...}``, a GSM8K-style ``#### x`` line, then the last number in the text.
    Accepts integers, thousands separators (``1,234``), decimals (``0.5``) and fractions (``3/4``).
    """
    for pat in (_BOXED, _HASHES):
        m = pat.findall(text)
        if m:
            text = m[-1]
            break
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    tok = nums[-1].replace(",", "")
    try:
        return Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None


def _answers(columns: dict, n: int, name: str) -> list:
    if "answer" not in columns:
        raise ValueError(f"{name}: needs an 'answer' column (one gold answer per completion)")
    answers = list(columns["answer"])
    if len(answers) != n:
        raise ValueError(f"{name}: got {len(answers)} answers for {n} completions")
    return answers


def reward_columns(fn: RewardFn) -> tuple[str, ...]:
    """The dataset columns reward function ``fn`` reads (its ``columns`` attribute; none declared: ``()``)."""
    cols = getattr(fn, "columns", ())
    return (cols,) if isinstance(cols, str) else tuple(cols)


def exact_match(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """1.0 where the stripped completion equals the stripped gold ``answer``, else 0.0."""
    answers = _answers(columns, len(completions), "exact_match")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


exact_match.columns = ("answer",)


def math_answer(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """1.0 where the completion's final number (``extract_number``) equals the gold ``answer``'s, else 0.0.

    Numbers are compared exactly as fractions, so ``"0.50"``, ``"1/2"`` and ``"\\boxed{0.5}"`` all match ``0.5``.
    """
    answers = _answers(columns, len(completions), "math_answer")
    out = []
    for c, a in zip(completions, answers):
        gold = extract_number(str(a))
        if gold is None:
            raise ValueError(f"math_answer: gold answer {a!r} contains no number")
        out.append(float(extract_number(c) == gold))
    return out


math_answer.columns = ("answer",)


def format_reward(pattern: str, *, full: bool = True) -> RewardFn:
    """Reward 1.0 where the completion matches the regex ``pattern`` (``re.fullmatch`` if ``full`` else
    ``re.search``, DOTALL), else 0.0."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"format_reward: invalid regex pattern {pattern!r}: {e}") from None
    match = rx.fullmatch if full else rx.search

    def fn(prompts, completions, **columns):
        return [float(match(c) is not None) for c in completions]

    fn.__name__ = "format_reward"
    return fn


def length_penalty(max_chars: int, *, coef: float = 1.0) -> RewardFn:
    """``-coef * max(0, len(completion) - max_chars) / max_chars``: zero up to ``max_chars`` characters, then
    linear in the excess (for a token-level soft overlong penalty see DAPO's ``overlong`` shaping in grpo)."""
    if max_chars <= 0:
        raise ValueError(f"length_penalty: max_chars must be > 0, got {max_chars}")

    def fn(prompts, completions, **columns):
        return [-coef * max(0, len(c) - max_chars) / max_chars for c in completions]

    fn.__name__ = "length_penalty"
    return fn


def combine(*weighted: tuple[RewardFn, float]) -> RewardFn:
    """Weighted sum ``sum_k w_k * fn_k(...)`` of reward functions, given as ``(fn, weight)`` pairs."""
    if not weighted:
        raise ValueError("combine: needs at least one (reward_fn, weight) pair")
    for i, item in enumerate(weighted):
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[0])):
            raise ValueError(f"combine: argument {i} must be a (callable, weight) pair, got {item!r}")

    def fn(prompts, completions, **columns):
        total = [0.0] * len(completions)
        for f, w in weighted:
            vals = f(prompts, completions, **columns)
            total = [t + float(w) * float(v) for t, v in zip(total, vals)]
        return total

    fn.__name__ = "combine(" + ",".join(getattr(f, "__name__", "fn") for f, _ in weighted) + ")"
    fn.columns = tuple(dict.fromkeys(c for f, _ in weighted for c in reward_columns(f)))
    return fn


REGISTRY: dict[str, RewardFn] = {"exact_match": exact_match, "math_answer": math_answer}


def get_reward_fn(spec: str | RewardFn | Sequence) -> RewardFn:
    """A reward callable from a config value: a callable, a registered name (``exact_match``, ``math_answer``,
    ``arith`` = ``fastpref.data.arith.arith_reward``), ``"format:<regex>"``, ``"length:<max_chars>"``,
    ``"package.module:function"`` (your own callable), or a list of ``[spec, weight]`` pairs combined with
    ``combine``."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        if spec == "arith":
            from fastpref.data.arith import arith_reward
            return arith_reward
        if spec in REGISTRY:
            return REGISTRY[spec]
        if spec.startswith("format:"):
            return format_reward(spec[len("format:"):])
        if spec.startswith("length:"):
            return length_penalty(int(spec[len("length:"):]))
        if ":" in spec:
            import importlib

            mod, _, fn = spec.partition(":")
            try:
                obj = getattr(importlib.import_module(mod), fn)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"reward: cannot load {spec!r}: {e}") from None
            if not callable(obj):
                raise ValueError(f"reward: {spec!r} is not callable")
            return obj
        raise ValueError(f"reward: unknown reward function {spec!r}; expected one of "
                         f"{sorted(REGISTRY) + ['arith']}, 'format:<regex>', 'length:<n>', 'module:function' or a "
                         "list of pairs")
    if isinstance(spec, (list, tuple)):
        return combine(*[(get_reward_fn(s), float(w)) for s, w in spec])
    raise ValueError(f"reward: expected a callable, a name or a list of [name, weight], got {type(spec).__name__}")


def score_rewards(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                  columns: dict | None = None, *, group_size: int = 1) -> torch.Tensor:
    """Call ``reward_fn`` and return the rewards as a float32 tensor ``[len(completions)]``.

    ``prompts`` holds one prompt per completion. Raises ``ValueError`` when the function returns the wrong
    number of rewards or a non-finite one; the message names the completion and its prompt index
    (``completion_index // group_size``).
    """
    columns = columns or {}
    vals = list(reward_fn(list(prompts), list(completions), **columns))
    name = getattr(reward_fn, "__name__", "reward_fn")
    if len(vals) != len(completions):
        raise ValueError(f"reward function {name} returned {len(vals)} rewards for {len(completions)} completions")
    for i, v in enumerate(vals):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"reward function {name}: reward {v!r} for completion {i} (prompt index "
                             f"{i // group_size}) is not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"reward function {name}: non-finite reward {f} for completion {i} (prompt index "
                             f"{i // group_size}, prompt {str(prompts[i])[:60]!r})")
    return torch.tensor([float(v) for v in vals], dtype=torch.float32)


def reward_model_scores(model, ids: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Scalar score ``[B]`` (fp32) of each token sequence under a sequence-classification reward model
    (``num_labels == 1``; right-padded batch, the model reads its last non-padding token). Differentiable unless
    called under ``torch.no_grad``."""
    dev = next(model.parameters()).device
    width = max(len(x) for x in ids)
    inp = torch.tensor([list(x) + [pad_id] * (width - len(x)) for x in ids], device=dev)
    att = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=dev)
    logits = model(input_ids=inp, attention_mask=att).logits
    if logits.dim() != 2 or logits.shape[1] != 1:
        raise ValueError(f"reward model must output one score per sequence ([B, 1] logits), got {tuple(logits.shape)}")
    return logits[:, 0].float()


class RewardModelScorer:
    """Wrap a sequence-classification reward model (``num_labels == 1``) as a reward function.

    ``scorer(prompts, completions)`` tokenises ``prompt + completion`` (batches of ``batch_size``, ``max_length``
    keeps the last tokens) and returns the model's scalar score per completion, in ``torch.no_grad`` and eval mode.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None):
        if batch_size <= 0:
            raise ValueError(f"RewardModelScorer: batch_size must be > 0, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.__name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            ids = [list(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts[s:s + self.batch_size]]
            if self.max_length:
                ids = [x[-self.max_length:] for x in ids]
            out.extend(reward_model_scores(self.model, ids, pad).cpu().tolist())
        self.model.train(was_training)
        return out
