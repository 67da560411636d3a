"""APO: the reward model starts from Bradley-Terry training on the human preference data, its iteration steps widen
the gold-vs-sample gap with the BT loss on that data as the regulariser (Cheng et al. 2023; the earlier Bernoulli-KL
anchor was not the paper's and is gone), the policy trains DPO on RM-ranked pairs of its samples; resume
mid-iteration."""

from __future__ import annotations

import math

import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, interrupted_and_resumed, make_algo

from fastpref.data.arith import arith_sft_rows

PREF = ["examples/data/arith_pref.jsonl"]


def test_apo_reward_model_learns_preferences_then_widens_the_gold_gap():
    rows = arith_sft_rows(32, seed=0)
    algo, ex = make_algo("apo", rows=rows, preference_files=PREF, rm_init_steps=40, rm_lr=1e-2, rm_steps=20,
                         gen_max_new_tokens=3, gen_num_generations=2)
    assert algo.rm_init_accuracy > 0.7, algo.rm_init_accuracy   # BT on D_P before training (no RM checkpoint)
    batch = ex[:8]
    ro = algo.rollout(batch)
    gold = [e["completion_ids"] for e in batch]

    def gap():
        with torch.no_grad():
            g = algo._scores(algo.rm, [e["prompt_ids"] for e in batch], gold).repeat_interleave(2)
            return float((g - algo._scores(algo.rm, ro.prompt_ids, ro.completion_ids)).mean())

    before = gap()
    m = algo.train_reward_model(ro, gold)
    assert gap() > before + 0.5, (before, gap())
    assert m["rm/bt_loss"] > 0 and m["rm/apo_loss"] > 0 and "rm/preference_accuracy" in m


def test_apo_end_to_end_and_resume_mid_iteration():
    rows = arith_sft_rows(32, seed=0)
    kw = dict(rows=rows, preference_files=PREF, rm_init_steps=2, steps_per_iteration=2, rm_steps=1,
              gen_num_generations=3, gen_max_new_tokens=3, iteration_prompts=8)
    a, b, hist = interrupted_and_resumed("apo", kw, 3, 2)
    assert ["rm/loss" in h for h in hist] == [True, False, True]     # RM steps open each iteration
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert_same_params(a.rt.model, b.rt.model)
    assert_same_params(a.rm, b.rm)
