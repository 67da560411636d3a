"""attn_implementation="fastpref": packed rows == each sequence alone (tiny Llama, SmolLM2), generation works."""

import contextlib
import copy

import pytest
import torch

from fastpref.attention import hf as fhf


@pytest.fixture
def registered():
    yield fhf.register_hf_attention
    fhf.register_hf_attention("auto")


def _tiny_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(copy.deepcopy(cfg))
    ref = LlamaForCausalLM(copy.deepcopy(cfg))  # own config: set_attn_implementation writes to it
    ref.load_state_dict(model.state_dict())
    model.set_attn_implementation("fastpref")
    ref.set_attn_implementation("eager")
    return model, ref


def _packed_vs_alone(model, ref, seqs, atol, packed_ctx=contextlib.nullcontext, **call_kw):
    """Logits and parameter gradients of one packed row vs each sequence alone through ``ref`` (``ref=None``:
    the same model switched to eager attention for the per-sequence runs)."""
    lens = [len(s) for s in seqs]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    w = torch.randn(ids.shape[1], model.config.vocab_size)
    model.zero_grad()
    with packed_ctx():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, **call_kw).logits[0]
        (packed * w).sum().backward()
    packed = packed.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if ref is None:
        ref = model
        model.zero_grad()
        model.set_attn_implementation("eager")
    alone, a = [], 0
    for s in seqs:
        lg = ref(input_ids=s[None], use_cache=False).logits[0]
        (lg * w[a:a + len(s)]).sum().backward()
        alone.append(lg.detach())
        a += len(s)
    alone = torch.cat(alone)
    scale = alone.abs().max().item()
    assert (packed - alone).abs().max().item() <= atol * max(1.0, scale)
    for name, r in ref.named_parameters():
        gs = max(1.0, r.grad.abs().max().item())
        assert (grads[name] - r.grad).abs().max().item() <= atol * gs, name


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tiny_llama_packed_equals_alone(registered, impl):
    registered(impl)
    model, ref = _tiny_pair()
    seqs = [torch.randint(0, 97, (n,)) for n in (5, 17, 1, 9)]
    _packed_vs_alone(model, ref, seqs, 2e-5)


def test_explicit_cu_seqlens_and_no_dense_mask(registered, monkeypatch):
    registered("torch")
    model, ref = _tiny_pair()
    import transformers.masking_utils as mu

    def no_dense(*a, **k):
        raise AssertionError("a dense mask was built for a packed row")

    @contextlib.contextmanager
    def ctx():
        with monkeypatch.context() as m:
            m.setattr(mu, "sdpa_mask", no_dense)
            yield

    seqs = [torch.randint(0, 97, (n,)) for n in (7, 3)]
    cu = torch.tensor([0, 7, 10], dtype=torch.int32)
    _packed_vs_alone(model, ref, seqs, 2e-5, packed_ctx=ctx, cu_seq_lens_q=cu, max_length_q=7)
    # and the boundaries derived from position_ids
    model.zero_grad(), ref.zero_grad()
    _packed_vs_alone(model, ref, seqs, 2e-5, packed_ctx=ctx)


def test_generation_padded_batch_matches_eager(registered):
    registered("auto")
    model, ref = _tiny_pair()
    ids = torch.randint(0, 97, (2, 6))
    for mask in (torch.ones(2, 6, dtype=torch.long), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])):
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_sliding_window_rejected(registered):
    registered("torch")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="sliding_window"):
        fhf.fastpref_attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=4,
                                       position_ids=torch.arange(8)[None])


@pytest.mark.slow  # loading and de-quantising the GGUF takes ~20-30 s on 2 CPU cores
@pytest.mark.demo
def test_smollm2_three_prompts_packed(registered):
    from fastpref.testing import load_smollm2

    registered("auto")
    model, tok = load_smollm2(torch.float32)
    model.set_attn_implementation("fastpref")
    prompts = ["The capital of France is", "Hi", "Write a short poem about the sea."]
    seqs = [torch.tensor(tok(p)["input_ids"]) for p in prompts]
    assert len({len(s) for s in seqs}) == 3
    _packed_vs_alone(model, None, seqs, 1e-4)
