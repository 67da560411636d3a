"""``attn_implementation="fastpref"`` for transformers models (Llama, Qwen2, Mistral, SmolLM2, ...).

``register_hf_attention()`` registers two things under the name ``"fastpref"``:

* in ``AttentionInterface`` the attention function ``fastpref_attention_forward``;
* in ``AttentionMaskInterface`` a mask builder that returns ``None`` whenever there is no padding (so the model
  never builds a dense 4-D ``[B, 1, T, T]`` mask for packed rows) and defers to SDPA's mask builder otherwise.

Calling convention (transformers' packed format, as for flash-attn 2): sequences concatenated in one row
(``input_ids [1, N]``) with ``position_ids`` restarting at each sequence start. The boundaries are passed
explicitly through the model call, with flash-attn's kwarg names in transformers: ``cu_seq_lens_q`` /
``cu_seq_lens_k`` (int32 ``[S + 1]`` on the device) and ``max_length_q`` / ``max_length_k`` (Python ints), plus
``fastpref_cu_seqlens_host`` (the same boundaries as host ints, read by the PyTorch twin instead of the device
tensor); :func:`packed_attention_kwargs` builds them (and ``attention_mask=unpadded_mask(...)``, see below) from
a packed ``fastpref.data.batch.Batch``, which is what the trainer does (``fastpref.train.modeling.decoder_hidden``):
no host sync anywhere in the attention. transformers' decoder models hand these kwargs unchanged to the attention
function of every layer (``**kwargs`` of the decoder layer and attention module): checked for every packable
family of ``tests/test_model_families.py`` (Llama, Qwen2/3, Mistral, Phi, Gemma 3, Granite, Cohere, ...).

Without them (an external caller passing ``position_ids`` only) the boundaries are derived from ``position_ids``:
a new sequence starts wherever ``position_ids[t] != position_ids[t - 1] + 1`` (the rule of
``masking_utils.find_packed_sequence_indices``) and at each row start; ONE host sync per model forward (the first
layer reads them and stores the result on the ``position_ids`` tensor itself, which every layer of the forward
receives; no module-global state). Shared-prefix batches pass ``fastpref_prefix=PrefixLayout`` (see
``fastpref.attention.prefix``).

The mask builder: transformers' ``create_causal_mask`` scans ``position_ids`` for packed sequences when it gets
no attention mask (``find_packed_sequence_indices``: a ``.all()`` on the device, one host sync per forward), and
checks a 2-D padding mask for zeros (another). :func:`unpadded_mask` is an all-ones ``[1, N]`` bool mask marked
as known to hold no padding: with it transformers skips the scan and the mask builder returns ``None`` without
reading it.

Everything else -- a padded batch with an ``attention_mask`` containing zeros, decoding with a KV cache
(query shorter than keys), dropout -- falls back to transformers' SDPA attention, so a model loaded with
``attn_implementation="fastpref"`` also generates correctly.

Not implemented, and raised before computing: a ``sliding_window`` shorter than the longest packed sequence and
attention logit softcapping (``softcap``, Gemma 2). The trainer refuses such models for ``data.pack=true`` before
training, from their config (``fastpref.train.modeling.packing_refusal``; docs/trainer.md).
"""

from __future__ import annotations

import torch

from fastpref.attention.varlen import varlen_attention

NAME = "fastpref"
_settings = {"impl": "auto"}
_UNPADDED = "_fastpref_unpadded"
_BOUNDS = "_fastpref_bounds"


def unpadded_mask(n_tokens: int, device) -> torch.Tensor:
    """An all-ones ``[1, n_tokens]`` bool attention mask marked as holding no padding (module docstring): the
    mask builder of ``"fastpref"`` returns ``None`` for it without reading the device."""
    mask = torch.ones((1, n_tokens), dtype=torch.bool, device=device)
    setattr(mask, _UNPADDED, True)
    return mask


