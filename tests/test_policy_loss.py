"""Plain RL policy losses vs independent fp64 formulas (written here, per sequence) and vs TRL's GRPO loss."""

from __future__ import annotations

import collections
import types

import pytest
import torch

from fastpref.losses.policy import LOSS_TYPES, policy_loss, token_weights, value_loss

LENS = [6, 3, 1, 4, 0, 5]  # uneven, one empty completion
T = 6


def _batch(seed=0, dtype=torch.float64, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    B = len(LENS)
    mask = torch.zeros(B, T, dtype=dtype)
    for i, n in enumerate(LENS):
        mask[i, :n] = 1
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, generator=g, dtype=dtype) if per_token_adv else torch.randn(B, generator=g, dtype=dtype)
    # garbage where the mask is 0: must not leak into anything
    lp = torch.where(mask > 0, lp, torch.full_like(lp, -30.0))
    old = torch.where(mask > 0, old, torch.full_like(old, float("-inf")))
    return lp, old, ref, adv, mask


def _ref_loss(lp, old, adv, mask, ref, *, loss_type, eps_low, eps_high, beta, kl, delta=None, on_policy=False,
              max_len=T, num_items=None):
    """fp64 loss written per sequence from the papers' formulas (GRPO/DAPO/Dr.GRPO/GSPO/PPO)."""
    B = lp.shape[0]
    per_seq, tok_sum, n_tot = [], 0.0, 0.0
    for i in range(B):
        n = int(mask[i].sum())
        if n == 0:
            per_seq.append(lp.new_zeros(()))
            continue
        x = lp[i, :n]
        o = x.detach() if on_policy else old[i, :n]
        a = adv[i] if adv.dim() == 1 else adv[i, :n]
        if loss_type == "gspo":
            s = torch.exp((x - o).mean())
            r = s.expand(n)
        elif loss_type == "gspo_token":
            s = torch.exp((x - o).mean()).detach()
            r = s * torch.exp(x - x.detach())
        else:
            r = torch.exp(x - o)
        r1 = r if delta is None else torch.clamp(r, max=delta)
        l = -torch.minimum(r1 * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
        if beta:
            d = ref[i, :n] - x
            k = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl]
            l = l + beta * k
        per_seq.append(l.sum() / n)
        tok_sum = tok_sum + l.sum()
        n_tot += n
    if loss_type in ("grpo", "gspo", "gspo_token"):
        return torch.stack(per_seq).mean()
    if loss_type in ("bnpo", "ppo"):
        return tok_sum / n_tot
    if loss_type == "dapo":
        return tok_sum / (n_tot if num_items is None else num_items)
    return tok_sum / (B * max_len)  # dr_grpo


