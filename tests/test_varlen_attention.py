"""varlen_attention: Triton kernel (interpreter on CPU) and PyTorch twin vs an fp64 per-sequence reference."""

import math

import pytest
import torch

from fastpref.attention import varlen_attention
from fastpref.testing import assert_close_to_ref


def _cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _ref(q, k, v, lens, causal, scale):
    """fp64 naive attention, one sequence at a time, explicit softmax (independent of SDPA and the kernel)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    out, a = [], 0
    for n in lens:
        qs, ks, vs = q[a:a + n], k[a:a + n].repeat_interleave(g, 1), v[a:a + n].repeat_interleave(g, 1)
        s = torch.einsum("thd,uhd->htu", qs, ks) * scale
        if causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append(torch.einsum("htu,uhd->thd", s.softmax(-1), vs))
        a += n
    return torch.cat(out)


CASES = [  # (lens, Hq, Hkv, D, dtype, causal)
    ([1, 17, 5, 33], 2, 2, 64, torch.float32, True),
    ([9, 1, 20], 4, 1, 96, torch.float32, True),
    ([3, 18], 8, 1, 128, torch.float32, True),
    ([1, 31, 16, 7], 8, 2, 16, torch.bfloat16, True),
    ([12, 1, 40], 4, 4, 32, torch.float16, True),
    ([1, 19, 6], 4, 2, 24, torch.float32, False),
]


@pytest.mark.parametrize("lens,hq,hkv,d,dtype,causal", CASES)
def test_forward_backward_vs_fp64(lens, hq, hkv, d, dtype, causal):
    total = sum(lens)
    cu = _cu(lens)
    q = torch.randn(total, hq, d).to(dtype)
    k = torch.randn(total, hkv, d).to(dtype)
    v = torch.randn(total, hkv, d).to(dtype)
    go = torch.randn(total, hq, d).to(dtype)
    scale = 0.7 / math.sqrt(d)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _ref(*leaves, lens, causal, scale)
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    res = {}
    for impl in ("torch", "triton"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o = varlen_attention(*x, cu, max(lens), causal=causal, softmax_scale=scale, impl=impl)
        assert o.dtype == dtype and o.shape == q.shape
        res[impl] = (o, *torch.autograd.grad(o, x, go))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        r = ref if i == 0 else ref_grads[i - 1]
        assert_close_to_ref(name, r, res["torch"][i], res["triton"][i], dtype=dtype)


def test_max_seqlen_upper_bound_and_tail_tokens():
    """max_seqlen may over-estimate; tokens past cu_seqlens[-1] get zero output and zero gradient."""
    lens = [5, 11]
    q, k, v = (torch.randn(20, 2, 16, requires_grad=True) for _ in range(3))
    cu = _cu(lens)
    o = varlen_attention(q, k, v, cu, 40, impl="triton")
    ref = _ref(q[:16], k[:16], v[:16], lens, True, 0.25)
    assert (o[:16].double() - ref).abs().max() < 1e-5
    assert o[16:].abs().max() == 0
    o.sum().backward()
    assert q.grad[16:].abs().max() == 0 and k.grad[16:].abs().max() == 0


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.randn(4, 3, 8)), "multiple of k/v heads"),
    (dict(k=torch.randn(4, 2, 4)), "head_dim"),
    (dict(cu=torch.tensor([0, 4])), "cu_seqlens"),
    (dict(max_seqlen=4.0), "max_seqlen"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
    (dict(impl="cuda"), "impl"),
    (dict(q=torch.randn(4, 2)), "q must be a 3-D"),
])
def test_validation(bad, match):
    args = dict(q=torch.randn(4, 2, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8),
                cu=torch.tensor([0, 4], dtype=torch.int32), max_seqlen=4, softmax_scale=None, impl="torch")
    args.update(bad)
    if "k" in bad:
        args["v"] = args["k"]
    with pytest.raises(ValueError, match=match):
        varlen_attention(args["q"], args["k"], args["v"], args["cu"], args["max_seqlen"],
                         softmax_scale=args["softmax_scale"], impl=args["impl"])


def _gpu_case(dtype, total=16384, hq=32, hkv=4, d=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(1, 2048, (1,), generator=gen)))
    lens[-1] -= sum(lens) - total
    lens = [n for n in lens if n > 0]
    q = torch.randn(total, hq, d, generator=gen).to("cuda", dtype)
    k = torch.randn(total, hkv, d, generator=gen).to("cuda", dtype)
    v = torch.randn(total, hkv, d, generator=gen).to("cuda", dtype)
    go = torch.randn(total, hq, d, generator=gen).to("cuda", dtype)
    return lens, _cu(lens, "cuda"), q, k, v, go


@pytest.mark.gpu
def test_gpu_deterministic_bf16():
    lens, cu, q, k, v, go = _gpu_case(torch.bfloat16)
    outs = []
    for _ in range(2):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o = varlen_attention(*x, cu, max(lens), impl="triton")
        outs.append((o, *torch.autograd.grad(o, x, go)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 96, 128])
def test_gpu_bf16_real_size_vs_fp32_twin(d):
    lens, cu, q, k, v, go = _gpu_case(torch.bfloat16, total=8192, d=d)
    res = {}
    for name, impl, dt in (("fp64", "torch", torch.float64), ("torch", "torch", torch.bfloat16),
                           ("triton", "triton", torch.bfloat16)):
        x = [t.to(dt).requires_grad_() for t in (q, k, v)]
        o = varlen_attention(*x, cu, max(lens), impl=impl)
        res[name] = (o, *torch.autograd.grad(o, x, go.to(dt)))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_ref(name, res["fp64"][i], res["torch"][i], res["triton"][i], dtype=torch.bfloat16)


_PTRS_FP32 = {"LSE", "DELTA"}
_PTRS_I32 = {"CU", "PK_START", "PK_END", "QC_END"}
_FLOATS = {"qk_scale_log2", "softmax_scale"}


@pytest.mark.parametrize("kernel", ["_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_preprocess_kernel"])
@pytest.mark.parametrize("d,prefix", [(64, False), (128, True)])
def test_compiles_for_sm90_without_spills(kernel, d, prefix, monkeypatch):
    """The launcher's bf16 configurations compile for H100 (sm_90) without register spills (no GPU needed)."""
    from fastpref.kernels import varlen_attention as kva
    from fastpref.testing import compile_for_gpu, ptxas_available

    if not ptxas_available():
        pytest.skip("the triton wheel has no ptxas")
    monkeypatch.setattr(kva, "triton_interpret", lambda: False)
    which = {"_fwd_kernel": "fwd", "_bwd_dq_kernel": "dq"}.get(kernel, "dkdv")
    bm, bn, bd, warps = kva._blocks(d, which)
    fn = getattr(kva, kernel)
    consts = {"BLOCK_M": bm if kernel != "_bwd_preprocess_kernel" else 64, "BLOCK_D": bd}
    if kernel != "_bwd_preprocess_kernel":
        consts.update(BLOCK_N=bn, CAUSAL=True, DOT_FP32=False, HAS_PREFIX=prefix)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            continue
        if name in _PTRS_FP32:
            sig[name] = "*fp32"
        elif name in _PTRS_I32:
            sig[name] = "*i32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name.isupper():
            sig[name] = "*bf16"
        else:
            sig[name] = "i32"
    res = compile_for_gpu("fastpref.kernels.varlen_attention", kernel, sig, consts, num_warps=warps)
    assert res["stack"] == 0, f"register spills: {res}"
