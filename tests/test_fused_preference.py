"""Fused preference losses against autograd through the full fp64 logits + the plain loss.

The oracle forms ``logits = h W^T / T`` for every token in fp64, sums the target log-probs per sequence, calls the
plain loss of ``fastpref.losses.preference`` and differentiates everything with autograd; the fused loss must give
the same loss and the same ``d/dhidden``, ``d/dweight`` (``fastpref.testing`` tolerances per dtype), for padded
(TRL order) and packed (interleaved) layouts, several chunkings, ignored prompt tokens and uneven lengths.
"""

import pytest
import torch

from fastpref.losses import (FusedLinearCPOLoss, FusedLinearDPOLoss, FusedLinearKTOLoss, FusedLinearORPOLoss,
                             FusedLinearSimPOLoss, cpo_loss, dpo_loss, kto_loss, orpo_loss)
from fastpref.ops import fused_linear_chunked_loss as fastpref_engine
from fastpref.testing import assert_close_to_ref, reference_logits

IGN = -100
H, V = 16, 48


def _sequences(S, seed):
    """S sequences of uneven length with 1-3 ignored prompt positions and an ignored last position."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(S):
        L = int(torch.randint(4, 11, (1,), generator=g))
        h = torch.randn(L, H, generator=g, dtype=torch.float64)
        t = torch.randint(0, V, (L,), generator=g)
        t[: int(torch.randint(1, min(4, L - 1), (1,), generator=g))] = IGN  # at least one scored token
        t[-1] = IGN
        seqs.append((h, t))
    return seqs


def _layout(seqs, layout, paired):
    """(hidden, targets, cu_seqlens or None, order) for a list of sequences (pairs interleaved in the list)."""
    if layout == "packed":
        h = torch.cat([s[0] for s in seqs])
        t = torch.cat([s[1] for s in seqs])
        cu = [0]
        for s in seqs:
            cu.append(cu[-1] + s[0].shape[0])
        return h, t, torch.tensor(cu), None
    # padded, TRL order: all chosen rows, then all rejected rows
    order = [*range(0, len(seqs), 2), *range(1, len(seqs), 2)] if paired else list(range(len(seqs)))
    T = max(s[0].shape[0] for s in seqs) + 1  # at least one padding column
    h = torch.zeros(len(seqs), T, H, dtype=torch.float64)
    t = torch.full((len(seqs), T), IGN)
    for row, k in enumerate(order):
        L = seqs[k][0].shape[0]
        h[row, :L], t[row, :L] = seqs[k][0], seqs[k][1]
    return h, t, None, order


def _naive_seq_logps(h, w, t, cu, order, temperature, head=None):
    """Per-sequence sums of target log-probs (list order) and token counts from the FULL logits (fp64 autograd);
    ``head``: the final-logit transform (softcap / logit_scale)."""
    logp = torch.log_softmax(reference_logits(h @ w.T, temperature, **(head or {})), -1)
    tok = torch.where(t != IGN, logp.gather(-1, t.clamp(min=0)[..., None])[..., 0], 0.0)
    if cu is None:
        seq, lens = tok.sum(-1), (t != IGN).sum(-1)
        inv = torch.argsort(torch.tensor(order))
        return seq[inv], lens[inv]
    seq = torch.stack([tok[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    lens = torch.stack([(t[a:b] != IGN).sum() for a, b in zip(cu[:-1], cu[1:])])
    return seq, lens


def _naive_ld_tail(h, w, t, cu, order, temperature, lens, head=None):
    """Per-sequence sum of log-probs of scored tokens past min(|y_w|, |y_l|) of the pair (LD-DPO), full logits."""
    logp = torch.log_softmax(reference_logits(h @ w.T, temperature, **(head or {})), -1)
    tok = torch.where(t != IGN, logp.gather(-1, t.clamp(min=0)[..., None])[..., 0], 0.0)
    shared = torch.minimum(lens[0::2], lens[1::2]).repeat_interleave(2)
    rows = [tok[a:b] for a, b in zip(cu[:-1], cu[1:])] if cu is not None else None
    trows = [t[a:b] for a, b in zip(cu[:-1], cu[1:])] if cu is not None else None
    if cu is None:
        inv = torch.argsort(torch.tensor(order))
        rows, trows = [tok[i] for i in inv], [t[i] for i in inv]
    out = []
    for k, (r, tt) in enumerate(zip(rows, trows)):
        rank = torch.cumsum((tt != IGN).long(), 0)
        out.append((r * ((tt != IGN) & (rank > shared[k]))).sum())
    return torch.stack(out)


CASES = {
    "dpo-sigmoid": (FusedLinearDPOLoss, dict(beta=0.2), "dpo"),
    "dpo-ipo": (FusedLinearDPOLoss, dict(beta=0.3, loss_type="ipo"), "dpo"),
    "dpo-rpo-rdpo": (FusedLinearDPOLoss, dict(beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4],
                                              rdpo_alpha=0.02), "dpo"),
    "dpo-ldpo": (FusedLinearDPOLoss, dict(beta=0.2, ld_alpha=0.4), "dpo"),
    "dpo-aot": (FusedLinearDPOLoss, dict(beta=0.2, loss_type="aot", label_smoothing=0.1), "dpo"),
    "dpo-fdiv": (FusedLinearDPOLoss, dict(beta=0.2, loss_type="sigmoid", f_divergence_type="js_divergence"), "dpo"),
    "dpo-robust-bco": (FusedLinearDPOLoss, dict(beta=0.2, loss_type=["robust", "bco_pair"], label_smoothing=0.1),
                       "dpo"),
    "kto": (FusedLinearKTOLoss, dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7), "kto"),
    "cpo": (FusedLinearCPOLoss, dict(beta=0.2, cpo_alpha=0.5, label_smoothing=0.1), "cpo"),
    "simpo": (FusedLinearSimPOLoss, dict(beta=2.0, simpo_gamma=1.0), "simpo"),
    "alphapo": (FusedLinearSimPOLoss, dict(beta=2.0, simpo_gamma=1.0, alpha=0.3), "simpo"),
    "orpo": (FusedLinearORPOLoss, dict(beta=0.3), "orpo"),
}

KTO_LABELS = torch.tensor([True, False, False, True, True, False])


def _oracle(kind, opts, seq, lens, ref, tails, kl):
    if kind == "dpo":
        o = dict(opts)
        kw = {}
        if o.get("ld_alpha") is not None:
            kw["tail_logps"] = (tails[0][0::2], tails[0][1::2], tails[1][0::2], tails[1][1::2])
        return dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], chosen_lengths=lens[0::2],
                        rejected_lengths=lens[1::2], **o, **kw)
    if kind == "kto":
        return kto_loss(seq, ref, KTO_LABELS, kl=kl, **opts)
    if kind == "cpo":
        return cpo_loss(seq[0::2], seq[1::2], lens[0::2], lens[1::2], **opts)
    if kind == "simpo":
        return cpo_loss(seq[0::2], seq[1::2], lens[0::2], lens[1::2], loss_type="simpo", cpo_alpha=0.0, **opts)
    return orpo_loss(seq[0::2], seq[1::2], lens[0::2], lens[1::2], **opts)


def _check_case(case, layout, dtype, impl="torch", chunk_size=24, temperature=0.7, ref_mode="hidden", seed=0,
                device="cpu", head=None, host_counts=False, **fused_kw):
    cls, opts, kind = CASES[case]
    paired = kind != "kto"
    seqs = _sequences(6, seed)
    gr = torch.Generator().manual_seed(seed + 50)
    ref_seqs = [(h + 0.3 * torch.randn(h.shape, generator=gr, dtype=h.dtype), t) for h, t in _sequences(6, seed)]
    h64, t, cu, order = _layout(seqs, layout, paired)
    rh64, _, _, _ = _layout(ref_seqs, layout, paired)
    g = torch.Generator().manual_seed(seed + 100)
    w64 = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    # the oracle sees exactly the values the fused loss sees (rounded to dtype)
    h64, w64, rh64 = h64.to(dtype).double(), w64.to(dtype).double(), rh64.to(dtype).double()
    kl = torch.tensor(0.05, dtype=torch.float64)

    # oracle: full fp64 logits + plain loss
    hl, wl = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    seq, lens = _naive_seq_logps(hl, wl, t, None if cu is None else cu.tolist(), order, temperature, head)
    with torch.no_grad():
        ref, _ = _naive_seq_logps(rh64, w64, t, None if cu is None else cu.tolist(), order, temperature, head)
    tails = None
    if opts.get("ld_alpha") is not None:
        cul = None if cu is None else cu.tolist()
        tails = (_naive_ld_tail(hl, wl, t, cul, order, temperature, lens, head),
                 _naive_ld_tail(rh64, w64, t, cul, order, temperature, lens, head).detach())
    loss_ref, m_ref = _oracle(kind, opts, seq, lens, ref if kind in ("dpo", "kto") else None, tails, kl)
    loss_ref.backward()

    # fused
    h, w = h64.to(device, dtype).requires_grad_(), w64.to(device, dtype).requires_grad_()
    fused = cls(**opts, temperature=temperature, impl=impl, chunk_size=chunk_size, **(head or {}), **fused_kw)
    kw = {}
    if kind in ("dpo", "kto"):
        if ref_mode == "hidden":
            kw["ref_hidden"] = rh64.to(device, dtype)
        else:  # precomputed reference log-probs are LD-weighted already (as TRL precomputes them)
            r = ref if tails is None else ref - (1 - opts["ld_alpha"]) * tails[1]
            r = r.float().to(device)
            kw["ref_logps"] = (r[0::2], r[1::2]) if paired else r
    if kind == "kto":
        kw.update(labels=KTO_LABELS.to(device), kl=kl.to(device))
    if host_counts:  # the scored tokens per sequence in input row order, as a Batch's scored_lengths_host
        valid = (t != IGN).long()
        kw["scored_lengths_host"] = (valid.sum(-1).tolist() if cu is None else
                                     [int(valid[a:b].sum()) for a, b in zip(cu[:-1], cu[1:])])
    loss, m = fused(h, w, t.to(device), cu_seqlens=cu, **kw)
    loss.backward()
    m = {k: v.cpu() for k, v in m.items()}
    return loss_ref, m_ref, hl.grad, wl.grad, loss.cpu(), m, h.grad.cpu(), w.grad.cpu()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("engine", ["eager", "recompute"])
def test_fused_matches_full_logits_fp32(case, layout, engine):
    engine = "auto" if case == "dpo-aot" else engine  # aot sorts across the batch: never eager
    loss_ref, m_ref, dh_ref, dw_ref, loss, m, dh, dw = _check_case(case, layout, torch.float32, engine=engine)
    assert loss.dtype == torch.float32 and dh.dtype == torch.float32
    assert_close_to_ref(f"{case}/{layout} loss", loss_ref.detach(), loss, dtype=torch.float32)
    assert_close_to_ref(f"{case}/{layout} dhidden", dh_ref, dh, dtype=torch.float32)
    assert_close_to_ref(f"{case}/{layout} dweight", dw_ref, dw, dtype=torch.float32)
    for k, v in m_ref.items():
        assert_close_to_ref(f"{case}/{layout} {k}", v.detach().reshape(1), m[k].reshape(1).double(),
                            dtype=torch.float32)


@pytest.mark.parametrize("case", ["dpo-sigmoid", "dpo-ldpo", "kto", "orpo"])
def test_fused_bf16(case):
    loss_ref, _, dh_ref, dw_ref, loss, _, dh, dw = _check_case(case, "packed", torch.bfloat16, ref_mode="logps")
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert_close_to_ref(f"{case} loss", loss_ref.detach(), loss, dtype=torch.bfloat16)
    assert_close_to_ref(f"{case} dhidden", dh_ref, dh, dtype=torch.bfloat16)
    assert_close_to_ref(f"{case} dweight", dw_ref, dw, dtype=torch.bfloat16)


@pytest.mark.parametrize("chunk_size,eager", [(1, False), (12, False), (20, True), (30, True), (10_000, True)])
def test_chunking_and_temperature_do_not_change_the_result(chunk_size, eager, monkeypatch):
    """engine='auto' goes eager when every pair fits the chunk budget (the longest pair here has 20 tokens)."""
    import fastpref.losses.fused_preference as fp

    calls = []
    monkeypatch.setattr(fp, "fused_linear_chunked_loss",
                        lambda *a, **k: calls.append(1) or fastpref_engine(*a, **k))
    a = _check_case("dpo-rpo-rdpo", "packed", torch.float32, chunk_size=chunk_size, temperature=1.3)
    assert bool(calls) == eager
    assert_close_to_ref("loss", a[0].detach(), a[4], dtype=torch.float32)
    assert_close_to_ref("dhidden", a[2], a[6], dtype=torch.float32)
    assert_close_to_ref("dweight", a[3], a[7], dtype=torch.float32)


@pytest.mark.parametrize("case", ["dpo-sigmoid", "kto"])
def test_triton_path_under_interpreter(case):
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    ref = _check_case(case, "packed", torch.float32, impl="torch", chunk_size=24)
    tri = _check_case(case, "packed", torch.float32, impl="triton", chunk_size=24)
    for i, name in ((4, "loss"), (6, "dhidden"), (7, "dweight")):
        assert_close_to_ref(f"{case} {name}", ref[i - 4].detach(), ref[i].detach(),
                            tri[i].detach(), dtype=torch.float32)


@pytest.mark.parametrize("case", ["dpo-ldpo", "dpo-aot", "kto", "orpo"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("host_counts", [False, True], ids=["device-counts", "host-counts"])
def test_skip_unscored_gives_the_same_result(case, layout, host_counts):
    """Read back from the device, or given as ``scored_lengths_host`` (no sync; padded pairs reordered)."""
    loss_ref, m_ref, dh_ref, dw_ref, loss, m, dh, dw = _check_case(case, layout, torch.float32, skip_unscored=True,
                                                                   host_counts=host_counts)
    assert_close_to_ref(f"{case} loss", loss_ref.detach(), loss, dtype=torch.float32)
    assert_close_to_ref(f"{case} dhidden", dh_ref, dh, dtype=torch.float32)
    assert_close_to_ref(f"{case} dweight", dw_ref, dw, dtype=torch.float32)
    for k, v in m_ref.items():
        assert_close_to_ref(f"{case} {k}", v.detach().reshape(1), m[k].reshape(1).double(), dtype=torch.float32)


def test_padded_and_packed_agree_and_ref_modes_agree():
    a = _check_case("dpo-ipo", "padded", torch.float32, ref_mode="hidden")
    b = _check_case("dpo-ipo", "packed", torch.float32, ref_mode="logps")
    torch.testing.assert_close(a[4], b[4], rtol=1e-5, atol=1e-6)
    for k in a[5]:
        torch.testing.assert_close(a[5][k], b[5][k], rtol=1e-5, atol=1e-6)


def test_no_grad_for_ignored_and_padding_positions():
    _, _, _, _, _, _, dh, _ = _check_case("dpo-sigmoid", "padded", torch.float32)
    seqs = _sequences(6, 0)
    _, t, _, _ = _layout(seqs, "padded", True)
    assert torch.count_nonzero(dh[t == IGN]) == 0


def test_fused_bad_inputs():
    h = torch.randn(3, 5, H)
    w = torch.randn(V, H)
    t = torch.randint(0, V, (3, 5))
    with pytest.raises(ValueError, match="even batch"):
        FusedLinearDPOLoss()(h, w, t, ref_logps=(torch.zeros(1), torch.zeros(1)))
    h, t = torch.randn(4, 5, H), torch.randint(0, V, (4, 5))
    with pytest.raises(ValueError, match=r"batch size mismatch: ref_logps are \(3,\) and \(2,\) but the batch has 2"):
        FusedLinearDPOLoss()(h, w, t, ref_logps=(torch.zeros(3), torch.zeros(2)))
    with pytest.raises(ValueError, match="exactly one of ref_logps"):
        FusedLinearDPOLoss()(h, w, t)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'; valid values: 'sigmoid', 'hinge'"):
        FusedLinearDPOLoss(loss_type="dpo")
    with pytest.raises(ValueError, match="reference-free"):
        FusedLinearSimPOLoss()(h, w, t, ref_hidden=h)
    with pytest.raises(ValueError, match="even number of sequences"):
        FusedLinearORPOLoss()(h.reshape(-1, H), w, t.reshape(-1), cu_seqlens=[0, 5, 12, 20])
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to N=20"):
        FusedLinearORPOLoss()(h.reshape(-1, H), w, t.reshape(-1), cu_seqlens=[0, 5, 10, 19])
    bad = t.clone()
    bad[0, 1] = V + 3
    with pytest.raises(ValueError, match=rf"targets must be in \[0, {V}\)"):
        FusedLinearORPOLoss()(h, w, bad)
    hn = h.clone()
    hn[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in policy_"):
        FusedLinearCPOLoss()(hn, w, t)
    with pytest.raises(ValueError, match="unknown loss_type 'nope'; valid values: 'sigmoid', 'hinge', 'ipo', 'simpo'"):
        FusedLinearCPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="engine='eager' needs a loss that is separable over pairs"):
        FusedLinearDPOLoss(loss_type="aot", engine="eager")(h, w, t, ref_logps=(torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ValueError, match="engine must be 'auto', 'eager' or 'recompute', got 'fast'"):
        FusedLinearDPOLoss(engine="fast")
    with pytest.raises(ValueError, match="unknown loss_type 'kto_pair'"):
        FusedLinearKTOLoss(loss_type="kto_pair")
    with pytest.raises(ValueError, match="batch size mismatch: labels"):
        FusedLinearKTOLoss()(h, w, t, ref_logps=torch.zeros(4), labels=torch.ones(3, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["dpo-sigmoid", "dpo-ldpo", "dpo-aot", "kto", "orpo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_on_cuda_triton_vs_torch(case, dtype):
    ref = _check_case(case, "packed", dtype, impl="torch", chunk_size=24, device="cuda")
    tri = _check_case(case, "packed", dtype, impl="triton", chunk_size=24, device="cuda")
    for i, name in ((4, "loss"), (6, "dhidden"), (7, "dweight")):
        assert_close_to_ref(f"{case} {name}", ref[i - 4].detach(), ref[i].detach(), tri[i].detach(), dtype=dtype)


def test_bias_and_ref_head_and_kto_kl_logps():
    """LM-head bias (policy and a separate reference head) and KTO's z0 from mismatched-pair log-probs."""
    seqs = _sequences(6, 3)
    h64, t, cu, _ = _layout(seqs, "packed", True)
    g = torch.Generator().manual_seed(4)
    w64, b64 = torch.randn(V, H, generator=g, dtype=torch.float64) / 2, torch.randn(V, generator=g, dtype=torch.float64)
    rw64, rb64 = w64 + 0.1 * torch.randn(V, H, generator=g, dtype=torch.float64), torch.randn(V, generator=g,
                                                                                             dtype=torch.float64)
    pk, rk = torch.randn(6, generator=g, dtype=torch.float64) + 1, torch.randn(6, generator=g, dtype=torch.float64)

    def seq_logps(h, w, b):
        logp = torch.log_softmax(h @ w.T + b, -1)
        tok = torch.where(t != IGN, logp.gather(-1, t.clamp(min=0)[:, None])[:, 0], 0.0)
        return torch.stack([tok[x:y].sum() for x, y in zip(cu[:-1].tolist(), cu[1:].tolist())])

    for kind in ("dpo", "kto"):
        hl, wl, bl = (x.clone().requires_grad_() for x in (h64, w64, b64))
        seq = seq_logps(hl, wl, bl)
        ref = seq_logps(h64, rw64, rb64)
        if kind == "dpo":
            want, _ = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.2)
            fused, kw = FusedLinearDPOLoss(beta=0.2, chunk_size=10), {}
        else:
            want, _ = kto_loss(seq, ref, KTO_LABELS, beta=0.2, policy_kl_logps=pk, ref_kl_logps=rk)
            fused, kw = FusedLinearKTOLoss(beta=0.2, chunk_size=10), dict(labels=KTO_LABELS,
                                                                            kl_logps=(pk.float(), rk.float()))
        want.backward()
        h, w, b = (x.float().requires_grad_() for x in (h64, w64, b64))
        got, _ = fused(h, w, t, bias=b, cu_seqlens=cu, ref_hidden=h.detach(), ref_weight=rw64.float(),
                       ref_bias=rb64.float(), **kw)
        got.backward()
        for name, r, x in (("loss", want.detach(), got), ("dh", hl.grad, h.grad), ("dw", wl.grad, w.grad),
                           ("db", bl.grad, b.grad)):
            assert_close_to_ref(f"{kind} {name}", r, x, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sequence_logps_matches_full_logits(layout):
    from fastpref.losses import sequence_logps

    seqs = _sequences(6, 5)
    h64, t, cu, order = _layout(seqs, layout, paired=False)
    w64 = torch.randn(V, H, generator=torch.Generator().manual_seed(6), dtype=torch.float64) / 2
    hl = h64.clone().requires_grad_()
    want, want_n = _naive_seq_logps(hl, w64, t, None if cu is None else cu.tolist(), order, 0.8)
    want.sum().backward()
    h = h64.float().requires_grad_()
    got, n = sequence_logps(h, w64.float(), t, cu_seqlens=cu, temperature=0.8)
    got.sum().backward()
    assert_close_to_ref("logps", want.detach(), got, dtype=torch.float32)
    assert_close_to_ref("dhidden", hl.grad, h.grad, dtype=torch.float32)
    torch.testing.assert_close(n, want_n.float())
    with pytest.raises(ValueError, match="cu_seqlens ending at N="):
        sequence_logps(h64.reshape(-1, H).float(), w64.float(), t.reshape(-1), cu_seqlens=[0, 3])


@pytest.mark.parametrize("loss_type", ["sigmoid", "nca_pair", "robust", "discopop"])
def test_fused_dpo_matches_liger(loss_type):
    """Liger's fused linear DPO (padded, TRL order, reference hidden states) as a second, independent oracle."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    h64, t, _, _ = _layout(_sequences(6, 7), "padded", True)
    g = torch.Generator().manual_seed(8)
    h, rh = h64.float(), (h64 + 0.3 * torch.randn(h64.shape, generator=g, dtype=torch.float64)).float()
    w = torch.randn(V, H, generator=g) / 2
    eps = 0.1 if loss_type == "robust" else 0.0
    a, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = LigerFusedLinearDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=eps, compiled=False)(
        wa, a, t, ref_input=rh, ref_weight=w)
    (out[0] if isinstance(out, tuple) else out).backward()
    b, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = FusedLinearDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=eps)(b, wb, t, ref_hidden=rh)
    loss.backward()
    torch.testing.assert_close(loss, (out[0] if isinstance(out, tuple) else out).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wb.grad, wa.grad, rtol=1e-4, atol=1e-6)


def test_skip_unscored_host_counts_are_checked():
    """Wrong ``scored_lengths_host``: the number of entries is always checked; the values with ``validate=True``
    (a host sync); padded pairs get the counts in input row order (chosen rows first)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 6, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (4, 6), generator=g)
    t[:, :2] = IGN
    t[0, 5] = IGN  # chosen row 0 has 3 scored tokens, the others 4
    counts = (t != IGN).sum(-1).tolist()
    assert counts == [3, 4, 4, 4]
    loss = FusedLinearDPOLoss(skip_unscored=True, validate=True)
    ref = (torch.zeros(2), torch.zeros(2))
    loss(h, w, t, ref_logps=ref, scored_lengths_host=counts)  # right: runs
    with pytest.raises(ValueError, match="scored_lengths_host has 3 entries for 4 sequences"):
        loss(h, w, t, ref_logps=ref, scored_lengths_host=counts[:3])
    with pytest.raises(ValueError, match="does not match"):
        loss(h, w, t, ref_logps=ref, scored_lengths_host=[4, 3, 4, 4])
