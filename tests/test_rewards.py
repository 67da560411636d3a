"""Reward functions, the arithmetic task, and the reward-model scorer, against hand-made cases."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from fastpref import rewards as R
from fastpref.data.arith import arith_reward, arith_sft_rows, make_arith


@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", Fraction(42)),
    ("first 3 then 1,234", Fraction(1234)),
    ("x = -0.5", Fraction(-1, 2)),
    ("so \\boxed{3/4} not 7", Fraction(3, 4)),
    ("work... #### 18\n", Fraction(18)),
    ("no digits", None),
])
def test_extract_number(text, expected):
    assert R.extract_number(text) == expected


def test_exact_and_math_answer():
    comps = [" 7 ", "7.0", "\\boxed{0.5}", "1/2", "8"]
    answers = ["7", "7", "1/2", "0.5", "7"]
    assert R.exact_match(None, comps, answer=answers) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert R.math_answer(None, comps, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        R.math_answer(None, comps)
    with pytest.raises(ValueError, match="contains no number"):
        R.math_answer(None, ["1"], answer=["seven"])


def test_format_length_and_combine():
    fmt = R.format_reward(r"<a>\d+</a>")
    assert fmt(None, ["<a>12</a>", "<a>x</a>", "pre <a>1</a>"]) == [1.0, 0.0, 0.0]
    assert R.format_reward(r"<a>\d+</a>", full=False)(None, ["pre <a>1</a>"]) == [1.0]
    with pytest.raises(ValueError, match="invalid regex"):
        R.format_reward("(")
    pen = R.length_penalty(4, coef=2.0)
    assert pen(None, ["abc", "abcd", "abcdef"]) == [0.0, 0.0, -1.0]     # -2 * (6 - 4) / 4
    both = R.combine((R.exact_match, 1.0), (pen, 0.5))
    assert both(None, ["abcdef", "7"], answer=["abcdef", "8"]) == [1.0 - 0.5, 0.0]
    with pytest.raises(ValueError, match="pair"):
        R.combine(R.exact_match)


def test_get_reward_fn_specs():
    assert R.get_reward_fn("math_answer") is R.math_answer
    assert R.get_reward_fn("arith") is arith_reward
    assert R.get_reward_fn("format:\\d")(None, ["5", "x"]) == [1.0, 0.0]
    assert R.get_reward_fn("fastpref.rewards:exact_match") is R.exact_match
    mixed = R.get_reward_fn([["exact_match", 2.0], ["length:1", 1.0]])
    assert mixed(None, ["ab"], answer=["ab"]) == [2.0 - 1.0]
    with pytest.raises(ValueError, match="unknown reward function"):
        R.get_reward_fn("exact_mach")
    with pytest.raises(ValueError, match="cannot load"):
        R.get_reward_fn("fastpref.rewards:nope")


def test_score_rewards_rejects_non_finite_naming_prompt_index():
    def bad(prompts, completions, **kw):
        return [0.0, 1.0, 0.5, float("nan"), 0.0, 0.0]

    with pytest.raises(ValueError, match=r"completion 3 \(prompt index 1"):
        R.score_rewards(bad, ["p0"] * 3 + ["p1"] * 3, ["c"] * 6, group_size=3)
    with pytest.raises(ValueError, match="returned 2 rewards for 3"):
        R.score_rewards(lambda p, c: [1.0, 2.0], ["p"] * 3, ["c"] * 3)
    with pytest.raises(ValueError, match="not a number"):
        R.score_rewards(lambda p, c: ["x"], ["p"], ["c"])
    out = R.score_rewards(R.exact_match, ["p", "p"], ["a", "b"], {"answer": ["a", "a"]})
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0]


def test_arith_task_answers_and_reward():
    rows = make_arith(50, seed=3, max_operand=9, ops=("+", "-", "*"), max_result=20)
    assert rows == make_arith(50, seed=3, max_operand=9, ops=("+", "-", "*"), max_result=20)   # seeded
    assert rows != make_arith(50, seed=4, max_operand=9, ops=("+", "-", "*"), max_result=20)
    for r in rows:
        a, op, b = r["prompt"][0], r["prompt"][1], r["prompt"][2]
        assert r["prompt"].endswith("=")
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(r["answer"]) == want and 0 <= want <= 20
    got = arith_reward(None, ["7", " 7", "3", "77", "7x", "x7", ""], answer=["7"] * 7)
    assert got == [1.5, 1.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    sft = arith_sft_rows(4, seed=1)
    assert all(r["response"] == r["answer"] for r in sft)
    with pytest.raises(ValueError, match="no rows satisfy"):
        make_arith(3, max_operand=9, max_result=-1)
    with pytest.raises(ValueError, match="ops"):
        make_arith(3, ops=("/",))


def test_reward_model_scorer_matches_direct_forward():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastpref.data.tokenizer import CharTokenizer

    tok = CharTokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id))
    scorer = R.RewardModelScorer(rm, tok, batch_size=2)
    prompts, comps = ["1+1=", "2+3=", "4+4="], ["2", "five", "8"]
    got = scorer(prompts, comps)
    for p, c, g in zip(prompts, comps, got):
        ids = torch.tensor([tok.encode(p + c)])
        want = rm(input_ids=ids).logits[0, 0].item()        # unpadded, one sequence alone
        assert g == pytest.approx(want, abs=1e-5)
