"""The bundled synthetic preference task of the embedded default run: continue a letter run.

A prompt is a run of 4-6 consecutive letters of the cyclic alphabet ``a..z``, ascending or descending
(``"klmn>"``, ``"fedc>"``). The chosen response continues the run for three letters (``"opq"``, ``"bay"``); the
rejected one is a plausible mistake: one letter off, continuing in the wrong direction, or repeating the last
letter. A tiny model learns the rule (next letter given the last two) in a few dozen steps, so the held-out
preference accuracy of DPO's implicit reward rises from chance to near 1 within a minute on CPU.
"""

from __future__ import annotations

import random
import string

_ALPHA = string.ascii_lowercase


def _run(start: int, step: int, n: int) -> str:
    return "".join(_ALPHA[(start + step * i) % 26] for i in range(n))


def make_pattern_pairs(n: int, *, seed: int = 0, response_length: int = 3) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` of the letter-run task, drawn with ``random.Random(seed)``."""
    if n <= 0:
        raise ValueError(f"make_pattern_pairs: n must be > 0, got {n}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, step, k = rng.randrange(26), rng.choice((1, -1)), rng.randint(4, 6)
        prompt = _run(start, step, k)
        chosen = _run(start + step * k, step, response_length)
        kind = rng.randrange(3)
        if kind == 0:      # one letter off
            pos = rng.randrange(response_length)
            wrong = _ALPHA[(_ALPHA.index(chosen[pos]) + rng.choice((1, 2, 3, -2, -3))) % 26]
            rejected = chosen[:pos] + wrong + chosen[pos + 1:]
        elif kind == 1:    # wrong direction
            rejected = _run(start + step * (k - 2), -step, response_length)
        else:              # stuck on the last letter
            rejected = prompt[-1] * response_length
        rows.append({"prompt": prompt + ">", "chosen": chosen, "rejected": rejected})
    return rows


def make_pattern_rows(n: int, kind: str, *, seed: int = 0) -> list[dict]:
    """Rows of the letter-run task for an algorithm reading ``kind`` rows: ``preference`` and ``sft`` get the
    pairs, ``kto`` two unpaired rows per pair (chosen: label true, rejected: label false), ``prompt`` the prompts
    with the correct continuation as ``answer``."""
    pairs = make_pattern_pairs(n, seed=seed)
    if kind in ("preference", "sft"):
        return pairs
    if kind == "kto":
        return [r for p in pairs for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                           {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    if kind == "prompt":
        return [{"prompt": p["prompt"], "answer": p["chosen"]} for p in pairs]
    raise ValueError(f"make_pattern_rows: unknown kind {kind!r}")
