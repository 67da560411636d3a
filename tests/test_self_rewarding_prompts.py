"""Self-Rewarding's self-instruction creation (Yuan et al. 2024, arXiv:2401.10020, Sec. 2.2; issue 17): with
``self_rewarding.generate_prompts``, M_t (the policy when the iteration starts, frozen) writes the iteration's
prompts by few-shot prompting with seed prompts of the training split in Self-Instruct's template; empty, over-long
and duplicate prompts are dropped and counted; the survivors are the prompts M_t answers and judges; none
surviving is a warning and the one-line can't-learn error; a resume continues exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, make_algo, restore, run_steps, snapshot

from fastpref.data.arith import make_arith
from fastpref.train.online import self_rewarding as sr
from fastpref.train.online.common import CannotLearn
from fastpref.train.online.self_rewarding import (DEFAULT_PROMPT_TEMPLATE, fewshot_prompt,
                                                  parse_generated_prompt)
from fastpref.train.rollout import Rollout

HEADER = "Come up with a series of tasks:"


def test_fewshot_prompt_is_self_instructs_numbered_list():
    assert DEFAULT_PROMPT_TEMPLATE.startswith(HEADER)
    assert fewshot_prompt(DEFAULT_PROMPT_TEMPLATE, ["What is  2+2?\n", "Name a\tcolour"]) == \
        f"{HEADER}\n1. What is 2+2?\n2. Name a colour\n3."
    assert fewshot_prompt("<{examples}|{next}>", ["a"]) == "<1. a|2>"


@pytest.mark.parametrize("text,truncated,expected", [
    (" 3+4=\n10. 5+5=", False, ("3+4=", None)),       # the item up to the next line
    ("3+4=", False, ("3+4=", None)),                  # ended by EOS
    ("3+4=\n", True, ("3+4=", None)),                 # ended by its newline within the budget
    ("3+4=5+6=7", True, (None, "too_long")),          # never ended: over-long
    ("   \n4. 1+1=", False, (None, "empty")),
    ("", False, (None, "empty")),
])
def test_parse_generated_prompt(text, truncated, expected):
    assert parse_generated_prompt(text, truncated) == expected


def _scripted_writer(monkeypatch, algo, replies):
    """Replace the prompt writer's generation (the few-shot prompts only) by scripted ``(text, truncated)``
    replies, recording each call: the asks, the model and whether its weights equal the reference's then."""
    real, calls = sr.generate, []

    def gen(model, tok, prompt_ids, cfg, *, prompts=None, num_generations=None):
        if not (prompts and prompts[0].startswith(HEADER)):
            return real(model, tok, prompt_ids, cfg, prompts=prompts, num_generations=num_generations)
        assert cfg.num_generations == 1 and cfg.max_new_tokens == algo.sec.prompt_max_new_tokens
        assert prompt_ids == [sr.encode(tok, p) for p in prompts]
        calls.append({"asks": list(prompts), "model": model,
                      "params": [p.detach().clone() for p in model.parameters()],
                      "is_ref": all(torch.equal(a, b) for a, b in zip(model.parameters(),
                                                                      algo.ref_module().parameters()))})
        out = [replies(a) for a in prompts]
        return Rollout(list(prompts), [list(x) for x in prompt_ids], [tok.encode(t) for t, _ in out],
                       [t for t, _ in out], [c for _, c in out], 1)

    monkeypatch.setattr(sr, "generate", gen)
    return calls


def _text_judge(algo):
    """A deterministic judge (a score from the response's characters), so pairs exist without a trained judge."""
    def judge(prompts, responses):
        algo.step_metrics.update({"judge/unparseable": 0.0, "judge/judgements": float(3 * len(responses))})
        return [float(sum(map(ord, r)) % 5) for r in responses]
    return judge


def _algo(**kw):
    return make_algo("self_rewarding", **{**dict(generate_prompts=True, prompt_shots=3, prompt_max_new_tokens=6,
                                                 steps_per_iteration=2, iteration_prompts=6, gen_num_generations=3,
                                                 gen_max_new_tokens=2, train_stream=True), **kw})


