"""Plain preference losses against independent fp64 formulas (written here) and against TRL 1.16's trainers.

TRL computes its DPO/KTO losses inline in ``_compute_loss`` from the model's per-token log-probs; the TRL tests
call that method on a trainer built with ``__new__`` (no model, no dataset) and a stand-in model that returns
given per-token log-probs, so TRL's own code runs on the same numbers and autograd gives its gradients.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastpref.losses import (DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss, reward_model_loss, simpo_loss,
                             spin_loss)

P = 6
ls = F.logsigmoid


def _inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(P, generator=g, dtype=torch.float64) * scale - 20 for _ in range(4)]
    lc = torch.randint(3, 12, (P,), generator=g)
    lr = torch.randint(3, 12, (P,), generator=g)
    return x, lc, lr


def _oracle(lt, pc, pr, rc, rr, lc, lr, beta, eps, tau=0.05):
    """Per-pair losses, fp64, straight from the papers / TRL's formulas."""
    w, l = pc - rc, pr - rr
    d = w - l
    sm = lambda z: -(1 - eps) * ls(z) - eps * ls(-z)  # noqa: E731
    if lt == "sigmoid":
        return sm(beta * d)
    if lt == "hinge":
        return torch.clamp(1 - beta * d, min=0)
    if lt == "ipo":
        return (w / lc - l / lr - 1 / (2 * beta)) ** 2
    if lt == "exo_pair":
        q = torch.sigmoid(beta * d)
        return q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
    if lt == "nca_pair":
        return -ls(beta * w) - 0.5 * ls(-beta * w) - 0.5 * ls(-beta * l)
    if lt == "robust":
        return ((1 - eps) * -ls(beta * d) - eps * -ls(-beta * d)) / (1 - 2 * eps)
    if lt == "bco_pair":
        return -ls(beta * w) - ls(-beta * l)
    if lt == "sppo_hard":
        return (w - 1 / (2 * beta)) ** 2 + (l + 1 / (2 * beta)) ** 2
    if lt == "aot":
        return sm(beta * (torch.sort(pc - pr).values - torch.sort(rc - rr).values))
    if lt == "aot_unpaired":
        return sm(beta * (torch.sort(w).values - torch.sort(l).values))
    if lt == "apo_zero":
        return (1 - torch.sigmoid(beta * w)) + torch.sigmoid(beta * l)
    if lt == "apo_down":
        return torch.sigmoid(beta * w) + (1 - torch.sigmoid(beta * d))
    if lt == "discopop":
        z = beta * d
        m = torch.sigmoid(z / tau)
        return (1 - m) * torch.log1p(torch.exp(-z)) + m * torch.exp(-z)
    if lt == "sigmoid_norm":
        return -ls(beta * (w / lc - l / lr))
    if lt == "sft":
        return -pc.sum() / lc.sum() * torch.ones_like(pc)
    raise AssertionError(lt)


def test_f_divergence_scores_fp64():
    (pc, pr, rc, rr), lc, lr = _inputs(9, scale=0.5)
    pc, pr, rc, rr = pc / 20, pr / 20, rc / 20, rr / 20  # log-ratios of order 1
    w, l = pc - rc, pr - rr
    a = 0.3
    scores = {"forward_kl": lambda r: 1 - 1 / torch.exp(r), "js_divergence": lambda r: torch.log(2 * torch.exp(r) / (
        torch.exp(r) + 1)), "alpha_divergence": lambda r: (torch.exp(r) ** (a - 1) - 1) / (a - 1)}
    for kind, f in scores.items():
        got, m = dpo_loss(pc, pr, rc, rr, beta=0.4, f_divergence_type=kind, f_alpha_divergence_coef=a)
        torch.testing.assert_close(got, -ls(0.4 * (f(w) - f(l))).mean())
        torch.testing.assert_close(m["rewards/chosen"], 0.4 * w.mean())


def _eps_for(lt):
    return {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "sigmoid": 0.2}.get(lt, 0.0)


