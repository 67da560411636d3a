"""PPO with a value head: learning on the arithmetic task, the rollout's KL-penalised rewards / GAE / whitening
against a naive per-sequence recomputation, the packed <-> padded conversion, and resume mid-epochs."""

from __future__ import annotations

import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, make_algo, restore, run_steps, snapshot

from fastpref.data.arith import arith_reward
from fastpref.train.online.ppo import from_padded, to_padded
from fastpref.train.rollout import pack


def test_to_from_padded_hand_case():
    b = pack([[1, 2], [3]], [[4, 5, 6], [7]])
    vals = torch.arange(b.targets.numel(), dtype=torch.float32) + 1  # tokens 1..N
    # sequence 0 = [1,2,4,5,6]: completion targets at positions 1,2,3; sequence 1 = [3,7]: position 5
    assert b.targets.tolist() == [-100, 4, 5, 6, -100, 7, -100]
    assert to_padded(vals, b).tolist() == [[2.0, 3.0, 4.0], [6.0, 0.0, 0.0]]
    back = from_padded(to_padded(vals, b), b)
    assert back.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 6.0, 0.0]


def test_ppo_raises_mean_reward_on_arith():
    algo, ex = make_algo("ppo", gen_num_generations=4, gen_max_new_tokens=2, num_ppo_epochs=2, kl_coef=0.01)
    hist, _ = run_steps(algo, ex, 60, lr=2e-2)
    r = [h["reward/mean"] for h in hist if "reward/mean" in h]
    assert len(r) == 30
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.2, f"PPO mean reward did not rise: {first:.3f} -> {last:.3f}"
    for key in ("objective/kl", "value/clipfrac", "loss/value", "clip_ratio/region_mean", "entropy"):
        assert key in hist[-1] or key in hist[-2], key


def test_ppo_rollout_advantages_match_naive_gae():
    kl_coef, gamma, lam = 0.3, 0.9, 0.8
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=4, kl_coef=kl_coef, gamma=gamma, lam=lam)
    model = algo.rt.model.double()
    algo.ref_module().double()
    torch.nn.init.normal_(algo.value_head.weight, std=0.5)     # non-trivial values
    with torch.no_grad():                                      # the reference differs from the policy
        for p in algo.ref_module().parameters():
            p.add_(0.05 * torch.randn_like(p))
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:3], 0)
    b = mb["packed"]
    ref_model = algo.ref_module()
    adv_all, ret_all = [], []
    for i in range(b.completion_lengths.numel()):
        s, e = b.cu_seqlens_cpu[i], b.cu_seqlens_cpu[i + 1]
        ids = b.input_ids[s:e]
        n_c = int(b.completion_lengths[i])
        n_p = ids.numel() - n_c
        comp = ids[n_p:]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            lr = torch.log_softmax(ref_model(input_ids=ids[None]).logits[0].double(), -1)
            h = model.get_decoder()(input_ids=ids[None]).last_hidden_state[0]
            v = algo.value_head(h).squeeze(-1).double()
        pos = range(n_p - 1, n_p - 1 + n_c)
        logp = torch.stack([lp[t, comp[j]] for j, t in enumerate(pos)])
        refp = torch.stack([lr[t, comp[j]] for j, t in enumerate(pos)])
        vals = torch.stack([v[t] for t in pos])
        text = algo.rt.tokenizer.decode([t for t in comp.tolist() if t != algo.rt.tokenizer.eos_token_id])
        score = arith_reward(None, [text], answer=[ex[i // 2]["row"]["answer"]])[0]
        r = -kl_coef * (logp - refp)
        r[-1] += score
        adv, last = [0.0] * n_c, 0.0
        for t in reversed(range(n_c)):
            nxt = vals[t + 1] if t + 1 < n_c else 0.0
            last = r[t] + gamma * nxt - vals[t] + gamma * lam * last
            adv[t] = last
        adv = torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in adv])
        adv_all.append(adv)
        ret_all.append(adv + vals)
    adv, ret = torch.cat(adv_all), torch.cat(ret_all)
    white = (adv - adv.mean()) / torch.sqrt(adv.var(unbiased=True) + 1e-8)
    on = b.targets != -100
    torch.testing.assert_close(mb["returns"][on].double(), ret, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mb["advantages"][on].double(), white, rtol=1e-5, atol=1e-6)
    assert bool((mb["advantages"][~on] == 0).all())


def test_ppo_resume_mid_epochs_continues_identically():
    kw = dict(gen_num_generations=2, gen_max_new_tokens=3, num_ppo_epochs=3)
    a, ex = make_algo("ppo", **kw)
    _, opt = run_steps(a, ex, 4, batch_size=4)               # rollout 2 is used by steps 4, 5, 6
    snap = snapshot(a, opt)
    run_steps(a, ex, 3, batch_size=4, opt=opt, start=4)
    b, _ = make_algo("ppo", seed=1, **kw)
    opt_b = restore(b, snap)
    run_steps(b, ex, 3, batch_size=4, opt=opt_b, start=4)
    assert_same_params(a.rt.model, b.rt.model)
