"""The bundled verifiable task: synthetic arithmetic with exact answers, generated from a seed.

Prompts are ``"a+b="`` (or ``"a-b="`` / ``"a*b="`` when asked), answers the exact result as a plain integer
string. With single-digit operands whose results stay single-digit the task needs only a vocabulary of digits,
operators, ``=`` and EOS, so a tiny randomly initialised model on CPU improves on it within a few dozen GRPO
steps: first the *format* (answer with digits only, then stop), then correctness.

``arith_reward`` = ``1.0 * correct + 0.25 * starts_with_digit + 0.25 * well_formed`` (well formed: the completion
is a plain number with no more digits than the answer, i.e. the policy answered and then stopped). The shaping
terms are dense enough that a random policy over a ~100-token vocabulary already sees reward variance inside a
group of 8: the format is learnt first (answer with a digit, then stop), then correctness.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_arith(n: int, *, seed: int = 0, max_operand: int = 4, ops: Sequence[str] = ("+",),
               max_result: int | None = 9) -> list[dict]:
    """``n`` rows ``{"prompt": "a+b=", "answer": "c"}`` drawn with ``random.Random(seed)``.

    Operands are in ``[0, max_operand]``; ``max_result`` (default 9: single-digit answers) rejects rows whose
    result is larger (or negative), so the answer format stays one token per digit. ``ops`` picks among
    ``+``, ``-``, ``*``.
    """
    if n <= 0:
        raise ValueError(f"make_arith: n must be > 0, got {n}")
    if max_operand < 0:
        raise ValueError(f"make_arith: max_operand must be >= 0, got {max_operand}")
    bad = [o for o in ops if o not in _OPS]
    if not ops or bad:
        raise ValueError(f"make_arith: ops must be a non-empty subset of {sorted(_OPS)}, got {list(ops)}")
    rng = random.Random(seed)
    rows: list[dict] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"make_arith: no rows satisfy max_result={max_result} with max_operand={max_operand} "
                             f"and ops={list(ops)}")
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(list(ops))
        c = _OPS[op](a, b)
        if max_result is not None and not 0 <= c <= max_result:
            continue
        rows.append({"prompt": f"{a}{op}{b}=", "answer": str(c)})
    return rows


def arith_reward(prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
    """``1.0 * (c == answer) + 0.25 * c[:1].isdigit() + 0.25 * (c.isdigit() and len(c) <= len(answer))`` per
    stripped completion ``c`` (ASCII digits only).

    Needs the ``answer`` column (one per completion).
    """
    if "answer" not in columns:
        raise ValueError("arith_reward: needs an 'answer' column (one gold answer per completion)")
    answers = list(columns["answer"])
    if len(answers) != len(completions):
        raise ValueError(f"arith_reward: got {len(answers)} answers for {len(completions)} completions")
    out = []
    for c, a in zip(completions, answers):
        c = c.strip()
        a = str(a).strip()
        digits = c.isascii() and c.isdigit()
        out.append(1.0 * (c == a) + 0.25 * (c[:1].isascii() and c[:1].isdigit()) + 0.25 * (digits and len(c) <= len(a)))
    return out


arith_reward.columns = ("answer",)


def arith_sft_rows(n: int, *, seed: int = 0, **kwargs) -> list[dict]:
    """``{"prompt", "response"}`` rows (gold response = the answer): the SFT data SPIN and APO start from."""
    return [{"prompt": r["prompt"], "response": r["answer"], "answer": r["answer"]}
            for r in make_arith(n, seed=seed, **kwargs)]

