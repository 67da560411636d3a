"""``model.liger``: when Liger-Kernel's layer patches are applied, what they patch, and that a patched model computes
the same logits and gradients as the unpatched one."""

import copy
import sys

import pytest
import torch

from fastpref.train.config import ConfigError, load_config
from fastpref.train.modeling import apply_liger, build_model, build_tokenizer, liger_decision

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def restore_llama_module(monkeypatch):
    """Liger replaces names in ``transformers.models.llama.modeling_llama`` process-wide; undo that after a test."""
    from transformers.loss import loss_utils
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(loss_utils.nn.functional, "cross_entropy", loss_utils.nn.functional.cross_entropy)
    return modeling_llama


def _cfg(*overrides):
    return load_config(None, list(overrides))


# ------------------------------------------------------------------------------------------------ the decision

def test_false_is_off_everywhere():
    assert liger_decision(_cfg("model.liger=false", "train.device=cuda"), "llama")[0] is False


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_other_values_are_errors(value):
    # caught when the config is loaded ("maybe"), or when the decision is made (1 == True passes the choice check)
    with pytest.raises(ConfigError, match=r"model\.liger=.*expected (one of )?auto, true,? (or )?false"):
        liger_decision(_cfg(f"model.liger={value}"), "llama")


def test_auto_on_cpu_is_off():
    pytest.importorskip("liger_kernel")
    use, why = liger_decision(_cfg("model.liger=auto", "train.device=cpu"), "llama")
    assert use is False
    assert "not on CUDA" in why and "train.device=cpu" in why


def test_true_on_cpu_is_an_error():
    pytest.importorskip("liger_kernel")
    with pytest.raises(ConfigError, match=r"model\.liger=true: .*not on CUDA"):
        liger_decision(_cfg("model.liger=true", "train.device=cpu"), "llama")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU default")
def test_default_is_auto_and_off_without_cuda():
    cfg = _cfg()
    assert cfg.model.liger == "auto"
    assert liger_decision(cfg, "llama")[0] is False