def test_generated_prompts_come_from_m_t_follow_the_template_are_deduplicated_and_feed_the_iteration(monkeypatch):
    algo, ex = _algo()
    seeds = {ex_["row"]["prompt"] for ex_ in ex}
    script = iter([("7+1=\n", False), (" 7+1=\n5.", False), ("  \n", False), ("9+9=9+9=", True),
                   (" 2+5= \n", False), ("1+1=", False)] * 2)
    calls = _scripted_writer(monkeypatch, algo, lambda ask: next(script))
    answered = []
    orig_rollout = algo.rollout

    def rollout(examples, **kw):
        answered.append([(e["row"]["prompt"], list(e["prompt_ids"])) for e in examples])
        return orig_rollout(examples, **kw)

    algo.rollout, algo.judge = rollout, _text_judge(algo)
    hist, opt = run_steps(algo, ex, 1, batch_size=4)
    first_answered, first_data = [x for call in answered for x in call], list(algo._iter_data)
    hist += run_steps(algo, ex, 2, batch_size=4, opt=opt, start=1)[0]
    # written once per iteration (steps 1 and 3), by the policy itself while it still equals its reference (M_t)
    assert len(calls) == 2 and all(c["model"] is algo.rt.model and c["is_ref"] for c in calls)
    assert any(not torch.equal(a, b) for a, b in zip(calls[0]["params"], calls[1]["params"]))
    for ask in calls[0]["asks"] + calls[1]["asks"]:                 # Self-Instruct's list of 3 seed prompts
        lines = ask.split("\n")
        assert lines[0] == HEADER and lines[-1] == "4." and len(lines) == 5
        assert all(line.startswith(f"{i}. ") and line[3:] in seeds for i, line in enumerate(lines[1:4], start=1))
    assert len(calls[0]["asks"]) == 6                               # one ask per slot of the iteration
    h = hist[0]
    assert (h["prompts/attempts"], h["prompts/kept"], h["prompts/duplicate"], h["prompts/empty"],
            h["prompts/too_long"]) == (6, 3, 1, 1, 1)
    assert h["signal/generated_prompts_dropped"] == 3
    # the survivors, deduplicated and tokenised as the trainer tokenises prompt rows, are what M_t answers
    tok = algo.rt.tokenizer
    want = [(p, tok.encode(p, add_special_tokens=True)) for p in ("7+1=", "2+5=", "1+1=")]
    assert first_answered == want
    assert h["iteration/pairs"] == len(first_data) > 0
    assert {tuple(p.prompt_ids) for p in first_data} <= {tuple(i) for _, i in want}
    assert h["prompts/in_seed_data"] == len({"7+1=", "2+5=", "1+1="} & seeds)


def test_no_surviving_prompt_warns_and_stops_with_one_line(monkeypatch, caplog):
    algo, ex = _algo()
    _scripted_writer(monkeypatch, algo, lambda ask: ("", False))
    algo.judge = _text_judge(algo)
    with caplog.at_level(logging.WARNING, logger="fastpref.train"):
        with pytest.raises(CannotLearn, match=r"self_rewarding: nothing to learn for a whole iteration .*"
                                              r"generated prompts dropped: 6/6; no pair"):
            run_steps(algo, ex, 1, batch_size=4)
    assert any("none of the 6 prompts M_t wrote survived (empty 6" in r.getMessage() for r in caplog.records)


def test_prompt_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"self_rewarding.prompt_template must contain \{examples\} and \{next\}"):
        _algo(prompt_template="{examples}")
    with pytest.raises(ValueError, match="self_rewarding.prompt_shots"):
        _algo(prompt_shots=0)


def test_resume_with_generated_prompts_continues_exactly(monkeypatch):
    rows = make_arith(64, seed=0)                                   # the same prompt pool for both

    def build(seed):
        algo, ex = _algo(seed=seed, rows=rows)
        # the writer answers with a shot of its ask: which one depends on the algorithm's seeded shot draw
        _scripted_writer(monkeypatch, algo, lambda ask: (ask.split("\n")[1][3:] + "\n", False))
        algo.judge = _text_judge(algo)
        return algo, ex

    a, ex = build(0)
    _, opt = run_steps(a, ex, 3, batch_size=4)                     # mid-iteration 2: its dataset is in the state
    snap = snapshot(a, opt)
    hist_a, _ = run_steps(a, ex, 3, batch_size=4, opt=opt, start=3)  # step 5 writes iteration 3's prompts
    b, _ = build(1)
    hist_b, _ = run_steps(b, ex, 3, batch_size=4, opt=restore(b, snap), start=3)
    assert_same_params(a.rt.model, b.rt.model)
    assert hist_a[1]["prompts/kept"] == hist_b[1]["prompts/kept"] > 0
