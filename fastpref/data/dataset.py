"""Reading, normalising, validating and tokenising training rows, with errors that name file, row and field.

Readers: ``.json`` (a list of objects), ``.jsonl`` (one object per line), ``.parquet``, and directories written by
``datasets.Dataset.save_to_disk``. Rows are numbered from 0 in file order (for JSONL: the n-th non-blank line).

Formats follow TRL's "Dataset formats" (``trl.data_utils``; TRL 1.16), each *standard* (strings) or
*conversational* (lists of ``{"role", "content"}`` messages), plus three LLaMA-Factory layouts. ``data.format=auto``
detects them row by row from the keys (:func:`detect_format`):

======================= ============================================= =============================================
format                  fields                                        read by (data kind)
======================= ============================================= =============================================
language modeling       ``text`` or ``messages``                      sft (``messages``: also on-line prompts)
prompt-only             ``prompt``                                    on-line (grpo, ppo, online_dpo, ...)
prompt-completion       ``prompt``, ``completion``                    sft, spin/apo, on-line (completion unused)
preference              ``prompt``, ``chosen``, ``rejected``          dpo family, rm, kto (unpaired), sft (chosen)
implicit prompt         ``chosen``, ``rejected`` (prompt = their      as preference; the prompt is extracted as
                        common prefix)                                TRL's ``extract_prompt`` does
unpaired preference     ``prompt``, ``completion``, ``label``         kto, sft (label true)
                        (or ``messages`` + ``label``)
alpaca                  ``instruction`` [+ ``input``] + ``output``    sft, on-line (a user turn, so conversational)
sharegpt                ``conversations`` [{from, value}] [+          with chosen/rejected as preference, else as
                        ``chosen``/``rejected``]                      ``messages``
======================= ============================================= =============================================

Messages may carry ``tool_calls`` (assistant) and come from the ``tool`` role; a row's ``tools`` column (a list or
its JSON string) and ``chat_template_kwargs`` go to the chat template, as in TRL. Text-only content-part lists
(``[{"type": "text", "text": ...}]``) are joined into one string. A row whose format its algorithm cannot use is a
:class:`BadRow` that lists the formats that algorithm accepts (:func:`accepted_formats`). A preference row's
``margin`` (a number; TRL's ``RewardTrainer`` column) is kept on the example as ``margin`` (the ``rm`` loss reads it).

Tokenising follows TRL's trainers: a string prompt is used as it is (no chat template); a conversational row is
rendered with the chat template (``data.chat_template``; ``auto`` needs the tokenizer to have one, ``none`` joins
``role: content`` lines). The prompt and each prompt + response are tokenised whole and the response starts where
the two token sequences diverge (TRL's ``common_prefix_length``); standard responses end with EOS, conversational
ones with what the template writes. SFT on a conversation trains every assistant turn and nothing else (TRL's
``assistant_only_loss``): the example then carries ``loss_mask`` over prompt + completion, where the completion
is the last assistant turn (what on-line algorithms that read sft rows treat as the gold response).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fastpref.data")


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


# ------------------------------------------------------------------------------------------------ formats

FORMATS: dict[str, str] = {
    "text": "language modeling {text}",
    "messages": "conversational language modeling {messages}",
    "prompt": "prompt-only {prompt}",
    "prompt_completion": "prompt-completion {prompt, completion}",
    "preference": "preference {prompt, chosen, rejected}",
    "implicit": "preference with implicit prompt {chosen, rejected}",
    "unpaired": "unpaired preference {prompt, completion, label} or {messages, label}",
    "alpaca": "alpaca {instruction, input, output}",
    "sharegpt": "sharegpt {conversations} or {conversations, chosen, rejected}",
}
"""The row formats (TRL's dataset types plus LLaMA-Factory's alpaca / sharegpt), as named in errors."""

ACCEPTED: dict[str, tuple[str, ...]] = {
    "sft": ("text", "messages", "prompt_completion", "preference", "implicit", "unpaired", "alpaca", "sharegpt"),
    "preference": ("preference", "implicit", "sharegpt"),
    "kto": ("unpaired", "preference", "implicit", "sharegpt"),
    "prompt": ("prompt", "prompt_completion", "messages", "preference", "implicit", "unpaired", "alpaca", "sharegpt"),
}
"""Formats each data kind (``Algorithm.data_kind``) reads. sft: every assistant turn of a conversation, or the
completion / chosen response (an unpaired row only when ``label`` is true); kto: a preference pair becomes two
unpaired examples (chosen: true, rejected: false), as TRL's ``unpair_preference_dataset``; prompt (on-line
algorithms): the prompt only (for ``messages``: the turns before the last assistant one)."""

_FORCED = {"preference": ("preference", "implicit"), "sharegpt": ("sharegpt",), "kto": ("unpaired",),
           "sft": ("alpaca", "prompt_completion", "messages", "text")}
"""``data.format`` values other than auto and the detected formats each one allows."""

_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "observation": "user", "function_call": "assistant", "tool": "tool"}


def accepted_formats(kind: str) -> str:
    """One line naming the algorithms that read ``kind`` rows and the formats they accept (for errors)."""
    try:
        from fastpref.train.algorithms.base import ALGORITHMS, load_builtin_algorithms

        load_builtin_algorithms()
        algos = sorted(n for n, c in ALGORITHMS.items() if c.data_kind == kind)
    except Exception:  # noqa: BLE001  (an error message must not fail on an import)
        algos = []
    who = f"algorithm={'/'.join(algos)}" if algos else f"{kind} rows"
    return (f"{who} accepts: " + "; ".join(FORMATS[f] for f in ACCEPTED[kind])
            + " (strings or message lists; see docs/data.md)")


def detect_format(row: dict) -> str:
    """The format of one row (a key of :data:`FORMATS`), from its keys, the most specific first."""
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "label" in row:
        return "unpaired"
    if "chosen" in row or "rejected" in row:
        return "preference" if "prompt" in row else "implicit"
    if "completion" in row:
        return "prompt_completion"
    if "messages" in row:
        return "messages"
    if "text" in row:
        return "text"
    if "prompt" in row:
        return "prompt"
    raise BadRow("<row>", f"cannot tell the format from the fields {sorted(row)}")


def is_conversational(value: Any) -> bool:
    """Whether a field value is a conversation: a list starting with a message (``role`` or ``from``), or one
    message dict (LLaMA-Factory's sharegpt responses). TRL's ``is_conversational``, per field."""
    if isinstance(value, dict):
        return "role" in value or "from" in value
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and (
        "role" in value[0] or "from" in value[0])


# ------------------------------------------------------------------------------------------------ normalising

def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise BadRow(key, "missing")
    v = row[key]
    if not isinstance(v, str):
        raise BadRow(key, f"expected a string, got {type(v).__name__} (or a list of {{role, content}} messages)")
    if not allow_empty and not v.strip():
        raise BadRow(key, "empty")
    return v


def _content(m: dict, where: str) -> str | None:
    """A message's text: a string, or text-only content parts joined (None when absent)."""
    c = m.get("content", m.get("value"))
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list):
        out = []
        for j, part in enumerate(c):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRow(f"{where}.content[{j}]", f"content part of type {kind!r}: only text parts are "
                                                      "supported (a text model)")
        return "".join(out)
    raise BadRow(f"{where}.content", f"expected a string or a list of text parts, got {type(c).__name__}")


