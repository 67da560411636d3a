"""Shared-prefix attention: kernel and twin vs an fp64 dense-mask reference; through a tiny Llama, per-token
log-probs (and gradients) of chosen and rejected == the two full sequences run separately."""

import copy

import pytest
import torch

from fastpref.attention.prefix import PrefixLayout, pack_shared_prefix, prefix_attention
from fastpref.testing import assert_close_to_ref


def _ref(q, k, v, seqlens, parent, scale):
    """fp64 attention with an explicit [N, N] mask built token by token from the layout's definition."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    n = seg.numel()
    t = torch.arange(n)
    par = torch.tensor(parent)[seg]
    allowed = ((seg[:, None] == seg[None, :]) & (t[:, None] >= t[None, :])) | (par[:, None] == seg[None, :])
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("thd,uhd->htu", q.double(), k.double().repeat_interleave(g, 1)) * scale
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("htu,uhd->thd", p, v.double().repeat_interleave(g, 1))


@pytest.mark.parametrize("seqlens,parent,hq,hkv,d,dtype", [
    ([7, 5, 1, 20, 3, 17, 9, 2], [-1, 0, 0, 0, -1, -1, 5, 5], 4, 2, 32, torch.float32),
    ([0, 4, 19, 18, 2], [-1, 0, 0, -1, 3], 8, 1, 16, torch.bfloat16),
])
def test_kernel_and_twin_vs_fp64(seqlens, parent, hq, hkv, d, dtype):
    layout = PrefixLayout.build(seqlens, parent)
    n = sum(seqlens)
    q, go = torch.randn(n, hq, d).to(dtype), torch.randn(n, hq, d).to(dtype)
    k, v = torch.randn(n, hkv, d).to(dtype), torch.randn(n, hkv, d).to(dtype)
    scale = d ** -0.5
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _ref(*leaves, seqlens, parent, scale)
    ref_g = torch.autograd.grad(ref, leaves, go.double())
    res = {}
    for impl in ("torch", "triton"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o = prefix_attention(*x, layout, impl=impl)
        res[impl] = (o, *torch.autograd.grad(o, x, go))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_ref(name, ref if i == 0 else ref_g[i - 1], res["torch"][i], res["triton"][i], dtype=dtype)


@pytest.mark.parametrize("seqlens,parent,match", [
    ([2, 3], [-1], "parent: 1 entries"),
    ([2, 3], [1, -1], r"parent\[0\] = 1"),
    ([2, 3, 4], [-1, 0, 1], "has a parent itself"),
    ([2, 3, 4], [-1, -1, 0], "directly follow"),
])
def test_layout_errors(seqlens, parent, match):
    with pytest.raises(ValueError, match=match):
        PrefixLayout.build(seqlens, parent)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_dpo_pairs_through_tiny_llama(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpref.attention.hf import register_hf_attention

    register_hf_attention(impl)
    try:
        cfg = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(copy.deepcopy(cfg))
        ref = LlamaForCausalLM(copy.deepcopy(cfg))
        ref.load_state_dict(model.state_dict())
        model.set_attn_implementation("fastpref")
        ref.set_attn_implementation("eager")
        r = lambda n: torch.randint(0, 61, (n,)).tolist()  # noqa: E731
        prompts = [r(6), r(1), r(11)]
        responses = [[r(4), r(7)], [r(3), r(1)], [r(5), r(2), r(6)]]  # pairs, and a group of 3
        batch = pack_shared_prefix(prompts, responses)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                       fastpref_prefix=batch.layout).logits[0]
        ok = batch.targets != -100
        logp = torch.zeros(ok.shape)
        logp[ok] = logits[ok].log_softmax(-1).gather(-1, batch.targets[ok, None])[:, 0]
        logp.sum().backward()
        total_ref = 0.0
        cu = batch.layout.cu_host
        for u, (p, rs) in enumerate(zip(prompts, responses)):
            for g, resp in enumerate(rs):
                full = torch.tensor(p + resp)[None]
                lg = ref(input_ids=full, use_cache=False).logits[0, len(p) - 1:-1].log_softmax(-1)
                lp_ref = lg.gather(-1, torch.tensor(resp)[:, None])[:, 0]
                s = batch.response_segments[u][g]
                got = logp[cu[s]:cu[s + 1] - 1]
                assert (got.detach() - lp_ref.detach()).abs().max() < 2e-5, (u, g)
                total_ref = total_ref + lp_ref.sum()
        total_ref.backward()
        for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
            assert (a.grad - b.grad).abs().max() <= 2e-5 * max(1.0, b.grad.abs().max().item()), name
        # the prompt is stored once: 6-1 + 1-1 + 11-1 prefix tokens, each response one extra token
        assert batch.input_ids.shape[1] == 15 + sum(len(x) + 1 for rs in responses for x in rs)
    finally:
        register_hf_attention("auto")
