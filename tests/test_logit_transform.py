"""The models' final-logit transform (``softcap``, ``logit_scale``) inside fastpref's kernels, ops and fused losses.

Oracle: fp64 full logits with the transform applied in the models' order (``fastpref.testing.reference_logits``:
``* logit_scale``, then ``softcap * tanh(. / softcap)``, then ``/ temperature``). Checked: ``linear_logprobs`` and
``linear_cross_entropy`` (PyTorch twin and Triton kernels under the interpreter: forward, backward, entropy, bias,
temperature, ignored rows), the fused preference losses (DPO, KTO, ORPO, SimPO) and ``FusedLinearPolicyLoss`` vs
their unfused references -- with the helpers and tolerances of test_logprobs, test_fused_preference and
test_fused_policy (``fastpref.testing.TOL``). Each group also shows that dropping the transform would fail it.
"""

from __future__ import annotations

import pytest
import test_fused_policy as tpol
import test_fused_preference as tpref
import torch
from test_logprobs import IGN, _problem, _reference, _run

from fastpref.losses import FusedLinearDPOLoss
from fastpref.losses.fused_policy import FusedLinearPolicyLoss
from fastpref.ops import fused_linear_chunked_loss, linear_cross_entropy, linear_logprobs
from fastpref.testing import TOL, assert_close_to_ref, max_err

F32 = torch.float32
HEADS = {  # values that matter: the test problems' raw logits reach |z| ~ 10
    "softcap": {"softcap": 2.0},
    "scale": {"logit_scale": 4.0},
    "both": {"softcap": 3.0, "logit_scale": 0.5},
}
MATTERS = 100  # dropping the transform must move the result by more than this many tolerances


def _slack(ref: torch.Tensor, dtype=F32) -> float:
    return TOL[dtype].atol * max(1.0, ref.double().abs().max().item())


def _assert_transform_matters(name, transformed_ref, untransformed, dtype=F32):
    err = max_err(untransformed, transformed_ref)
    assert err > MATTERS * _slack(transformed_ref, dtype), f"{name}: the transform does not matter here ({err:.3g})"


# ------------------------------------------------------------------------------------------------ linear_logprobs