def _message(m: Any, where: str) -> dict:
    """One message as ``{"role", "content", ...}`` (ShareGPT ``from``/``value`` mapped, None-valued keys dropped,
    ``tool_calls``, ``name``, ``tool_call_id`` and other keys kept for the chat template)."""
    if not isinstance(m, dict):
        raise BadRow(where, f"expected a message object, got {type(m).__name__}")
    role = m.get("role", m.get("from"))
    if role not in _ROLE:
        raise BadRow(where, f"unknown role {role!r} (expected one of system, user, assistant, tool)")
    out = {k: v for k, v in m.items() if k not in ("from", "value", "role", "content") and v is not None}
    content = _content(m, where)
    if out.get("tool_calls") is not None and not isinstance(out["tool_calls"], list):
        raise BadRow(f"{where}.tool_calls", f"expected a list, got {type(out['tool_calls']).__name__}")
    if content is None and not out.get("tool_calls"):
        raise BadRow(where, "a message without 'content'" + (" or 'tool_calls'" if _ROLE[role] == "assistant" else ""))
    msg = {"role": _ROLE[role]}
    if content is not None:
        msg["content"] = content
    msg.update(out)
    return msg


def _messages(row: dict, key: str) -> list[dict]:
    conv = row.get(key)
    if conv is None:
        raise BadRow(key, "missing")
    if isinstance(conv, dict):
        conv = [conv]
    if not isinstance(conv, list) or not conv:
        raise BadRow(key, f"expected a non-empty list of messages, got {type(conv).__name__}")
    return [_message(m, f"{key}[{i}]") for i, m in enumerate(conv)]


