"""linear_logprobs / linear_cross_entropy / the eager chunked-loss engine against an fp64 full-logits truth.

Both implementations are checked: the PyTorch twin must be within the dtype's tolerance of the fp64 truth and
the Triton kernels (interpreted on CPU) within ``k`` times the twin's error (``fastpref.testing.TOL``).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastpref.ops import fused_linear_chunked_loss, linear_cross_entropy, linear_logprobs, plan_chunks, segment_sum
from fastpref.testing import assert_close_to_ref, reference_logits

IGN = -100


def _problem(N, H, V, *, bias, seed=0, ignore_every=4, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64) * scale
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGN
    up_logp = torch.randn(N, generator=g, dtype=torch.float64)
    up_ent = torch.randn(N, generator=g, dtype=torch.float64)
    return h, w, b, t, up_logp, up_ent


def _reference(h, w, b, t, T, up_logp, up_ent, entropy, head=None):
    """fp64 full logits (``head``: softcap / logit_scale); values and gradients of sum(up_logp logp + up_ent H)."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    z = reference_logits(h @ w.T + (b if b is not None else 0), T, **(head or {}))
    lp = torch.log_softmax(z, -1)
    valid = t != IGN
    logp = torch.where(valid, lp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(lp.exp() * lp).sum(-1), 0.0)
    loss = (up_logp * logp).sum() + ((up_ent * ent).sum() if entropy else 0)
    loss.backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "dh": h.grad, "dw": w.grad,
            "db": b.grad if b is not None else None}


def _run(impl, dtype, h, w, b, t, T, up_logp, up_ent, entropy, chunk_size, **kw):
    h = h.to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    b = b.to(dtype).requires_grad_() if b is not None else None
    out = linear_logprobs(h, w, t, bias=b, temperature=T, return_entropy=entropy, impl=impl,
                          chunk_size=chunk_size, **kw)
    logp, ent = out if entropy else (out, None)
    assert logp.dtype == torch.float32
    loss = (up_logp.float() * logp).sum() + ((up_ent.float() * ent).sum() if entropy else 0)
    loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    return {"logp": logp.detach(), "entropy": ent.detach() if entropy else None, "dh": h.grad, "dw": w.grad,
            "db": b.grad if b is not None else None}


CASES = [  # N, H, V, chunk_size: odd sizes, N=1, V smaller than any block, chunking with a ragged last chunk
    (1, 16, 10, None),
    (37, 24, 70, 16),
    (50, 40, 301, 7),
]


