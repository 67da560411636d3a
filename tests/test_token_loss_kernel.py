"""The token-loss Triton kernel (under the interpreter on CPU) and its PyTorch twin vs an fp64 autograd reference."""

from __future__ import annotations

import pytest
import torch

from fastpref.ops.token_loss import token_policy_loss
from fastpref.testing import assert_close_to_ref

triton = pytest.importorskip("triton")

N, S = 45, 5  # sequences of uneven length, some tokens masked


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([13, 2, 0, 19, 11])
    ids = torch.repeat_interleave(torch.arange(S), lens)
    mask = (torch.rand(N, generator=g) > 0.2).double()
    lp = -torch.rand(N, generator=g, dtype=torch.float64) * 2
    old = lp + 0.25 * torch.randn(N, generator=g, dtype=torch.float64)
    ref = lp + 0.25 * torch.randn(N, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    w = mask * torch.rand(N, generator=g, dtype=torch.float64)
    # garbage where the weight is 0: must not leak
    old = torch.where(mask > 0, old, torch.full_like(old, float("-inf")))
    return lp, old, ref, adv, w, mask, ids


def _ref(lp, old, ref, adv, w, mask, ids, *, level, eps_low, eps_high, delta, beta, kl, on_policy):
    """fp64 loss, per sequence, with autograd: sum_t w_t l_t."""
    x = lp.clone().requires_grad_()
    total = x.new_zeros(())
    ratios = torch.zeros_like(lp)
    for i in range(S):
        sel = (ids == i).nonzero().squeeze(1)
        on = sel[mask[sel] > 0]
        if on.numel() == 0:
            continue
        xs = x[on]
        o = xs.detach() if on_policy else old[on]
        if level == "token":
            r = torch.exp(xs - o)
        elif level == "sequence":
            r = torch.exp((xs - o).mean()).expand(on.numel())
        else:
            r = torch.exp((xs - o).mean()).detach() * torch.exp(xs - xs.detach())
        a = adv[on]
        r1 = r if delta is None else r.clamp(max=delta)
        l = -torch.minimum(r1 * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
        if ref is not None:
            d = ref[on] - xs
            l = l + beta * {"k1": -d, "k2": d * d / 2, "k3": d.exp() - d - 1}[kl]
        total = total + (w[on] * l).sum()
        ratios[on] = r.detach()
    g, = torch.autograd.grad(total, x)
    return total.detach(), g, ratios


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("kl,has_ref,on_policy,delta", [("k1", True, False, None), ("k2", True, True, 2.5),
                                                        ("k3", True, False, 2.5), ("k3", False, False, None)])
def test_kernel_and_twin_vs_fp64(level, kl, has_ref, on_policy, delta):
    lp, old, ref, adv, w, mask, ids = _inputs(seed=len(level) * 7 + int(kl[1]) + 10 * on_policy)
    eps_low, eps_high = (0.2, 0.28) if level == "token" else (3e-4, 4e-4)
    want, gw, rw = _ref(lp, old, ref if has_ref else None, adv, w, mask, ids, level=level, eps_low=eps_low,
                        eps_high=eps_high, delta=delta, beta=0.1, kl=kl, on_policy=on_policy)
    counts = torch.zeros(S).index_add_(0, ids, mask.float())
    inv = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros_like(counts))
    outs = {}
    for impl in ("torch", "triton"):
        x = lp.float().requires_grad_()
        loss, st = token_policy_loss(x, adv.float(), w.float(), mask.float(),
                                     old_logp=None if on_policy else old.float(),
                                     ref_logp=ref.float() if has_ref else None, level=level, seq_ids=ids,
                                     seq_inv_len=inv, eps_low=eps_low, eps_high=eps_high, delta=delta, beta=0.1,
                                     kl_estimator=kl, impl=impl)
        g, = torch.autograd.grad(loss, x)
        outs[impl] = (loss, g, st)
    (lt, gt, st_t), (lk, gk, st_k) = outs["torch"], outs["triton"]
    assert_close_to_ref("loss", want, lt, lk)
    assert_close_to_ref("g", gw, gt, gk)
    assert_close_to_ref("ratio", rw, st_t.ratio, st_k.ratio)
    assert torch.equal(st_t.clip, st_k.clip)
    assert torch.all(gk[mask == 0] == 0) and torch.isfinite(gk).all()
    if has_ref:
        assert_close_to_ref("kl", st_t.kl.double(), st_k.kl)
    else:
        assert st_k.kl is None
    # clip flags against their definition, on the fp64 ratios
    low = (mask > 0) & (rw < 1 - eps_low) & (adv < 0)
    high = (mask > 0) & (rw > 1 + eps_high) & (adv > 0)
    assert torch.equal(st_k.clip, low.to(torch.int8) + 2 * high.to(torch.int8))


def test_kernel_launcher_checks():
    from fastpref.kernels.token_loss import token_loss_fwd

    x = torch.zeros(8)
    kw = dict(old_logp=None, ref_logp=None, seq_log_ratio=None, eps_low=0.2, eps_high=0.2, delta=float("inf"),
              beta=0.0, kl_estimator="k3")
    with pytest.raises(ValueError, match="advantages must be 1-D"):
        token_loss_fwd(x, torch.zeros(7), x, **kw)
    with pytest.raises(ValueError, match="weights must be float32"):
        token_loss_fwd(x, x, x.double(), **kw)
    with pytest.raises(ValueError, match="old_logp must be contiguous"):
        token_loss_fwd(x, x, x, **{**kw, "old_logp": torch.zeros(16)[::2]})
    with pytest.raises(ValueError, match="kl_estimator"):
        token_loss_fwd(x, x, x, **{**kw, "kl_estimator": "k9"})
    out = token_loss_fwd(torch.zeros(0), torch.zeros(0), torch.zeros(0), **kw)
    assert out[0].shape == (0,)


def test_op_checks():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="level"):
        token_policy_loss(x, x, x, x, level="seq")
    with pytest.raises(ValueError, match="seq_ids"):
        token_policy_loss(x, x, x, x, level="sequence")
    with pytest.raises(ValueError, match="weights must be float32"):
        token_policy_loss(x, x, x.double(), x)
    with pytest.raises(ValueError, match="impl"):
        token_policy_loss(x, x, x, x, impl="cuda")


