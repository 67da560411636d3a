"""Data: every bad-input case stops before training with file, row and field named (and no traceback from the
CLI), ``on_bad_row=skip`` counts and logs, every reader and format works, and collation shifts targets right."""

import json

import pytest
import torch

from fastpref.data.collate import collate_preference, pad_sequences
from fastpref.data.dataset import (DataError, LoadReport, Tokenization, load_examples, normalise, read_rows,
                                   split_examples)
from fastpref.data.tokenizer import CharTokenizer
from fastpref.train.cli import main

TOK = Tokenization(CharTokenizer(), max_length=64, max_prompt_length=32)
GOOD = {"prompt": "abc>", "chosen": "def", "rejected": "xyz"}


def _write(tmp_path, rows, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(rows))
    return str(p)


BAD_CASES = [
    ("missing field", {"prompt": "abc>", "chosen": "def"}, "field 'rejected': missing"),
    ("empty response", {"prompt": "abc>", "chosen": "  ", "rejected": "x"}, "field 'chosen': empty"),
    ("wrong type", {"prompt": "abc>", "chosen": 5, "rejected": "x"}, "field 'chosen': expected a string, got int"),
    ("prompt too long", {"prompt": "a" * 40, "chosen": "d", "rejected": "x"},
     "field 'prompt': 40 tokens > data.max_prompt_length=32"),
    ("response too long", {"prompt": "ab", "chosen": "d" * 70, "rejected": "x"}, "field 'chosen': prompt + chosen"),
    ("not an object", ["abc", "def"], "field '<row>': expected a JSON object, got list"),
]


@pytest.mark.parametrize("name, bad, needle", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_row_names_file_row_field(tmp_path, name, bad, needle):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        load_examples([path], "preference", TOK)
    assert f"{path}: row 2: " in str(e.value) and needle in str(e.value)
    report = LoadReport()
    ex = load_examples([path], "preference", TOK, on_bad_row="skip", report=report)
    assert len(ex) == 3 and report.skipped == 1 and report.rows == 4 and needle in report.reasons[0]


def test_truncation_keeps_prompt_end_and_response_start():
    tok = Tokenization(CharTokenizer(), max_length=10, max_prompt_length=4, truncation="truncate")
    ex = tok.example(normalise({"prompt": "abcdefg", "chosen": "0123456789", "rejected": "x"}, "preference"))
    c = CharTokenizer()
    assert ex["prompt_ids"] == c.encode("defg")
    assert ex["chosen_ids"] == c.encode("012345")  # 10 - 4 tokens, EOS cut
    assert ex["rejected_ids"] == c.encode("x") + [c.eos_token_id]


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a JSON list of rows"),
])
def test_file_that_is_not_json(tmp_path, content, needle):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(DataError, match=needle) as e:
        read_rows(str(p))
    assert str(p) in str(e.value)
    q = tmp_path / "bad.jsonl"
    q.write_text(json.dumps(GOOD) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"line 3 \(row 1\): not valid JSON"):
        read_rows(str(q))
    with pytest.raises(DataError, match="no such file"):
        read_rows(str(tmp_path / "nope.json"))


def test_kto_label_type(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "b", "label": "yes"}]
    with pytest.raises(DataError, match=r"row 1: field 'label': expected true or false"):
        load_examples([_write(tmp_path, rows)], "kto", TOK)


@pytest.mark.parametrize("args, needle", [
    (["data.train_files=[{f}]"], "row 2: field 'rejected': missing"),
    (["data.train_files=[{f}]", "data.max_prompt_length=3"], "row 0: field 'prompt': 4 tokens"),
])
def test_cli_stops_before_training_without_traceback(tmp_path, capsys, args, needle):
    path = _write(tmp_path, [GOOD, GOOD, {"prompt": "abc>", "chosen": "d"}, GOOD])
    out_dir = tmp_path / "run"
    rc = main([a.format(f=path) for a in args] + [f"output_dir={out_dir}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastpref: error: ") and needle in err and path in err
    assert "Traceback" not in err
    assert not (out_dir / "checkpoints").exists() and not (out_dir / "metrics.jsonl").exists()


def test_readers_jsonl_parquet_and_saved_dataset(tmp_path):
    rows = [GOOD, {"prompt": "q>", "chosen": "r", "rejected": "s"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_rows(str(jl)) == rows
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    assert read_rows(str(tmp_path / "d.parquet")) == rows
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert read_rows(str(tmp_path / "ds")) == rows


def test_bundled_example_formats():
    sharegpt = read_rows("examples/data/dpo_en_demo.json")
    ex = normalise(sharegpt[0], "preference")
    assert ex["prompt"][0]["role"] == "user" and ex["chosen"] == sharegpt[0]["chosen"]["value"]
    kto = read_rows("examples/data/kto_en_demo.json")
    ex = normalise(kto[0], "kto")
    assert ex["completion"] == kto[0]["messages"][-1]["content"] and ex["label"] == kto[0]["label"]
    alpaca = read_rows("examples/data/alpaca_en_demo.json")
    ex = normalise(alpaca[0], "sft")
    assert ex["completion"] == alpaca[0]["output"] and ex["prompt"].startswith(alpaca[0]["instruction"])
    with pytest.raises(Exception, match="chosen"):
        normalise(alpaca[0], "preference")


def test_collate_targets_are_shifted_response_tokens():
    c = CharTokenizer()
    exs = [TOK.example(normalise(GOOD, "preference")),
           TOK.example(normalise({"prompt": "q>", "chosen": "rs", "rejected": "tuvw"}, "preference"))]
    b = collate_preference(exs, c.pad_token_id)
    assert b.input_ids.shape[0] == 4
    for row, (e, key) in enumerate([(exs[0], "chosen_ids"), (exs[1], "chosen_ids"), (exs[0], "rejected_ids"),
                                    (exs[1], "rejected_ids")]):
        full = e["prompt_ids"] + e[key]
        assert b.input_ids[row, :len(full)].tolist() == full
        assert int(b.attention_mask[row].sum()) == len(full)
        # independent: position t predicts full[t+1]; scored iff t+1 is a response position
        want = [full[t + 1] if t + 1 >= len(e["prompt_ids"]) and t + 1 < len(full) else -100
                for t in range(b.targets.shape[1])]
        assert b.targets[row].tolist() == want
    with pytest.raises(ValueError, match="empty batch"):
        pad_sequences([], 0)


def test_split_is_seeded_and_disjoint():
    exs = [{"i": i} for i in range(50)]
    a, b = split_examples(exs, 0.2, seed=3)
    a2, b2 = split_examples(exs, 0.2, seed=3)
    assert len(b) == 10 and a == a2 and b == b2
    assert {e["i"] for e in a}.isdisjoint({e["i"] for e in b})


def test_char_tokenizer_round_trip(tmp_path):
    c = CharTokenizer()
    ids = c.encode("Hi there\n~")
    assert c.decode(ids + [c.eos_token_id]) == "Hi there\n~"
    assert c.encode("é") == [c.unk_token_id]
    c.save_pretrained(str(tmp_path))
    assert CharTokenizer.from_pretrained(str(tmp_path)).encode("abc") == c.encode("abc")
    assert torch.tensor(ids).max() < c.vocab_size
