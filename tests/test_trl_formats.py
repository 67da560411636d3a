"""fastpref's trainer reads every TRL dataset type (TRL 1.16, ``trl.data_utils``): one small JSONL file per format,
loaded for each algorithm kind that uses it, with token ids equal to TRL's own pipeline for the same row
(``maybe_extract_prompt`` -> ``maybe_apply_chat_template`` -> the tokenizer, split at the common prefix as TRL's
trainers do), SFT masks equal to TRL's ``assistant_only_loss`` masks (the chat template's ``{% generation %}``
spans), implicit prompts equal to ``trl.extract_prompt``, and refusals that name file:row and the accepted
formats.

The tokenizer is a tiny offline ``PreTrainedTokenizerFast``: one token per character, ChatML-style special tokens,
a BOS post-processor (so standard rows must get special tokens and templated ones must not, as in TRL) and a chat
template with tools, tool calls, content parts and generation markers.
"""

import json

import pytest
import torch

tdu = pytest.importorskip("trl.data_utils")
pytest.importorskip("tokenizers")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from fastpref.data.collate import collate_single  # noqa: E402
from fastpref.data.dataset import (ACCEPTED, FORMATS, DataError, Tokenization, extract_prompt,  # noqa: E402
                                   load_examples, normalise, read_rows)
from fastpref.data.tokenizer import CharTokenizer  # noqa: E402

CONTENT = ("{% if m.content is string %}{{ m.content }}{% elif m.content %}{% for p in m.content %}{{ p.text }}"
           "{% endfor %}{% endif %}")
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}" + CONTENT +
    "{% if m.tool_calls %}<tool_call>{{ m.tool_calls | tojson }}</tool_call>{% endif %}<|im_end|>\n"
    "{% endgeneration %}{% else %}" + CONTENT + "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer() -> PreTrainedTokenizerFast:
    special = ["<pad>", "<eos>", "<unk>", "<bos>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  bos_token="<bos>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = TEMPLATE
    return tok


TOK = _tokenizer()
TZ = Tokenization(TOK, max_length=1024, max_prompt_length=512)


def U(text):  # noqa: N802
    return {"role": "user", "content": text}


def A(text, **kw):  # noqa: N802
    return {"role": "assistant", "content": text, **kw}


CALL = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]

# (format id, row)
ROWS = {
    "text": {"text": "The sky is blue."},
    "messages": {"messages": [U("hi"), A("A1"), U("more"), A("A2")]},
    "messages_tools": {"messages": [U("2+3?"), A("", tool_calls=CALL), {"role": "tool", "content": "5"}, A("It is 5.")],
                       "tools": TOOLS},
    "messages_parts": {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                    {"role": "user", "content": [{"type": "text", "text": "Sky"},
                                                                 {"type": "text", "text": " colour?"}]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]},
    "prompt": {"prompt": "The sky is"},
    "prompt_conv": {"prompt": [U("What colour is the sky?")]},
    "prompt_completion": {"prompt": "The sky is", "completion": " blue."},
    "prompt_completion_conv": {"prompt": [U("What colour is the sky?")], "completion": [A("It is blue.")]},
    "preference": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "preference_conv": {"prompt": [U("What colour is the sky?")], "chosen": [A("It is blue.")],
                        "rejected": [A("It is green.")]},
    "implicit": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "implicit_conv": {"chosen": [U("What colour is the sky?"), A("It is blue.")],
                      "rejected": [U("What colour is the sky?"), A("It is green.")]},
    "unpaired": {"prompt": "The sky is", "completion": " blue.", "label": True},
    "unpaired_conv": {"prompt": [U("What colour is the sky?")], "completion": [A("It is green.")], "label": True},
}

# which kinds read which rows (True: loads; False: refused with the accepted formats)
USE = {
    "sft": {"text", "messages", "messages_tools", "messages_parts", "prompt_completion", "prompt_completion_conv",
            "preference", "preference_conv", "implicit", "implicit_conv", "unpaired", "unpaired_conv"},
    "preference": {"preference", "preference_conv", "implicit", "implicit_conv"},
    "kto": {"unpaired", "unpaired_conv", "preference", "preference_conv", "implicit", "implicit_conv"},
    "prompt": {"prompt", "prompt_conv", "prompt_completion", "prompt_completion_conv", "preference",
               "preference_conv", "implicit", "implicit_conv", "unpaired", "unpaired_conv", "messages",
               "messages_tools", "messages_parts"},
}


