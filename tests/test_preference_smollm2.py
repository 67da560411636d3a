"""Real model: fused DPO on SmolLM2-135M equals the naive path (full logits + log_softmax + dpo_loss).

A few pairs of ``dpo_en_demo.json`` are tokenised with the model's chat template; the last hidden states of the
model are the input of both paths. Loss, metrics and the gradients w.r.t. the hidden states and the (tied) LM head
weight must agree with an fp64 computation through the full ``[tokens, 49152]`` logits. Skips when the optional
SmolLM2 GGUF is not installed (``fastpref.testing.load_smollm2``).
"""

import json
import os

import pytest
import torch

from fastpref.losses import FusedLinearDPOLoss, dpo_loss
from fastpref.testing import assert_close_to_ref, load_smollm2

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dpo_en_demo.json")
PAIRS, MAX_RESPONSE, IGN = 2, 16, -100


def _pairs():
    path = DATA if os.path.exists(DATA) else os.path.join(os.path.dirname(__file__), "..", "examples", "data",
                                                          "dpo_en_demo.json")
    if not os.path.exists(path):
        pytest.skip("dpo_en_demo.json not found")
    with open(path) as f:
        rows = json.load(f)[:PAIRS]
    return [(r["conversations"][-1]["value"], r["chosen"]["value"], r["rejected"]["value"]) for r in rows]


@pytest.fixture(scope="module")
def batch():
    model, tok = load_smollm2(torch.float32)
    model.eval()
    seqs = []  # TRL order: all chosen, then all rejected
    pairs = _pairs()
    for which in (1, 2):
        for p in pairs:
            prompt = tok.apply_chat_template([{"role": "user", "content": p[0][:120]}], tokenize=False,
                                             add_generation_prompt=True)
            pi = tok(prompt, add_special_tokens=False)["input_ids"]
            ri = tok(p[which], add_special_tokens=False)["input_ids"][:MAX_RESPONSE]
            ids = pi + ri
            labels = [IGN] * len(pi) + ri
            seqs.append((ids, labels[1:] + [IGN]))  # targets shifted: position t predicts ids[t + 1]
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), tok.eos_token_id or 0)
    tgt = torch.full((len(seqs), T), IGN)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        ids[i, : len(a)], tgt[i, : len(b)], att[i, : len(a)] = torch.tensor(a), torch.tensor(b), 1
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
        # a second "reference" model: the same network with its final norm weight perturbed
        ref_hidden = hidden * (1 + 0.05 * torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(0)))
    return hidden, ref_hidden, model.lm_head.weight.detach().clone(), tgt, [len(s[0]) for s in seqs]


def _naive(hidden, weight, targets, temperature):
    """Full-vocabulary logits and log_softmax at every scored position (the others contribute nothing)."""
    scored = targets != IGN
    logp = torch.log_softmax(hidden[scored] @ weight.T / temperature, -1)
    tok = hidden.new_zeros(targets.shape).masked_scatter(scored, logp.gather(-1, targets[scored][:, None])[:, 0])
    return tok.sum(-1), scored.sum(-1)


@pytest.mark.parametrize("loss_type,layout", [("sigmoid", "padded"), (["ipo", "sft"], "packed")])
def test_fused_dpo_equals_naive_on_smollm2(batch, loss_type, layout):
    hidden, ref_hidden, weight, tgt, lens = batch
    T, beta = 0.9, 0.1
    B = hidden.shape[0]
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    seq, n = _naive(h64, w64, tgt, T)
    with torch.no_grad():
        ref, _ = _naive(ref_hidden.double(), weight.double(), tgt, T)
    P = B // 2
    loss_ref, m_ref = dpo_loss(seq[:P], seq[P:], ref[:P], ref[P:], beta=beta, loss_type=loss_type,
                               chosen_lengths=n[:P], rejected_lengths=n[P:])
    loss_ref.backward()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # padded: skip the prompt and padding positions (as a trainer would); packed: every position through the head
    fused = FusedLinearDPOLoss(beta=beta, loss_type=loss_type, temperature=T, chunk_size=64,
                               skip_unscored=layout == "padded", engine="eager")
    if layout == "padded":
        loss, m = fused(h, w, tgt, ref_hidden=ref_hidden)
        dh_ref = h64.grad
    else:  # pack the real tokens, pairs interleaved
        order = [i for p in range(P) for i in (p, P + p)]
        packed = torch.cat([h[i, : lens[i]] for i in order])
        ref_packed = torch.cat([ref_hidden[i, : lens[i]] for i in order])
        tpacked = torch.cat([tgt[i, : lens[i]] for i in order])
        cu = torch.tensor([0] + [lens[i] for i in order]).cumsum(0)
        loss, m = fused(packed, w, tpacked, cu_seqlens=cu, ref_hidden=ref_packed)
        dh_ref = torch.cat([h64.grad[i, : lens[i]] for i in order])
    loss.backward()
    dh = h.grad if layout == "padded" else torch.cat([h.grad[i, : lens[i]] for i in order])
    assert_close_to_ref("loss", loss_ref.detach(), loss, dtype=torch.float32)
    assert_close_to_ref("dhidden", dh_ref, dh, dtype=torch.float32)
    assert_close_to_ref("dweight", w64.grad, w.grad, dtype=torch.float32)
    for k in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert_close_to_ref(k, m_ref[k].reshape(1), m[k].reshape(1).double(), dtype=torch.float32)
