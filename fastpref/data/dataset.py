"""Reading, normalising, validating and tokenising training rows, with errors that name file, row and field.

Readers: ``.json`` (a list of objects), ``.jsonl`` (one object per line), ``.parquet``, and directories written by
``datasets.Dataset.save_to_disk``. Rows are numbered from 0 in file order (for JSONL: the n-th non-blank line).

Formats (``data.format=auto`` detects them row by row) are normalised to one canonical example per row:

=============== ======================================================= =====================================
format          fields                                                  canonical example
=============== ======================================================= =====================================
preference      ``prompt``, ``chosen``, ``rejected`` (strings)          prompt, chosen, rejected
sharegpt        ``conversations`` [{from, value}], ``chosen`` and       prompt = messages, chosen, rejected
                ``rejected`` ({from, value} or strings)
kto             ``messages`` (last turn = completion) + ``label``, or   prompt, completion, label
                ``prompt`` + ``completion`` + ``label``
sft             ``instruction`` [+ ``input``] + ``output``,             prompt, completion
                ``prompt`` + ``completion``, or ``messages``
=============== ======================================================= =====================================

A prompt is a string or a list of ``{"role", "content"}`` messages; it is rendered with the tokenizer's chat
template (``data.chat_template``) or, without one, by plain concatenation. Each response is tokenised separately
and ends with EOS. Preference rows also serve SFT (prompt + chosen), e.g. for the SFT warm-up.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fastpref.data")

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "observation": "user", "function_call": "assistant"}


class DataError(ValueError):
    """A data problem the user can fix; the message names the file, the row and the field."""


class BadRow(ValueError):
    """One row is unusable: ``field`` names the offending field."""

    def __init__(self, field_name: str, msg: str):
        super().__init__(msg)
        self.field = field_name
        self.msg = msg


# --------------------------------------------------------------------------------------------------- reading

def read_rows(path: str) -> list[Any]:
    """All rows of ``path`` in order (objects, or whatever the file holds: rows are checked later)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        try:
            import datasets

            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001  (datasets raises many types)
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return ds.to_list()
    low = path.lower()
    if low.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    with open(path, encoding="utf-8") as fh:
        try:
            text = fh.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if low.endswith(".jsonl"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno} (row {len(rows)})"
            rows.append(_parse_json(line, where))
            dup = _duplicate_key(rows[-1])
            if dup is not None:
                raise DataError(f"{where}: duplicate key {dup!r} in one object")
        return rows
    data = _parse_json(text, path)
    if isinstance(data, _DupKeys):
        raise DataError(f"{path}: duplicate key {data.dup!r} in the top-level object")
    if isinstance(data, dict):
        for key in ("train", "data", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(f"{path}: expected a JSON list of rows (or an object with a 'train'/'data' list)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        dup = _duplicate_key(row)
        if dup is not None:
            raise DataError(f"{path}: row {i}: duplicate key {dup!r} in one object")
    return data


class _DupKeys(dict):
    """A JSON object that held a key more than once (``dup``: the first repeated key; the last value is kept)."""

    dup: str = ""


def _object(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    seen: set[str] = set()
    out = _DupKeys(d)
    out.dup = next(k for k, _ in pairs if k in seen or seen.add(k))
    return out


def _parse_json(text: str, where: str) -> Any:
    """``json.loads`` with duplicate keys marked (``_DupKeys``) and errors as one-line :class:`DataError`\\ s."""
    try:
        return json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno} column {e.colno}" if "line " not in where else ""
        raise DataError(f"{where}: not valid JSON: {e.msg}{at}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def _duplicate_key(value: Any) -> str | None:
    """The first repeated key of any object inside ``value`` (iteratively: rows may be deeply nested), or None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, _DupKeys):
            return v.dup
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


# ------------------------------------------------------------------------------------------------ normalising

def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise BadRow(key, "missing")
    v = row[key]
    if isinstance(v, dict):  # ShareGPT / chat message {from, value} or {role, content}
        v = v.get("value", v.get("content"))
        if v is None:
            raise BadRow(key, "a message without 'value' or 'content'")
    if isinstance(v, list) and v and isinstance(v[-1], dict):  # a conversation: its last message's text
        v = v[-1].get("value", v[-1].get("content"))
    if not isinstance(v, str):
        raise BadRow(key, f"expected a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise BadRow(key, "empty")
    return v


def _messages(row: dict, key: str) -> list[dict]:
    conv = row.get(key)
    if conv is None:
        raise BadRow(key, "missing")
    if not isinstance(conv, list) or not conv:
        raise BadRow(key, f"expected a non-empty list of messages, got {type(conv).__name__}")
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise BadRow(f"{key}[{i}]", f"expected a message object, got {type(m).__name__}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in _ROLE:
            raise BadRow(f"{key}[{i}]", f"unknown role {role!r}")
        if not isinstance(content, str):
            raise BadRow(f"{key}[{i}]", f"expected string content, got {type(content).__name__}")
        out.append({"role": _ROLE[role], "content": content})
    return out


def detect_format(row: dict) -> str:
    """The format of one row (see the module docstring), from its keys."""
    if "conversations" in row:
        return "sharegpt"
    if "label" in row:
        return "kto"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row or "instruction" in row or "output" in row or "completion" in row:
        return "sft"
    if "prompt" in row:
        return "prompt"
    raise BadRow("<row>", f"cannot tell the format from the fields {sorted(row)}")


def _prompt(row: dict) -> str | list[dict]:
    if "prompt" in row and isinstance(row["prompt"], list):
        return _messages(row, "prompt")
    return _text(row, "prompt")


def normalise(row: Any, kind: str, fmt: str = "auto") -> dict:
    """Canonical example (see the module docstring) of a raw ``row`` for an algorithm reading ``kind`` rows
    (preference, sft, kto, prompt). Raises :class:`BadRow` naming the field."""
    if not isinstance(row, dict):
        raise BadRow("<row>", f"expected a JSON object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "sharegpt":
        conv = _messages(row, "conversations")
        ex = {"prompt": conv, "chosen": _text(row, "chosen"), "rejected": _text(row, "rejected")}
    elif fmt == "preference":
        ex = {"prompt": _prompt(row), "chosen": _text(row, "chosen"), "rejected": _text(row, "rejected")}
    elif fmt == "kto":
        if "messages" in row:
            msgs = _messages(row, "messages")
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise BadRow("messages", "expected a conversation ending with the assistant's completion")
            if not msgs[-1]["content"].strip():
                raise BadRow("messages", "empty completion")
            ex = {"prompt": msgs[:-1], "completion": msgs[-1]["content"]}
        else:
            ex = {"prompt": _prompt(row), "completion": _text(row, "completion")}
        if "label" not in row:
            raise BadRow("label", "missing")
        if not isinstance(row["label"], bool):
            raise BadRow("label", f"expected true or false, got {row['label']!r}")
        ex["label"] = row["label"]
    elif fmt == "sft":
        if "instruction" in row:
            inst = _text(row, "instruction")
            extra = _text(row, "input", allow_empty=True) if row.get("input") is not None else ""
            ex = {"prompt": inst + ("\n\n" + extra if extra.strip() else ""), "completion": _text(row, "output")}
        elif "messages" in row:
            msgs = _messages(row, "messages")
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
                raise BadRow("messages", "expected a conversation ending with a non-empty assistant message")
            ex = {"prompt": msgs[:-1], "completion": msgs[-1]["content"]}
        else:
            ex = {"prompt": _prompt(row), "completion": _text(row, "completion")}
    elif fmt == "prompt":
        ex = {"prompt": _prompt(row)}
    else:
        raise BadRow("<row>", f"unknown format {fmt!r}")
    return _to_kind(ex, kind, fmt)


def _to_kind(ex: dict, kind: str, fmt: str) -> dict:
    if kind == "prompt":
        return {"prompt": ex["prompt"]}
    if kind == "sft":
        if "chosen" in ex:
            return {"prompt": ex["prompt"], "completion": ex["chosen"]}
        if "completion" in ex and ex.get("label", True):
            return {"prompt": ex["prompt"], "completion": ex["completion"]}
        if "completion" in ex:
            raise BadRow("label", "an undesirable (label=false) example cannot be used for SFT")
        raise BadRow("completion", "missing")
    if kind == "preference":
        for key in ("chosen", "rejected"):
            if key not in ex:
                raise BadRow(key, f"missing (a {fmt} row; preference algorithms need prompt/chosen/rejected)")
        return ex
    if kind == "kto":
        if "label" not in ex:
            raise BadRow("label", f"missing (a {fmt} row; KTO needs a completion and a boolean label)")
        return ex
    raise ValueError(f"normalise: unknown kind {kind!r}")


# ------------------------------------------------------------------------------------------------- tokenising

@dataclass
class Tokenization:
    """How rows become token ids (the ``data`` config plus the tokenizer)."""

    tokenizer: Any
    max_length: int = 512
    max_prompt_length: int = 256
    truncation: str = "error"
    chat_template: str = "auto"

    def __post_init__(self):
        if self.chat_template not in ("auto", "none") and not hasattr(self.tokenizer, "apply_chat_template"):
            from fastpref.train.config import ConfigError

            raise ConfigError(f"data.chat_template: the tokenizer ({type(self.tokenizer).__name__}) cannot apply a "
                              "chat template; use auto or none")

    def _template(self) -> str | None:
        if self.chat_template == "none":
            return None
        if self.chat_template == "auto":
            return getattr(self.tokenizer, "chat_template", None)
        return self.chat_template

    def render(self, prompt: str | list[dict], response: str | None = None) -> tuple[str, str | None]:
        """``(prompt_text, response_text)``; the response text includes the template's end-of-turn."""
        tmpl = self._template()
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tmpl is None:
            if isinstance(prompt, list):
                p = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
            else:
                p = prompt
            return p, response
        tok = self.tokenizer
        p = tok.apply_chat_template(msgs, chat_template=tmpl, tokenize=False, add_generation_prompt=True)
        if response is None:
            return p, None
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], chat_template=tmpl,
                                       tokenize=False)
        return p, (full[len(p):] if full.startswith(p) else response)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def response_ids(self, text: str, templated: bool) -> list[int]:
        ids = self.encode(text)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not templated or not ids or ids[-1] != eos):
            ids = ids + [eos]
        return ids

    def example(self, ex: dict) -> dict:
        """Token ids of a canonical example: ``prompt_ids`` and ``chosen_ids``/``rejected_ids`` or
        ``completion_ids`` (+ ``label``). Raises :class:`BadRow` on empty or over-long rows."""
        responses = [k for k in ("chosen", "rejected", "completion") if k in ex]
        templated = self._template() is not None
        out: dict = {}
        p_text = None
        for k in responses:
            p_text, r_text = self.render(ex["prompt"], ex[k])
            out[f"{k}_ids"] = self.response_ids(r_text, templated)
        if p_text is None:
            p_text, _ = self.render(ex["prompt"])
        prompt_ids = self.encode(p_text)
        if not prompt_ids:
            raise BadRow("prompt", "empty")
        if len(prompt_ids) > self.max_prompt_length:
            if self.truncation != "truncate":
                raise BadRow("prompt", f"{len(prompt_ids)} tokens > data.max_prompt_length={self.max_prompt_length}"
                                       " (set data.truncation=truncate to cut it)")
            prompt_ids = prompt_ids[-self.max_prompt_length:]
        budget = self.max_length - len(prompt_ids)
        for k in responses:
            ids = out[f"{k}_ids"]
            if len(ids) > budget:
                if self.truncation != "truncate":
                    raise BadRow(k, f"prompt + {k} = {len(prompt_ids) + len(ids)} tokens > data.max_length="
                                    f"{self.max_length} (set data.truncation=truncate to cut it)")
                out[f"{k}_ids"] = ids[:budget]
        out["prompt_ids"] = prompt_ids
        if "label" in ex:
            out["label"] = ex["label"]
        return out


