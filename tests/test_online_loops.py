"""The self-improvement loops as their papers define them (issue 17): one iteration machinery (a frozen M_t builds
the iteration's dataset once, when the iteration starts; the steps train on it), SPIN's mixing of iteration t-1,
Self-Rewarding's paper prompt / strict "Score: N" parser / chat template / EFT step, DICE's SFT reference given by
path / searched length penalty / offline mixing, iLR-DPO's loss; and the can't-learn signals (a warning with the
counts at the step, a one-line error when it lasts a whole iteration)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, interrupted_and_resumed, make_algo, run_steps

from fastpref.data.arith import arith_sft_rows, make_arith
from fastpref.train.modeling import sequence_logps
from fastpref.train.online.common import CannotLearn, parse_judge_score, score_signal
from fastpref.train.online.dice import search_length_alpha
from fastpref.train.online.self_rewarding import DEFAULT_JUDGE_TEMPLATE
from fastpref.train.rollout import Rollout, pack


def _count_rollouts(algo):
    calls = []
    orig = algo.rollout

    def counted(examples, **kw):
        calls.append(len(examples))
        return orig(examples, **kw)

    algo.rollout = counted
    return calls


# ------------------------------------------------------------------------------------------------ machinery

def test_spin_iteration_dataset_is_built_once_by_the_frozen_opponent_and_mixes_the_previous_one():
    rows = arith_sft_rows(48, seed=0)
    algo, ex = make_algo("spin", rows=rows, steps_per_iteration=2, gen_max_new_tokens=2, iteration_prompts=8,
                         train_stream=True)
    calls = _count_rollouts(algo)
    opponent, same_as_ref = [], []
    orig_build = algo.build_iteration

    def build(prompts):  # the generator of the iteration is the policy as it is when the iteration starts
        opponent.append([p.detach().clone() for p in algo.rt.model.parameters()])
        same_as_ref.append(all(torch.equal(a, b) for a, b in zip(opponent[-1], algo.ref_module().parameters())))
        return orig_build(prompts)

    algo.build_iteration = build
    hist, _ = run_steps(algo, ex, 4, batch_size=4)
    assert len(opponent) == 2 and sum(calls) == 16          # 8 prompts at steps 1 and 3 only
    assert [h.get("iteration/pairs") is not None for h in hist] == [True, False, True, False]
    assert hist[0]["spin/previous_pairs"] == 0 and hist[2]["spin/previous_pairs"] > 0     # t-1's pairs mixed in
    assert hist[2]["iteration/pairs"] == hist[2]["spin/previous_pairs"] + 8 - hist[2]["spin/identical"]
    # each iteration's opponent (the policy when it starts) is its reference, and iteration 2's differs from 1's
    assert same_as_ref == [True, True]
    assert any(not torch.equal(a, b) for a, b in zip(opponent[0], opponent[1]))


@pytest.mark.parametrize("epochs", [1, 2])
def test_spin_resume_mid_iteration_continues_exactly(epochs):
    rows = arith_sft_rows(48, seed=0)
    kw = dict(rows=rows, steps_per_iteration=2 * epochs, epochs_per_iteration=epochs, gen_max_new_tokens=2,
              iteration_prompts=8, train_stream=True)
    # epochs=1: step 3 of iteration 2, its dataset in the state; epochs=2: cut inside the first pass, resumed
    # across the second pass's reshuffle
    a, b, _ = interrupted_and_resumed("spin", kw, 3, 3)
    assert_same_params(a.rt.model, b.rt.model)


# ------------------------------------------------------------------------------------------------ self-rewarding

@pytest.mark.parametrize("text,expected", [
    ("Relevant and correct.\nScore: 4", 4.0),
    ("Score: 2 ... on reflection Score: 5", 5.0),
    ("score: 3", None),                 # not the paper's spelling
    ("I'd give it 3 points.", None),    # no score line: no last-number fallback
    ("Score: 7", None),                 # out of the 5-point range
    ("Score: 2.5", 2.5),
    ("", None),
])
def test_strict_score_line_parser(text, expected):
    assert parse_judge_score(text, require_score_line=True) == expected


def test_self_rewarding_uses_the_papers_prompt_through_the_chat_template():
    for phrase in ("additive 5-point", "Add 1 point if the response is relevant", "Bestow a fifth point",
                   "User: {prompt}\n<response>{response}</response>", 'format: "Score: <total points>"',
                   "systematically attribute points based on the outlined criteria."):
        assert phrase in DEFAULT_JUDGE_TEMPLATE, phrase
    algo, _ = make_algo("self_rewarding")
    assert algo.sec.judge_samples == 3
    assert algo.judge_prompt("2+2=", "4") == DEFAULT_JUDGE_TEMPLATE.format(prompt="2+2=", response="4")
    tok = algo.rt.tokenizer                                   # a tokenizer with a chat template renders it
    tok.chat_template = "x"
    tok.apply_chat_template = lambda msgs, tokenize, add_generation_prompt: (
        f"<u>{msgs[0]['content']}</u><a>" if not tokenize and add_generation_prompt and len(msgs) == 1 else None)
    assert algo.judge_prompt("2+2=", "4") == "<u>" + DEFAULT_JUDGE_TEMPLATE.format(prompt="2+2=", response="4") + \
        "</u><a>"


def test_self_rewarding_eft_iteration_trains_the_judgement_nll():
    algo, ex = make_algo("self_rewarding", eft_files=["examples/data/arith_eft.jsonl"], steps_per_iteration=4,
                         judge_template="{prompt}{response}?", judge_max_new_tokens=9)
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:4], 1)
    loss, m = algo.compute_loss(mb)
    b = mb.batch                                          # the token-mean NLL of the judgements, directly
    with torch.no_grad():
        nll = -sequence_logps(algo.rt.model, b).sum() / b.scored_lengths.sum()
    torch.testing.assert_close(loss.detach(), nll, rtol=1e-5, atol=1e-6)
    assert algo.step_metrics["eft/examples"] == 128 and "pairs/count" not in algo.step_metrics
    hist, _ = run_steps(algo, ex, 3, batch_size=4, lr=2e-2, start=1)
    assert hist[-1]["loss"] < loss.item() - 0.3, (loss.item(), [h["loss"] for h in hist])


# ------------------------------------------------------------------------------------------------ DICE

def test_length_alpha_search_zeroes_the_length_gap():
    # one group: alpha 0 pairs the long top sample with the worst (gap 3 - 1 = 2); alpha 0.3 makes sample 1 the
    # best (0.6 > 0.1) against sample 2 (gap 0): chosen. Then gaps +1 (alpha 0) and -1 (alpha 0.3): the smaller alpha
    assert search_length_alpha([1.0, 0.9, 0.0], [3, 1, 1], 3, [0.3, 0.0]) == (0.3, [(1, 2)], 0.0)
    assert search_length_alpha([1.0, 0.9, 0.0], [3, 1, 2], 3, [0.0, 0.3]) == (0.0, [(0, 2)], 1.0)
    a, pairs, gap = search_length_alpha([1.0, 0.9, 0.0, 0.0, 0.2, 0.1], [3, 1, 2, 2, 2, 2], 3, [0.0, 0.3])
    # alpha 0: pairs (0, 2) gap 1 and (4, 3) gap 0 -> mean 0.5; alpha 0.3: (1, 0) gap -2, (4, 3) 0 -> -1
    assert (a, pairs, gap) == (0.0, [(0, 2), (4, 3)], 0.5)
    a, pairs, gap = search_length_alpha([1.0, 0.9, 0.0, 0.0, 0.2, 0.1], [3, 1, 2, 2, 2, 2], 3, [0.0, 0.05])
    assert a == 0.0                                            # equal gaps: the smallest alpha
    assert search_length_alpha([0.0] * 3, [1, 1, 1], 3, [0.0])[1] == []


def _save_perturbed(algo, path, scale=0.3):
    m = __import__("copy").deepcopy(algo.rt.model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    m.save_pretrained(path)
    return m


def test_dice_starts_from_the_given_reference_mixes_offline_pairs_and_searches_alpha(tmp_path):
    probe, _ = make_algo("dice")
    sft = _save_perturbed(probe, tmp_path / "sft")
    algo, ex = make_algo("dice", reference_path=str(tmp_path / "sft"), offline_files=["examples/data/arith_pref.jsonl"],
                         steps_per_iteration=2, iteration_prompts=16, gen_num_generations=4, gen_max_new_tokens=3,
                         train_stream=True)
    hist, _ = run_steps(algo, ex, 1, batch_size=4)
    assert_same_params(algo.score_ref, sft)                   # the implicit reward's reference is the SFT model
    pi0 = [p.detach().clone() for p in algo.ref_module().parameters()]
    hist += run_steps(algo, ex, 2, batch_size=4, start=1)[0]
    h = hist[0]
    assert h["pairs/generated"] > 0 and h["pairs/offline"] == h["pairs/generated"]   # gamma = 0.5
    assert h["iteration/pairs"] == 2 * h["pairs/generated"]
    assert abs(h["dice/length_gap"]) <= 1.0 and h["dice/alpha"] in algo.sec.alpha_grid
    # the DPO reference of iteration 0 was pi_0 (not the SFT model); after it, the implicit reward's reference
    # is pi_1's own DPO reference, pi_0
    assert all(torch.equal(a, b) for a, b in zip(pi0, algo.score_ref.parameters()))
    with pytest.raises(AssertionError):
        assert_same_params(algo.score_ref, sft)


def test_dice_resume_mid_iteration_continues_exactly(tmp_path):
    probe, _ = make_algo("dice")
    _save_perturbed(probe, tmp_path / "sft")
    kw = dict(rows=make_arith(64, seed=0), reference_path=str(tmp_path / "sft"),  # the same prompt pool for both
              offline_files=["examples/data/arith_pref.jsonl"], steps_per_iteration=2, iteration_prompts=8,
              gen_num_generations=3, gen_max_new_tokens=2, train_stream=True)
    a, b, _ = interrupted_and_resumed("dice", kw, 3, 3)     # mid-iteration 2: score reference = pi_0 by now
    assert_same_params(a.rt.model, b.rt.model)
    assert_same_params(a.score_ref, b.score_ref)


def test_dice_drop_truncated_leaves_cut_responses_out_of_every_pair(tmp_path):
    # sail-sg/dice drops the responses stopped at the length limit before pairing (generate_dpo_scores.py)
    assert search_length_alpha([1.0, None, 0.0], [1, 1, 1], 3, [0.0]) == (0.0, [(0, 2)], 0.0)
    probe, _ = make_algo("dice")
    _save_perturbed(probe, tmp_path / "sft")
    algo, ex = make_algo("dice", reference_path=str(tmp_path / "sft"), drop_truncated=True, steps_per_iteration=2,
                         iteration_prompts=8, gen_num_generations=4, train_stream=True)
    tok = algo.rt.tokenizer
    eos = tok.eos_token_id
    made = []

    def rollout(chunk, **kw):  # per prompt: two answers that ended (EOS), two cut at the token budget
        def enc(text):
            return list(tok.encode(text, add_special_tokens=False))

        ids = [x for i in range(len(chunk))
               for x in (enc(str(i % 10)) + [eos], enc(str((i + 1) % 10)) + [eos], enc(f"1{i % 10}"), enc("98"))]
        ro = Rollout([e["row"]["prompt"] for e in chunk for _ in range(4)],
                     [list(e["prompt_ids"]) for e in chunk for _ in range(4)], ids, ["?"] * 4 * len(chunk),
                     [False, False, True, True] * len(chunk), 4)
        made.append(ro)
        return ro

    algo.rollout = rollout
    hist, _ = run_steps(algo, ex, 1, batch_size=4)
    cut = {tuple(c) for ro in made for c, t in zip(ro.completion_ids, ro.truncated) if t}
    gen = algo._iter_data                                    # no offline data: every pair is generated
    assert gen and len(gen) == hist[0]["pairs/generated"]
    assert all(tuple(p.chosen_ids) not in cut and tuple(p.rejected_ids) not in cut for p in gen)
    assert hist[0]["dice/truncated"] == 16 and hist[0]["signal/truncated_responses"] == 16


def test_dice_with_a_policy_equal_to_its_reference_stops_with_one_line(caplog):
    algo, ex = make_algo("dice", steps_per_iteration=2, gen_num_generations=3, gen_max_new_tokens=2)
    with pytest.raises(CannotLearn, match=r"dice: nothing to learn for a whole iteration .*constant reward: 24/24"):
        run_steps(algo, ex, 1, batch_size=4)


# ------------------------------------------------------------------------------------------------ iLR-DPO

def test_ilr_dpo_loss_is_length_regularised_dpo_on_the_iterations_pairs():
    algo, ex = make_algo("ilr_dpo", beta=0.5, length_alpha=0.2, steps_per_iteration=2, iteration_prompts=8,
                         gen_num_generations=4, gen_max_new_tokens=3)
    calls = _count_rollouts(algo)
    with torch.no_grad():
        for p in algo.rt.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:4], 1)
    loss, _ = algo.compute_loss(mb)
    b = mb.batch
    with torch.no_grad():
        pi = sequence_logps(algo.rt.model, b).double()
        ref = sequence_logps(algo.ref_module(), b).double()
    d = pi - ref
    lens = b.scored_lengths.double()
    want = -F.logsigmoid(0.5 * (d[0::2] - d[1::2]) + 0.2 * (lens[0::2] - lens[1::2])).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    algo.micro_batches(ex[:4], 2)
    assert sum(calls) == 8                                   # generated once, at the iteration's start


# ------------------------------------------------------------------------------------------------ signals

def test_score_signal_counts():
    assert score_signal([1.0, 1.0, 0.0, 1.0], 2) == {"zero-variance groups": (1, 2)}
    assert score_signal([2.0, 2.0, 2.0, None], 2) == {"zero-variance groups": (2, 2), "constant reward": (3, 3),
                                                      "unscored samples": (1, 4)}


def test_online_constant_reward_warns_at_each_step_and_errors_after_a_whole_iteration(caplog):
    algo, ex = make_algo("online_dpo", gen_num_generations=2, gen_max_new_tokens=2, steps_per_iteration=2)
    algo.reward_fn = lambda p, c, **k: [1.0] * len(c)
    with caplog.at_level(logging.WARNING, logger="fastpref.train"):
        run_steps(algo, ex, 1, batch_size=4)
        said = [r.getMessage() for r in caplog.records if "step 1:" in r.getMessage()]
        assert said and "zero-variance groups: 4/4" in said[0] and "constant reward: 8/8" in said[0], said
        with pytest.raises(CannotLearn, match="no pair in any of its 2 steps"):
            run_steps(algo, ex, 1, batch_size=4, start=1)
    assert any("step 2:" in r.getMessage() for r in caplog.records)


def test_online_varying_reward_is_not_flagged(caplog):
    algo, ex = make_algo("online_dpo", gen_num_generations=2, gen_max_new_tokens=2, steps_per_iteration=2)
    algo.reward_fn = lambda p, c, **k: [float(i % 2) for i in range(len(c))]
    with caplog.at_level(logging.WARNING, logger="fastpref.train"):
        hist, _ = run_steps(algo, ex, 2, batch_size=4)
    assert not [r for r in caplog.records if "step " in r.getMessage()]
    assert hist[0]["signal/zero-variance_groups".replace("-", "-")] == 0 and hist[0]["signal/pairs"] == 4


# ------------------------------------------------------------------------------------------------ examples

@pytest.mark.parametrize("config", ["examples/spin_arith.yaml", "examples/ilr_dpo_arith.yaml",
                                    "examples/self_rewarding_arith.yaml", "examples/apo_arith.yaml",
                                    "examples/dice_arith.yaml"])
def test_each_loop_example_runs_through_the_trainer(tmp_path, config):
    import json
    import math

    from fastpref.train.algorithms.base import load_builtin_algorithms
    from fastpref.train.config import load_config
    from fastpref.train.trainer import Trainer

    load_builtin_algorithms()
    extra = []
    if "dice" in config:                                     # the DPO policy and its SFT reference, by path
        from fastpref.data.tokenizer import CharTokenizer

        probe, _ = make_algo("dice")
        for name, scale in (("sft", 0.3), ("dpo", 0.0)):
            m = _save_perturbed(probe, tmp_path / name, scale) if scale else probe.rt.model
            m.save_pretrained(tmp_path / name)
            CharTokenizer().save_pretrained(str(tmp_path / name))
        extra = [f"model.name_or_path={tmp_path / 'dpo'}", f"dice.reference_path={tmp_path / 'sft'}"]
    cfg = load_config(config, [f"output_dir={tmp_path / 'out'}", "train.max_steps=3", "train.batch_size=4",
                               "train.eval_every=0", "train.plots=false", "train.save_every=0",
                               f"{config.split('/')[1].split('_arith')[0]}.steps_per_iteration="
                               f"{3 if 'self_rewarding' in config else 2}",  # sr: 3 EFT steps (see its test)
                               f"{config.split('/')[1].split('_arith')[0]}.iteration_prompts=8"] + extra)
    res = Trainer(cfg, quiet=True).run()
    assert res.step == 3
    recs = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    train = [r for r in recs if r.get("phase") == cfg.algorithm]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)


def test_epochs_per_iteration_makes_passes_over_the_iteration_dataset_in_fresh_orders():
    """``epochs_per_iteration=2`` with 4 steps: steps 1-2 see every pair of the iteration once, steps 3-4 again,
    in another seeded order (uclaml/SPIN trains several epochs per iteration); 1 pass by default."""
    from fastpref.train.online.common import Pair

    data = [Pair([1, i], [2], [3]) for i in range(6)]
    seen = {}
    for epochs in (1, 2):
        algo, ex = make_algo("spin", rows=arith_sft_rows(16, seed=0), steps_per_iteration=4,
                             epochs_per_iteration=epochs)
        algo.build_iteration = lambda prompts: list(data)
        algo.step_metrics = {}
        steps = []
        for _ in range(4):
            steps.append([p.prompt_ids[1] for p in algo.step_pairs(ex[:4])])
            algo._iter_step += 1
        seen[epochs] = steps
    once = seen[1]
    assert sorted(i for s in once for i in s) == list(range(6))  # one pass over 4 steps
    first, second = seen[2][0] + seen[2][1], seen[2][2] + seen[2][3]
    assert sorted(first) == sorted(second) == list(range(6))     # two whole passes
    assert first != second                                          # each in its own order


@pytest.mark.parametrize("overrides, needle", [
    (["algorithm=online_dpo", "online_dpo.epochs_per_iteration=2"],
     "online_dpo.epochs_per_iteration=2: only the methods with an iteration dataset"),
    (["algorithm=spin", "spin.steps_per_iteration=10", "spin.epochs_per_iteration=3"],
     "spin.epochs_per_iteration=3 must divide steps_per_iteration=10"),
    (["algorithm=spin", "spin.epochs_per_iteration=0"], "spin.epochs_per_iteration must be an int >= 1"),
])
def test_epochs_per_iteration_errors_name_the_key(overrides, needle):
    from fastpref.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)