@pytest.mark.gpu
def test_kernel_matches_twin_on_gpu_large():
    torch.manual_seed(0)
    n = 1 << 20
    lp = -torch.rand(n, device="cuda") * 3
    old = lp + 0.1 * torch.randn_like(lp)
    ref = lp + 0.1 * torch.randn_like(lp)
    adv = torch.randn_like(lp)
    mask = (torch.rand_like(lp) > 0.1).float()
    w = mask / mask.sum()
    res = []
    for impl in ("torch", "triton"):
        x = lp.clone().requires_grad_()
        loss, st = token_policy_loss(x, adv, w, mask, old_logp=old, ref_logp=ref, beta=0.04, impl=impl)
        g, = torch.autograd.grad(loss, x)
        res.append((loss, g, st.clip))
    assert torch.allclose(res[0][0], res[1][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(res[0][1], res[1][1], rtol=1e-5, atol=1e-10)
    assert (res[0][2] != res[1][2]).float().mean().item() < 1e-4


@pytest.mark.parametrize("seq,kl", [(False, 2), (True, 0)])
def test_kernel_compiles_for_sm90(seq, kl):
    """The interpreter accepts code the GPU compiler rejects: compile for H100 ahead of time (no GPU needed)."""
    from fastpref.testing import compile_for_gpu, ptxas_available

    if not ptxas_available():
        pytest.skip("the triton wheel has no ptxas")
    f32 = "*fp32"
    sig = {k: f32 for k in ("LOGP", "OLD", "REF", "SEQ_LR", "ADV", "WGT", "OUT_LOSS", "OUT_G", "OUT_GR", "OUT_RATIO",
                            "OUT_KL")}
    sig.update({"OUT_CLIP": "*i8", "n": "i32", "eps_low": "fp32", "eps_high": "fp32", "delta": "fp32", "beta": "fp32"})
    res = compile_for_gpu("fastpref.kernels.token_loss", "_token_loss_kernel", sig,
                          {"HAS_OLD": True, "HAS_REF": True, "SEQ_RATIO": seq, "KL_KIND": kl, "BLOCK": 1024},
                          num_warps=4)
    assert res["stack"] == 0, res
