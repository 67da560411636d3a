"""Reward functions for on-line RL: plain Python callables, composable with weights.

A reward function is called as TRL's ``GRPOTrainer`` calls one (``_calculate_rewards``, TRL 1.16):
``fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> list[float | None]``, one value
per completion; ``columns`` are the other dataset fields of the row (e.g. ``answer``, ``solution``), repeated to
line up with ``completions``. So ``trl.rewards.*`` and a TRL user's own functions work unchanged. When the row's
prompt is conversational (a list of ``{"role", "content"}`` messages) the prompts are those message lists and
each completion is ``[{"role": "assistant", "content": text}]``, as TRL passes them; otherwise both are strings.
``completion_ids`` are the generated token ids (EOS kept, as TRL). A function without ``**kwargs`` gets only the
arguments it names. TRL's trainer-only arguments (``trainer_state``, ``log_extra``, ``log_metric``,
``environments``) are not passed. ``None`` means "this function does not score this completion": ``combine``
skips it (TRL's ``nansum`` over functions); a completion no function scores is an error here (fastpref's
advantages and pairings need a reward for every completion).

``score_rewards`` calls one and checks the result (length, finiteness), so a NaN/inf reward is an error naming the
prompt index instead of a silently poisoned advantage. The dataset columns a function reads (:func:`reward_columns`)
are its ``columns`` attribute (``exact_match.columns == ("answer",)``; ``combine`` takes the union) or, for a
function without one (TRL's), its parameters without a default other than ``prompts`` / ``completions`` /
``completion_ids`` (``trl.rewards.accuracy_reward`` -> ``("solution",)``); the trainer checks every data row for
them before training starts.

Provided: ``exact_match`` / ``math_answer`` (number extraction, ``\\boxed{}`` and ``#### x`` aware),
``format_reward`` (regex), ``length_penalty``, ``combine`` (weighted sum), and ``RewardModelScorer`` (a
sequence-classification reward model, e.g. one trained with ``algorithm=rm``).
"""

from __future__ import annotations

import inspect
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


# The arguments the caller always provides, and TRL GRPOTrainer's own extras that fastpref does not pass.
_INPUTS = ("prompts", "completions", "completion_ids")
_TRL_TRAINER_ARGS = ("trainer_state", "log_extra", "log_metric", "environments")


