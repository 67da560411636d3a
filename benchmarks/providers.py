"""Benchmark registry: for each op, how to build its inputs, its providers, its FLOP model and its sweeps.

A provider is ``build(inputs, params, device) -> step``; ``step()`` runs one forward+backward (gradients w.r.t.
the trainable inputs via ``torch.autograd.grad``, so nothing accumulates between calls) and returns the loss as a
detached tensor, so providers can be checked against each other. Every import of a peer library or of a
fastpref module happens inside ``build``: a provider that cannot run raises :class:`Unavailable` (or
``ImportError``) and the runner records ``unavailable: <reason>`` instead of failing.

FLOP models (``N`` tokens, ``H`` hidden, ``V`` vocabulary; a matmul ``[a,b]x[b,c]`` is ``2abc``):

* log-probs / cross-entropy forward+backward. Useful work: ``6NHV`` (logits ``2NHV``, ``dh`` ``2NHV``,
  ``dW`` ``2NHV``). Actual: naive, torch.compile, Liger's FLCE (gradients formed in the forward) ``6NHV``;
  fastpref's ``linear_logprobs`` and TRL's ``ChunkedLogProbFunction`` recompute the logits in the backward:
  ``8NHV``. (On CUDA TRL scores only the non-ignored positions, as its trainers do: ~10% fewer in the
  log-probs case, so its ``actual`` figure is an upper bound there.)
* DPO with the reference computed from its hidden states inside the step: ``N = 2*B*T`` tokens of pairs, useful
  ``6NHV`` (policy) + ``2NHV`` (reference forward, no grad) = ``8NHV``; every provider here does exactly that
  (fastpref's eager engine forms the gradients during the forward: no recompute).
* GRPO/policy loss (old log-probs given, no KL): useful ``6NHV``; TRL's chunked log-prob path recomputes: ``8NHV``.
* Causal attention over sequences of lengths ``L_i``: forward ``4 * d * Hq * sum(L_i^2) / 2``, backward 2.5x the
  forward; padded SDPA really does ``4 * d * Hq * B * Lmax^2 / 2`` (causal, padding included).

Sizes: ``GPU`` sweeps are those of issues 3-6; ``QUICK`` sweeps are CPU-sized (the whole quick sweep runs in
about a minute on 2 cores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


Step = Callable[[], torch.Tensor]


@dataclass
class OpSpec:
    name: str
    title: str
    make_inputs: Callable[[dict, torch.device], dict]
    providers: dict[str, Callable[[dict, dict, torch.device], Step]]
    useful_flops: Callable[[dict], float]
    actual_flops: dict[str, Callable[[dict], float]]  # provider -> FLOPs it really does (default: useful)
    gpu: list[dict]
    quick: list[dict]
    x_key: str  # swept parameter shown on the plots' x axis
    tokens: Callable[[dict], int] = field(default=lambda p: 0)
    headline: dict | None = None  # the size summary.md features (an issue's target), else the largest that ran
    logits_elems: Callable[[dict], int] | None = None  # [tokens, V] of the naive path (peak vs logits size)


def _dtype(p: dict) -> torch.dtype:
    return getattr(torch, p.get("dtype", "bfloat16"))


def _randn(shape: tuple, p: dict, device: torch.device, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    """Large random inputs drawn on the device itself (a CPU draw of a 256k x 4096 head takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=_dtype(p)).mul_(scale)


def _need_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Unavailable(f"{what} needs CUDA")


def _compiled(fn: Callable, device: torch.device) -> Callable:
    if device.type == "cpu":
        import shutil

        if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
            raise Unavailable("torch.compile on CPU needs a C++ compiler")
    return torch.compile(fn)


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    torch.autograd.grad(loss, params)
    return loss.detach()


# --------------------------------------------------------------------------------------------------------------
# log-probs / cross-entropy: mean NLL of the targets, forward + backward w.r.t. hidden and weight
# --------------------------------------------------------------------------------------------------------------

def _lp_inputs(p: dict, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    N, H, V = p["N"], p["H"], p["V"]
    hidden = _randn((N, H), p, device).requires_grad_()
    weight = _randn((V, H), p, device, 1 / math.sqrt(H), seed=2).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.1] = -100  # prompt/padding positions
    return dict(hidden=hidden, weight=weight, targets=targets.to(device))


