"""PPO's implementation details ("The N Implementation Details of RLHF with PPO", OpenRLHF, TRL) and the GRPO
variants' keys, each against an independent computation: the adaptive KL controller's coefficient sequence, the
reward normaliser's fitted gain/bias, the shuffled mini-batches' coverage, dropout off during the no-grad passes,
the entropy bonus, the dual clip, the separate critic's schedule, Dr. GRPO's scaling, GSPO = GRPO at mu = 1, and a
resume in the middle of a shuffled rollout."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, interrupted_and_resumed, make_algo, run_steps

from fastpref.losses import AdaptiveKLController, fit_reward_normalizer, policy_loss
from fastpref.train.modeling import disable_dropout


# ------------------------------------------------------------------------------------ adaptive KL controller

def test_adaptive_kl_controller_follows_ziegler_et_al():
    """beta_{t+1} = beta_t (1 + clip(KL/target - 1, -0.2, 0.2) n / horizon), worked by hand."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 12: error +1 clipped to +0.2, n 512: x(1 + 0.2 * 0.0512) = x1.01024
    assert ctl.update(12.0, 512) == pytest.approx(0.2 * 1.01024, rel=1e-12)
    # KL 6.6: error +0.1: x(1 + 0.1 * 0.0512) = x1.00512
    assert ctl.update(6.6, 512) == pytest.approx(0.2 * 1.01024 * 1.00512, rel=1e-12)
    # KL 0: error -1 clipped to -0.2, n 1000: x0.98
    assert ctl.update(0.0, 1000) == pytest.approx(0.2 * 1.01024 * 1.00512 * 0.98, rel=1e-12)
    # KL on target: unchanged
    v = ctl.value
    assert ctl.update(6.0, 512) == pytest.approx(v, rel=1e-12)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_ppo_kl_coefficient_sequence_is_the_controllers_on_the_logged_kls():
    """In a run, the coefficient used by each rollout is the recurrence applied to the previous rollouts' logged
    ``objective/kl`` -- recomputed here from the logs alone."""
    target, horizon = 0.05, 64
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=2, num_ppo_epochs=1, kl_coef=0.3,
                         kl_target=target, kl_horizon=horizon)
    hist, _ = run_steps(algo, ex, 8, lr=2e-2, batch_size=4)
    coef = 0.3
    for h in hist:
        assert h["objective/kl_coef"] == pytest.approx(coef, rel=1e-9)
        err = min(max(h["objective/kl"] / target - 1, -0.2), 0.2)
        coef *= 1 + err * 8 / horizon  # 8 sequences per rollout
    assert algo.kl_coef == pytest.approx(coef, rel=1e-9)
    assert len({round(h["objective/kl_coef"], 12) for h in hist}) > 1  # it moved


def test_fixed_kl_coef_without_a_target():
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=2, num_ppo_epochs=1, kl_coef=0.07)
    hist, _ = run_steps(algo, ex, 3, batch_size=4)
    assert algo.kl_ctl is None and all(h["objective/kl_coef"] == pytest.approx(0.07) for h in hist)


# ------------------------------------------------------------------------------------ reward normalisation

def test_fit_reward_normalizer_standardises():
    s = torch.tensor([0.0, 1.0, 1.0, 3.0, 5.0])
    gain, bias = fit_reward_normalizer(s)
    mean, std = 2.0, (sum((x - 2.0) ** 2 for x in s.tolist()) / 5) ** 0.5  # population std, by hand
    assert gain == pytest.approx(1 / std) and bias == pytest.approx(-mean / std)
    out = gain * s.double() + bias
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(out.std(unbiased=False)) == pytest.approx(1.0, rel=1e-12)
    assert fit_reward_normalizer(torch.full((4,), 3.0)) == (1.0, -3.0)  # constant: only the shift


