"""End-to-end training steps (forward + backward + AdamW step of a whole model) for DPO and GRPO.

The model is a Llama built from a config (no download; random init, seeded, the same weights for every
provider), the batch is random token ids with right padding, a prompt (unscored) and a response (scored).
Reference log-probs (DPO) and old log-probs (GRPO) are precomputed inputs (the initial model's own, plus noise),
as with TRL's ``precompute_ref_log_probs`` / a rollout's stored log-probs, so every provider does the same work:

* ``fastpref``: decoder hidden states ``[B, T, H]`` (``fastpref.train.modeling.decoder_hidden``) into
  ``FusedLinearDPOLoss`` / ``FusedLinearPolicyLoss`` (no ``[B, T, V]`` logits).
* ``fastpref-packed``: the same with the padding removed: the real tokens packed in one row, the model loaded with
  ``attn_implementation="fastpref"`` (``fastpref.attention.register_hf_attention``; packed varlen attention,
  explicit ``cu_seq_lens_q``), the packed forms of the fused losses.
* ``fastpref-packed-skip`` (DPO): the same with ``skip_unscored=True`` (the trainer's ``dpo.skip_unscored``): the
  LM head sees only the scored (response) positions, the counts given on the host (``scored_lengths_host``).
* ``hf-naive``: ``model(...).logits``, fp32 ``log_softmax`` + gather, the plain loss.
* ``trl``: the compute path of TRL 1.16's ``DPOTrainer._compute_loss`` / ``GRPOTrainer``: the model patched with
  ``trl.trainer.utils.add_fused_lm_head`` (DPOTrainer's ``outputs``), ``model(..., labels, fused_lm_head=True)
  .log_probs``, then the loss (fastpref's plain ``dpo_loss`` / ``policy_loss``, which the losses' tests check
  against TRL's formulas). TRL's ``Trainer`` loop itself (accelerate, data collation, logging) is not timed.

Throughput is counted on the batch's tokens (padding included, the same for every provider); so are the FLOPs,
which flatters ``fastpref-packed-skip`` (it skips the head on the prompt positions) and the packed paths (no
padding): compare their times.
"""

from __future__ import annotations

import torch

from fastpref.benchmarks.providers import OpSpec, Unavailable, naive_token_logps, register


def _model(p: dict, device: torch.device, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=p["V"], hidden_size=p["H"], intermediate_size=p["I"], num_hidden_layers=p["L"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv"], max_position_embeddings=p["T"],
                      tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a CPU init of a 0.6B model takes many seconds
        model = LlamaForCausalLM(cfg).to(dtype=getattr(torch, p.get("dtype", "bfloat16")))
    model.train()
    return model


def _batch(p: dict, n_rows: int, device: torch.device, g: torch.Generator) -> dict:
    T, V = p["T"], p["V"]
    ids = torch.randint(0, V, (n_rows, T), generator=g)
    prompt = int(T // 4)
    lengths = torch.randint(prompt + T // 4, T + 1, (n_rows,), generator=g)
    pos = torch.arange(T)[None, :]
    attn = (pos < lengths[:, None]).long()
    completion = ((pos >= prompt) & (pos < lengths[:, None])).long()
    labels = ids.masked_fill(completion == 0, -100)  # TRL's unshifted labels
    targets = torch.cat([labels[:, 1:], torch.full((n_rows, 1), -100)], dim=1)  # shifted: predicts t+1 at t
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attn, labels=labels,
                                             targets=targets).items()}


def _inputs(kind: str):
    def make(p: dict, device: torch.device) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)
        rows = 2 * p["B"] if kind == "dpo" else p["G"]
        x = _batch(p, rows, device, g)
        if kind == "grpo":
            r = torch.randn(rows, generator=g)
            x["advantages"] = ((r - r.mean()) / (r.std() + 1e-4)).to(device)
        # reference (DPO) / old (GRPO) log-probs: filled from the model at the first build, plus noise
        x["ref"] = x["old"] = None
        return x
    return make


def _token_logps(path: str, model, x) -> torch.Tensor:
    """Per-token log-probs aligned with ``x["targets"]`` ``[B, T]`` (0 where ignored)."""
    if path == "hf-naive":
        logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], use_cache=False).logits
        return naive_token_logps_from_logits(logits, x["targets"])
    if path == "trl":
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=x["labels"],
                    fused_lm_head=True)
        lp = out.log_probs * (x["targets"][:, :-1] != -100)
        return torch.cat([lp, lp.new_zeros(lp.shape[0], 1)], dim=1)
    raise ValueError(path)