@pytest.mark.parametrize("lt", DPO_LOSS_TYPES)
def test_dpo_every_type_matches_fp64_formula(lt):
    (pc, pr, rc, rr), lc, lr = _inputs()
    beta, eps = 0.3, _eps_for(lt)
    leaves = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    loss, m = dpo_loss(*leaves, beta=beta, loss_type=lt, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr)
    ref_leaves = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
    ref = _oracle(lt, *ref_leaves, lc.double(), lr.double(), beta, eps).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward(), ref.backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(m["rewards/margins"], beta * ((pc - rc) - (pr - rr)).mean())
    assert torch.allclose(m["rewards/accuracies"], ((pc - rc) > (pr - rr)).double().mean())
    assert all(not v.requires_grad for v in m.values())


def test_dpo_reduction_none_and_sum_and_fp32():
    (pc, pr, rc, rr), lc, lr = _inputs(1)
    per, _ = dpo_loss(pc, pr, rc, rr, reduction="none")
    assert per.shape == (P,)
    torch.testing.assert_close(per, _oracle("sigmoid", pc, pr, rc, rr, lc, lr, 0.1, 0.0))
    tot, _ = dpo_loss(pc, pr, rc, rr, reduction="sum")
    torch.testing.assert_close(tot, per.sum())
    l32, _ = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float())
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), per.mean(), rtol=1e-5, atol=1e-6)


def test_rpo_weights_rdpo_ldpo_spin():
    (pc, pr, rc, rr), lc, lr = _inputs(2)
    beta = 0.2
    rpo, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                      chosen_lengths=lc, rejected_lengths=lr)
    want = _oracle("sigmoid", pc, pr, rc, rr, lc, lr, beta, 0).mean() + 0.5 * -pc.sum() / lc.sum()
    torch.testing.assert_close(rpo, want)
    # R-DPO: alpha * (|y_w| - |y_l|) inside the log-sigmoid
    rd, _ = dpo_loss(pc, pr, rc, rr, beta=beta, rdpo_alpha=0.05, chosen_lengths=lc, rejected_lengths=lr)
    want = -ls(beta * ((pc - rc) - (pr - rr)) + 0.05 * (lc - lr).double()).mean()
    torch.testing.assert_close(rd, want)
    # LD-DPO: shared + alpha * tail
    tails = [t * 0.3 for t in (pc, pr, rc, rr)]
    ld, m = dpo_loss(pc, pr, rc, rr, beta=beta, ld_alpha=0.25, tail_logps=tails)
    eff = [x - y + 0.25 * y for x, y in zip((pc, pr, rc, rr), tails)]
    torch.testing.assert_close(ld, -ls(beta * ((eff[0] - eff[2]) - (eff[1] - eff[3]))).mean())
    torch.testing.assert_close(m["logps/chosen"], eff[0].mean())
    # SPIN = DPO on (real, generated)
    torch.testing.assert_close(spin_loss(pc, pr, rc, rr, beta=beta)[0], dpo_loss(pc, pr, rc, rr, beta=beta)[0])


def test_kto_formula_paired_unpaired_and_kl():
    g = torch.Generator().manual_seed(3)
    pl, rl = (torch.randn(8, generator=g, dtype=torch.float64) - 10 for _ in range(2))
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    pk, rk = torch.randn(8, generator=g, dtype=torch.float64) + 1, torch.randn(8, generator=g, dtype=torch.float64)
    x = pl.clone().requires_grad_()
    loss, m = kto_loss(x, rl, labels, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7, policy_kl_logps=pk,
                       ref_kl_logps=rk)
    z0 = max(0.0, (pk - rk).mean().item())
    rho = pl - rl
    per = [1.5 * (1 - torch.sigmoid(0.2 * (r - z0))) if lab else 0.7 * (1 - torch.sigmoid(0.2 * (z0 - r)))
           for r, lab in zip(rho, labels)]
    torch.testing.assert_close(loss, torch.stack(per).mean())
    torch.testing.assert_close(m["kl"], torch.tensor(z0, dtype=torch.float64))
    torch.testing.assert_close(m["rewards/chosen"], 0.2 * rho[labels].mean())
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # paired (labels=None): the first half is desirable
    a, _ = kto_loss(pl, rl, None, kl=0.3)
    b, _ = kto_loss(pl, rl, torch.arange(8) < 4, kl=0.3)
    torch.testing.assert_close(a, b)
    apo, _ = kto_loss(pl, rl, labels, loss_type="apo_zero_unpaired", reduction="none")
    torch.testing.assert_close(apo, torch.where(labels, 1 - torch.sigmoid(0.1 * rho), torch.sigmoid(0.1 * rho)))