def _write(tmp_path, name, rows):
    p = tmp_path / f"{name}.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


# ---------------------------------------------------------------------------------------- TRL's pipeline

def trl_ids(row: dict, kind: str) -> list[dict]:
    """What TRL 1.16's trainers make of ``row`` (DPO / KTO / SFT / GRPO prompts), from TRL's public functions:
    ``maybe_extract_prompt`` (pairs), unpairing (KTO), ``maybe_apply_chat_template`` with the row's tools, EOS text
    on standard responses, then the prompt and prompt + response tokenised whole (special tokens only for standard
    text) and split at ``common_prefix_length``."""
    tools = row.get("tools")
    ex = {k: v for k, v in row.items() if k != "tools"}
    if "chosen" in ex:
        ex = tdu.maybe_extract_prompt(ex)
    if kind == "prompt":
        if "messages" in ex:
            ex = {"prompt": ex["messages"][:-1]}
        ex = {"prompt": ex["prompt"]}
    if kind == "sft" and "prompt" in ex:  # SFT reads the chosen / desirable response
        ex = {"prompt": ex["prompt"], "completion": ex.get("chosen", ex.get("completion"))}
    exs = ([{"prompt": ex["prompt"], "completion": ex[k], "label": k == "chosen"} for k in ("chosen", "rejected")]
           if kind == "kto" and "chosen" in ex else [ex])
    out = []
    for e in exs:
        conv = tdu.is_conversational(e)
        t = tdu.maybe_apply_chat_template(e, TOK, tools=tools)
        eos = "" if conv else TOK.eos_token
        if "text" in t:  # language modeling
            out.append({"ids": TOK(t["text"] + eos, add_special_tokens=not conv)["input_ids"]})
            continue
        p = TOK(t["prompt"], add_special_tokens=not conv)["input_ids"]
        fulls = {k: TOK(t["prompt"] + t[k] + eos, add_special_tokens=not conv)["input_ids"]
                 for k in ("chosen", "rejected", "completion") if k in t}
        n = min((tdu.common_prefix_length(p, f) for f in fulls.values()), default=len(p))
        out.append({"prompt_ids": p[:n], **{f"{k}_ids": f[n:] for k, f in fulls.items()},
                    **({"label": e["label"]} if "label" in e else {})})
    return out


def trl_assistant_mask(messages, tools=None) -> list[int]:
    """TRL's ``assistant_only_loss`` mask: the template's ``{% generation %}`` spans, from transformers."""
    out = TOK.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(out["assistant_masks"])


# ------------------------------------------------------------------------------------------------ loading

CASES = [(kind, fid) for kind in USE for fid in ROWS]