EPS = {"dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4)}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_every_loss_type_and_estimator_vs_fp64(loss_type, kl):
    lp, old, ref, adv, mask = _batch()
    eps_low, eps_high = EPS.get(loss_type, (0.2, 0.2))
    x32 = lp.float().requires_grad_()
    loss, metrics = policy_loss(x32, old.float(), adv.float(), mask.float(), loss_type=loss_type,
                                ref_logps=ref.float(), beta=0.05, kl_estimator=kl, impl="torch")
    g, = torch.autograd.grad(loss, x32)
    x64 = lp.clone().requires_grad_()
    want = _ref_loss(x64, old, adv, mask, ref, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, beta=0.05,
                     kl=kl)
    gw, = torch.autograd.grad(want, x64)
    assert abs(loss.item() - want.item()) < 1e-5
    assert (g.double() - gw).abs().max().item() < 1e-6
    assert torch.all(g[mask == 0] == 0)
    assert set(metrics) == {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio/mean", "kl"}
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo", "gspo_token", "ppo"])
def test_on_policy_per_token_advantages_dual_clip(loss_type):
    """old_logps=None: ratio 1 with logp's gradient; per-token advantages; delta (dual clip)."""
    lp, old, ref, adv, mask = _batch(seed=1, per_token_adv=True)
    eps_low, eps_high = EPS.get(loss_type, (0.2, 0.2))
    for on_policy in (True, False):
        x = lp.float().requires_grad_()
        loss, m = policy_loss(x, None if on_policy else old.float(), adv.float(), mask.float(), loss_type=loss_type,
                              delta=3.0, impl="torch")
        g, = torch.autograd.grad(loss, x)
        x64 = lp.clone().requires_grad_()
        want = _ref_loss(x64, old, adv, mask, ref, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, beta=0.0,
                         kl=None, delta=3.0, on_policy=on_policy)
        gw, = torch.autograd.grad(want, x64)
        assert abs(loss.item() - want.item()) < 1e-5, on_policy
        assert (g.double() - gw).abs().max().item() < 1e-6, on_policy
        if on_policy:
            assert abs(m["ratio/mean"].item() - 1.0) < 1e-6 and m["clip_ratio/region_mean"].item() == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    """With A < 0 and a huge ratio, the loss per token is at most delta * |A| and carries no gradient."""
    x = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-5.0]])  # ratio e^5 ~ 148
    loss, _ = policy_loss(x, old, torch.tensor([-1.0]), torch.ones(1, 1), loss_type="ppo", delta=3.0, impl="torch")
    g, = torch.autograd.grad(loss, x)
    assert abs(loss.item() - 3.0) < 1e-6 and g.item() == 0.0
    loss, _ = policy_loss(x, old, torch.tensor([-1.0]), torch.ones(1, 1), loss_type="ppo", impl="torch")
    assert abs(loss.item() - torch.tensor(5.0).exp().item()) < 1e-3


def test_dapo_num_items_and_dr_grpo_max_len_and_packed():
    lp, old, ref, adv, mask = _batch(seed=2)
    loss, _ = policy_loss(lp.float(), old.float(), adv.float(), mask.float(), loss_type="dapo",
                          num_items_in_batch=torch.tensor(40.0), impl="torch")
    want = _ref_loss(lp, old, adv, mask, ref, loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0, kl=None,
                     num_items=40.0)
    assert abs(loss.item() - want.item()) < 1e-5
    loss, _ = policy_loss(lp.float(), old.float(), adv.float(), mask.float(), loss_type="dr_grpo",
                          max_completion_length=16, impl="torch")
    want = _ref_loss(lp, old, adv, mask, ref, loss_type="dr_grpo", eps_low=0.2, eps_high=0.2, beta=0, kl=None,
                     max_len=16)
    assert abs(loss.item() - want.item()) < 1e-5
    # packed: the same completions concatenated (cu_seqlens), per-sequence advantages [S]
    sel = mask.reshape(-1) > 0
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
    for lt in ("grpo", "gspo", "dapo"):
        padded, _ = policy_loss(lp.float(), old.float(), adv.float(), mask.float(), loss_type=lt, impl="torch")
        packed, _ = policy_loss(lp.reshape(-1)[sel].float(), old.reshape(-1)[sel].float(), adv.float(),
                                torch.ones(int(sel.sum())), loss_type=lt, cu_seqlens=cu, impl="torch")
        assert abs(padded.item() - packed.item()) < 1e-6, lt


def test_token_weights_tables():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(token_weights(mask, "grpo"), mask / torch.tensor([[6.0], [2.0]]))
    torch.testing.assert_close(token_weights(mask, "bnpo"), mask / 4)
    torch.testing.assert_close(token_weights(mask, "dr_grpo"), mask / 8)
    torch.testing.assert_close(token_weights(mask, "dapo", num_items_in_batch=10.0), mask / 10)
    with pytest.raises(ValueError, match="max_completion_length"):
        token_weights(mask.reshape(-1), "dr_grpo", cu_seqlens=torch.tensor([0, 4, 8]))


