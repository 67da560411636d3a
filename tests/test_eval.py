"""``fastpref eval`` (fastpref.eval): preference accuracy / margin against an independent recomputation from the
model's own logits in fp64, win rate against a hand-built reward, KL, the JSON report, one-line errors, LoRA
``final/`` directories, and the URIAL / OPO baselines (golden prompts, BM25 retrieval, end-to-end runs)."""

from __future__ import annotations

import json

import pytest
import torch

from fastpref.eval import (BM25, OPO, EvalError, EvalOptions, cut_completion, evaluate, load_principles, load_urial,
                           main, urial_prompt, win_rate)

COMMON = ["algorithm=dpo", "train.max_steps=6", "train.batch_size=8", "data.synthetic_rows=80",
          "data.eval_fraction=0.1", "data.max_length=32", "data.max_prompt_length=16", "optim.lr=0.01",
          "train.cpu_threads=1", "train.plots=false", "train.log_every=3"]


def _train(out, extra=()):
    from fastpref.train.config import load_config
    from fastpref.train.trainer import train

    train(load_config(None, [f"output_dir={out}", *COMMON, *extra]), quiet=True)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("eval") / "run")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from fastpref.data.synthetic import make_pattern_pairs

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = make_pattern_pairs(6, seed=123)
    for r in rows:
        r["answer"] = r["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _own_logp(model, prompt: str, response: str, tok) -> float:
    """log p(response | prompt) from the model's own logits, fp64 (independent of the fused path)."""
    p, r = tok.encode(prompt), tok.encode(response) + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = logits.log_softmax(-1)
    return float(sum(lp[len(p) - 1 + i, t] for i, t in enumerate(r)))


def test_accuracy_and_margin_match_own_logits(run_dir, pairs_file):
    from fastpref.eval import load_causal_lm, load_run_start, load_tokenizer, run_config_of

    path, rows = pairs_file
    rep = evaluate(EvalOptions(model=str(run_dir), data=str(path), num_prompts=2, max_new_tokens=4))
    cfg = run_config_of(str(run_dir))
    tok = load_tokenizer(str(run_dir / "final"))
    pol, ref = load_causal_lm(str(run_dir), tok, cfg), load_run_start(cfg, tok)
    beta = cfg.sections[cfg.algorithm].beta
    ch = [beta * (_own_logp(pol, r["prompt"], r["chosen"], tok) - _own_logp(ref, r["prompt"], r["chosen"], tok))
          for r in rows]
    rj = [beta * (_own_logp(pol, r["prompt"], r["rejected"], tok) - _own_logp(ref, r["prompt"], r["rejected"], tok))
          for r in rows]
    p = rep["preference"]
    assert p["pairs"] == len(rows)
    assert p["accuracy"] == sum(c > r for c, r in zip(ch, rj)) / len(rows)
    assert p["margin"] == pytest.approx(sum(c - r for c, r in zip(ch, rj)) / len(rows), abs=1e-4)
    assert p["reward_chosen"] == pytest.approx(sum(ch) / len(ch), abs=1e-4)
    assert abs(p["margin"]) > 1e-3  # the trained policy is not its reference


def test_policy_against_itself_is_zero(run_dir, pairs_file):
    path, _ = pairs_file
    rep = evaluate(EvalOptions(model=str(run_dir), reference=str(run_dir / "final"), data=str(path), num_prompts=3,
                               max_new_tokens=4))
    assert rep["preference"]["accuracy"] == 0.0 and rep["preference"]["margin"] == 0.0
    assert rep["policy"]["kl_to_reference"] == 0.0


def test_win_rate_against_hand_built_reward(run_dir, pairs_file):
    path, _ = pairs_file
    calls = []

    def vowels(prompts, completions, **kw):  # hand-built: count of vowels in the completion
        calls.append(list(completions))
        return [float(sum(ch in "aeiou" for ch in c)) for c in completions]

    rep = evaluate(EvalOptions(model=str(run_dir), data=str(path), num_prompts=6, max_new_tokens=8, reward=vowels))
    pol, opp = calls
    a = [float(sum(ch in "aeiou" for ch in c)) for c in pol]
    b = [float(sum(ch in "aeiou" for ch in c)) for c in opp]
    expect = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)
    assert rep["win_rate"] == expect and rep["win_rate_pairs"] == 6 and rep["win_rate_left_out"] == 0
    assert rep["policy"]["mean_score"] == pytest.approx(sum(a) / 6)
    assert [s["policy"] for s in rep["samples"]] == pol[:3]


def test_chosen_match_reward():
    from fastpref.eval import chosen_match
    from fastpref.rewards import reward_columns

    assert chosen_match(["p>", "q>"], ["abc ", "abd"], chosen=["abc", "abc"]) == [1.0, 0.0]
    assert reward_columns(chosen_match) == ("chosen",)