@pytest.mark.parametrize("N,H,V,chunk", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_matches_fp64_fp32(N, H, V, chunk, bias, entropy, T):
    h, w, b, t, ul, ue = _problem(N, H, V, bias=bias)
    ref = _reference(h, w, b, t, T, ul, ue, entropy)
    twin = _run("torch", torch.float32, h, w, b, t, T, ul, ue, entropy, chunk)
    kern = _run("triton", torch.float32, h, w, b, t, T, ul, ue, entropy, chunk, num_splits=2)
    for k in ("logp", "entropy", "dh", "dw", "db"):
        if twin[k] is None or (k == "entropy" and not entropy):
            continue
        assert_close_to_ref(k, ref[k], twin[k], kern[k], torch.float32)
    # ignored positions give exactly 0 and no gradient
    ign = t == IGN
    assert (kern["logp"][ign] == 0).all() and (twin["logp"][ign] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_fp64_half(dtype):
    h, w, b, t, ul, ue = _problem(40, 32, 130, bias=True, scale=0.5)
    ref = _reference(h, w, b, t, 0.9, ul, ue, True)
    twin = _run("torch", dtype, h, w, b, t, 0.9, ul, ue, True, 16)
    kern = _run("triton", dtype, h, w, b, t, 0.9, ul, ue, True, 16)
    for k in ("logp", "entropy", "dh", "dw", "db"):
        assert_close_to_ref(k, ref[k], twin[k], kern[k], dtype)


def test_vocab_splits_agree():
    """The Triton forward merges vocabulary splits; any split count gives the same statistics."""
    h, w, b, t, ul, ue = _problem(20, 16, 500, bias=False)
    h, w = h.float(), w.float()
    outs = [linear_logprobs(h, w, t, return_entropy=True, impl="triton", num_splits=s) for s in (1, 3, 4)]
    for lp, ent in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, outs[0][1], rtol=0, atol=1e-5)


def test_leading_dims_and_chunk_invariance():
    h, w, b, t, *_ = _problem(24, 16, 50, bias=False)
    h3, t3 = h.float().reshape(4, 6, 16), t.reshape(4, 6)
    lp3 = linear_logprobs(h3, w.float(), t3, impl="torch")
    assert lp3.shape == (4, 6)
    lp = linear_logprobs(h.float(), w.float(), t, impl="torch", chunk_size=5)
    torch.testing.assert_close(lp3.reshape(-1), lp, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_cross_entropy_matches_torch(reduction, impl):
    h, w, b, t, *_ = _problem(33, 16, 90, bias=True)
    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    ref = F.cross_entropy((hr @ wr.T + br) / 1.3, t, ignore_index=IGN, reduction=reduction)
    hf, wf, bf = (x.float().requires_grad_() for x in (h, w, b))
    out = linear_cross_entropy(hf, wf, t, bias=bf, temperature=1.3, reduction=reduction, impl=impl, chunk_size=8)
    assert_close_to_ref("ce", ref.detach(), out.detach().double(), None, torch.float32)
    up = torch.randn_like(ref)
    (ref * up).sum().backward()
    (out * up.float()).sum().backward()
    for name, a, r in (("dh", hf.grad, hr.grad), ("dw", wf.grad, wr.grad), ("db", bf.grad, br.grad)):
        assert_close_to_ref(name, r, a.double(), None, torch.float32)


def test_all_ignored_mean_is_zero():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.full((5,), IGN)
    loss = linear_cross_entropy(h, w, t, impl="torch")
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_engine_matches_autograd(impl):
    """Eager engine: a DPO-like non-linear per-pair loss, chunks on pair boundaries, == full-logit autograd."""
    h, w, b, t, *_ = _problem(40, 16, 60, bias=True, ignore_every=3)
    cu = torch.tensor([0, 7, 12, 20, 31, 36, 40])  # 6 sequences = 3 interleaved pairs
    beta = 0.3

    def per_pair_loss(seq_logps):
        return -F.logsigmoid(beta * (seq_logps[0::2] - seq_logps[1::2]))

    hr, wr, br = (x.clone().requires_grad_() for x in (h, w, b))
    z = (hr @ wr.T + br) / 0.8
    lp = torch.where(t != IGN, torch.log_softmax(z, -1).gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    ref = per_pair_loss(segment_sum(lp, cu)).mean()
    ref.backward()

    hf, wf, bf = (x.float().requires_grad_() for x in (h, w, b))
    pair_bounds = cu[::2].tolist()

    def chunk_fn(s, e, logp, ent):
        local = cu[(cu >= s) & (cu <= e)] - s
        pl = per_pair_loss(segment_sum(logp, local))
        return pl.sum() / 3, {"per_pair": pl}

    loss, aux = fused_linear_chunked_loss(hf, wf, t, chunk_fn, plan_chunks(pair_bounds, 60, chunk_size=14),
                                          bias=bf, temperature=0.8, impl=impl)
    assert len(aux) == 3 and torch.cat([a["per_pair"] for a in aux]).shape == (3,)
    (3 * loss).backward()
    assert_close_to_ref("loss", ref.detach(), loss.detach().double(), None, torch.float32)
    for name, a, r in (("dh", hf.grad, hr.grad), ("dw", wf.grad, wr.grad), ("db", bf.grad, br.grad)):
        assert_close_to_ref(name, 3 * r, a.double(), None, torch.float32)


def test_plan_chunks():
    assert plan_chunks([0, 5, 12, 20, 30, 37], 10, chunk_size=12) == [0, 12, 20, 30, 37]
    assert plan_chunks([0, 50, 55], 10, chunk_size=12) == [0, 50, 55]  # oversize unit alone
    assert plan_chunks([0, 3, 6, 9], 10, chunk_size=100) == [0, 9]
    with pytest.raises(ValueError, match="unit_bounds"):
        plan_chunks([1, 3], 10)


def test_errors_name_the_argument():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.tensor([1, 2, 3, IGN])
    with pytest.raises(ValueError, match="hidden's last dim"):
        linear_logprobs(torch.randn(4, 7), w, t)
    with pytest.raises(ValueError, match="weight must be float32, bfloat16, float16 or float64, got torch.int32"):
        linear_logprobs(h, w.int(), t)  # mixed float dtypes are fine (tests/test_mixed_dtype.py)
    with pytest.raises(ValueError, match="targets shape"):
        linear_logprobs(h, w, t[:3])
    with pytest.raises(ValueError, match="targets must be an int64"):
        linear_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\).*\[10\]"):
        linear_logprobs(h, w, torch.tensor([1, 10, 3, IGN]))
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        linear_logprobs(h, w, t, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_logprobs(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs(h, w, t, bias=torch.randn(9))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")


_MEM_SCRIPT = textwrap.dedent("""
    import re, sys, torch
    torch.set_num_threads(2)
    from fastpref.ops import linear_logprobs
    def hwm():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    N, H, V = 4096, 256, 32000
    torch.manual_seed(0)
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / 16).requires_grad_()
    t = torch.randint(0, V, (N,))
    base = rss()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS high-water mark
    if sys.argv[1] == "naive":
        logp = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    else:
        logp = linear_logprobs(h, w, t, impl="torch")
    logp.sum().backward()
    print(hwm() - base)
""")


def test_peak_memory_is_a_fraction_of_naive():
    """Torch twin fwd+bwd at N=4096, H=256, V=32000 fp32: peak extra RSS < 1/4 of the full-logits path."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak RSS")
    peaks = {}
    for mode in ("naive", "fastpref"):
        out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, mode], capture_output=True, text=True, check=True)
        peaks[mode] = int(out.stdout.strip().splitlines()[-1])
    logits_bytes = 4096 * 32000 * 4
    assert peaks["naive"] > logits_bytes  # the measurement sees the logits at all
    assert peaks["fastpref"] < peaks["naive"] / 4, peaks


def test_liger_oracle():
    """Liger's fused linear cross-entropy (its torch path on CPU) agrees with ours."""
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy")
    h, w, b, t, *_ = _problem(32, 16, 64, bias=False)
    h, w = h.float(), w.float()
    try:
        ref = liger.LigerFusedLinearCrossEntropyLoss(ignore_index=IGN)(w, h, t)
    except Exception as e:  # Liger's kernels need a GPU backend
        pytest.skip(f"Liger cannot run here: {type(e).__name__}")
    ours = linear_cross_entropy(h, w, t, impl="torch")
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)


def test_trl_oracle():
    """TRL's selective_log_softmax on full logits agrees with our log-probs."""
    utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(utils, "selective_log_softmax"):
        pytest.skip("this TRL has no selective_log_softmax")
    h, w, b, t, *_ = _problem(30, 16, 64, bias=False, ignore_every=0)
    ref = utils.selective_log_softmax((h @ w.T).float(), t)
    ours = linear_logprobs(h.float(), w.float(), t, impl="torch")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_size_and_determinism(dtype):
    N, H, V = 4096, 2048, 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(N, H, device="cuda", generator=g) * 0.5).to(dtype)
    w = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = IGN
    up = torch.randn(N, device="cuda", generator=g)
    runs = []
    for _ in range(2):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = linear_logprobs(hh, ww, t, return_entropy=True, impl="triton")
        ((lp * up).sum() + ent.sum() * 0.01).backward()
        runs.append((lp, ent, hh.grad, ww.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical runs differ"
    # against the twin and an fp64 truth on a slice of the vocabulary-complete problem
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp_t, ent_t = linear_logprobs(hh, ww, t, return_entropy=True, impl="torch")
    ((lp_t * up).sum() + ent_t.sum() * 0.01).backward()
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    lsm = torch.log_softmax(hd @ wd.T, -1)
    valid = t != IGN
    lp_r = torch.where(valid, lsm.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    ent_r = torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0.0)
    ((lp_r * up.double()).sum() + ent_r.sum() * 0.01).backward()
    for name, k, tw, r in (("logp", runs[0][0], lp_t, lp_r), ("entropy", runs[0][1], ent_t, ent_r),
                           ("dh", runs[0][2], hh.grad, hd.grad), ("dw", runs[0][3], ww.grad, wd.grad)):
        assert_close_to_ref(name, r.detach(), tw.detach(), k.detach(), dtype)