def test_cpo_simpo_orpo_formulas():
    (pc, pr, _, _), lc, lr = _inputs(4, scale=1.0)
    pc, pr = pc / 10 - 1, pr / 10 - 1  # log-probs of short completions
    lcd, lrd = lc.double(), lr.double()
    nll = -pc.sum() / lcd.sum()
    c, _ = cpo_loss(pc, pr, lc, lr, beta=0.3, label_smoothing=0.1, cpo_alpha=0.5)
    z = 0.3 * (pc - pr)
    torch.testing.assert_close(c, (-(0.9) * ls(z) - 0.1 * ls(-z)).mean() + 0.5 * nll)
    h, _ = cpo_loss(pc, pr, lc, lr, loss_type="hinge", cpo_alpha=0.0)
    torch.testing.assert_close(h, torch.clamp(1 - 0.1 * (pc - pr), min=0).mean())
    s, m = simpo_loss(pc, pr, lc, lr, beta=2.0, simpo_gamma=1.0)
    torch.testing.assert_close(s, -ls(2.0 * pc / lcd - 2.0 * pr / lrd - 1.0).mean())
    torch.testing.assert_close(m["rewards/chosen"], (2.0 * pc / lcd).mean())
    ap, m = simpo_loss(pc, pr, lc, lr, beta=2.0, simpo_gamma=1.0, alpha=0.5)
    rw, rl_ = (1 - torch.exp(pc / lcd) ** -0.5) / 0.5, (1 - torch.exp(pr / lrd) ** -0.5) / 0.5
    torch.testing.assert_close(ap, -ls(2.0 * (rw - rl_) - 1.0).mean())  # AlphaPO
    torch.testing.assert_close(m["rewards/chosen"], (2.0 * rw).mean())
    o, m = orpo_loss(pc, pr, lc, lr, beta=0.25)
    aw, al = pc / lcd, pr / lrd
    log_odds = (aw - torch.log(1 - torch.exp(aw))) - (al - torch.log(1 - torch.exp(al)))
    torch.testing.assert_close(o, nll - 0.25 * ls(log_odds).mean())
    torch.testing.assert_close(m["log_odds_chosen"], log_odds.mean())


