"""GRPO / DAPO / GSPO on the tiny model: learning on the arithmetic task, every loss type end to end, the gradient
against an independent full-logits computation, dynamic sampling, overlong shaping, and resume mid-rollout."""

from __future__ import annotations

import pytest
import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, interrupted_and_resumed, make_algo, restore, run_steps, snapshot

from fastpref.losses.advantages import group_advantages


def test_grpo_raises_mean_reward_on_arith():
    algo, ex = make_algo("grpo", seed=0, gen_num_generations=8, gen_max_new_tokens=2)
    hist, _ = run_steps(algo, ex, 60, lr=2e-2)
    r = [h["reward"] for h in hist]
    first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10
    assert last > first + 0.2, f"mean reward did not rise: first 10 steps {first:.3f}, last 10 {last:.3f}"
    for key in ("reward_std", "advantages/std", "entropy", "completions/mean_length", "time_share/generate",
                "time_share/train", "train_tokens_per_s", "clip_ratio/region_mean"):
        assert key in hist[-1], key


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "gspo_token"])
def test_every_loss_type_runs_with_iterations_kl_and_accumulation(loss_type):
    algo, ex = make_algo("grpo", loss_type=loss_type, num_iterations=2, beta=0.05, gen_num_generations=4,
                         gen_max_new_tokens=3)
    algo.cfg.train.grad_accum = 2
    hist, _ = run_steps(algo, ex, 3, batch_size=4)
    # step 1: first iteration on the fresh rollout, old log-probs == current ones and reference == policy
    assert hist[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert hist[0]["clip_ratio/region_mean"] == 0.0
    # step 2 reuses the buffered rollout (no generation), the policy moved: ratio != 1
    assert "time/generate" in hist[0] and "time/generate" not in hist[1] and "time/generate" in hist[2]
    assert hist[1]["ratio/mean"] != 1.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


def test_grpo_gradient_matches_full_logits_reference():
    """loss_type=grpo, mu=1, beta=0: grad = -1/S sum_i A_i / |o_i| sum_t grad log pi(o_it), vs fp64 autograd
    through full logits of each sequence alone, with advantages recomputed from the logged rewards."""
    algo, ex = make_algo("grpo", loss_type="grpo", gen_num_generations=4, gen_max_new_tokens=3)
    model = algo.rt.model.double()
    algo.step_metrics = {}
    seen = {}
    inner = algo.score

    def spy(ro, examples):
        seen["ro"], seen["r"] = ro, inner(ro, examples)
        return seen["r"]

    algo.score = spy
    (mb,) = algo.micro_batches(ex[:3], 0)
    loss, _ = algo.compute_loss(mb)
    model.zero_grad()
    loss.backward()
    got = model.get_output_embeddings().weight.grad.clone()

    ro, rewards = seen["ro"], seen["r"]
    adv = group_advantages(rewards.double(), 4)
    model.zero_grad()
    total = 0.0
    S = len(ro)
    for i in range(S):
        p, c = ro.prompt_ids[i], ro.completion_ids[i]
        logits = model(input_ids=torch.tensor([p + c])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        tok = torch.stack([lp[len(p) - 1 + j, t] for j, t in enumerate(c)])
        total = total - adv[i] * tok.sum() / len(c) / S
    total.backward()
    want = model.get_output_embeddings().weight.grad
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_dynamic_sampling_drops_zero_variance_groups_and_refills():
    algo, ex = make_algo("grpo", dynamic_sampling=True, max_refill_rounds=2, gen_num_generations=4,
                         gen_max_new_tokens=2)

    def reward(prompts, completions, **cols):  # constant on prompts starting with an even digit
        return [0.0 if int(p[0]) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]

    algo.reward_fn = reward
    n_even = sum(int(e["row"]["prompt"][0]) % 2 == 0 for e in ex[:6])
    assert 0 < n_even < 6
    seen = []
    inner = algo.score

    def spy(ro, examples):
        out = inner(ro, examples)
        seen.append(out)
        return out

    algo.score = spy
    algo.step_metrics = {}
    micro = algo.micro_batches(ex[:6], 0)
    m = algo.step_metrics
    assert m["dynamic_sampling/dropped_groups"] >= n_even
    assert m["dynamic_sampling/refills"] >= 1 and len(seen) == 1 + m["dynamic_sampling/refills"]
    kept = int(m["dynamic_sampling/kept_groups"])
    assert sum(mb.batch.scored_lengths.numel() for mb in micro) == 4 * kept
    for mb in micro:  # every kept group has reward variance, so non-zero advantages
        adv = mb.advantages.view(-1, 4)
        assert bool((adv.abs().sum(dim=1) > 0).all())



def _even_constant(prompts, completions, **cols):
    """Zero reward variance on prompts starting with an even digit, some variance elsewhere."""
    return [0.0 if int(p[0]) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]


def _record_rollouts(algo) -> list[list[int]]:
    """The uids of the examples of every rollout ``algo`` makes from now on."""
    calls, inner = [], algo.rollout

    def spy(examples, **kw):
        calls.append([e["uid"] for e in examples])
        return inner(examples, **kw)

    algo.rollout = spy
    return calls


def test_dynamic_sampling_refills_with_fresh_prompts_then_from_the_pool():
    """10 training prompts, a step of 4 whose groups all tie: the refills take the 6 unseen prompts in the stream's
    seeded order (4, then 2 topped up from the pool), then only pool prompts (the step's own)."""
    import random

    algo, ex = make_algo("grpo", dynamic_sampling=True, max_refill_rounds=3, gen_num_generations=2,
                         gen_max_new_tokens=2, n_rows=10, train_stream=True)
    algo.reward_fn = lambda prompts, completions, **cols: [1.0] * len(prompts)
    calls = _record_rollouts(algo)
    algo.step_metrics = {}
    micro = algo.micro_batches(ex[:4], 1)
    assert micro[0].batch is None and algo.step_metrics["skipped"] == 1.0
    order = list(range(10))
    random.Random("grpo-refill:0").shuffle(order)
    fresh = [u for u in order if u >= 4]
    assert calls[0] == [0, 1, 2, 3]
    assert calls[1] == fresh[:4]
    assert calls[2][:2] == fresh[4:] and set(calls[2][2:]) <= {0, 1, 2, 3}
    assert len(calls) == 4 and set(calls[3]) <= {0, 1, 2, 3}
    m = algo.step_metrics
    assert (m["dynamic_sampling/refills"], m["dynamic_sampling/fresh_prompts"]) == (3, 6)
    # the next step's prompts (never rolled out before) are used; nothing fresh is left for refills
    algo.step_metrics = {}
    algo.micro_batches(ex[4:8], 2)
    assert calls[4] == [4, 5, 6, 7] and algo.step_metrics["dynamic_sampling/fresh_prompts"] == 0


def test_dynamic_sampling_without_a_training_split_refills_from_the_pool():
    algo, ex = make_algo("grpo", dynamic_sampling=True, max_refill_rounds=1, gen_num_generations=2,
                         gen_max_new_tokens=2)
    algo.reward_fn = lambda prompts, completions, **cols: [1.0] * len(prompts)
    calls = _record_rollouts(algo)
    algo.step_metrics = {}
    algo.micro_batches(ex[:4], 1)
    assert len(calls) == 2 and set(calls[1]) <= {0, 1, 2, 3}
    assert algo.step_metrics["dynamic_sampling/fresh_prompts"] == 0



def test_refill_stream_ranks_share_out_the_order_and_uids_are_required():
    from fastpref.train.online.grpo import RefillStream

    ex = [{"prompt_ids": [1], "uid": u} for u in range(7)]
    whole = RefillStream(ex, seed=3)
    r0, r1 = RefillStream(ex, seed=3, rank=0, world=2), RefillStream(ex, seed=3, rank=1, world=2)
    assert sorted(whole.order) == list(range(7)) and whole.order != list(range(7))
    assert r0.order == whole.order[0::2] and r1.order == whole.order[1::2]
    r0.mark_seen([ex[r0.order[1]]])
    assert [e["uid"] for e in r0.draw(10)] == [r0.order[0]] + r0.order[2:]
    assert r0.draw(1) == []
    with pytest.raises(ValueError, match="uid"):
        RefillStream([{"prompt_ids": [1]}], seed=0)

def test_dynamic_sampling_fresh_refills_resume_identically():
    """A resumed run draws the same fresh prompts as the uninterrupted one (the stream's position and seen set are
    in the state) and ends with the same weights."""
    kw = dict(dynamic_sampling=True, max_refill_rounds=2, gen_num_generations=4, gen_max_new_tokens=2,
              train_stream=True)
    a, ex = make_algo("grpo", **kw)
    a.reward_fn = _even_constant
    _, opt = run_steps(a, ex, 2, batch_size=4)
    snap = snapshot(a, opt)
    calls_a = _record_rollouts(a)
    hist_a, _ = run_steps(a, ex, 2, batch_size=4, opt=opt, start=2)
    b, _ = make_algo("grpo", **kw)          # the same seed (a resume checks it); other weights: from the snapshot
    with torch.no_grad():
        for p in b.rt.model.parameters():
            p.add_(0.1)
    b.reward_fn = _even_constant
    opt_b = restore(b, snap)
    calls_b = _record_rollouts(b)
    run_steps(b, ex, 2, batch_size=4, opt=opt_b, start=2)
    assert sum(h["dynamic_sampling/fresh_prompts"] for h in hist_a) > 0
    assert calls_a == calls_b
    assert_same_params(a.rt.model, b.rt.model)
    c, _ = make_algo("grpo", dynamic_sampling=True)           # no training split: no stream
    with pytest.raises(ValueError, match="refill stream"):
        c.load_state_dict(snap["algo"])


def test_overlong_shaping_adds_dapo_penalty():
    algo, ex = make_algo("grpo", overlong_cache_length=2, overlong_coef=1.0, gen_num_generations=4,
                         gen_max_new_tokens=2)
    algo.step_metrics = {}
    algo.micro_batches(ex[:4], 0)
    m = algo.step_metrics
    # L_max = L_cache = 2: penalty = -|y| / 2 for every completion (|y| <= 2)
    assert m["reward"] - m["reward/sampled_mean"] == pytest.approx(-m["completions/mean_length"] / 2, abs=1e-6)


def test_grpo_resume_mid_rollout_continues_identically():
    kw = dict(num_iterations=2, beta=0.05, dynamic_sampling=True, gen_num_generations=4, gen_max_new_tokens=3)
    # step 3 starts a rollout used again by step 4; b's other init: everything must come from the snapshot
    a, b, _ = interrupted_and_resumed("grpo", kw, 3, 2)
    assert_same_params(a.rt.model, b.rt.model)


def test_grpo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        make_algo("grpo", loss_type="ppo")
    with pytest.raises(ValueError, match="num_generations"):
        make_algo("grpo", gen_num_generations=1)
    with pytest.raises(ValueError, match="overlong_cache_length"):
        make_algo("grpo", overlong_cache_length=9, gen_max_new_tokens=4)
    from fastpref.train.config import ConfigError
    from fastpref.train.trainer import Trainer

    cfg = _trainer_cfg(tmp_path, "noref", **{"grpo.beta": 0.1})   # reference.mode=auto -> none
    with pytest.raises(ConfigError, match="grpo.beta=0.1 needs a reference"):
        Trainer(cfg, quiet=True).run()


def _trainer_cfg(tmp_path, name, **over):
    from fastpref.train.algorithms.base import load_builtin_algorithms
    from fastpref.train.config import load_config

    load_builtin_algorithms()
    args = [f"output_dir={tmp_path / name}", "train.plots=false", "train.max_steps=6", "train.batch_size=4",
            "data.eval_fraction=0.05"] + [f"{k}={v}" for k, v in over.items()]
    return load_config("examples/grpo_arith.yaml", args)


@pytest.mark.parametrize("dynamic", [False, True])
def test_grpo_through_the_trainer_resumes_mid_rollout_to_the_same_weights(tmp_path, dynamic):
    """``fastpref train examples/grpo_arith.yaml``: killed after step 3 (mid-rollout with mu=2), resumed from the
    checkpoint, it ends with the same weights as the uninterrupted run; with dynamic sampling the trainer hands
    the training split over, so refills are fresh prompts (and their stream position is resumed too)."""
    from fastpref.train.trainer import Trainer

    over = {"grpo.num_iterations": 2, "grpo.generation.num_generations": 4, "train.save_every": 3,
            "grpo.dynamic_sampling": str(dynamic).lower()}
    full = Trainer(_trainer_cfg(tmp_path, "full", **over), quiet=True).run()
    assert full.step == 6
    Trainer(_trainer_cfg(tmp_path, "cut", **over), quiet=True, stop_after=3).run()
    Trainer(_trainer_cfg(tmp_path, "cut", **over), quiet=True).run()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json

    recs = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    train_recs = [r for r in recs if r.get("phase") == "grpo"]
    assert len(train_recs) == 6 and all("time_share/train" in r for r in train_recs)
    # mu = 2: steps 1, 3, 5 generate (reward stats), steps 2, 4, 6 reuse the rollout
    assert [("reward" in r) for r in train_recs] == [True, False] * 3
    assert any("eval/reward/mean" in r for r in recs)
    if dynamic:
        assert sum(r.get("dynamic_sampling/fresh_prompts", 0) for r in train_recs) > 0


def test_grpo_kl_with_a_lora_base_reference(tmp_path):
    """With LoRA and reference.mode=lora_base the reference is the policy with adapters off: KL starts at 0
    (LoRA's B = 0) and the run completes."""
    pytest.importorskip("peft")
    from fastpref.train.trainer import Trainer

    cfg = _trainer_cfg(tmp_path, "lora", **{"grpo.beta": 0.1, "reference.mode": "lora_base",
                                            "model.lora.enabled": "true", "train.max_steps": 2,
                                            "grpo.generation.num_generations": 4})
    res = Trainer(cfg, quiet=True).run()
    assert res.step == 2
    import json

    recs = [json.loads(x) for x in open(tmp_path / "lora" / "metrics.jsonl") if '"phase": "grpo"' in x]
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)