@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("bias,entropy,T", [(False, False, 1.0), (True, True, 0.7), (True, False, 1.3)])
def test_linear_logprobs_matches_fp64(head, bias, entropy, T):
    h, w, b, t, ul, ue = _problem(37, 24, 70, bias=bias)  # every 4th row ignored
    ref = _reference(h, w, b, t, T, ul, ue, entropy, head=HEADS[head])
    twin = _run("torch", F32, h, w, b, t, T, ul, ue, entropy, 16, **HEADS[head])
    kern = _run("triton", F32, h, w, b, t, T, ul, ue, entropy, 16, num_splits=2, **HEADS[head])
    for k in ("logp", "entropy", "dh", "dw", "db"):
        if twin[k] is None:
            continue
        assert_close_to_ref(f"{head} {k}", ref[k], twin[k], kern[k], F32)
    ign = t == IGN
    assert (kern["logp"][ign] == 0).all() and (twin["logp"][ign] == 0).all()
    assert (twin["dh"][ign] == 0).all() and (kern["dh"][ign] == 0).all()
    plain = _reference(h, w, b, t, T, ul, ue, entropy)
    for k in ("logp", "dh", "dw"):
        _assert_transform_matters(f"{head} {k}", ref[k], plain[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_logprobs_half_with_softcap(dtype):
    h, w, b, t, ul, ue = _problem(40, 32, 130, bias=True, scale=0.5)
    ref = _reference(h, w, b, t, 0.9, ul, ue, True, head=HEADS["softcap"])
    twin = _run("torch", dtype, h, w, b, t, 0.9, ul, ue, True, 16, softcap=2.0)
    kern = _run("triton", dtype, h, w, b, t, 0.9, ul, ue, True, 16, softcap=2.0)
    for k in ("logp", "entropy", "dh", "dw", "db"):
        assert_close_to_ref(k, ref[k], twin[k], kern[k], dtype)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_cross_entropy_with_transform(impl):
    h, w, b, t, _, _ = _problem(29, 16, 90, bias=True)
    valid = t != IGN
    up = -valid.double() / valid.sum()  # d(mean CE)/dlogp
    for head in ("softcap", "scale"):
        ref = _reference(h, w, b, t, 0.8, up, up, False, head=HEADS[head])
        hh, ww, bb = (x.float().requires_grad_() for x in (h, w, b))
        loss = linear_cross_entropy(hh, ww, t, bias=bb, temperature=0.8, impl=impl, chunk_size=8, **HEADS[head])
        loss.backward()
        want = -ref["logp"].sum() / valid.sum()
        for name, r, x in (("loss", want, loss), ("dh", ref["dh"], hh.grad), ("dw", ref["dw"], ww.grad),
                           ("db", ref["db"], bb.grad)):
            assert_close_to_ref(f"{head} {name}", r, x.detach(), dtype=F32)
        plain = linear_cross_entropy(h.float(), w.float(), t, bias=b.float(), temperature=0.8, impl=impl)
        _assert_transform_matters(f"{head} loss", want, plain)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_softcap_saturates_without_overflow(impl):
    """Raw logits of +-1e4 (tanh fully saturated): finite, exact log-probs and gradients."""
    h, w, b, t, ul, ue = _problem(12, 16, 40, bias=False, scale=3000.0)
    ref = _reference(h, w, b, t, 1.0, ul, ue, True, head={"softcap": 5.0})
    out = _run(impl, F32, h, w, b, t, 1.0, ul, ue, True, 5, softcap=5.0)
    for k in ("logp", "entropy", "dh", "dw"):
        assert torch.isfinite(out[k]).all(), k
        assert_close_to_ref(k, ref[k], out[k], dtype=F32)


# ------------------------------------------------------------------------------------------- fused preference losses

@pytest.mark.parametrize("head", ["softcap", "scale"])
@pytest.mark.parametrize("case,engine,impl", [("dpo-sigmoid", "eager", "torch"), ("dpo-ldpo", "recompute", "torch"),
                                              ("kto", "eager", "torch"), ("orpo", "eager", "torch"),
                                              ("simpo", "recompute", "torch"), ("dpo-sigmoid", "eager", "triton"),
                                              ("kto", "recompute", "triton")])
def test_fused_preference_losses_match_unfused(head, case, engine, impl):
    """Policy and reference (ref_hidden) log-probs both get the transform; loss, dhidden, dweight, metrics."""
    hd = HEADS[head]
    loss_ref, m_ref, dh_ref, dw_ref, loss, m, dh, dw = tpref._check_case(case, "packed", F32, impl=impl,
                                                                         engine=engine, head=hd)
    assert_close_to_ref(f"{case} loss", loss_ref.detach(), loss.detach(), dtype=F32)
    assert_close_to_ref(f"{case} dhidden", dh_ref, dh, dtype=F32)
    assert_close_to_ref(f"{case} dweight", dw_ref, dw, dtype=F32)
    for k, v in m_ref.items():
        assert_close_to_ref(f"{case} {k}", v.detach().reshape(1), m[k].reshape(1).double(), dtype=F32)
    plain = tpref._check_case(case, "packed", F32, impl="torch", engine=engine)
    _assert_transform_matters(f"{case} dhidden", dh_ref, plain[6])


def test_fused_preference_padded_layout_and_bf16_with_softcap():
    for layout, dtype in (("padded", F32), ("packed", torch.bfloat16)):
        loss_ref, _, dh_ref, dw_ref, loss, _, dh, dw = tpref._check_case("dpo-sigmoid", layout, dtype,
                                                                         head=HEADS["softcap"], ref_mode="logps")
        assert_close_to_ref(f"{layout} loss", loss_ref.detach(), loss.detach(), dtype=dtype)
        assert_close_to_ref(f"{layout} dhidden", dh_ref, dh, dtype=dtype)
        assert_close_to_ref(f"{layout} dweight", dw_ref, dw, dtype=dtype)


# ----------------------------------------------------------------------------------------------- fused policy loss

@pytest.mark.parametrize("head", ["softcap", "scale", "both"])
@pytest.mark.parametrize("loss_type,two_pass", [("dapo", False), ("grpo", True)])
def test_fused_policy_loss_matches_unfused(head, loss_type, two_pass):
    hd = HEADS[head]
    h, w, tgt, cu, _, _, adv = tpol._batch()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # old / ref log-probs near the (transformed) policy's: some ratios clip, some do not
        lp = tpol._logps(h, w, tgt, 0.7, head=hd)
    old = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)
    ref = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=lp.dtype)
    kw = dict(loss_type=loss_type, beta=0.05)
    want, gh_ref, gw_ref = tpol._reference(h, w, tgt, cu, old, ref, adv, 0.7, head=hd, ent_coef=0.2, **kw)
    run = dict(dtype=F32, temp=0.7, ent_coef=0.2, two_pass=two_pass, chunk_size=4 if two_pass else 9, **kw)
    twin = tpol._fused(h, w, tgt, cu, old, ref, adv, impl="torch", head=hd, **run)
    kern = tpol._fused(h, w, tgt, cu, old, ref, adv, impl="triton", head=hd, **run)
    assert_close_to_ref("loss", want, twin[0].detach(), kern[0].detach())
    assert_close_to_ref("dhidden", gh_ref, twin[1], kern[1])
    assert_close_to_ref("dweight", gw_ref, twin[2], kern[2])
    plain = tpol._fused(h, w, tgt, cu, old, ref, adv, impl="torch", **run)
    _assert_transform_matters("policy dhidden", gh_ref, plain[1])


# ------------------------------------------------------------------------------------------------------ validation

BAD = [("softcap", 0.0), ("softcap", -1.0), ("softcap", float("inf")), ("softcap", float("nan")),
       ("logit_scale", 0.0), ("logit_scale", float("inf")), ("logit_scale", -2.0), ("logit_scale", None),
       ("temperature", 0.0), ("temperature", float("nan"))]


@pytest.mark.parametrize("arg,value", BAD)
def test_bad_transform_values_are_refused_in_one_line(arg, value):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, IGN])
    calls = {
        "linear_logprobs": lambda: linear_logprobs(h, w, t, **{arg: value}),
        "linear_cross_entropy": lambda: linear_cross_entropy(h, w, t, **{arg: value}),
        "fused_linear_chunked_loss": lambda: fused_linear_chunked_loss(
            h, w, t, lambda s, e, lp, ent: (lp.sum(), {}), [0, 4], **{arg: value}),
        "FusedLinearDPOLoss": lambda: FusedLinearDPOLoss(**{arg: value}),
        "FusedLinearPolicyLoss": lambda: FusedLinearPolicyLoss("grpo", **{arg: value}),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{op}: {arg} must be") and repr(value) in msg and "\n" not in msg, msg