def test_without_liger(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # find_spec -> None, import -> ImportError
    use, why = liger_decision(_cfg("model.liger=auto", "train.device=cuda"), "llama")
    assert use is False and "not installed" in why
    with pytest.raises(ConfigError, match=r"model\.liger=true: .*liger_kernel is not installed"):
        liger_decision(_cfg("model.liger=true", "train.device=cuda"), "llama")


def test_model_type_support():
    pytest.importorskip("liger_kernel.transformers")
    # train.device=cuda: the decision only reads the config (the model is built on the CPU and moved later)
    assert liger_decision(_cfg("model.liger=auto", "train.device=cuda"), "llama") == (True, "model.liger=auto")
    assert liger_decision(_cfg("model.liger=true", "train.device=cuda"), "qwen2")[0] is True
    use, why = liger_decision(_cfg("model.liger=auto", "train.device=cuda"), "gpt2")
    assert use is False and "no patches for model type 'gpt2'" in why
    with pytest.raises(ConfigError, match=r"model\.liger=true: .*model type 'gpt2'"):
        liger_decision(_cfg("model.liger=true", "train.device=cuda"), "gpt2")


# ------------------------------------------------------------------------------------------------ what is patched

@pytest.mark.parametrize("lora", [False, True])
def test_build_model_applies_layer_patches_only(restore_llama_module, lora):
    pytest.importorskip("liger_kernel.transformers")
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.loss import loss_utils

    ce = loss_utils.nn.functional.cross_entropy
    cfg = _cfg("model.liger=true", "train.device=cuda", f"model.lora.enabled={str(lora).lower()}",
               "model.lora.target_modules=[q_proj,v_proj,gate_proj,up_proj,down_proj]")
    said = []
    model = build_model(cfg, build_tokenizer(cfg), say=said.append)
    assert said == ["model.liger=true: applied Liger's rope, rms_norm, swiglu to llama"]
    inner = model.get_base_model() if lora else model
    for layer in inner.model.layers:
        assert layer.mlp._get_name() == "LigerSwiGLUMLP"
        assert layer.input_layernorm._get_name() == "LigerRMSNorm"
        assert layer.post_attention_layernorm._get_name() == "LigerRMSNorm"
        if lora:  # the adapters wrap the projections that Liger's MLP forward calls
            assert all(hasattr(getattr(layer.mlp, p), "lora_A") for p in ("gate_proj", "up_proj", "down_proj"))
    assert inner.model.norm._get_name() == "LigerRMSNorm"
    assert restore_llama_module.apply_rotary_pos_emb is liger_rotary_pos_emb
    # no loss patches: the model's forward is the class's, transformers' cross-entropy untouched
    assert "forward" not in vars(inner)
    assert loss_utils.nn.functional.cross_entropy is ce


def test_build_model_auto_on_cpu_leaves_model_alone(restore_llama_module):
    cfg = _cfg("model.liger=auto", "train.device=cpu")
    said = []
    model = build_model(cfg, build_tokenizer(cfg), say=said.append)
    assert said and said[0].startswith("model.liger=auto: Liger's patches off")
    assert model.model.layers[0].mlp._get_name() == "LlamaMLP"
    assert model.model.norm._get_name() == "LlamaRMSNorm"


# ------------------------------------------------------------------------------------------------ numerics

_NO_INTERPRETER = (
    "Liger 0.8's {} kernel cannot run under the Triton interpreter (CPU tests): it calls {}.to(tl.float32) on a "
    "scalar kernel argument, which the Triton 3.6 interpreter passes as a Python float (InterpreterError: "
    "'float' object has no attribute 'to'); runs on CUDA")


def _tiny_llama(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(mc).to(device=device, dtype=dtype)


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("patch", [
    "rope",
    pytest.param("rms_norm", marks=pytest.mark.skipif(not HAS_CUDA,
                                                      reason=_NO_INTERPRETER.format("RMSNorm", "eps"))),
    pytest.param("swiglu", marks=pytest.mark.skipif(not HAS_CUDA,
                                                    reason=_NO_INTERPRETER.format("SwiGLU", "gate_multiplier"))),
])
def test_patched_tiny_llama_matches_unpatched(restore_llama_module, monkeypatch, patch):
    """Each patch alone on a tiny Llama: same logits and grads; on CPU through the Triton interpreter."""
    liger = pytest.importorskip("liger_kernel.transformers.monkey_patch")
    from liger_kernel.ops.rope import LigerRopeFunction

    device = "cuda" if HAS_CUDA else "cpu"
    model = _tiny_llama(device, torch.float32)
    patched = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 13), device=device)
    ref_logits, ref_grads = _logits_and_grads(model, ids)

    liger.apply_liger_kernel_to_llama(model=patched, rope=patch == "rope", rms_norm=patch == "rms_norm",
                                      swiglu=patch == "swiglu", cross_entropy=False, fused_linear_cross_entropy=False)
    calls = []
    rope_forward = LigerRopeFunction.forward
    monkeypatch.setattr(LigerRopeFunction, "forward",
                        staticmethod(lambda *a, **k: calls.append(1) or rope_forward(*a, **k)))
    logits, grads = _logits_and_grads(patched, ids)

    if patch == "rope":
        assert len(calls) == 2  # Liger's RoPE kernel ran once per layer
    else:
        name = "LigerRMSNorm" if patch == "rms_norm" else "LigerSwiGLUMLP"
        assert name in str(patched)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.gpu
def test_all_patches_bf16_on_cuda(restore_llama_module):
    """All of ``apply_liger`` on a bf16 tiny Llama on CUDA: logits and grads within bf16 noise of the unpatched."""
    pytest.importorskip("liger_kernel.transformers")
    model = _tiny_llama("cuda", torch.bfloat16)
    patched = copy.deepcopy(model)
    ids = torch.randint(0, 96, (4, 37), device="cuda")
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    assert apply_liger(patched) == ["rope", "rms_norm", "swiglu"]
    logits, grads = _logits_and_grads(patched, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    for n, g in ref_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        assert (grads[n] - g).abs().max() / scale < 5e-2, n