def test_reward_model_forms():
    g = torch.Generator().manual_seed(5)
    c, r, mg = (torch.randn(P, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    bt, m = reward_model_loss(c, r, margin=mg, center_rewards_coefficient=0.01)
    torch.testing.assert_close(bt, -ls(c - r - mg).mean() + 0.01 * ((c + r) ** 2).mean())
    le, _ = reward_model_loss(c, r, loss_type="log_exp")
    torch.testing.assert_close(le, torch.log(1 + torch.exp(r - c)).mean())  # ColossalChat's literal form
    torch.testing.assert_close(m["accuracy"], (c > r).double().mean())
    big = reward_model_loss(torch.tensor([0.0]), torch.tensor([200.0]), loss_type="log_exp")[0]
    assert torch.isfinite(big) and abs(big.item() - 200.0) < 1e-4  # literal log(1+exp(200)) is inf in fp32


# ----------------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_have_clear_errors():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="unknown loss_type 'sigmod'.*'sigmoid', 'hinge', 'ipo'"):
        dpo_loss(x, x, x, x, loss_type="sigmod")
    with pytest.raises(ValueError, match="batch size mismatch: policy_rejected_logps has 3 entries"):
        dpo_loss(x, x[:3], x, x)
    y = x.clone()
    y[2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in ref_chosen_logps"):
        dpo_loss(x, x, y, x)
    dpo_loss(x, x, y, x, validate=False)  # the hot path skips the check (no host sync)
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="exo_pair.*label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(ValueError, match="loss_weights has 1 entries but loss_type has 2"):
        dpo_loss(x, x, x, x, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="ld_alpha needs tail_logps"):
        dpo_loss(x, x, x, x, ld_alpha=0.5)
    with pytest.raises(ValueError, match="f_divergence_type='forward_kl' is only defined for the loss types"):
        dpo_loss(x, x, x, x, loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'; valid values: 'reverse_kl', 'forward_kl'"):
        dpo_loss(x, x, x, x, f_divergence_type="kl")
    with pytest.raises(ValueError, match="must be 1-D"):
        dpo_loss(x[None], x[None], x[None], x[None])
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*'kto', 'apo_zero_unpaired'"):
        kto_loss(x, x, x > 0, loss_type="dpo")
    with pytest.raises(ValueError, match="batch size mismatch: labels has 3"):
        kto_loss(x, x, (x > 0)[:3])
    with pytest.raises(ValueError, match="unknown loss_type 'simpo2'"):
        cpo_loss(x, x, loss_type="simpo2")
    with pytest.raises(ValueError, match="NaN or infinite values in rewards_rejected"):
        reward_model_loss(x, y)
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        orpo_loss(x, x, x, x, reduction="avg")


# ----------------------------------------------------------------------------------------------------- TRL parity

class _StandInLM:
    """Returns fixed per-token log-probs for each input_ids tensor (by identity), as TRL's fused LM head would."""

    training = True

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, **kw):
        lp = self.table[id(input_ids)]
        B, L = lp.shape
        z = torch.zeros(B, L, dtype=lp.dtype)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())


_ACC = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _trl_common(obj):
    obj.accelerator, obj.aux_loss_enabled, obj.precompute_ref_logps = _ACC, False, True
    obj._metrics = defaultdict(lambda: defaultdict(list))
    obj._total_train_tokens, obj._tp_size = 0, 1


def _padded_batch(seed, B, T):
    """Per-token log-probs [B, T-1] with a prompt of 2 tokens and ragged completions (TRL's shifted layout)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, T - 2, (B,), generator=g)
    pos = torch.arange(T)
    completion = ((pos >= 2) & (pos < 2 + lens[:, None])).long()
    attention = (pos < 2 + lens[:, None]).long()
    per_tok = (-torch.rand(B, T - 1, generator=g, dtype=torch.float64) * 3) * completion[:, 1:]
    return per_tok, completion, attention


def _tails(per_tok, mask, P_):
    """LD-DPO split computed independently: scored tokens past min(|y_w|, |y_l|) of the pair."""
    lens = mask.sum(1)
    shared = torch.minimum(lens[:P_], lens[P_:]).repeat(2)
    rank = mask.cumsum(1)
    return (per_tok * (mask.bool() & (rank > shared[:, None]))).sum(1)


@pytest.mark.parametrize("lt,eps,ld,fdiv", [(t, _eps_for(t) if t != "sigmoid" else 0.0, None, "reverse_kl")
                                             for t in DPO_LOSS_TYPES]
                         + [(["sigmoid", "sft"], 0.0, None, "reverse_kl"), ("sigmoid", 0.0, 0.3, "reverse_kl"),
                            ("ipo", 0.0, 0.5, "reverse_kl"), ("sigmoid", 0.0, None, "forward_kl"),
                            ("hinge", 0.0, None, "js_divergence"), ("ipo", 0.0, None, "alpha_divergence"),
                            (["discopop", "sft"], 0.0, None, "alpha_divergence")])
def test_dpo_matches_trl(lt, eps, ld, fdiv):
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T, beta = 8, 12, 0.25
    per_tok, completion, attention = _padded_batch(7, B, T)
    g = torch.Generator().manual_seed(8)
    ref_c, ref_r = (torch.randn(B // 2, generator=g, dtype=torch.float64) * 2 - 10 for _ in range(2))
    types = [lt] if isinstance(lt, str) else lt
    weights = [1.0, 0.7] if len(types) == 2 else None
    if fdiv == "alpha_divergence":  # TRL's alpha-divergence branch has clamps for fp16/bf16/fp32 only
        per_tok, ref_c, ref_r = per_tok.float(), ref_c.float(), ref_r.float()

    tr = DPOTrainer.__new__(DPOTrainer)
    _trl_common(tr)
    tr.beta, tr.loss_types, tr.loss_weights = beta, types, weights or [1.0] * len(types)
    tr.ld_alpha, tr.f_divergence_type, tr.label_smoothing, tr.use_weighting = ld, fdiv, eps, False
    tr.f_alpha_divergence_coef = 0.3
    tr.args = SimpleNamespace(discopop_tau=0.05)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    lp_trl = per_tok.clone().requires_grad_()
    tr.model = _StandInLM({id(input_ids): lp_trl})
    ref_c_t, ref_r_t = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
    inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref_c_t, "ref_rejected_logps": ref_r_t}
    trl_loss = tr._compute_loss(tr.model, inputs, False)
    trl_loss.backward()

    lp = per_tok.clone().requires_grad_()
    rc, rr = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
    mask = completion[:, 1:]
    seq = (lp * mask).sum(1)
    lens = completion.sum(1)
    kw = {}
    if ld is not None:
        tail = _tails(lp, mask, B // 2)
        # TRL's precomputed reference log-probs are already LD-weighted: their tails are 0
        kw = dict(ld_alpha=ld, tail_logps=(tail[: B // 2], tail[B // 2:], torch.zeros_like(rc), torch.zeros_like(rr)))
    loss, m = dpo_loss(seq[: B // 2], seq[B // 2:], rc, rr, beta=beta, loss_type=lt, loss_weights=weights,
                       label_smoothing=eps, chosen_lengths=lens[: B // 2], rejected_lengths=lens[B // 2:],
                       f_divergence_type=fdiv, f_alpha_divergence_coef=0.3, **kw)
    loss.backward()
    # TRL's exo_pair evaluates log(eps), log1p(-eps) on an fp32 tensor: parity to fp32 precision there
    rtol = 1e-6 if "exo_pair" in types else 1e-10
    if per_tok.dtype == torch.float32:
        rtol = 1e-5
    torch.testing.assert_close(loss, trl_loss.to(loss.dtype), rtol=rtol, atol=1e-12)
    # the stand-in's log-probs are 0 off the completion; TRL sums over every position, so compare on the completion
    torch.testing.assert_close(lp.grad, lp_trl.grad * mask, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(rc.grad, ref_c_t.grad, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(rr.grad, ref_r_t.grad, rtol=rtol, atol=1e-12)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert math.isclose(m[k].item(), tr._metrics["train"][k][-1], rel_tol=1e-9, abs_tol=1e-9), k


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(loss_type):
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer

    B, T = 8, 10
    per_tok, completion, attention = _padded_batch(11, B, T)
    kl_tok, kl_completion, kl_attention = _padded_batch(12, B, T)
    g = torch.Generator().manual_seed(13)
    ref, ref_kl = torch.randn(B, generator=g, dtype=torch.float64) - 8, torch.randn(B, generator=g,
                                                                                    dtype=torch.float64) - 9
    labels = torch.tensor([True, False, True, True, False, True, False, False])
    tr = KTOTrainer.__new__(KTOTrainer)
    _trl_common(tr)
    tr.beta, tr.loss_type, tr.desirable_weight, tr.undesirable_weight = 0.3, loss_type, 1.3, 0.8
    tr.calculate_KL = loss_type == "kto"
    ids, kl_ids = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    lp_trl = per_tok.clone().requires_grad_()
    tr.model = _StandInLM({id(ids): lp_trl, id(kl_ids): kl_tok})
    tr.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "label": labels,
              "ref_logps": ref, "ref_KL_logps": ref_kl, "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention,
              "KL_completion_mask": kl_completion}
    trl_loss = tr._compute_loss(tr.model, inputs, False)
    trl_loss.backward()

    lp = per_tok.clone().requires_grad_()
    seq = lp.sum(1)
    kw = dict(policy_kl_logps=kl_tok.sum(1), ref_kl_logps=ref_kl) if loss_type == "kto" else {}
    loss, m = kto_loss(seq, ref, labels, beta=0.3, loss_type=loss_type, desirable_weight=1.3,
                       undesirable_weight=0.8, **kw)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss.to(loss.dtype), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-9, atol=1e-12)
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        assert math.isclose(m[k].item(), tr._metrics["train"][k][-1], rel_tol=1e-9, abs_tol=1e-9), k


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0),
                                             ("simpo", 0.4), ("sigmoid", -0.2)])
def test_cpo_matches_trl(loss_type, alpha):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    (pc, pr, _, _), lc, lr = _inputs(14, scale=1.0)
    pc, pr = pc / 5, pr / 5
    tr = CPOTrainer.__new__(CPOTrainer)
    tr.accelerator, tr.alpha, tr.beta, tr.loss_type = _ACC, alpha, 0.2, loss_type
    tr.label_smoothing, tr.simpo_gamma = (0.1 if loss_type in ("sigmoid", "simpo") else 0.0), 0.7
    averaged = loss_type in ("ipo", "simpo")
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, cr, rr = tr.cpo_loss(a / lc if averaged else a, b / lr if averaged else b)
    losses.mean().backward()
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ours, m = cpo_loss(x, y, lc, lr, beta=0.2, loss_type=loss_type, label_smoothing=tr.label_smoothing,
                       cpo_alpha=0.0, simpo_gamma=0.7, alpha=alpha)
    ours.backward()
    torch.testing.assert_close(ours, losses.mean())
    torch.testing.assert_close(x.grad, a.grad)
    torch.testing.assert_close(y.grad, b.grad)
    torch.testing.assert_close(m["rewards/chosen"], cr.mean())


def test_orpo_odds_ratio_matches_trl():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    (pc, pr, _, _), lc, lr = _inputs(15, scale=1.0)
    pc, pr = pc / 10 - 1, pr / 10 - 1
    tr = ORPOTrainer.__new__(ORPOTrainer)
    tr.accelerator, tr.beta = _ACC, 0.15
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _, _, ratio, log_odds = tr.odds_ratio_loss(a / lc, b / lr)
    nll = -a.sum() / lc.sum()  # the NLL on the same (completion) tokens
    (nll - losses.mean()).backward()
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ours, m = orpo_loss(x, y, lc, lr, beta=0.15)
    ours.backward()
    # TRL's odds_ratio_loss computes in fp32: parity to fp32 precision
    kw = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, (nll - losses.mean()).detach(), **kw)
    torch.testing.assert_close(x.grad, a.grad, **kw)
    torch.testing.assert_close(y.grad, b.grad, **kw)
    torch.testing.assert_close(m["log_odds_ratio"], ratio.double(), **kw)
    torch.testing.assert_close(m["log_odds_chosen"], log_odds.double(), **kw)


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, 0.01)])
def test_reward_model_matches_trl(with_margin, center):
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(16)
    scores = (torch.randn(2 * P, 1, generator=g, dtype=torch.float64) * 2).requires_grad_()
    margin = torch.rand(P, generator=g, dtype=torch.float64)

    class ValueHeadStandIn:
        training = True

        def __call__(self, **kw):
            return SimpleNamespace(logits=scores)

    tr = RewardTrainer.__new__(RewardTrainer)
    _trl_common(tr)
    tr.model = ValueHeadStandIn()
    tr.args = SimpleNamespace(center_rewards_coefficient=center)
    inputs = {"input_ids": torch.zeros(2 * P, 3, dtype=torch.long), "attention_mask": torch.ones(2 * P, 3)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = tr.compute_loss(tr.model, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, scores)

    s = scores.detach().clone().requires_grad_()
    loss, m = reward_model_loss(s[:P, 0], s[P:, 0], margin=margin if with_margin else None,
                                center_rewards_coefficient=center)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(s.grad, trl_grad)
    for k in ("accuracy", "margin"):
        assert math.isclose(m[k].item(), tr._metrics["train"][k][-1], rel_tol=1e-9, abs_tol=1e-9), k