def test_entropy_metric_and_bonus():
    lp, old, ref, adv, mask = _batch(seed=3)
    ent = torch.rand_like(lp).float().requires_grad_()
    base, _ = policy_loss(lp.float(), old.float(), adv.float(), mask.float(), loss_type="grpo", impl="torch")
    loss, m = policy_loss(lp.float(), old.float(), adv.float(), mask.float(), loss_type="grpo", entropy=ent,
                          entropy_coef=0.1, impl="torch")
    mean_h = (ent.double() * mask).sum() / mask.sum()
    assert abs(m["entropy"].item() - mean_h.item()) < 1e-6
    assert abs(loss.item() - (base.item() - 0.1 * mean_h.item())) < 1e-6
    g, = torch.autograd.grad(loss, ent)
    torch.testing.assert_close(g, (-0.1 * mask / mask.sum()).float())


def test_errors_name_the_parameter():
    lp, old, ref, adv, mask = _batch()
    args = (lp.float(), old.float(), adv.float(), mask.float())
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(*args, loss_type="nope")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(*args, loss_type="grpo", beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp.float(), old.float(), adv[:2].float(), mask.float(), loss_type="grpo")
    with pytest.raises(ValueError, match="delta"):
        policy_loss(*args, loss_type="grpo", delta=1.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        policy_loss(*args, loss_type="grpo", ref_logps=ref.float(), beta=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(*args, loss_type="gspo", importance_sampling_level="token")


def test_value_loss_vs_formula():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    v = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    old = v.detach() + 0.5 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    ret = torch.randn(2, 4, generator=g, dtype=torch.float64)
    loss, m = value_loss(v, old, ret, mask, clip=0.2)
    want, frac, n = 0.0, 0, 0
    for i in range(2):
        for t in range(4):
            if mask[i, t]:
                vc = min(max(v[i, t].item(), old[i, t].item() - 0.2), old[i, t].item() + 0.2)
                a, b = (v[i, t].item() - ret[i, t].item()) ** 2, (vc - ret[i, t].item()) ** 2
                want += max(a, b)
                frac += b > a
                n += 1
    assert abs(loss.item() - 0.5 * want / n) < 1e-12
    assert abs(m["value/clipfrac"].item() - frac / n) < 1e-12


# ------------------------------------------------------------ TRL 1.16's GRPOTrainer._compute_loss, called on a stub


def _trl_loss(logps, old, adv, mask, ref, *, loss_type, eps_low, eps_high, level, beta, delta, max_len):
    """TRL's own loss code, run without a model: a stub object carries the attributes ``_compute_loss`` reads."""
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    acc = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                reduce=lambda x, reduction="sum": x, sync_gradients=True)
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    B, Tc = logps.shape
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, Tc, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    loss = trainer.GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"),
                                             ("dapo", "token"), ("grpo", "sequence")])
@pytest.mark.parametrize("on_policy,delta", [(False, None), (True, None), (False, 1.5)])
def test_matches_trl_grpo_loss(loss_type, level, on_policy, delta):
    lp, old, ref, adv, mask = _batch(seed=5)
    lp = torch.where(mask > 0, lp, torch.zeros_like(lp)).float()
    old = torch.where(mask > 0, old, torch.zeros_like(old)).float()
    ref, adv, mask = ref.float(), adv.float(), mask.float()
    eps_low, eps_high = (3e-4, 4e-4) if level == "sequence" else EPS.get(loss_type, (0.2, 0.2))
    x1 = lp.clone().requires_grad_()
    want, trl_m = _trl_loss(x1, None if on_policy else old, adv, mask, ref, loss_type=loss_type, eps_low=eps_low,
                            eps_high=eps_high, level=level, beta=0.04, delta=delta, max_len=T)
    gw, = torch.autograd.grad(want, x1)
    x2 = lp.clone().requires_grad_()
    loss, m = policy_loss(x2, None if on_policy else old, adv, mask, loss_type=loss_type, eps_low=eps_low,
                          eps_high=eps_high, importance_sampling_level=level, ref_logps=ref, beta=0.04, delta=delta,
                          impl="torch")
    g, = torch.autograd.grad(loss, x2)
    assert abs(loss.item() - want.item()) < 1e-6
    assert (g - gw).abs().max().item() < 1e-7
    assert abs(m["kl"].item() - trl_m["kl"]) < 1e-6
    if level == "token":  # at sequence level TRL's means also count the empty completion; ours do not
        for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert abs(m[k].item() - trl_m[k]) < 1e-6, k