def test_ppo_fits_the_normaliser_on_initial_policy_samples_and_applies_it():
    algo, ex = make_algo("ppo", gen_num_generations=4, gen_max_new_tokens=2, num_ppo_epochs=1,
                         normalize_reward=True, normalize_samples=40, train_stream=True)
    seen: list[float] = []
    inner = algo.reward_fn

    def recording(*args, **kw):
        out = inner(*args, **kw)
        seen.extend(float(x) for x in out)
        return out

    for attr in ("columns",):
        if hasattr(inner, attr):
            setattr(recording, attr, getattr(inner, attr))
    algo.reward_fn = recording
    hist, _ = run_steps(algo, ex, 2, lr=2e-2, batch_size=8)
    # 32 samples per rollout: the first rollout plus one extra rollout of the initial policy = 64 >= 40.
    fit = torch.tensor(seen[:64], dtype=torch.float64)
    mean, std = float(fit.mean()), float(fit.std(unbiased=False))
    gain, bias = algo.reward_norm
    assert gain == pytest.approx(1 / std, rel=1e-9) and bias == pytest.approx(-mean / std, rel=1e-9, abs=1e-12)
    assert len(seen) == 64 + 32  # no refit at step 2
    assert hist[0]["reward/norm_gain"] == pytest.approx(gain)
    raw_first = torch.tensor(seen[:32], dtype=torch.float64)
    assert hist[0]["objective/scores"] == pytest.approx(float((gain * raw_first + bias).mean()), rel=1e-6, abs=1e-9)
    raw_second = torch.tensor(seen[64:], dtype=torch.float64)
    assert hist[1]["objective/scores"] == pytest.approx(float((gain * raw_second + bias).mean()), rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------ mini-batches

def _sequences(mb) -> list[tuple[int, ...]]:
    b = mb.batch
    cu = b.cu_seqlens_host
    return [tuple(b.input_ids[0, cu[i]:cu[i + 1]].tolist()) for i in range(len(cu) - 1)]


def test_mini_batches_shuffle_and_cover_the_rollout_once_per_epoch():
    E, M = 3, 4
    algo, ex = make_algo("ppo", gen_num_generations=4, gen_max_new_tokens=3, num_ppo_epochs=E, num_mini_batches=M)
    algo.cfg.train.grad_accum = 2
    steps = []
    for step in range(E * M):
        algo.step_metrics = {}
        steps.append(algo.micro_batches(ex[:8], step + 1))
        algo.on_step_end(step + 1)
    assert algo._uses_left == 0
    assert all(len(s) == 2 for s in steps)  # grad_accum micro-batches per mini-batch
    epochs = [[seq for mbs in steps[e * M:(e + 1) * M] for mb in mbs for seq in _sequences(mb)] for e in range(E)]
    assert all(len(ep) == 32 for ep in epochs)  # 8 prompts x 4 samples, each once per epoch
    assert Counter(epochs[0]) == Counter(epochs[1]) == Counter(epochs[2])
    sizes = [sum(len(_sequences(mb)) for mb in mbs) for mbs in steps]
    assert sizes == [8] * (E * M)
    orders = [tuple(sorted(map(hash, (seq for mb in mbs for seq in _sequences(mb))))) for mbs in steps]
    assert orders[:M] != orders[M:2 * M], "the mini-batch partition did not change between epochs"
    # The per-token fields travel with their sequences: the same sequence has the same advantages in every epoch.
    per_seq = {}
    for mbs in steps:
        for mb in mbs:
            b, cu = mb.batch, mb.batch.cu_seqlens_host
            for i, seq in enumerate(_sequences(mb)):
                adv = tuple(mb.advantages[cu[i]:cu[i + 1]].tolist())
                per_seq.setdefault(seq, set()).add(adv)
    assert all(len(v) == 1 for v in per_seq.values())


def test_one_mini_batch_keeps_the_full_batch_step():
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=2, num_ppo_epochs=2)
    algo.step_metrics = {}
    a = algo.micro_batches(ex[:4], 1)
    algo.on_step_end(1)
    b = algo.micro_batches(ex[:4], 2)
    assert len(a) == len(b) == 1 and a[0] is b[0]


def test_too_many_mini_batches_is_a_config_error():
    from fastpref.train.algorithms.base import ALGORITHMS
    from fastpref.train.config import Config

    cfg = Config(algorithm="ppo")
    cfg.train.batch_size = 2
    cfg.sections["ppo"].generation.num_generations = 2
    cfg.sections["ppo"].num_mini_batches = 5
    with pytest.raises(ValueError, match="num_mini_batches=5 exceeds the rollout's 4 sequences"):
        ALGORITHMS["ppo"].check_config(cfg)


def test_resume_in_the_middle_of_a_shuffled_rollout_continues_identically():
    kw = dict(gen_num_generations=2, gen_max_new_tokens=3, num_ppo_epochs=2, num_mini_batches=2, kl_target=0.05,
              kl_horizon=50, normalize_reward=True, normalize_samples=10)
    a, b, _ = interrupted_and_resumed("ppo", kw, 5, 4)       # rollout 2 is used by steps 5..8
    assert_same_params(a.rt.model, b.rt.model)
    assert a.kl_coef == b.kl_coef and a.reward_norm == b.reward_norm


# ------------------------------------------------------------------------------------ dropout, entropy, dual clip

def _dropout_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)
    model = LlamaForCausalLM(cfg)
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.3))  # an nn.Dropout as well
    return model.train()