def naive_token_logps_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return tok * (targets != -100)


def _provider(kind: str, path: str):
    def build(x, p, device):
        from fastpref.losses import dpo_loss
        from fastpref.losses.policy import policy_loss

        if path.startswith("fastpref-packed"):
            try:
                from fastpref.attention.hf import register_hf_attention
            except ImportError as e:
                raise Unavailable(f"fastpref.attention.hf not importable ({e})") from e
            model = _model(p, device, attn=register_hf_attention())
        else:
            model = _model(p, device)
        if path == "trl":
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        if x["ref"] is None and x["old"] is None:
            with torch.no_grad():
                h = _hidden(model, x)
                w = model.get_output_embeddings().weight
                tok = torch.stack([naive_token_logps(h[i], w, x["targets"][i]) for i in range(h.shape[0])])
                g = torch.Generator(device="cpu").manual_seed(1)
                noise = torch.randn(tok.shape, generator=g).to(tok.device) * (x["targets"] != -100)
                if kind == "dpo":
                    x["ref"] = (tok + 0.05 * noise).sum(-1)
                else:
                    x["old"] = tok + 0.05 * noise
        packed = _pack(x, kind) if path.startswith("fastpref-packed") else None
        mask = (x["targets"] != -100).float()
        if path.startswith("fastpref"):
            if kind == "dpo":
                from fastpref.losses.fused_preference import FusedLinearDPOLoss

                fused = FusedLinearDPOLoss(beta=0.1, validate=False, skip_unscored=path.endswith("-skip"))
            else:
                try:
                    from fastpref.losses.fused_policy import FusedLinearPolicyLoss
                except ImportError as e:
                    raise Unavailable(f"fastpref.losses.fused_policy not importable ({e})") from e
                fused = FusedLinearPolicyLoss(loss_type="dapo")
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-6, foreach=True)
        B = x["input_ids"].shape[0] // 2

        def loss_fn():
            if path.startswith("fastpref-packed"):
                from fastpref.train.modeling import base_model

                k = packed
                h = base_model(model).get_decoder()(
                    input_ids=k["ids"], position_ids=k["pos"], use_cache=False, cu_seq_lens_q=k["cu"],
                    cu_seq_lens_k=k["cu"], max_length_q=k["max"], max_length_k=k["max"]).last_hidden_state[0]
                w = model.get_output_embeddings().weight
                if kind == "dpo":
                    return fused(h, w, k["targets"], cu_seqlens=k["cu_cpu"], scored_lengths_host=k["scored"],
                                 ref_logps=(x["ref"][:B], x["ref"][B:]))[0]
                return fused(h, w, k["targets"], x["advantages"], cu_seqlens=k["cu_cpu"], old_logps=k["old"])[0]
            if path == "fastpref":
                h = _hidden(model, x)
                w = model.get_output_embeddings().weight
                if kind == "dpo":
                    return fused(h, w, x["targets"], ref_logps=(x["ref"][:B], x["ref"][B:]))[0]
                return fused(h, w, x["targets"], x["advantages"], old_logps=x["old"])[0]
            tok = _token_logps(path, model, x)
            if kind == "dpo":
                seq = tok.sum(-1)
                return dpo_loss(seq[:B], seq[B:], x["ref"][:B], x["ref"][B:], beta=0.1)[0]
            return policy_loss(tok, x["old"], x["advantages"], mask, loss_type="dapo", impl="torch")[0]

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
            return loss.detach()
        return step
    return build


