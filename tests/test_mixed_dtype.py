"""Mixed dtypes (bf16 mixed precision: fp32 master weights, bf16 activations) in the ops, fused losses and attention.

The rule (``fastpref._amp``): inside ``torch.autocast`` compute in autocast's dtype (as ``lm_head`` / SDPA would),
outside it in the promoted dtype; gradients in each input's own dtype. Checked against fp64 references on the
inputs' exact (rounded) values: inside CPU autocast within the bf16 tolerance and equal to the same op on inputs
cast to bf16 by hand (autocast is honoured); outside autocast within the fp32 tolerance (promotion happened).
For linear_logprobs, a fused preference loss (DPO), FusedLinearPolicyLoss, varlen_attention and the transformers
attention hook.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import test_fused_policy as tpol
import test_fused_preference as tpref
import torch
from test_logprobs import _problem, _reference
from test_varlen_attention import _cu
from test_varlen_attention import _ref as attention_ref

from fastpref.attention import varlen_attention
from fastpref.attention.hf import fastpref_attention_forward
from fastpref.losses import FusedLinearDPOLoss
from fastpref.losses.fused_policy import FusedLinearPolicyLoss
from fastpref.ops import linear_logprobs
from fastpref.testing import assert_close_to_ref

BF16, F32 = torch.bfloat16, torch.float32
# (hidden dtype, weight dtype, bias dtype or None)
COMBOS = [(BF16, F32, None), (F32, BF16, None), (BF16, F32, F32), (BF16, F32, BF16), (F32, BF16, BF16)]


def _ctx(autocast: bool):
    return torch.autocast("cpu", dtype=BF16) if autocast else contextlib.nullcontext()


def _tol(autocast: bool, x: torch.Tensor) -> torch.dtype:
    """The tolerance for ``x``: bf16 inside autocast (the op computes in bf16); outside, mixed inputs promote to
    fp32, so fp32 -- unless ``x`` itself is bf16 (a gradient returned in a bf16 input's dtype)."""
    return BF16 if autocast or x.dtype == BF16 else F32


def _leaves(*xs_dtypes):
    return [None if x is None else x.to(d).requires_grad_() for x, d in xs_dtypes]


# ------------------------------------------------------------------------------------------------ linear_logprobs

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("hd,wd,bd", COMBOS)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_logprobs_mixed(impl, hd, wd, bd, autocast):
    h, w, b, t, up, _ = _problem(24, 32, 96, bias=bd is not None, scale=0.5)
    # the reference sees the inputs' exact values
    h, w = h.to(hd).double(), w.to(wd).double()
    b = b.to(bd).double() if b is not None else None
    ref = _reference(h, w, b, t, 0.9, up, up, False, head={"softcap": 3.0})
    x = _leaves((h, hd), (w, wd), (b, bd))
    with _ctx(autocast):
        logp = linear_logprobs(x[0], x[1], t, bias=x[2], temperature=0.9, softcap=3.0, impl=impl, chunk_size=8)
    assert logp.dtype == F32
    (logp * up.float()).sum().backward()  # outside autocast, as recommended
    assert x[0].grad.dtype == hd and x[1].grad.dtype == wd and (b is None or x[2].grad.dtype == bd)
    for name, r, g in (("logp", ref["logp"], logp.detach()), ("dh", ref["dh"], x[0].grad), ("dw", ref["dw"], x[1].grad),
                       ("db", ref["db"], None if b is None else x[2].grad)):
        if r is not None:
            assert_close_to_ref(f"{name} {hd}/{wd}/{bd}", r, g, dtype=_tol(autocast, g))
    if autocast:  # the same computation as on inputs cast to bf16 by hand
        by_hand = linear_logprobs(h.to(BF16), w.to(BF16), t, bias=None if b is None else b.to(BF16), temperature=0.9,
                                  softcap=3.0, impl=impl, chunk_size=8)
        torch.testing.assert_close(logp.detach(), by_hand, rtol=0, atol=1e-6)


def test_uniform_fp32_under_autocast_computes_in_bf16():
    """fp32 hidden and weight inside bf16 autocast: the matmul runs in bf16 as nn.Linear's would (no dtype error)."""
    h, w, _, t, _, _ = _problem(16, 32, 64, bias=False)
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    with _ctx(True):
        logp = linear_logprobs(hf, wf, t, impl="torch")
        logits = torch.nn.functional.linear(hf, wf)
    assert logits.dtype == BF16
    own = torch.where(t != -100, logits.float().log_softmax(-1).gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(logp, own, rtol=0, atol=1e-5)
    logp.sum().backward()
    assert hf.grad.dtype == F32 and wf.grad.dtype == F32


# ------------------------------------------------------------------------------------------- fused preference loss

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("hd,wd", [(BF16, F32), (F32, BF16), (F32, F32)])
@pytest.mark.parametrize("engine,impl", [("eager", "torch"), ("recompute", "torch"), ("eager", "triton")])
def test_fused_dpo_mixed(engine, impl, hd, wd, autocast):
    """Also fp32 master weights and fp32 hidden under bf16 autocast (was: "Expected out tensor to have dtype")."""
    seqs = tpref._sequences(6, 0)
    h64, t, cu, _ = tpref._layout(seqs, "packed", True)
    g = torch.Generator().manual_seed(1)
    w64 = (torch.randn(tpref.V, tpref.H, generator=g, dtype=torch.float64) / tpref.H ** 0.5 * 2).to(wd).double()
    h64 = h64.to(hd).double()
    rh64 = (h64 + 0.3 * torch.randn(h64.shape, generator=g, dtype=torch.float64)).to(hd).double()
    hl, wl = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    seq, lens = tpref._naive_seq_logps(hl, wl, t, cu.tolist(), None, 0.7)
    with torch.no_grad():
        ref, _ = tpref._naive_seq_logps(rh64, w64, t, cu.tolist(), None, 0.7)
    want, _ = tpref._oracle("dpo", dict(beta=0.2), seq, lens, ref, None, None)
    want.backward()
    h, w = h64.to(hd).requires_grad_(), w64.to(wd).requires_grad_()
    with _ctx(autocast):
        loss, _ = FusedLinearDPOLoss(beta=0.2, temperature=0.7, chunk_size=24, impl=impl, engine=engine)(
            h, w, t, cu_seqlens=cu, ref_hidden=rh64.to(hd))
    loss.backward()
    assert loss.dtype == F32 and h.grad.dtype == hd and w.grad.dtype == wd
    assert_close_to_ref("loss", want.detach(), loss.detach(), dtype=_tol(autocast, loss))
    assert_close_to_ref("dhidden", hl.grad, h.grad, dtype=_tol(autocast, h.grad))
    assert_close_to_ref("dweight", wl.grad, w.grad, dtype=_tol(autocast, w.grad))


# ---------------------------------------------------------------------------------------------- fused policy loss

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("hd,wd,bias", [(BF16, F32, False), (F32, BF16, False), (BF16, F32, True)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_policy_mixed(impl, hd, wd, bias, autocast):
    h, w, tgt, cu, old, ref, adv = tpol._batch(seed=3)
    h, w = h.to(hd).double(), w.to(wd).double()
    b = (0.5 * torch.randn(tpol.V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).to(F32).double() \
        if bias else None
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if bias else None
    z = (hh @ ww.T + (bb if bias else 0)) / 0.7
    lp = z.log_softmax(-1).gather(1, tgt.clamp(min=0)[:, None])[:, 0] * (tgt != -100)
    want = tpol._ref_loss(lp, old, ref, adv, tgt, cu, loss_type="dapo", beta=0.05)
    want.backward()
    x = _leaves((h, hd), (w, wd), (b, F32))
    f = FusedLinearPolicyLoss("dapo", beta=0.05, temperature=0.7, chunk_size=9, max_completion_length=10, impl=impl)
    with _ctx(autocast):
        loss, _ = f(x[0], x[1], tgt, adv.float(), cu_seqlens=cu, old_logps=old.float(), ref_logps=ref.float(),
                    bias=x[2])
    loss.backward()
    assert x[0].grad.dtype == hd and x[1].grad.dtype == wd and (not bias or x[2].grad.dtype == F32)
    assert_close_to_ref("loss", want.detach(), loss.detach(), dtype=_tol(autocast, loss))
    for name, r, gr in (("dhidden", hh.grad, x[0].grad), ("dweight", ww.grad, x[1].grad),
                        ("dbias", bb.grad if bias else None, x[2].grad if bias else None)):
        if r is not None:
            assert_close_to_ref(name, r, gr, dtype=_tol(autocast, gr))


# ------------------------------------------------------------------------------------------------------ attention

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("qd,kd,vd", [(BF16, F32, F32), (F32, BF16, BF16), (F32, F32, BF16)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_varlen_attention_mixed(impl, qd, kd, vd, autocast):
    lens, hq, hkv, d = [1, 13, 6], 4, 2, 16
    total = sum(lens)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, n, d, generator=g).to(dt) for n, dt in ((hq, qd), (hkv, kd), (hkv, vd)))
    go = torch.randn(total, hq, d, generator=g)
    scale = 0.7 / math.sqrt(d)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*leaves, lens, True, scale)
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    with _ctx(autocast):
        out = varlen_attention(*x, _cu(lens), max(lens), softmax_scale=scale, impl=impl)
    assert out.dtype == (BF16 if autocast else F32)  # autocast's dtype, else promoted
    grads = torch.autograd.grad(out, x, go.to(out.dtype))
    assert [gr.dtype for gr in grads] == [qd, kd, vd]
    for name, r, o in zip(("out", "dq", "dk", "dv"), (ref, *ref_grads), (out, *grads)):
        assert_close_to_ref(name, r, o.detach(), dtype=_tol(autocast, o))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_hf_attention_hook_under_autocast_with_fp32_qkv(impl):
    """transformers' call under autocast with fp32 q/k/v (e.g. after a norm): packed rows, bf16 out, fp32 grads."""
    from fastpref.attention import hf as fhf

    lens, hq, hkv, d = [5, 9], 4, 2, 16
    T = sum(lens)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, T, d, generator=g).requires_grad_() for n in (hq, hkv, hkv))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    fhf.register_hf_attention(impl)
    try:
        with _ctx(True):
            out, _ = fastpref_attention_forward(SimpleNamespace(is_causal=True), q, k, v, None, scaling=0.25,
                                                position_ids=pos)
    finally:
        fhf.register_hf_attention("auto")
    assert out.dtype == BF16 and out.shape == (1, T, hq, d)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*(x[0].transpose(0, 1) for x in leaves), lens, True, 0.25)
    assert_close_to_ref("out", ref, out[0].detach(), dtype=BF16)
    out.float().sum().backward()
    ref.sum().backward()
    for x, r in zip((q, k, v), leaves):
        assert x.grad.dtype == F32
        assert_close_to_ref("grad", r.grad, x.grad, dtype=BF16)
