"""The trainer's log-probs equal each model family's own logits (issue 14): a matrix over families built from config.

For every family (tiny: hidden 32, 2 layers, vocab 64, no download) fastpref's per-token log-probs through the
trainer's path (``fastpref.train.modeling.token_logps``: decoder hidden states + LM head + the family's logit
transform read by ``logit_transform``) must equal ``log_softmax`` of the model's own ``logits``, padded and packed
(varlen attention as ``attn_implementation="fastpref"``), in fp32 and under bf16 autocast (compared with the
model's own forward under the same autocast). Where packing is refused the refusal message is asserted. The
transforms are set to values that matter (a softcap of 2, a scale of 4) and the head is scaled so the logits are
large; each test also checks that dropping the transform would fail it.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
import torch
import transformers

from fastpref.attention.hf import register_hf_attention
from fastpref.data.collate import pack_sequences, pad_sequences
from fastpref.train.config import ConfigError, load_config
from fastpref.train.modeling import (_REFUSED, _TRANSFORMS, LogitTransform, check_logits, check_model_config,
                                     logit_transform, token_logps)

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
MAX_LEN = 64
PACK_FIX = "use data.pack=false"

# name: (config class, overrides, expected transform, packing refusal substring or None)
FAMILIES = {
    "llama": ("LlamaConfig", {}, LogitTransform(), None),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}, LogitTransform(), None),
    "qwen2": ("Qwen2Config", {}, LogitTransform(), None),
    "qwen2_sliding": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
                      LogitTransform(), "config.sliding_window=8"),
    "qwen3": ("Qwen3Config", {}, LogitTransform(), None),
    "mistral": ("MistralConfig", {}, LogitTransform(), None),  # window 4096 >= every sequence: plain causal
    "mistral_sliding": ("MistralConfig", {"sliding_window": 8}, LogitTransform(), "config.sliding_window=8"),
    "phi": ("PhiConfig", {}, LogitTransform(), None),  # an LM-head bias
    "phi3": ("Phi3Config", {}, LogitTransform(), None),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 2.0}, LogitTransform(softcap=2.0),
               "config.attn_logit_softcapping=50.0"),
    "gemma3_text": ("Gemma3TextConfig", {"final_logit_softcapping": 2.0}, LogitTransform(softcap=2.0), None),
    "gemma3_sliding": ("Gemma3TextConfig", {"final_logit_softcapping": 2.0, "sliding_window": 8},
                       LogitTransform(softcap=2.0), "config.sliding_window=8"),
    "vaultgemma": ("VaultGemmaConfig", {"final_logit_softcapping": 2.0}, LogitTransform(softcap=2.0),
                   "config.attn_logit_softcapping=50.0"),
    "nanochat": ("NanoChatConfig", {"final_logit_softcapping": 2.0}, LogitTransform(softcap=2.0), None),
    "granite": ("GraniteConfig", {"logits_scaling": 0.25}, LogitTransform(logit_scale=4.0), None),
    "granitemoe": ("GraniteMoeConfig", {"logits_scaling": 0.25, "num_local_experts": 2, "num_experts_per_tok": 1},
                   LogitTransform(logit_scale=4.0), None),
    "granitemoeshared": ("GraniteMoeSharedConfig", {"logits_scaling": 0.25, "num_local_experts": 2,
                                                    "num_experts_per_tok": 1}, LogitTransform(logit_scale=4.0), None),
    "hyperclovax": ("HyperCLOVAXConfig", {"logits_scaling": 4.0}, LogitTransform(logit_scale=4.0), None),
    "cohere": ("CohereConfig", {"logit_scale": 4.0}, LogitTransform(logit_scale=4.0), None),
    "cohere2": ("Cohere2Config", {"logit_scale": 4.0}, LogitTransform(logit_scale=4.0), None),
}


def _config(name: str):
    cls, over, _, _ = FAMILIES[name]
    return getattr(transformers, cls)(**{**BASE, **over})


_MODELS: dict = {}


def _models(name: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """``(model with its default attention, the same weights with attn_implementation="fastpref" or None where
    packing is refused)``, fp32, eval mode; the head scaled so that the logits are large (the transforms matter)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        c = _config(name)
        model = transformers.AutoModelForCausalLM.from_config(c).eval()
        with torch.no_grad():
            head = model.get_output_embeddings()
            head.weight.mul_(8.0)
            if getattr(head, "bias", None) is not None:
                head.bias.normal_(0, 1.0)
        packed = None
        if FAMILIES[name][3] is None:
            packed = transformers.AutoModelForCausalLM.from_config(_config(name),
                                                                   attn_implementation=register_hf_attention()).eval()
            packed.load_state_dict(model.state_dict())
        _MODELS[name] = (model, packed)
    return _MODELS[name]