# --------------------------------------------------------------------------------------------------- loading

@dataclass
class LoadReport:
    """What loading did: rows read and skipped (with the reasons of the first few)."""

    rows: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def load_examples(paths: list[str], kind: str, tok: Tokenization, *, fmt: str = "auto", on_bad_row: str = "error",
                  report: LoadReport | None = None, rows_override: list[dict] | None = None,
                  source_name: str = "<synthetic>", columns: tuple[str, ...] = (),
                  columns_for: str = "the reward function") -> list[dict]:
    """Tokenised examples of every row of ``paths`` (or of ``rows_override``), each with ``source``
    (``"file:row"``) and ``row`` (the raw row, for on-line algorithms' answers).

    ``columns``: fields every row must also have (non-null), e.g. the ``answer`` a reward function reads
    (``fastpref.rewards.reward_columns``; ``columns_for`` names the reader in the message), so a missing one stops
    the run before training instead of at the first rollout. ``on_bad_row="error"`` raises :class:`DataError`
    at the first bad row, naming file, row and field; ``"skip"`` counts it in ``report`` and logs it.
    """
    report = report if report is not None else LoadReport()
    out: list[dict] = []
    sources = [(source_name, rows_override)] if rows_override is not None else [(p, read_rows(p)) for p in paths]
    for path, rows in sources:
        for i, row in enumerate(rows):
            report.rows += 1
            try:
                ex = tok.example(normalise(row, kind, fmt))
                for c in columns:
                    if row.get(c) is None:
                        raise BadRow(c, f"missing ({columns_for} needs it)")
            except BadRow as e:
                msg = f"{path}: row {i}: field {e.field!r}: {e.msg}"
                if on_bad_row == "error":
                    raise DataError(msg + " (set data.on_bad_row=skip to skip such rows)") from None
                report.skipped += 1
                if len(report.reasons) < 20:
                    report.reasons.append(msg)
                log.warning("skipping %s", msg)
                continue
            ex["source"] = f"{path}:{i}"
            ex["row"] = row
            out.append(ex)
    return out


def identical_pairs(examples: list[dict]) -> list[dict]:
    """The preference examples whose chosen and rejected token ids are equal (after templating and truncation):
    they carry no preference, and a run where every pair is like that cannot learn."""
    return [e for e in examples if "rejected_ids" in e and e["chosen_ids"] == e["rejected_ids"]]


def split_examples(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: a seeded random ``fraction`` of the examples is held out (at least one when
    ``fraction > 0`` and there are two or more)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