def naive_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The common path: full logits, fp32 log_softmax, gather; 0 at ignored positions."""
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != -100
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return tok * valid


def _naive_nll(hidden, weight, targets):
    valid = targets != -100
    return -naive_token_logps(hidden, weight, targets).sum() / valid.sum().clamp(min=1)


def _lp_torch(x, p, device):
    return lambda: _grads(_naive_nll(x["hidden"], x["weight"], x["targets"]), [x["hidden"], x["weight"]])


def _lp_compile(x, p, device):
    fn = _compiled(_naive_nll, device)
    return lambda: _grads(fn(x["hidden"], x["weight"], x["targets"]), [x["hidden"], x["weight"]])


def _lp_fastpref(impl: str):
    def build(x, p, device):
        if impl == "triton":
            _need_cuda(device, "the Triton kernels (the CPU interpreter is for tests, not timing)")
        from fastpref.ops import linear_cross_entropy

        def step():
            loss = linear_cross_entropy(x["hidden"], x["weight"], x["targets"], impl=impl, check_targets=False)
            return _grads(loss, [x["hidden"], x["weight"]])
        return step
    return build


def _lp_liger(x, p, device):
    _need_cuda(device, "Liger's fused linear cross-entropy (Triton)")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    return lambda: _grads(ce(x["weight"], x["hidden"], x["targets"]), [x["hidden"], x["weight"]])


def trl_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TRL 1.16's fused LM-head log-probs as its ``add_fused_lm_head`` calls them: ``trl.kernels.
    ChunkedLogProbFunction`` (cuBLAS tiles + Triton online logsumexp on CUDA, torch ops elsewhere; recompute in
    the backward) with TRL's vocabulary chunk; on Triton devices only the valid positions are scored (TRL's
    ``compact`` path), elsewhere every position."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    shape = targets.shape
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    valid = t != -100
    compact = _use_triton(h.device)
    out = ChunkedLogProbFunction.apply(h[valid] if compact else h, weight, None,
                                       t[valid] if compact else t.clamp(min=0), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                       None, 1.0, ())[0]
    if compact:
        return out.new_zeros(valid.shape).masked_scatter(valid, out).reshape(shape)
    return (out * valid).reshape(shape)


def _lp_trl(x, p, device):
    valid = (x["targets"] != -100).sum().clamp(min=1)

    def step():
        loss = -trl_token_logps(x["hidden"], x["weight"], x["targets"]).sum() / valid
        return _grads(loss, [x["hidden"], x["weight"]])
    return step


def _nhv(p):
    return p["N"] * p["H"] * p["V"]


LOGPROBS = OpSpec(
    name="logprobs", title="Fused linear log-probs / cross-entropy, forward+backward",
    make_inputs=_lp_inputs,
    providers={"fastpref-triton": _lp_fastpref("triton"), "fastpref-torch": _lp_fastpref("torch"),
               "torch": _lp_torch, "torch-compile": _lp_compile, "liger": _lp_liger, "trl": _lp_trl},
    useful_flops=lambda p: 6 * _nhv(p),
    actual_flops={"fastpref-triton": lambda p: 8 * _nhv(p), "fastpref-torch": lambda p: 8 * _nhv(p),
                  "trl": lambda p: 8 * _nhv(p)},
    # the issue-3 target size (N=16384, V=128256) comes early so a time-boxed GPU run always has it
    gpu=[dict(N=n, H=4096, V=v) for v in (128256, 151936, 32000, 256000) for n in (2048, 8192, 16384)],
    quick=[dict(N=256, H=128, V=8192, dtype="float32"), dict(N=1024, H=128, V=32000, dtype="float32")],
    x_key="N", tokens=lambda p: p["N"], headline=dict(N=16384, H=4096, V=128256),
    logits_elems=lambda p: p["N"] * p["V"])


# --------------------------------------------------------------------------------------------------------------
# DPO: B pairs x T tokens, TRL layout [2B, T, H] (first B rows chosen), reference from its own hidden states
# --------------------------------------------------------------------------------------------------------------

def _pair_targets(B: int, T: int, V: int, g: torch.Generator) -> torch.Tensor:
    """[2B, T] targets: a shared prompt (ignored) per pair, chosen/rejected responses of different lengths,
    right padding (ignored)."""
    t = torch.randint(0, V, (2 * B, T), generator=g)
    for i in range(B):
        prompt = int(torch.randint(T // 8, T // 3, (1,), generator=g))
        for row in (i, i + B):
            end = int(torch.randint(prompt + T // 4, T + 1, (1,), generator=g))
            t[row, :prompt] = -100
            t[row, end:] = -100
    return t


def _dpo_inputs(p: dict, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, H, V = p["B"], p["T"], p["H"], p["V"]
    x = dict(hidden=_randn((2 * B, T, H), p, device).requires_grad_(),
             weight=_randn((V, H), p, device, 1 / math.sqrt(H), seed=2).requires_grad_(),
             ref_hidden=_randn((2 * B, T, H), p, device, seed=3),
             targets=_pair_targets(B, T, V, g).to(device))
    x["ref_weight"] = x["weight"].detach() + _randn((V, H), p, device, 0.01, seed=4)
    return x


BETA = 0.1


def _naive_dpo(hidden, weight, ref_hidden, ref_weight, targets):
    from fastpref.losses import dpo_loss

    B = hidden.shape[0] // 2
    pol = naive_token_logps(hidden, weight, targets).sum(-1)
    with torch.no_grad():
        ref = naive_token_logps(ref_hidden, ref_weight, targets).sum(-1)
    return dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta=BETA)[0]


def _dpo_torch(x, p, device):
    return lambda: _grads(_naive_dpo(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["targets"]),
                          [x["hidden"], x["weight"]])


def _dpo_compile(x, p, device):
    fn = _compiled(_naive_dpo, device)
    return lambda: _grads(fn(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["targets"]),
                          [x["hidden"], x["weight"]])


def _dpo_fastpref(impl: str):
    def build(x, p, device):
        if impl == "triton":
            _need_cuda(device, "the Triton kernels (the CPU interpreter is for tests, not timing)")
        from fastpref.losses.fused_preference import FusedLinearDPOLoss

        loss_fn = FusedLinearDPOLoss(beta=BETA, impl=impl, validate=False)

        def step():
            loss, _ = loss_fn(x["hidden"], x["weight"], x["targets"], ref_hidden=x["ref_hidden"],
                              ref_weight=x["ref_weight"])
            return _grads(loss, [x["hidden"], x["weight"]])
        return step
    return build


def _dpo_liger(x, p, device):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=device.type == "cuda", use_ref_model=True)

    def step():
        out = loss_fn(x["weight"], x["hidden"], x["targets"], ref_input=x["ref_hidden"], ref_weight=x["ref_weight"])
        return _grads(out[0] if isinstance(out, tuple) else out, [x["hidden"], x["weight"]])
    return step


def _dpo_nhv(p):
    return 2 * p["B"] * p["T"] * p["H"] * p["V"]


DPO = OpSpec(
    name="dpo", title="DPO loss (sigmoid, reference from hidden states), forward+backward",
    make_inputs=_dpo_inputs,
    providers={"fastpref-triton": _dpo_fastpref("triton"), "fastpref-torch": _dpo_fastpref("torch"),
               "torch": _dpo_torch, "torch-compile": _dpo_compile, "liger": _dpo_liger},
    useful_flops=lambda p: 8 * _dpo_nhv(p), actual_flops={},
    gpu=[dict(B=8, T=t, H=4096, V=128256) for t in (1024, 2048, 4096)],
    quick=[dict(B=4, T=64, H=128, V=32000, dtype="float32")],
    x_key="T", tokens=lambda p: 2 * p["B"] * p["T"], logits_elems=lambda p: 2 * p["B"] * p["T"] * p["V"])


# --------------------------------------------------------------------------------------------------------------
# GRPO / policy loss: G completions x T tokens of one prompt group, old log-probs given, DAPO normalisation
# --------------------------------------------------------------------------------------------------------------

LOSS_TYPE = "dapo"


def _grpo_inputs(p: dict, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    G, T, H, V = p["G"], p["T"], p["H"], p["V"]
    lengths = torch.randint(T // 4, T + 1, (G,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None])
    ids = torch.randint(0, V, (G, T), generator=g)
    rewards = torch.randn(G, generator=g)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    x = dict(hidden=_randn((G, T, H), p, device).requires_grad_(),
             weight=_randn((V, H), p, device, 1 / math.sqrt(H), seed=2).requires_grad_(),
             ids=ids.to(device), mask=mask.to(device), advantages=adv.to(device))
    with torch.no_grad():
        chunks = [naive_token_logps(x["hidden"][i], x["weight"], x["ids"][i]) for i in range(G)]
    # old log-probs: the current ones plus noise, so ratios sit near 1 and some tokens clip
    old = torch.stack(chunks) + 0.05 * torch.randn(G, T, generator=g).to(device)
    x["old_logps"] = (old * x["mask"]).float()
    x["targets"] = torch.where(x["mask"], x["ids"], torch.full_like(x["ids"], -100))
    return x


def _plain_policy(logps, x):
    from fastpref.losses.policy import policy_loss

    return policy_loss(logps, x["old_logps"], x["advantages"], x["mask"].float(), loss_type=LOSS_TYPE,
                       impl="torch")[0]


def _grpo_torch(x, p, device):
    return lambda: _grads(_plain_policy(naive_token_logps(x["hidden"], x["weight"], x["targets"]), x),
                          [x["hidden"], x["weight"]])


def _grpo_compile(x, p, device):
    fn = _compiled(lambda h, w: _plain_policy(naive_token_logps(h, w, x["targets"]), x), device)
    return lambda: _grads(fn(x["hidden"], x["weight"]), [x["hidden"], x["weight"]])


def _grpo_trl(x, p, device):
    # TRL's GRPO loss lives inside GRPOTrainer.compute_loss; its log-prob path is the fused LM head
    # (ChunkedLogProbFunction). We time that path followed by fastpref's plain policy loss (same formula).
    return lambda: _grads(_plain_policy(trl_token_logps(x["hidden"], x["weight"], x["targets"]), x),
                          [x["hidden"], x["weight"]])


def _grpo_fastpref(impl: str):
    def build(x, p, device):
        if impl == "triton":
            _need_cuda(device, "the Triton kernels (the CPU interpreter is for tests, not timing)")
        try:
            from fastpref.losses.fused_policy import FusedLinearPolicyLoss
        except ImportError as e:
            raise Unavailable(f"fastpref.losses.fused_policy not importable yet ({e})") from e
        loss_fn = FusedLinearPolicyLoss(loss_type=LOSS_TYPE, impl=impl)

        def step():
            loss, _ = loss_fn(x["hidden"], x["weight"], x["targets"], x["advantages"], old_logps=x["old_logps"])
            return _grads(loss, [x["hidden"], x["weight"]])
        return step
    return build


def _grpo_liger(x, p, device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type=LOSS_TYPE,
                                       compiled=device.type == "cuda")

    def step():
        out = loss_fn(x["hidden"], x["weight"], x["ids"], x["mask"].long(), x["advantages"],
                      old_per_token_logps=x["old_logps"])
        return _grads(out[0] if isinstance(out, tuple) else out, [x["hidden"], x["weight"]])
    return step


def _grpo_nhv(p):
    return p["G"] * p["T"] * p["H"] * p["V"]


GRPO = OpSpec(
    name="grpo", title=f"GRPO policy loss ({LOSS_TYPE}, old log-probs given), forward+backward",
    make_inputs=_grpo_inputs,
    providers={"fastpref-triton": _grpo_fastpref("triton"), "fastpref-torch": _grpo_fastpref("torch"),
               "torch": _grpo_torch, "torch-compile": _grpo_compile, "liger": _grpo_liger, "trl": _grpo_trl},
    useful_flops=lambda p: 6 * _grpo_nhv(p), actual_flops={"trl": lambda p: 8 * _grpo_nhv(p)},
    gpu=[dict(G=8, T=1024, H=4096, V=128256), dict(G=16, T=2048, H=4096, V=128256),
         dict(G=8, T=4096, H=4096, V=151936)],
    quick=[dict(G=4, T=128, H=128, V=32000, dtype="float32")],
    x_key="T", tokens=lambda p: p["G"] * p["T"], logits_elems=lambda p: p["G"] * p["T"] * p["V"])


# --------------------------------------------------------------------------------------------------------------
# Attention: packed causal GQA over sequences of a realistic length spread
# --------------------------------------------------------------------------------------------------------------

def seq_lengths(total: int, max_len: int, g: torch.Generator) -> list[int]:
    """Lengths drawn log-normally (median ~max_len/6, long tail, clipped to [16, max_len]) until ``total``."""
    lens: list[int] = []
    while sum(lens) < total:
        L = int(torch.empty(1).log_normal_(math.log(max_len / 6), 0.8, generator=g).clamp(16, max_len))
        lens.append(min(L, total - sum(lens)))
    return lens


def _attn_inputs(p: dict, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = seq_lengths(p["tokens"], p["max_len"], g)
    N, Hq, Hk, d = sum(lens), p["hq"], p["hkv"], p["d"]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    q, k, v = (_randn((N, h, d), p, device, seed=i).requires_grad_() for i, h in ((1, Hq), (2, Hk), (3, Hk)))
    return dict(q=q, k=k, v=v, lens=lens, cu=cu.to(device), cu_cpu=cu, max_len=max(lens))


def _attn_loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def _attn_step(x, fn):
    return lambda: _grads(_attn_loss(fn()), [x["q"], x["k"], x["v"]])


def _attn_fastpref(impl: str):
    def build(x, p, device):
        if impl == "triton":
            _need_cuda(device, "the Triton kernels (the CPU interpreter is for tests, not timing)")
        try:
            from fastpref.attention import varlen_attention
        except ImportError as e:
            raise Unavailable(f"fastpref.attention.varlen_attention not importable yet ({e})") from e
        return _attn_step(x, lambda: varlen_attention(x["q"], x["k"], x["v"], x["cu"], x["max_len"], causal=True,
                                                      impl=impl))
    return build


def _attn_sdpa_padded(x, p, device):
    lens, L = x["lens"], x["max_len"]
    B, Hq, Hk, d = len(lens), p["hq"], p["hkv"], p["d"]
    idx = torch.cat([torch.arange(n) + i * L for i, n in enumerate(lens)]).to(device)

    def pad(t):
        out = t.new_zeros(B * L, t.shape[1], d).index_copy(0, idx, t)
        return out.view(B, L, t.shape[1], d).transpose(1, 2)

    def fwd():
        # K/V heads repeated to Hq so SDPA keeps its flash backend (enable_gqa can fall back to the math one)
        k, v = (t.repeat_interleave(Hq // Hk, dim=1) for t in (x["k"], x["v"]))
        o = F.scaled_dot_product_attention(pad(x["q"]), pad(k), pad(v), is_causal=True)
        return o.transpose(1, 2).reshape(B * L, Hq, d).index_select(0, idx)
    return _attn_step(x, fwd)


def _attn_flex(x, p, device):
    _need_cuda(device, "FlexAttention's backward (torch has no CPU backward for it)")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(x["lens"])), torch.tensor(x["lens"])).to(device)
    N = doc.numel()

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(mask_mod, None, None, N, N, device=str(device), _compile=True)
    flex = torch.compile(flex_attention)

    def fwd():
        q, k, v = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (x["q"], x["k"], x["v"]))
        o = flex(q, k, v, block_mask=block_mask, enable_gqa=p["hq"] != p["hkv"])
        return o[0].transpose(0, 1)
    return _attn_step(x, fwd)


def _attn_flash(x, p, device):
    _need_cuda(device, "flash-attn")
    from flash_attn import flash_attn_varlen_func

    return _attn_step(x, lambda: flash_attn_varlen_func(x["q"], x["k"], x["v"], x["cu"], x["cu"], x["max_len"],
                                                        x["max_len"], causal=True))


def _attn_flops(p, lens=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = seq_lengths(p["tokens"], p["max_len"], g)
    return 3.5 * 4 * p["d"] * p["hq"] * sum(n * n for n in lens) / 2


def _attn_padded_flops(p):
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = seq_lengths(p["tokens"], p["max_len"], g)
    return 3.5 * 4 * p["d"] * p["hq"] * len(lens) * max(lens) ** 2 / 2


ATTENTION = OpSpec(
    name="attention", title="Packed causal GQA attention, forward+backward",
    make_inputs=_attn_inputs,
    providers={"fastpref-triton": _attn_fastpref("triton"), "fastpref-torch": _attn_fastpref("torch"),
               "flex-attention": _attn_flex, "sdpa-padded": _attn_sdpa_padded, "flash-attn": _attn_flash},
    useful_flops=_attn_flops, actual_flops={"sdpa-padded": _attn_padded_flops},
    gpu=[dict(tokens=t, max_len=4096, hq=32, hkv=4, d=128) for t in (16384, 32768, 65536)],
    quick=[dict(tokens=1024, max_len=256, hq=8, hkv=1, d=32, dtype="float32")],
    x_key="tokens", tokens=lambda p: p["tokens"])


OPS: dict[str, OpSpec] = {op.name: op for op in (LOGPROBS, DPO, GRPO, ATTENTION)}


def register(op: OpSpec) -> None:
    """Add an op (the end-to-end steps register themselves from :mod:`fastpref.benchmarks.e2e`)."""
    OPS[op.name] = op