def _pack(x: dict, kind: str) -> dict:
    """The batch's real tokens in one row (transformers' packed layout: position ids restart per sequence),
    pairs interleaved (chosen, rejected) as the packed fused losses expect; explicit ``cu_seqlens``."""
    n = x["input_ids"].shape[0]
    rows = [r for i in range(n // 2) for r in (i, i + n // 2)] if kind == "dpo" else list(range(n))
    lens = x["attention_mask"].sum(-1).tolist()  # set-up, not timed: host reads are fine here
    scored = (x["targets"] != -100).sum(-1).tolist()
    take = lambda t: torch.cat([t[r, :lens[r]] for r in rows])  # noqa: E731
    cu_cpu = torch.tensor([0] + [lens[r] for r in rows]).cumsum(0).to(torch.int32)
    dev = x["input_ids"].device
    return dict(ids=take(x["input_ids"])[None], targets=take(x["targets"]),
                pos=torch.cat([torch.arange(lens[r], device=dev) for r in rows])[None],
                old=None if x.get("old") is None else take(x["old"]), cu=cu_cpu.to(dev), cu_cpu=cu_cpu,
                max=max(lens), scored=[scored[r] for r in rows])


def _hidden(model, x):
    """Decoder hidden states of the padded rows ``x`` through the trainer's path (one ``fastpref.data.batch.Batch``)."""
    from fastpref.data.batch import Batch
    from fastpref.train.modeling import decoder_hidden

    ids, mask = x["input_ids"], x["attention_mask"]
    b = Batch(input_ids=ids, targets=x["targets"], position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              seq_index=torch.arange(ids.shape[0], device=ids.device),
              scored_lengths=(x["targets"] != -100).sum(-1), attention_mask=mask)
    return decoder_hidden(model, b)


def _params(p):
    """Matmul parameters: attention projections, MLP, LM head (the input embedding is a lookup, no FLOPs)."""
    return p["L"] * (2 * p["H"] ** 2 * (1 + p["kv"] / p["heads"]) + 3 * p["H"] * p["I"]) + p["V"] * p["H"]


def _flops(rows_key: str, factor: int):
    # 6 * params * tokens (dense transformer training step, attention scores not counted)
    return lambda p: 6 * _params(p) * p[rows_key] * factor * p["T"]


GPU_MODEL = dict(V=128256, H=1024, I=4096, L=16, heads=16, kv=4)   # ~0.6B parameters (Llama-3-style vocab)
CPU_MODEL = dict(V=32000, H=64, I=176, L=2, heads=4, kv=1, dtype="float32")

for _kind, _rows, _gpu, _quick in (
        ("dpo", "B", [dict(GPU_MODEL, B=4, T=1024), dict(GPU_MODEL, B=4, T=2048)], [dict(CPU_MODEL, B=2, T=128)]),
        ("grpo", "G", [dict(GPU_MODEL, G=8, T=1024), dict(GPU_MODEL, G=16, T=1024)], [dict(CPU_MODEL, G=4, T=128)])):
    register(OpSpec(
        name=f"e2e-{_kind}",
        title=f"End-to-end {_kind.upper()} training step (Llama from config, fwd+bwd+AdamW)",
        make_inputs=_inputs(_kind),
        providers={name: _provider(_kind, name) for name in ("fastpref", "fastpref-packed", "hf-naive", "trl")
                   + (("fastpref-packed-skip",) if _kind == "dpo" else ())},
        useful_flops=_flops(_rows, 2 if _kind == "dpo" else 1), actual_flops={},
        gpu=_gpu, quick=_quick, x_key="T",
        tokens=(lambda p, r=_rows, f=2 if _kind == "dpo" else 1: p[r] * f * p["T"])))