@pytest.mark.parametrize("kind, fid", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_each_format_loads_as_trl_tokenises_it_or_is_refused(tmp_path, kind, fid):
    row = ROWS[fid]
    path = _write(tmp_path, fid, [row, row])
    if fid not in USE[kind]:
        with pytest.raises(DataError) as e:
            load_examples([path], kind, TZ)
        msg = str(e.value)
        assert msg.startswith(f"{path}: row 0: ") and "\n" not in msg
        for f in ACCEPTED[kind]:
            assert FORMATS[f] in msg, (f, msg)
        return
    got = load_examples([path], kind, TZ)
    assert [g["source"] for g in got] == [f"{path}:0"] * (len(got) // 2) + [f"{path}:1"] * (len(got) // 2)
    got = got[:len(got) // 2]
    want = trl_ids(row, kind)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if "ids" in w:  # language modeling: the whole sequence
            assert g["prompt_ids"] + g["completion_ids"] == w["ids"]
        else:
            for k, v in w.items():
                assert g[k] == v, (k, TOK.decode(g[k]), TOK.decode(v))
            assert {k for k in g if k.endswith("_ids")} == {k for k in w if k.endswith("_ids")}


def _trained(ex: dict) -> list[int]:
    """0/1 per token of prompt + completion: what SFT trains on."""
    n_p, n_c = len(ex["prompt_ids"]), len(ex["completion_ids"])
    return ex.get("loss_mask") or [0] * n_p + [1] * n_c


def _spans(ex: dict) -> list[str]:
    ids, mask = ex["prompt_ids"] + ex["completion_ids"], _trained(ex)
    spans, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            spans.append(TOK.decode(cur, skip_special_tokens=False))
            cur = []
    return spans


@pytest.mark.parametrize("fid, spans", [
    ("messages", ["A1<|im_end|>\n", "A2<|im_end|>\n"]),
    ("messages_tools", ['<tool_call>[{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]'
                        "</tool_call><|im_end|>\n", "It is 5.<|im_end|>\n"]),
    ("messages_parts", ["Blue.<|im_end|>\n"]),
    ("prompt_completion_conv", ["It is blue.<|im_end|>\n"]),
    ("preference_conv", ["It is blue.<|im_end|>\n"]),
    ("prompt_completion", [" blue.<eos>"]),
    ("text", ["The sky is blue.<eos>"]),  # every token after the first (the BOS)
])
def test_sft_trains_exactly_the_assistant_tokens(fid, spans):
    row = ROWS[fid]
    ex = TZ.example(normalise(row, "sft"))
    assert _spans(ex) == spans
    if "messages" in row:  # equal to TRL's assistant_only_loss mask on the same conversation
        assert _trained(ex) == trl_assistant_mask(row["messages"], row.get("tools"))
        # the completion is the last assistant turn (what spin / apo read as the gold response)
        assert TOK.decode(ex["completion_ids"], skip_special_tokens=False).endswith(spans[-1])


def test_sft_mask_survives_collation_padded_and_packed():
    exs = [TZ.example(normalise(ROWS[f], "sft")) for f in ("messages", "prompt_completion", "messages_tools")]
    for pack in (False, True):
        b = collate_single(exs, TOK.pad_token_id, pack=pack)
        if pack:
            starts = b.cu_seqlens_host
            rows = [b.targets[starts[i]:starts[i + 1]] for i in range(len(exs))]
        else:
            rows = [b.targets[i] for i in range(len(exs))]
        for ex, tg in zip(exs, rows):
            ids, mask = ex["prompt_ids"] + ex["completion_ids"], _trained(ex)
            want = [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
            assert tg[:len(ids)].tolist() == want


@pytest.mark.parametrize("fid", ["implicit", "implicit_conv"])
def test_implicit_prompt_is_trls_extract_prompt(fid):
    row = ROWS[fid]
    trl = tdu.extract_prompt(row)
    assert extract_prompt(row["chosen"], row["rejected"]) == (trl["prompt"], trl["chosen"], trl["rejected"])
    ex = normalise(row, "preference")
    assert ex["prompt"] == trl["prompt"]
    # a space before the divergence stays with the responses, and a prefix stops one short, as in TRL
    for c, r in [("Say it: yes", "Say it: no"), ("abc", "abcd"), ("ab cd", "ab ce")]:
        t = tdu.extract_prompt({"chosen": c, "rejected": r})
        assert extract_prompt(c, r) == (t["prompt"], t["chosen"], t["rejected"])


def test_string_prompt_is_used_as_is_and_conversations_need_a_template(tmp_path):
    # a plain-string prompt gets no chat template (TRL): the same ids with or without one on the tokenizer
    ex = TZ.example(normalise(ROWS["preference"], "preference"))
    assert ex["prompt_ids"] == TOK("The sky is")["input_ids"]
    # a conversational row and a tokenizer without a chat template: one line naming file, row and field
    path = _write(tmp_path, "conv", [ROWS["preference"], ROWS["preference_conv"]])
    char = Tokenization(CharTokenizer(), max_length=200, max_prompt_length=100)
    with pytest.raises(DataError) as e:
        load_examples([path], "preference", char)
    msg = str(e.value)
    assert msg.startswith(f"{path}: row 1: field 'prompt': a conversational row needs a chat template")
    assert "data.chat_template" in msg and "\n" not in msg
    # data.chat_template=none opts in to 'role: content' lines
    plain = Tokenization(CharTokenizer(), max_length=200, max_prompt_length=100, chat_template="none")
    ex = load_examples([path], "preference", plain)[1]
    c = CharTokenizer()
    assert c.decode(ex["prompt_ids"]) == "user: What colour is the sky?\nassistant: "
    assert ex["chosen_ids"] == c.encode("It is blue.\n") + [c.eos_token_id]


def test_kto_unpairs_preference_pairs_and_sft_refuses_undesirable_rows(tmp_path):
    path = _write(tmp_path, "pairs", [ROWS["preference"], ROWS["unpaired"]])
    ex = load_examples([path], "kto", TZ)
    assert [(e["source"][-1], e["label"]) for e in ex] == [("0", True), ("0", False), ("1", True)]
    assert ex[0]["prompt_ids"] == ex[1]["prompt_ids"] and ex[0]["completion_ids"] != ex[1]["completion_ids"]
    bad = _write(tmp_path, "undesirable", [{**ROWS["unpaired_conv"], "label": False}])
    with pytest.raises(DataError, match=r"row 0: field 'label': an undesirable \(label=false\) example"):
        load_examples([bad], "sft", TZ)


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "a", "completion": [A("b")]}, "field 'completion': a message list after a string prompt"),
    ({"chosen": "abc", "rejected": "xyz"}, "field 'chosen': chosen and rejected share no prefix"),
    ({"chosen": [U("q"), A("a")], "rejected": "q b"}, "field 'rejected': chosen and rejected must both be"),
    ({"messages": [U("q"), {"role": "robot", "content": "x"}]}, "field 'messages[1]': unknown role 'robot'"),
    ({"messages": [U("q"), A([{"type": "image_url", "image_url": "x"}])]},
     "field 'messages[1].content[0]': content part of type 'image_url'"),
    ({"messages": [U("q"), A("a"), U("again")]}, "field 'messages': expected the conversation to end with an "
                                                 "assistant turn"),
    ({"messages": [U("q"), A("a")], "tools": "{not json"}, "field 'tools': not valid JSON"),
    ({"foo": 1}, "field '<row>': cannot tell the format from the fields ['foo']; algorithm=apo/sft/spin accepts: language "
                  "modeling {text}; "),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, needle):
    path = _write(tmp_path, "bad", [ROWS["messages"], row])
    with pytest.raises(DataError) as e:
        load_examples([path], "sft", TZ)
    assert str(e.value).startswith(f"{path}: row 1: ") and needle in str(e.value), str(e.value)


def test_existing_demo_files_load_for_every_algorithm_that_reads_them():
    """examples/data keeps loading unchanged (the first rows of each; long demo rows are truncated)."""
    tz = Tokenization(TOK, max_length=512, max_prompt_length=256, truncation="truncate")
    cases = {"examples/data/dpo_en_demo.json": ("preference", "sft", "kto", "prompt"),
             "examples/data/kto_en_demo.json": ("kto", "prompt"),
             "examples/data/alpaca_en_demo.json": ("sft", "prompt"),
             "examples/data/arith_sft.jsonl": ("sft", "prompt"),
             "examples/data/arith_prompts.jsonl": ("prompt",)}
    for path, kinds in cases.items():
        rows = read_rows(path)[:12]
        for kind in kinds:
            ex = load_examples([], kind, tz, rows_override=rows, source_name=path)
            assert len(ex) >= len(rows) and all(e["prompt_ids"] for e in ex), (path, kind)
    # the sharegpt / alpaca rows are conversational (a user turn) and rendered with the template, as before
    ex = load_examples([], "sft", tz, rows_override=read_rows("examples/data/alpaca_en_demo.json")[:1])[0]
    assert TOK.decode(ex["prompt_ids"], skip_special_tokens=False).startswith("<|im_start|>user\n")
    c = CharTokenizer()
    ex = load_examples(["examples/data/arith_sft.jsonl"], "sft", Tokenization(c, 32, 16))[0]
    assert c.decode(ex["prompt_ids"]) == "1+4=" and ex["completion_ids"] == c.encode("5") + [c.eos_token_id]


def test_sft_on_conversations_trains_end_to_end(tmp_path):
    """The trainer runs SFT on multi-turn messages with the masks (tiny model, 'role: content' lines)."""
    from fastpref.train.cli import main

    rows = [{"messages": [U(f"q{i}"), A("ab"), U("more"), A("cd")]} for i in range(8)]
    path = _write(tmp_path, "chat", rows)
    out = tmp_path / "run"
    rc = main(["algorithm=sft", f"data.train_files=[{path}]", "data.chat_template=none", "data.eval_fraction=0",
               "train.max_steps=2", "train.batch_size=4", "train.plots=false", "train.cpu_threads=1",
               "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", f"output_dir={out}", "--quiet"])
    assert rc == 0
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs if r.get("phase") != "eval"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if "loss" in r)