def _field(row: dict, key: str) -> str | list[dict]:
    """A string field, or a conversation (list of messages, or one message dict)."""
    if is_conversational(row.get(key)):
        return _messages(row, key)
    return _text(row, key)


def _response(row: dict, key: str) -> str | list[dict]:
    """A response field: a string, or a conversation; one plain assistant message (LLaMA-Factory's sharegpt
    ``{"from": "gpt", "value": ...}``) is kept as its text, which after a conversational prompt means the same."""
    v = _field(row, key)
    if isinstance(v, list) and len(v) == 1 and v[0]["role"] == "assistant" and set(v[0]) == {"role", "content"}:
        return v[0]["content"]
    return v


def _as_messages(value: str | list[dict], role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)``: the longest common prefix of ``chosen`` and ``rejected`` (strings or message
    lists) split off as the prompt, exactly as ``trl.data_utils.extract_prompt`` (TRL 1.16) does it, including its
    quirks: a space before the divergence stays with the responses, and when one is a prefix of the other the
    prefix stops one item short. (One deliberate difference: responses that differ from their first item give no
    prompt, where TRL's ``chosen[idx - 1]`` would look at the last character.)"""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":  # TRL: remove the space before the prompt's end
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _implicit(row: dict) -> dict:
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRow("rejected", "chosen and rejected must both be strings or both be message lists")
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise BadRow("chosen", "chosen and rejected share no prefix, so there is no implicit prompt (give the "
                               "prompt in a 'prompt' field)")
    for key, v in (("chosen", chosen), ("rejected", rejected)):
        if not v:
            raise BadRow(key, "empty after the implicit prompt is taken off")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _with_prompt(row: dict, keys: tuple[str, ...]) -> dict:
    """``prompt`` plus the response ``keys``; a string response after a conversational prompt is an assistant
    message (LLaMA-Factory style), a message list after a string prompt is refused (TRL's
    ``maybe_extract_prompt`` handles that case for pairs); one message dict is its text."""
    prompt = _field(row, "prompt")
    ex: dict = {"prompt": prompt}
    for k in keys:
        v = _response(row, k)
        if not isinstance(prompt, list) and isinstance(row.get(k), list) and is_conversational(row[k]):
            raise BadRow(k, f"a message list after a string prompt: give prompt and {k} both as strings or both "
                            "as message lists")
        ex[k] = v
    return ex


def _canonical(row: dict, fmt: str) -> dict:
    """The row as TRL's field names hold it (``prompt``, ``chosen``, ``rejected``, ``completion``, ``label``,
    ``messages``, ``text``), each a string or a message list, with an implicit prompt extracted. The example is
    conversational when its prompt is a message list (its string responses are then assistant messages) or when it
    has ``chat: True`` (alpaca: the string prompt is one user message)."""
    if fmt == "sharegpt":
        conv = _messages(row, "conversations")
        if "chosen" not in row and "rejected" not in row:
            return {"messages": conv}
        return {"prompt": conv, "chosen": _response(row, "chosen"), "rejected": _response(row, "rejected")}
    if fmt == "alpaca":
        inst = _text(row, "instruction")
        extra = _text(row, "input", allow_empty=True) if row.get("input") is not None else ""
        return {"prompt": inst + ("\n\n" + extra if extra.strip() else ""), "completion": _text(row, "output"),
                "chat": True}
    if fmt == "unpaired":
        if "messages" in row and "prompt" not in row and "completion" not in row:
            msgs = _messages(row, "messages")
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise BadRow("messages", "expected a conversation ending with the assistant's completion")
            if not (msgs[-1].get("content") or "").strip() and not msgs[-1].get("tool_calls"):
                raise BadRow("messages", "empty completion")
            last = msgs[-1]
            ex = {"prompt": msgs[:-1], "completion": last["content"] if set(last) == {"role", "content"} else [last]}
        else:
            ex = _with_prompt(row, ("completion",))
        if "label" not in row or row["label"] is None:
            raise BadRow("label", "missing")
        if not isinstance(row["label"], bool):
            raise BadRow("label", f"expected true or false, got {row['label']!r}")
        ex["label"] = row["label"]
        return ex
    if fmt == "preference":
        # TRL's maybe_extract_prompt: a string prompt next to conversational pairs is not their prompt
        if not is_conversational(row.get("prompt")) and any(
                isinstance(row.get(k), list) and is_conversational(row[k]) for k in ("chosen", "rejected")):
            return _implicit(row)
        return _with_prompt(row, ("chosen", "rejected"))
    if fmt == "implicit":
        return _implicit(row)
    if fmt == "prompt_completion":
        return _with_prompt(row, ("completion",))
    if fmt == "messages":
        return {"messages": _messages(row, "messages")}
    if fmt == "text":
        return {"text": _text(row, "text")}
    if fmt == "prompt":
        return {"prompt": _field(row, "prompt")}
    raise BadRow("<row>", f"unknown format {fmt!r}")


def _template_extras(row: dict) -> dict:
    """``tools`` (a list, or its JSON string as TRL accepts) and ``chat_template_kwargs`` of a row."""
    out = {}
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRow("tools", f"not valid JSON: {e.msg}") from None
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRow("tools", f"expected a list of tool schemas, got {type(tools).__name__}")
        if tools:
            out["tools"] = tools
    kw = row.get("chat_template_kwargs")
    if kw is not None:
        if not isinstance(kw, dict):
            raise BadRow("chat_template_kwargs", f"expected an object, got {type(kw).__name__}")
        out["template_kwargs"] = kw
    return out


def normalise_all(row: Any, kind: str, fmt: str = "auto") -> list[dict]:
    """The canonical examples of a raw ``row`` for an algorithm reading ``kind`` rows (sft, preference, kto,
    prompt): one, or two for a preference pair read by kto. Raises :class:`BadRow` naming the field; a format the
    kind cannot use names the formats it accepts."""
    if not isinstance(row, dict):
        raise BadRow("<row>", f"expected a JSON object, got {type(row).__name__}")
    if kind not in ACCEPTED:
        raise ValueError(f"normalise: unknown kind {kind!r}")
    try:
        found = detect_format(row)
    except BadRow as e:
        raise BadRow(e.field, f"{e.msg}; {accepted_formats(kind)}") from None
    if fmt != "auto" and found not in _FORCED.get(fmt, ()):
        raise BadRow("<row>", f"data.format={fmt} but the fields {sorted(row)} are a {FORMATS[found]} row "
                              "(data.format=auto detects it)")
    if found not in ACCEPTED[kind]:
        raise BadRow("<row>", f"a {FORMATS[found]} row cannot be used here; {accepted_formats(kind)}")
    ex = _canonical(row, found)
    extras = _template_extras(row)
    if kind == "preference" and row.get("margin") is not None:  # TRL's RewardTrainer margin column
        m = row["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise BadRow("margin", f"expected a finite number, got {m!r}")
        extras["margin"] = float(m)
    if kind == "kto" and "chosen" in ex:  # TRL's unpair_preference_dataset
        return [{"prompt": ex["prompt"], "completion": ex[k], "label": k == "chosen", **extras}
                for k in ("chosen", "rejected")]
    return [{**_to_kind(ex, kind), **extras}]


def normalise(row: Any, kind: str, fmt: str = "auto") -> dict:
    """The one canonical example of ``row`` for ``kind`` (see :func:`normalise_all`; a pair read as kto, which
    gives two, is refused here)."""
    out = normalise_all(row, kind, fmt)
    if len(out) != 1:
        raise BadRow("<row>", "a preference pair gives two KTO examples: use normalise_all")
    return out[0]


def _to_kind(ex: dict, kind: str) -> dict:
    chat = {"chat": True} if ex.get("chat") else {}
    if kind == "prompt":
        if "prompt" in ex:
            return {"prompt": ex["prompt"], **chat}
        msgs = ex["messages"]
        end = len(msgs)
        while end and msgs[end - 1]["role"] == "assistant":
            end -= 1
        if not end:
            raise BadRow("messages", "no prompt: every message is the assistant's")
        return {"prompt": msgs[:end]}
    if kind == "sft":
        if "text" in ex:
            return {"text": ex["text"]}
        if "messages" in ex:
            msgs = ex["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None or last == 0:
                raise BadRow("messages", "expected a conversation with an assistant turn after the first message")
            if last != len(msgs) - 1:
                raise BadRow("messages", f"expected the conversation to end with an assistant turn, got "
                                         f"{msgs[-1]['role']!r}")
            return {"messages": msgs}
        response = "chosen" if "chosen" in ex else "completion"
        if response == "completion" and not ex.get("label", True):
            raise BadRow("label", "an undesirable (label=false) example cannot be used for SFT")
        # conversational: only the assistant turns of the completion are trained (TRL's assistant_only_loss)
        return {"prompt": ex["prompt"], "completion": ex[response], **chat, "assistant_only_loss": True}
    if kind == "preference":
        for key in ("chosen", "rejected"):
            if key not in ex:
                raise BadRow(key, f"missing; {accepted_formats(kind)}")
        return ex
    if kind == "kto":
        if "label" not in ex:
            raise BadRow("label", f"missing; {accepted_formats(kind)}")
        return ex
    raise ValueError(f"normalise: unknown kind {kind!r}")


# ------------------------------------------------------------------------------------------------- tokenising

def common_prefix_length(ids: list, other: list) -> int:
    """Leading items ``ids`` and ``other`` have in common (TRL's ``common_prefix_length``, also used on strings)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _plain(messages: list[dict], tools: list | None, add_generation_prompt: bool,
           continue_final_message: bool) -> str:
    """``data.chat_template=none``: one ``role: content`` line per message (tool calls as JSON after the content,
    the tool schemas as a first ``tools:`` line), then ``assistant: `` for a generation prompt."""
    lines = [f"tools: {json.dumps(tools)}\n"] if tools else []
    for m in messages:
        calls = f" {json.dumps(m['tool_calls'])}" if m.get("tool_calls") else ""
        lines.append(f"{m['role']}: {m.get('content', '')}{calls}\n")
    if continue_final_message and lines:
        lines[-1] = lines[-1][:-1]
    return "".join(lines) + ("assistant: " if add_generation_prompt else "")


@dataclass
class Tokenization:
    """How rows become token ids (the ``data`` config plus the tokenizer), as TRL's trainers tokenise them (see the
    module docstring)."""

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
            return getattr(self.tokenizer, "chat_template", None) or None
        return self.chat_template

    def render(self, messages: list[dict], *, tools: list | None = None, template_kwargs: dict | None = None,
               add_generation_prompt: bool = False, continue_final_message: bool = False,
               field: str = "prompt") -> str:
        """The text of a conversation under the chat template (``data.chat_template``). Raises :class:`BadRow` on
        ``field`` when there is no template (``auto`` and a tokenizer without one) or the template fails."""
        tmpl = self._template()
        if tmpl is None:
            if self.chat_template != "none":
                raise BadRow(field, f"a conversational row needs a chat template and the tokenizer "
                                    f"({type(self.tokenizer).__name__}) has none: set data.chat_template to a Jinja "
                                    "template, or to none to join the messages as 'role: content' lines")
            return _plain(messages, tools, add_generation_prompt, continue_final_message)
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=tmpl, tools=tools or None, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                **(template_kwargs or {}))
        except Exception as e:  # noqa: BLE001  (jinja and the template's own raise_exception: many types)
            raise BadRow(field, f"the chat template failed on this row: {' '.join(str(e).split())}") from None

    def render_prompt(self, prompt: list[dict], field: str = "prompt", **kw) -> str:
        """A conversational prompt with TRL's rule: the generation prompt after a user/tool/system turn, the final
        message continued after an assistant one."""
        last_assistant = prompt[-1]["role"] == "assistant"
        return self.render(prompt, add_generation_prompt=not last_assistant, continue_final_message=last_assistant,
                           field=field, **kw)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Ids of ``text``; ``special``: with the tokenizer's special tokens (e.g. BOS), as TRL tokenises standard
        text (``tokenizer(text)``); chat-templated text never gets them (the template writes its own)."""
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def _eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def _split(self, prompt: str | list[dict], responses: dict, kw: dict) -> tuple[list[int], dict[str, list[int]]]:
        """Prompt ids and each response's ids (TRL's DPO / KTO / SFT tokenisation): the prompt and every prompt +
        response are tokenised whole; the responses start where the prompt's tokens and theirs first differ."""
        if isinstance(prompt, list):
            p = self.encode(self.render_prompt(prompt, **kw))
            fulls = {k: self.encode(self.render(prompt + r, field=k, **kw)) for k, r in responses.items()}
            if self._template() is None:  # 'role: content' lines have no end-of-turn token
                fulls = {k: self._eos(v) for k, v in fulls.items()}
        else:
            p = self.encode(prompt, special=True)
            fulls = {k: self._eos(self.encode(prompt + r, special=True)) for k, r in responses.items()}
        n = min((common_prefix_length(p, f) for f in fulls.values()), default=len(p))
        return p[:n], {k: f[n:] for k, f in fulls.items()}

    def _conversation(self, msgs: list[dict], split: int, train_from: int, kw: dict
                      ) -> tuple[list[int], list[int], list[int]]:
        """``(prompt_ids, completion_ids, loss_mask)`` of a conversation for SFT: the whole conversation tokenised
        once; ``loss_mask`` is 1 on the tokens of every assistant turn at or after message ``train_from`` (TRL's
        ``assistant_only_loss``), from the turn's generation prompt to the end of its rendering; the completion
        starts at message ``split``. A turn's token boundaries are where the tokens of the text before it and of the
        whole conversation first differ (TRL's rule for the prompt / completion boundary)."""
        full = self.render(msgs, field="messages", **kw)
        ids = self.encode(full)
        if self._template() is None:
            ids = self._eos(ids)

        def tok_at(c: int) -> int:
            return len(ids) if c >= len(full) else common_prefix_length(self.encode(full[:c]), ids)

        starts: dict[int, int] = {}

        def start_of(i: int) -> int:
            if i in starts:
                return starts[i]
            try:
                head = self.render(msgs[:i], add_generation_prompt=True, field="messages", **kw)
            except BadRow:
                if i:
                    raise
                head = ""  # a conversation opening with the assistant: some templates cannot render no messages
            starts[i] = tok_at(common_prefix_length(head, full))
            return starts[i]

        mask = [0] * len(ids)
        for i, m in enumerate(msgs):
            if i < train_from or m["role"] != "assistant":
                continue
            upto = full if i == len(msgs) - 1 else self.render(msgs[:i + 1], field="messages", **kw)
            if not full.startswith(upto):
                raise BadRow("messages", f"the chat template renders messages 0..{i} differently alone than at the "
                                         "start of the whole conversation (it rewrites earlier turns), so the "
                                         "assistant's tokens cannot be told apart; use a template that renders "
                                         "turns incrementally (data.chat_template)")
            s, e = start_of(i), tok_at(len(upto))
            mask[s:e] = [1] * (e - s)
        n = start_of(split)
        return ids[:n], ids[n:], mask

    def example(self, ex: dict) -> dict:
        """Token ids of a canonical example (:func:`normalise`): ``prompt_ids`` and ``chosen_ids``/``rejected_ids``
        or ``completion_ids`` (+ ``label``, + ``loss_mask`` over prompt + completion when SFT trains other tokens
        than the completion's: ``messages``, or ``assistant_only_loss`` on a conversational row). Raises
        :class:`BadRow` on empty or over-long rows."""
        kw = {k: ex[k] for k in ("tools", "template_kwargs") if k in ex}
        mask = None
        fields = {"prompt": "prompt"}
        chat = "prompt" in ex and (isinstance(ex["prompt"], list) or bool(ex.get("chat")))
        if "messages" in ex:  # SFT on every assistant turn; the completion is the last one
            msgs = ex["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt_ids, comp, mask = self._conversation(msgs, last, 0, kw)
            responses = {"completion": comp}
            fields = {"prompt": "messages", "completion": "messages"}
        elif chat and ex.get("assistant_only_loss"):  # SFT on the assistant turns of the completion
            msgs = _as_messages(ex["prompt"], "user")
            prompt_ids, comp, mask = self._conversation(msgs + _as_messages(ex["completion"], "assistant"),
                                                        len(msgs), len(msgs), kw)
            responses = {"completion": comp}
        elif "text" in ex:
            ids = self._eos(self.encode(ex["text"], special=True))
            if len(ids) < 2:
                raise BadRow("text", "fewer than two tokens: nothing to predict")
            prompt_ids, responses = ids[:1], {"completion": ids[1:]}  # every token after the first is trained
            fields = {"prompt": "text", "completion": "text"}
        else:
            p = _as_messages(ex["prompt"], "user") if chat else ex["prompt"]
            rs = {k: _as_messages(ex[k], "assistant") if chat else ex[k]
                  for k in ("chosen", "rejected", "completion") if k in ex}
            if rs:
                prompt_ids, responses = self._split(p, rs, kw)
            else:  # prompt only (on-line algorithms)
                prompt_ids = self.encode(self.render_prompt(p, **kw)) if chat else self.encode(p, special=True)
                responses = {}
        pf = fields["prompt"]
        if not prompt_ids:
            raise BadRow(pf, "empty")
        if len(prompt_ids) > self.max_prompt_length:
            if self.truncation != "truncate":
                raise BadRow(pf, f"{len(prompt_ids)} tokens > data.max_prompt_length={self.max_prompt_length}"
                                 " (set data.truncation=truncate to cut it)")
            cut = len(prompt_ids) - self.max_prompt_length
            prompt_ids = prompt_ids[cut:]
            mask = mask[cut:] if mask is not None else None
        budget = self.max_length - len(prompt_ids)
        out: dict = {}
        for k, ids in responses.items():
            f = fields.get(k, k)
            if not ids:
                raise BadRow(f, f"no {k} tokens after the prompt's")
            if len(ids) > budget:
                if self.truncation != "truncate":
                    raise BadRow(f, f"prompt + {k} = {len(prompt_ids) + len(ids)} tokens > data.max_length="
                                    f"{self.max_length} (set data.truncation=truncate to cut it)")
                ids = ids[:budget]
            out[f"{k}_ids"] = ids
        out["prompt_ids"] = prompt_ids
        if mask is not None:
            mask = mask[:len(prompt_ids) + len(out["completion_ids"])]
            if not any(mask):
                raise BadRow("messages", "no assistant token is left to train on after truncation")
            if mask != [0] * len(prompt_ids) + [1] * len(out["completion_ids"]):
                out["loss_mask"] = mask
        if "label" in ex:
            out["label"] = ex["label"]
        if "margin" in ex:  # a preference row's margin (TRL's RewardTrainer column; the rm algorithm reads it)
            out["margin"] = ex["margin"]
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
    """Tokenised examples of every row of ``paths`` (or of ``rows_override``; a preference pair read by kto gives
    two), each with ``source`` (``"file:row"``) and ``row`` (the raw row, for on-line algorithms' answers).

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
                exs = [tok.example(ex) for ex in normalise_all(row, kind, fmt)]
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
            for ex in exs:  # two for a pair read by kto
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