def _seqs(vocab: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for p, r in ((3, 5), (2, 9), (4, 3)):
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        out.append((ids[:p], ids[p:]))
    return out


@torch.no_grad()
def _own_logps(model, seqs) -> list[torch.Tensor]:
    """The model's own per-token log-probs of each sequence's completion tokens (each sequence run alone)."""
    out = []
    for p, r in seqs:
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        out.append(logits.log_softmax(-1)[len(p) - 1:-1].gather(-1, torch.tensor(r)[:, None])[:, 0])
    return out


def _ours(model, batch, seqs, packed: bool) -> list[torch.Tensor]:
    tok = token_logps(model, batch, impl="torch")
    if packed:
        tok = tok.reshape(-1)
        starts = [0]
        for p, r in seqs:
            starts.append(starts[-1] + len(p) + len(r))
        return [tok[a + len(p) - 1:a + len(p) - 1 + len(r)] for a, (p, r) in zip(starts, seqs)]
    return [tok[b, len(p) - 1:len(p) - 1 + len(r)] for b, (p, r) in enumerate(seqs)]


def _cfg(**kw):
    return load_config(None, [f"data.max_length={MAX_LEN}", "data.max_prompt_length=16", "output_dir=/tmp/x",
                              *[f"{k}={v}" for k, v in kw.items()]])


TOL = {"fp32": 1e-4, "bf16-mixed": 6e-2}  # x max(1, max |log-prob|), as fastpref.testing.TOL


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logit_transform_and_packing_decision(name):
    _, _, transform, refusal = FAMILIES[name]
    c = _config(name)
    assert logit_transform(c) == transform
    check_model_config(_cfg(**{"data.pack": "false"}), c)  # padded runs: always allowed
    if refusal is None:
        check_model_config(_cfg(**{"data.pack": "true"}), c)
    else:
        with pytest.raises(ConfigError) as e:
            check_model_config(_cfg(**{"data.pack": "true"}), c)
        msg = str(e.value)
        assert "\n" not in msg and refusal in msg and repr(c.model_type) in msg and PACK_FIX in msg, msg


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logps_equal_the_models_own_logits(name, layout, precision):
    model, packed_model = _models(name)
    if layout == "packed" and packed_model is None:
        pytest.skip("packing refused for this family (asserted in test_logit_transform_and_packing_decision)")
    seqs = _seqs(BASE["vocab_size"])
    batch = pack_sequences(seqs) if layout == "packed" else pad_sequences(seqs, 0)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else torch.autocast("cpu",
                                                                                                       enabled=False)
    with torch.no_grad(), ctx:
        ref = torch.cat(_own_logps(model, seqs))
        ours = torch.cat(_ours(packed_model if layout == "packed" else model, batch, seqs, layout == "packed"))
    tol = TOL[precision] * max(1.0, float(ref.abs().max()))
    err = float((ours.float() - ref).abs().max())
    assert err <= tol, f"{name} {layout} {precision}: max |fastpref - model| = {err:.3g} > {tol:.3g}"
    transform = FAMILIES[name][2]
    if not transform.is_identity and precision == "fp32":  # the test can fail: without the transform it would
        from fastpref.ops import linear_logprobs
        from fastpref.train.modeling import decoder_hidden, lm_head

        with torch.no_grad():
            w, b = lm_head(model)
            plain = linear_logprobs(decoder_hidden(model, pad_sequences(seqs, 0)), w,
                                    pad_sequences(seqs, 0).targets, bias=b, impl="torch")
        plain = torch.cat([plain[i, len(p) - 1:len(p) - 1 + len(r)] for i, (p, r) in enumerate(seqs)])
        assert float((plain - ref).abs().max()) > 100 * tol, f"{name}: the transform does not matter in this test"


@pytest.mark.parametrize("name", ["llama_tied", "gemma3_text", "granite", "cohere", "phi"])
def test_runtime_self_check_passes(name):
    model, packed_model = _models(name)
    assert check_logits(model) < 1e-3
    assert check_logits(packed_model, pack=True) < 1e-3


def test_runtime_self_check_refuses_an_unknown_transform():
    class Doubled(transformers.LlamaForCausalLM):  # a family whose forward does something after lm_head
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    model = Doubled(_config("llama")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    with pytest.raises(ConfigError, match=r"model type 'llama': fastpref's log-probs differ from the model's own"):
        check_logits(model)


def test_unknown_family_with_a_transform_attribute_is_refused():
    c = transformers.LlamaConfig(**BASE)
    c.logits_scaling = 2.0  # e.g. a new MuP family built on Llama's code
    with pytest.raises(ConfigError, match=r"model type 'llama': config.logits_scaling=2.0 is a logit transform"):
        logit_transform(c)
    c.logits_scaling = 1.0  # neutral: nothing to reproduce
    assert logit_transform(c).is_identity


def test_refused_family_names_type_and_attribute():
    with pytest.raises(ConfigError, match=r"model type 'inkling_text'.*config.unpadded_vocab_size"):
        logit_transform(SimpleNamespace(model_type="inkling_text"))


def test_table_covers_every_family_that_transforms_logits():
    """Every CausalLM of the installed transformers whose forward rescales or softcaps ``logits`` with a config
    attribute is in the transform table or refused by name (so a new family cannot be silently ignored)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class = {}
    for mtype, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for c in (cls if isinstance(cls, (list, tuple)) else [cls]):
            by_class.setdefault(c, []).append(mtype)
    root = os.path.dirname(transformers.models.__file__)
    pattern = re.compile(r"logits\s*=.*(softcap|soft_cap|logit_scale|logits_scaling|multiplier)")
    missing = []
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, f"modeling_{d}.py")
        if not os.path.exists(path):
            continue
        src = open(path, encoding="utf-8").read()
        if not pattern.search(src):
            continue
        for cls in re.findall(r"^class (\w+ForCausalLM)\(", src, flags=re.M):
            for mtype in by_class.get(cls, []):
                body = src[src.index(f"class {cls}("):]
                fwd = body[body.find("def forward"):body.find("\nclass ", 1) if "\nclass " in body else None]
                if pattern.search(fwd) and mtype not in _TRANSFORMS and mtype not in _REFUSED:
                    missing.append(mtype)
    assert not missing, f"families that transform logits but are not in fastpref's table: {missing}"


def test_build_model_refuses_packing_before_training(tmp_path):
    """The trainer's own build path (a saved Gemma 2 directory, data.pack=true) refuses with the one-line message."""
    from fastpref.train.modeling import build_model

    model, _ = _models("gemma2")
    model.save_pretrained(tmp_path / "gemma2")
    cfg = _cfg(**{"model.name_or_path": str(tmp_path / "gemma2"), "data.pack": "true"})
    with pytest.raises(ConfigError, match=r"data.pack=true: model type 'gemma2': config.attn_logit_softcapping=50.0 "
                                          r"is not implemented by the packed attention; use data.pack=false"):
        build_model(cfg, None)
    built = build_model(_cfg(**{"model.name_or_path": str(tmp_path / "gemma2")}), None)  # padded: fine
    assert logit_transform(built) == LogitTransform(softcap=2.0)


@pytest.mark.parametrize("name", ["gemma3_text", "granite", "cohere"])
def test_algorithms_use_the_transform(name):
    """The algorithms' fused losses and the on-line per-token log-probs get the transform (policy and reference):
    SFT's loss, DPO's logged policy log-probs and GRPO's ``token_logps`` equal the model's own logits."""
    from fastpref.train.algorithms.base import ALGORITHMS, Runtime, load_builtin_algorithms
    from fastpref.train.reference import make_reference
    from fastpref.train.rollout import pack

    load_builtin_algorithms()
    model, _ = _models(name)
    seqs = _seqs(BASE["vocab_size"])
    own = _own_logps(model, seqs)
    cfg = _cfg(**{"algorithm": "dpo"})
    ref = make_reference("copy", model)
    ref.take()
    rt = Runtime(cfg=cfg, model=model, tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cpu"),
                 reference=ref)
    tol = TOL["fp32"] * max(1.0, max(float(x.abs().max()) for x in own))
    with torch.no_grad():
        sft = ALGORITHMS["sft"](cfg, rt)
        loss, _ = sft.compute_loss(pad_sequences(seqs, 0))
        assert float(loss) == pytest.approx(-float(torch.cat(own).mean()), abs=tol)
        dpo = ALGORITHMS["dpo"](cfg, rt)
        pairs = [{"prompt_ids": seqs[0][0], "chosen_ids": seqs[0][1], "rejected_ids": seqs[1][1]}]
        _, m = dpo.compute_loss(dpo.collate(pairs))
        chosen = float(_own_logps(model, [seqs[0]])[0].sum())
        rejected = float(_own_logps(model, [(seqs[0][0], seqs[1][1])])[0].sum())
        assert float(m["logps/chosen"]) == pytest.approx(chosen, abs=10 * tol)
        assert float(m["logps/rejected"]) == pytest.approx(rejected, abs=10 * tol)
        assert float(m["rewards/margins"]) == pytest.approx(0.0, abs=1e-4)  # the reference agrees with the policy
        batch = pack([p for p, _ in seqs], [r for _, r in seqs])
        tok = token_logps(model, batch)
        ours = torch.cat([tok[batch.targets != -100]])
        torch.testing.assert_close(ours, torch.cat(own), atol=tol, rtol=0)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[3] is None])
def test_packed_forward_passes_the_boundaries_explicitly(name, monkeypatch):
    """Every packable family hands ``cu_seq_lens_q``/``max_length_q`` (``fastpref.attention.hf``) through to the
    attention of each layer: the boundaries are never derived from ``position_ids`` and a packed forward makes no
    host sync at all (fastpref's or transformers')."""
    import fastpref.attention.hf as hf
    from fastpref.testing import HostSyncCounter

    _, packed_model = _models(name)

    def derived(*a, **k):
        raise AssertionError(f"{name}: the attention derived the boundaries from position_ids")

    monkeypatch.setattr(hf, "cu_seqlens_from_position_ids", derived)
    batch = pack_sequences(_seqs(BASE["vocab_size"]))
    with torch.no_grad(), HostSyncCounter() as c:
        token_logps(packed_model, batch, impl="torch")
    assert c.total == 0, (name, c.origin_where)
