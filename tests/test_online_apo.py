"""APO: the reward-model phase widens the gold-vs-sample gap under a KL anchor, the policy phase trains DPO on
RM-ranked pairs; the Bernoulli KL against a direct formula; resume mid-iteration."""

from __future__ import annotations

import math

import pytest
import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, make_algo, restore, run_steps, snapshot

from fastpref.data.arith import arith_sft_rows
from fastpref.train.online.apo import bernoulli_kl


def test_bernoulli_kl_matches_direct_formula():
    a, b = torch.tensor([0.3, -2.0, 4.0]), torch.tensor([-1.0, 0.5, 4.0])
    for x, y, got in zip(a.tolist(), b.tolist(), bernoulli_kl(a, b).tolist()):
        p, q = 1 / (1 + math.exp(-x)), 1 / (1 + math.exp(-y))
        assert got == pytest.approx(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)), abs=1e-6)


def test_apo_reward_model_phase_widens_the_gap():
    rows = arith_sft_rows(32, seed=0)
    algo, ex = make_algo("apo", rows=rows, rm_steps=20, rm_lr=1e-2, rm_kl_coef=0.0, gen_max_new_tokens=3)
    batch = ex[:8]
    ro = algo.rollout(batch, num_generations=1)
    prompts, gold = [e["prompt_ids"] for e in batch], [e["completion_ids"] for e in batch]

    def gap():
        with torch.no_grad():
            return float((algo._scores(algo.rm, prompts, gold) - algo._scores(algo.rm, prompts, ro.completion_ids))
                         .mean())

    before = gap()
    m = algo.train_reward_model(batch)          # trains on fresh samples of the same prompts vs the same gold
    assert gap() > before + 0.5, (before, gap())
    assert m["rm/kl_to_initial"] > 0


def test_apo_end_to_end_and_resume_mid_iteration():
    rows = arith_sft_rows(32, seed=0)
    kw = dict(rows=rows, steps_per_iteration=2, rm_steps=1, gen_num_generations=3, gen_max_new_tokens=3)
    a, ex = make_algo("apo", **kw)
    hist, opt = run_steps(a, ex, 3, batch_size=4)
    assert ["rm/loss" in h for h in hist] == [True, False, True]     # RM epochs open each iteration
    assert all("rm_score/mean" in h and math.isfinite(h["loss"]) for h in hist)
    snap = snapshot(a, opt)
    run_steps(a, ex, 2, batch_size=4, opt=opt, start=3)
    b, _ = make_algo("apo", seed=1, **kw)
    opt_b = restore(b, snap)
    run_steps(b, ex, 2, batch_size=4, opt=opt_b, start=3)
    assert_same_params(a.rt.model, b.rt.model)
    assert_same_params(a.rm, b.rm)