def test_win_rate_rule():
    assert win_rate([1.0, 0.0, 2.0, None], [0.0, 0.0, 3.0, 1.0]) == (0.5, 3, 1)
    assert win_rate([None], [1.0]) == (None, 0, 1)


def test_reward_column_and_registered_reward(run_dir, pairs_file):
    path, _ = pairs_file
    rep = evaluate(EvalOptions(model=str(run_dir), data=str(path), num_prompts=4, max_new_tokens=4,
                               reward="exact_match"))
    assert rep["scorer"] == "exact_match" and 0.0 <= rep["win_rate"] <= 1.0


def test_cli_json_schema_and_markdown(run_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main([str(run_dir / "config.yaml"), "--num-prompts", "4", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| preference accuracy |" in printed and "| KL(policy || reference), nats/seq |" in printed
    rep = json.loads(out.read_text())
    assert set(rep) == {"model", "reference", "data", "mode", "beta", "preference", "win_rate", "scorer",
                        "generation", "policy", "opponent", "samples", "notes"}
    assert set(rep["preference"]) == {"pairs", "accuracy", "margin", "reward_chosen", "reward_rejected"}
    assert set(rep["policy"]) == {"mean_length", "kl_to_reference", "kl_stderr"}
    assert rep["preference"]["pairs"] == 8  # the run's held-out 10% of 80 rows
    assert rep["generation"]["prompts"] == 4 and rep["opponent"]["name"] == "reference"
    assert all(isinstance(rep["policy"][k], float) for k in rep["policy"])


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastpref: error: ") and "\n" not in err, err
    return err


def test_one_line_errors(run_dir, pairs_file, tmp_path, capsys):
    path, _ = pairs_file
    assert "no such directory" in _error(capsys, ["--model", str(tmp_path / "nope"), "--data", str(path)])
    assert "no such file" in _error(capsys, ["--model", str(run_dir), "--data", str(tmp_path / "x.jsonl")])
    assert "no such file" in _error(capsys, [str(tmp_path / "missing.yaml")])
    (tmp_path / "empty").mkdir()
    assert "not a model directory" in _error(capsys, ["--model", str(run_dir), "--reference", str(tmp_path / "empty"),
                                                      "--data", str(path)])
    # a reference with another vocabulary
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32)).save_pretrained(other)
    err = _error(capsys, ["--model", str(run_dir), "--reference", str(other), "--data", str(path)])
    assert "incompatible models" in err and "50" in err
    assert "no run config.yaml" in _error(capsys, ["--model", "tiny", "--data", str(path)])
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(capsys, ["--model", str(run_dir), "--data", str(path),
                                                          "--device", "cuda"])
    assert "exclude each other" in _error(capsys, ["--model", str(run_dir), "--data", str(path), "--reward",
                                                   "exact_match", "--judge", "tiny"])


def test_lora_final_dir_loads(tmp_path, pairs_file):
    path, _ = pairs_file
    run = _train(tmp_path / "lora", ["model.lora.enabled=true", "optim.lr=0.05"])
    assert (run / "final" / "adapter_config.json").exists()
    rep = evaluate(EvalOptions(model=str(run / "final"), data=str(path), num_prompts=2, max_new_tokens=4))
    assert abs(rep["preference"]["margin"]) > 1e-4  # adapters on vs off differ
    assert rep["notes"] == []


# ---------------------------------------------------------------------------------------- URIAL and OPO

def test_urial_prompt_golden():
    spec = {"instruction": "Be nice.", "examples": [{"query": "Q1?", "answer": "A1."}, {"query": "Q2", "answer": "A2"}]}
    assert urial_prompt(" Hi? ", spec) == (
        "# Instruction\n\nBe nice.\n\n"
        "# Query:\n```\nQ1?\n```\n\n# Answer:\n```\nA1.\n```\n\n"
        "# Query:\n```\nQ2\n```\n\n# Answer:\n```\nA2\n```\n\n"
        "# Query:\n```\nHi?\n```\n\n# Answer:\n```\n")
    assert cut_completion(" Sure!\n```\n\n# Query: more") == "Sure!"
    assert cut_completion("no stop") == "no stop"


def test_bundled_urial_spec():
    spec = load_urial()
    assert len(spec["examples"]) == 3
    assert spec["instruction"].startswith("Below is a list of conversations between a human and an AI assistant")
    text = urial_prompt("What is 2+2?", spec)
    assert text.startswith("# Instruction\n\nBelow is a list") and text.endswith("# Query:\n```\nWhat is 2+2?\n```"
                                                                                   "\n\n# Answer:\n```\n")
    assert text.isascii()  # the character tokenizer of the tiny model has no <unk> in it


def test_bm25_ranking_by_hand():
    docs = ["cats purr", "dogs bark loudly", "cats and dogs"]
    bm = BM25(docs, k1=1.5, b=0.75)
    # idf(cats) = ln(1 + (3 - 2 + .5) / (2 + .5)); doc 0 has length 2, avgdl = 7/3
    import math

    idf = math.log(1 + 1.5 / 2.5)
    tf = 1 * 2.5 / (1 + 1.5 * (1 - 0.75 + 0.75 * 2 / (7 / 3)))
    assert bm.scores("cats")[0] == pytest.approx(idf * tf)
    assert bm.top("cats", 2) == [0, 2]
    assert bm.top("bark dogs", 1) == [1]
    assert bm.top("dogs", 1) == [2]  # the shorter document wins a one-term tie of frequencies (b = 0.75)
    assert bm.top("zebra", 3) == []


def test_opo_retrieval_and_prompt():
    principles = load_principles()
    assert 20 <= len(principles) <= 50
    opo = OPO(principles, k=3)
    hits = opo.retrieve("How do I hack into my neighbour's wifi network account?")
    assert any("without the owner's permission" in h["text"] or "hacking" in h["text"] for h in hits)
    math_hits = [h["topic"] for h in opo.retrieve("Solve this arithmetic problem: 17 * 23, show the calculation")]
    assert math_hits[0] == "math"
    toy = OPO([{"id": "a", "text": "Always cite sources."}, {"id": "b", "text": "Use metric units."}], k=2)
    assert toy.prompt("What units for distance?") == (
        "Follow these principles when you answer.\n\nPrinciples:\n1. Use metric units.\n\n"
        "Question: What units for distance?\nAnswer:")
    assert toy.prompt("zzz") == "Question: zzz\nAnswer:"


@pytest.mark.parametrize("mode", ["urial", "opo"])
def test_modes_end_to_end(run_dir, pairs_file, mode, tmp_path):
    path, _ = pairs_file
    out = tmp_path / f"{mode}.json"
    assert main(["--model", str(run_dir), "--data", str(path), "--mode", mode, "--num-prompts", "2",
                 "--max-new-tokens", "4", "--reward", "exact_match", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["mode"] == mode and rep["opponent"]["name"] == mode
    assert rep["win_rate"] is not None and rep["opponent"]["mean_length"] >= 1


def test_bad_principles_file(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(EvalError, match="line 1: expected an object with a 'text'"):
        load_principles(str(bad))


def test_reward_model_and_judge_scorers(run_dir, pairs_file, tmp_path):
    """The reward-model and judge paths run: a random reward model gives a win rate in [0, 1] over every pair;
    the untrained tiny judge writes no 'Score: N' line, so its pairs are left out and counted."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastpref.data.tokenizer import CharTokenizer

    path, _ = pairs_file
    rm_dir = tmp_path / "rm"
    tok = CharTokenizer()
    LlamaForSequenceClassification(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                               num_labels=1, pad_token_id=0)).save_pretrained(rm_dir)
    rep = evaluate(EvalOptions(model=str(run_dir), data=str(path), num_prompts=3, max_new_tokens=4,
                               reward_model=str(rm_dir)))
    assert rep["scorer"] == "reward_model" and 0.0 <= rep["win_rate"] <= 1.0 and rep["win_rate_pairs"] == 3
    rep = evaluate(EvalOptions(model=str(run_dir), data=str(path), num_prompts=2, max_new_tokens=4, judge="tiny"))
    assert rep["scorer"] == "judge" and rep["win_rate_pairs"] + rep["win_rate_left_out"] == 2


def test_config_eval_matches_the_trainers_own_eval(tmp_path):
    """`fastpref eval CONFIG` of a run with an SFT warm-up finds the warmed-up reference in the checkpoint and
    reproduces the trainer's last held-out evaluation (same rows, same reference, same beta)."""
    from fastpref.train.config import load_config
    from fastpref.train.trainer import train

    out = tmp_path / "warm"
    cfg = load_config(None, [f"output_dir={out}", *COMMON, "train.sft_warmup_steps=3", "train.max_steps=8",
                             "train.save_every=5"])
    res = train(cfg, quiet=True)
    rep = evaluate(EvalOptions(model=str(out / "final"), run_cfg=load_config(str(out / "config.yaml")),
                               num_prompts=2, max_new_tokens=4))
    assert "checkpoints/step-8" in rep["reference"] and rep["notes"] == []  # the newest checkpoint after the warm-up
    p = rep["preference"]
    assert p["pairs"] == 8
    assert p["accuracy"] == pytest.approx(res.eval["eval/rewards/accuracies"], abs=1e-6)
    assert p["margin"] == pytest.approx(res.eval["eval/rewards/margins"], abs=1e-4)
    assert p["reward_chosen"] == pytest.approx(res.eval["eval/rewards/chosen"], abs=1e-4)