def test_disable_dropout_makes_train_mode_deterministic():
    model = _dropout_llama()
    ids = torch.randint(0, 64, (2, 12))
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b), "dropout was not active to begin with"
    assert disable_dropout(model) >= 3  # two attention modules + the nn.Dropout
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, a.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("off", [True, False])
def test_ppo_disables_dropout_of_policy_reference_and_critic(off):
    """``ppo.disable_dropout`` (default on) zeroes the attention dropout of the policy, the reference and the
    separate critic (built as a copy of the policy, so it inherits the rate first)."""
    algo, _ = make_algo("ppo", critic="separate", disable_dropout=False)
    for m in (algo.rt.model, algo.ref_module()):
        for sub in m.modules():
            if hasattr(sub, "attention_dropout"):
                sub.attention_dropout = 0.5
    algo.sec.disable_dropout = off
    again = type(algo)(algo.cfg, algo.rt)
    mods = [algo.rt.model, algo.ref_module(), again.critic]
    rates = [sub.attention_dropout for m in mods for sub in m.modules() if hasattr(sub, "attention_dropout")]
    assert len(rates) == 6 and all((r == 0.0) == off for r in rates), rates


def test_entropy_bonus_and_dual_clip_reach_the_loss():
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=3)
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:4], 1)
    base, m0 = algo.compute_loss(mb)
    algo.sec.entropy_coef = 0.1
    bonus, m1 = algo.compute_loss(mb)
    assert float(m1["loss/policy"] - m0["loss/policy"]) == pytest.approx(-0.1 * float(m0["entropy"]), rel=1e-5)
    algo.sec.entropy_coef = 0.0
    # ratio e^5 on every token and advantage -1: the clipped PPO loss is the ratio (148.4); the dual clip caps it at 3
    far = dataclasses.replace(mb, old=mb.old - 5.0, advantages=torch.where(mb.batch.scored_mask.bool(), -1.0, 0.0))
    _, plain = algo.compute_loss(far)
    assert float(plain["loss/policy"]) == pytest.approx(float(torch.exp(torch.tensor(5.0))), rel=1e-4)
    algo.sec.dual_clip = 3.0
    _, dual = algo.compute_loss(far)
    assert float(dual["loss/policy"]) == pytest.approx(3.0, rel=1e-5)


def test_separate_critic_follows_the_runs_schedule():
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=2, num_ppo_epochs=1, critic="separate",
                         critic_lr=0.04)
    o = algo.cfg.optim
    o.schedule, o.warmup_steps, o.min_lr_ratio = "linear", 2, 0.0
    algo.cfg.train.max_steps = 10
    algo = type(algo)(algo.cfg, algo.rt)
    hist, _ = run_steps(algo, ex, 6, batch_size=2)
    # linear warm-up over 2 steps, then linear decay to 0 over the remaining 8: by hand
    want = [0.04 * f for f in (0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8)]
    assert [h["critic/lr"] for h in hist] == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------ GRPO variants' keys

def test_dr_grpo_sets_its_scaling_and_explicit_values_win():
    algo, _ = make_algo("grpo", loss_type="dr_grpo")
    assert algo.sec.resolved_scale_rewards == "none"
    algo, _ = make_algo("grpo", loss_type="grpo")
    assert algo.sec.resolved_scale_rewards == "group"
    algo, _ = make_algo("grpo", loss_type="dr_grpo", scale_rewards="batch")
    assert algo.sec.resolved_scale_rewards == "batch"


def test_dr_grpo_advantages_are_not_std_scaled_in_a_run():
    """The step's advantages under dr_grpo are reward minus group mean (no division), recomputed from rewards."""
    algo, ex = make_algo("grpo", loss_type="dr_grpo", gen_num_generations=4, gen_max_new_tokens=2)
    algo.step_metrics = {}
    captured = {}
    import fastpref.train.online.grpo as grpo_mod

    orig = grpo_mod.group_advantages

    def spy(rewards, G, **kw):
        captured["kw"] = kw
        captured["out"] = orig(rewards, G, **kw)
        captured["rewards"] = rewards
        return captured["out"]

    grpo_mod.group_advantages = spy
    try:
        algo.micro_batches(ex[:4], 1)
    finally:
        grpo_mod.group_advantages = orig
    r = captured["rewards"].double().view(-1, 4)
    torch.testing.assert_close(captured["out"].double().view(-1, 4), r - r.mean(1, keepdim=True))
    assert captured["kw"]["scale_rewards"] == "none"


def test_gspo_equals_grpo_with_one_update_per_rollout():
    """On-policy (mu = 1, ``old_logps=None``): GSPO's sequence ratio is 1 with gradient = the per-sequence token
    mean of grad log p, the same as GRPO's per-sequence normalisation: equal loss and gradients."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([0.5, -1.0, 2.0])
    grads = []
    for lt in ("gspo", "grpo"):
        torch.manual_seed(1)
        lp = torch.full((3, 4), -1.0) + 0.1 * torch.randn(3, 4)
        logp = lp.clone().requires_grad_(True)
        loss, _ = policy_loss(logp, None, adv, mask, loss_type=lt)
        loss.backward()
        grads.append((float(loss.detach()), logp.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)