def is_messages(x) -> bool:
    """Whether ``x`` is a conversation: a list of dicts with a ``role`` (TRL's ``is_conversational`` rule)."""
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the concatenated contents of a message list (a content
    given as parts contributes its ``text`` parts)."""
    if isinstance(completion, str):
        return completion
    out = []
    for m in completion:
        content = m.get("content") or ""
        out.append(content if isinstance(content, str) else
                   "".join(p.get("text", "") for p in content if isinstance(p, dict)))
    return "".join(out)


def _answers(columns: dict, n: int, name: str) -> list:
    if "answer" not in columns:
        raise ValueError(f"{name}: needs an 'answer' column (one gold answer per completion)")
    answers = list(columns["answer"])
    if len(answers) != n:
        raise ValueError(f"{name}: got {len(answers)} answers for {n} completions")
    return answers


def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _legacy_positional(sig) -> int:
    """2 for a function written for fastpref's former positional call ``fn(prompts, completions, **columns)``
    under other names (``lambda p, c: ...``): two leading positional parameters and none of TRL's input names;
    else 0. Such a function is called positionally."""
    params = list(sig.parameters.values())
    if any(p.name in _INPUTS for p in params):
        return 0
    return 2 if len([p for p in params if p.kind in _POSITIONAL]) >= 2 else 0


def reward_columns(fn: RewardFn) -> tuple[str, ...]:
    """The dataset columns reward function ``fn`` reads: its ``columns`` attribute, else the parameters of its
    signature that have no default, other than ``prompts`` / ``completions`` / ``completion_ids`` (a TRL reward
    function such as ``accuracy_reward(completions, solution, **kwargs)`` -> ``("solution",)``).

    Raises ``ValueError`` when the function requires one of TRL GRPOTrainer's own arguments (``trainer_state``,
    ``log_extra``, ``log_metric``, ``environments``), which fastpref does not pass.
    """
    cols = getattr(fn, "columns", None)
    if cols is not None:
        return (cols,) if isinstance(cols, str) else tuple(cols)
    sig = _signature(fn)
    if sig is None:
        return ()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(sig.parameters.values())[_legacy_positional(sig):]
    required = [p.name for p in params
                if p.kind in named and p.default is inspect.Parameter.empty and p.name not in _INPUTS]
    trainer_only = [n for n in required if n in _TRL_TRAINER_ARGS]
    if trainer_only:
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} requires TRL GRPOTrainer's "
                         f"{trainer_only[0]!r}, which fastpref does not pass; give it a default")
    return tuple(required)


def call_reward(fn: RewardFn, prompts: list, completions: list, completion_ids: list | None = None,
                columns: dict | None = None) -> list:
    """``fn(prompts=..., completions=..., completion_ids=..., **columns)`` as a list (TRL's call); a function
    without ``**kwargs`` gets only the arguments it names; one written for the former positional call under
    other names (``lambda p, c: ...``) gets ``fn(prompts, completions, ...)``."""
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **(columns or {})}
    args: tuple = ()
    sig = _signature(fn)
    if sig is not None:
        n_pos = _legacy_positional(sig)
        if n_pos:
            args = (kwargs.pop("prompts"), kwargs.pop("completions"))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            names = list(sig.parameters)[n_pos:]
            kwargs = {k: v for k, v in kwargs.items() if k in names}
    return list(fn(*args, **kwargs))


def exact_match(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """1.0 where the stripped completion equals the stripped gold ``answer``, else 0.0."""
    answers = _answers(columns, len(completions), "exact_match")
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answers)]


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
        out.append(float(extract_number(completion_text(c)) == gold))
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
        return [float(match(completion_text(c)) is not None) for c in completions]

    fn.__name__ = "format_reward"
    return fn


def length_penalty(max_chars: int, *, coef: float = 1.0) -> RewardFn:
    """``-coef * max(0, len(completion) - max_chars) / max_chars``: zero up to ``max_chars`` characters, then
    linear in the excess (for a token-level soft overlong penalty see DAPO's ``overlong`` shaping in grpo)."""
    if max_chars <= 0:
        raise ValueError(f"length_penalty: max_chars must be > 0, got {max_chars}")

    def fn(prompts, completions, **columns):
        return [-coef * max(0, len(completion_text(c)) - max_chars) / max_chars for c in completions]

    fn.__name__ = "length_penalty"
    return fn


def combine(*weighted: tuple[RewardFn, float]) -> RewardFn:
    """Weighted sum ``sum_k w_k * fn_k(...)`` of reward functions, given as ``(fn, weight)`` pairs (each called
    with :func:`call_reward`). A ``None`` from one function is skipped (TRL's ``nansum`` of the weighted
    rewards); ``None`` where every function returned ``None``."""
    if not weighted:
        raise ValueError("combine: needs at least one (reward_fn, weight) pair")
    for i, item in enumerate(weighted):
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[0])):
            raise ValueError(f"combine: argument {i} must be a (callable, weight) pair, got {item!r}")

    def fn(prompts, completions, completion_ids=None, **columns):
        total: list = [None] * len(completions)
        for f, w in weighted:
            vals = call_reward(f, prompts, completions, completion_ids, columns)
            total = [t if v is None else (0.0 if t is None else t) + float(w) * float(v) for t, v in zip(total, vals)]
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


def score_rewards(reward_fn: RewardFn, prompts: Sequence, completions: Sequence[str], columns: dict | None = None,
                  *, completion_ids: Sequence[Sequence[int]] | None = None, group_size: int = 1) -> torch.Tensor:
    """Call ``reward_fn`` as TRL does (:func:`call_reward`) and return the rewards as a float32 tensor
    ``[len(completions)]``.

    ``prompts`` holds one prompt per completion: a string, or a message list for a conversational row (then each
    string completion is passed as ``[{"role": "assistant", "content": text}]``, TRL's form). Raises ``ValueError``
    when the function returns the wrong number of rewards, ``None`` or a non-finite one; the message names the
    completion and its prompt index (``completion_index // group_size``).
    """
    prompts, completions = list(prompts), list(completions)
    if prompts and is_messages(prompts[0]):
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    ids = None if completion_ids is None else [list(x) for x in completion_ids]
    vals = call_reward(reward_fn, prompts, completions, ids, columns)
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    if len(vals) != len(completions):
        raise ValueError(f"reward function {name} returned {len(vals)} rewards for {len(completions)} completions")
    for i, v in enumerate(vals):
        if v is None:
            raise ValueError(f"reward function {name} returned None (no score) for completion {i} (prompt index "
                             f"{i // group_size}); every completion needs a reward -- combine it with a function "
                             "that scores it (combine skips None)")
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
    Conversational prompts and completions (message lists) are joined and rendered with the tokenizer's chat
    template, as TRL's GRPOTrainer does for a reward model.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None):
        if batch_size <= 0:
            raise ValueError(f"RewardModelScorer: batch_size must be > 0, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.__name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        texts = [p + c if isinstance(p, str) and isinstance(c, str)
                 else self.tokenizer.apply_chat_template(list(p) + list(c), tokenize=False)
                 for p, c in zip(prompts, completions)]
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
