"""Advantages and reward shaping vs hand-written loops (python floats) and TRL where it has the function."""

from __future__ import annotations

import math

import pytest
import torch

from fastpref.losses.advantages import (gae, group_advantages, kl_penalty_rewards, overlong_penalty,
                                        rloo_advantages, whiten)


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_vs_loop(scale):
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 0.0, 4.0, 1.0], dtype=torch.float64)
    G = 4
    got = group_advantages(r, G, scale_rewards=scale)
    rl = r.tolist()
    for i, x in enumerate(rl):
        grp = rl[(i // G) * G:(i // G + 1) * G]
        a = x - sum(grp) / G
        if scale == "group":
            a /= _std(grp) + 1e-4
        elif scale == "batch":
            a /= _std(rl) + 1e-4
        assert abs(got[i].item() - a) < 1e-12, (i, scale)
    assert torch.all(got[4:8] == 0)  # a group with equal rewards has no signal


def test_group_advantages_single_generation_and_errors():
    assert torch.all(group_advantages(torch.tensor([1.0, 2.0]), 1) == 0)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="std")
    with pytest.raises(ValueError, match="num_generations"):
        rloo_advantages(torch.zeros(4), 1)


def test_rloo_vs_loop():
    r = torch.randn(12, dtype=torch.float64)
    got = rloo_advantages(r, 3)
    rl = r.tolist()
    for i, x in enumerate(rl):
        others = [y for j, y in enumerate(rl[(i // 3) * 3:(i // 3 + 1) * 3]) if (i // 3) * 3 + j != i]
        assert abs(got[i].item() - (x - sum(others) / len(others))) < 1e-12


def _lens_mask(lens, T):
    m = torch.zeros(len(lens), T, dtype=torch.float64)
    for i, n in enumerate(lens):
        m[i, :n] = 1
    return m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_vs_loop_uneven_lengths(gamma, lam):
    lens, T = [5, 2, 0, 3], 5
    mask = _lens_mask(lens, T)
    rew = torch.randn(4, T, dtype=torch.float64)
    val = torch.randn(4, T, dtype=torch.float64)
    adv, ret = gae(rew, val, mask, gamma=gamma, lam=lam, whiten_advantages=False)
    for i, n in enumerate(lens):
        a_next = 0.0
        for t in reversed(range(n)):
            v_next = val[i, t + 1].item() if t + 1 < n else 0.0  # the episode ends at the last token
            a_next = rew[i, t].item() + gamma * v_next - val[i, t].item() + gamma * lam * a_next
            assert abs(adv[i, t].item() - a_next) < 1e-12, (i, t)
            assert abs(ret[i, t].item() - (a_next + val[i, t].item())) < 1e-12
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)
    white, _ = gae(rew, val, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(white, whiten(adv, mask))


def test_whiten_vs_loop():
    mask = _lens_mask([4, 1, 3], 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    vals = [x[i, t].item() for i in range(3) for t in range(4) if mask[i, t]]
    m, s = sum(vals) / len(vals), _std(vals)
    got = whiten(x, mask, eps=0.0)
    for i in range(3):
        for t in range(4):
            want = (x[i, t].item() - m) / s if mask[i, t] else 0.0
            assert abs(got[i, t].item() - want) < 1e-12
    kept = whiten(x, mask, shift_mean=False, eps=0.0)
    assert abs(((kept * mask).sum() / mask.sum()).item() - m) < 1e-12


def test_kl_penalty_rewards_vs_loop():
    lens, T = [3, 1, 0, 4], 4
    mask = _lens_mask(lens, T)
    lp, ref, score = torch.randn(4, T, dtype=torch.float64), torch.randn(4, T, dtype=torch.float64), torch.randn(4)
    got = kl_penalty_rewards(score.double(), lp, ref, mask, kl_coef=0.1)
    for i, n in enumerate(lens):
        for t in range(T):
            want = -0.1 * (lp[i, t] - ref[i, t]).item() if t < n else 0.0
            if n and t == n - 1:
                want += score[i].item()
            assert abs(got[i, t].item() - want) < 1e-6, (i, t)
    k3 = kl_penalty_rewards(torch.zeros(4, dtype=torch.float64), lp, ref, mask, kl_coef=1.0, kl_estimator="k3")
    d = ref - lp
    torch.testing.assert_close(k3, -(d.exp() - d - 1) * mask)


def test_overlong_penalty_vs_piecewise_and_trl():
    lengths = torch.tensor([10, 80, 81, 90, 100, 101, 500])
    got = overlong_penalty(lengths, 100, 20)
    for L, g in zip(lengths.tolist(), got.tolist()):
        want = 0.0 if L <= 80 else ((80 - L) / 20 if L <= 100 else -1.0)
        assert abs(g - want) < 1e-6, L
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(lengths, 100, 0)
    rewards = pytest.importorskip("trl.rewards")
    trl_fn = rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    trl = trl_fn([[1] * L for L in lengths.tolist()])
    assert got.tolist() == pytest.approx(trl, abs=1e-6)