def packed_attention_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int,
                            cu_seqlens_host: tuple[int, ...] | list[int]) -> dict:
    """The model-call kwargs of a packed row (module docstring): ``cu_seq_lens_q``/``cu_seq_lens_k``,
    ``max_length_q``/``max_length_k``, ``fastpref_cu_seqlens_host`` and ``attention_mask=unpadded_mask(N)``."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": int(max_seqlen),
            "max_length_k": int(max_seqlen), "fastpref_cu_seqlens_host": tuple(cu_seqlens_host),
            "attention_mask": unpadded_mask(cu_seqlens_host[-1], cu_seqlens.device)}


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch: int,
                                 seq_len: int) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """``(cu_seqlens int32 on position_ids' device, max_seqlen, host boundaries)`` of the ``batch * seq_len``
    flattened tokens, derived from where ``position_ids`` restart (the fallback for callers that pass no
    boundaries).

    One host sync (the start flags are copied to the host once); the result is stored on the ``position_ids``
    tensor itself (keyed by its shape and version), so the layers of one forward, which all receive that tensor,
    pay it once -- no module-global cache.
    """
    key = (batch, seq_len, position_ids._version)
    hit = getattr(position_ids, _BOUNDS, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    pos = position_ids.expand(batch, seq_len)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flags = start.reshape(-1).tolist()  # the host sync
    host = tuple(i for i, f in enumerate(flags) if f) + (batch * seq_len,)
    max_seqlen = max(b - a for a, b in zip(host[:-1], host[1:]))
    cu = torch.tensor(host, dtype=torch.int32).to(position_ids.device, non_blocking=True)
    result = (cu, max_seqlen, host)
    setattr(position_ids, _BOUNDS, (key, result))
    return result


def _explicit_boundaries(kwargs: dict, device) -> tuple[torch.Tensor, int, tuple[int, ...] | None] | None:
    for cu_name, max_name in (("cu_seq_lens_q", "max_length_q"), ("cu_seqlens", "max_seqlen")):
        cu = kwargs.get(cu_name)
        if cu is not None:
            max_seqlen = kwargs.get(max_name)
            if max_seqlen is None:
                raise ValueError(f"fastpref attention: {cu_name} given without {max_name}")
            if isinstance(max_seqlen, torch.Tensor):
                raise ValueError(f"fastpref attention: {max_name} must be a Python int (a tensor would be read "
                                 "back from the device)")
            host = kwargs.get("fastpref_cu_seqlens_host")
            return cu.to(device=device, dtype=torch.int32), int(max_seqlen), host
    return None


def fastpref_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, Tk, D]`` ->
    ``([B, T, Hq, D], None)``. Packed/unpadded calls run ``varlen_attention``; the rest SDPA (module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, hq, T, D = query.shape
    prefix = kwargs.get("fastpref_prefix")
    if prefix is None and (attention_mask is not None or key.shape[2] != T or dropout > 0.0
                           or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None:  # the trainer refuses such models before training (modeling.py)
        raise ValueError(f"fastpref attention: attention logit softcapping (softcap={kwargs['softcap']}) is not "
                         "implemented; load the model with another attn_implementation (data.pack=false)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q = query.transpose(1, 2).reshape(B * T, hq, D)
    k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
    if prefix is not None:
        from fastpref.attention.prefix import prefix_attention

        _check_window(kwargs.get("sliding_window"), prefix.max_seqlen)
        out = prefix_attention(q, k, v, prefix, causal=causal, softmax_scale=scaling, impl=_settings["impl"])
    else:
        bounds = _explicit_boundaries(kwargs, q.device)
        if bounds is None:
            pos = kwargs.get("position_ids")
            if pos is None:
                host = tuple(range(0, (B + 1) * T, T))
                bounds = (torch.tensor(host, dtype=torch.int32).to(q.device, non_blocking=True), T, host)
            else:
                bounds = cu_seqlens_from_position_ids(pos, B, T)
        cu, max_seqlen, host = bounds
        _check_window(kwargs.get("sliding_window"), max_seqlen)
        out = varlen_attention(q, k, v, cu, max_seqlen, causal=causal, softmax_scale=scaling, impl=_settings["impl"],
                               cu_seqlens_host=host)
    return out.view(B, T, hq, D), None


def _check_window(window: int | None, max_seqlen: int) -> None:
    """A sliding window shorter than the longest sequence would mask keys the kernel attends to: refuse (before
    computing). The trainer refuses such configs before training (``fastpref.train.modeling.packing_refusal``)."""
    if window is not None and window < max_seqlen:
        raise ValueError(f"fastpref attention: sliding_window={window} < max_seqlen={max_seqlen} is not "
                         "implemented; load the model with another attn_implementation (data.pack=false)")


def _fastpref_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask without padding (packed rows included: the attention reads the boundaries); SDPA's mask otherwise.

    An :func:`unpadded_mask` is known to hold no padding; checking any other 2-D padding mask for zeros is a host
    sync, as in transformers' flash-attention mask builder.
    """
    from transformers.masking_utils import sdpa_mask

    if q_length == kv_length and (attention_mask is None or (attention_mask.shape[-1] == kv_length and (
            getattr(attention_mask, _UNPADDED, False) or bool(attention_mask.all())))):
        return None
    kw = {} if mask_function is None else {"mask_function": mask_function}
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kw, **kwargs)


def register_hf_attention(impl: str = "auto") -> str:
    """Register ``"fastpref"`` with transformers' attention and mask interfaces; returns the name.

    ``impl`` is passed to ``varlen_attention`` (``"auto"``: Triton on CUDA, the PyTorch twin elsewhere).
    Idempotent. Then ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="fastpref")`` or
    ``model.set_attn_implementation("fastpref")``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from fastpref._impl import IMPLS

    if impl not in IMPLS:
        raise ValueError(f"register_hf_attention: impl must be one of {IMPLS}, got {impl!r}")
    _settings["impl"] = impl
    AttentionInterface.register(NAME, fastpref_attention_forward)
    AttentionMaskInterface.register(NAME, _fastpref_mask)
    return NAME
