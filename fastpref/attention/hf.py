"""``attn_implementation="fastpref"`` for transformers models (Llama, Qwen2, Mistral, SmolLM2, ...).

``register_hf_attention()`` registers two things under the name ``"fastpref"``:

* in ``AttentionInterface`` the attention function ``fastpref_attention_forward``;
* in ``AttentionMaskInterface`` a mask builder that returns ``None`` whenever there is no padding (so the model
  never builds a dense 4-D ``[B, 1, T, T]`` mask for packed rows) and defers to SDPA's mask builder otherwise.

Calling convention (transformers' packed format, as for flash-attn 2): sequences concatenated in one row
(``input_ids [1, N]``) with ``position_ids`` restarting at each sequence start; a new sequence starts wherever
``position_ids[t] != position_ids[t - 1] + 1`` (the rule of ``masking_utils.find_packed_sequence_indices``) and at
each row start. ``cu_seqlens`` are derived from ``position_ids`` with ONE host sync per model forward (the
boundaries are read once, on the first layer, and reused by the others: ``max_seqlen`` must be a host int to size
the kernel grid). To avoid even that, pass them explicitly through the model call: ``cu_seq_lens_q`` (int32 on
the device) and ``max_length_q`` (int) -- flash-attn's names in transformers -- or ``cu_seqlens``/``max_seqlen``.
Shared-prefix batches pass ``fastpref_prefix=PrefixLayout`` (see ``fastpref.attention.prefix``).

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
_boundary_cache: dict = {}


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 on position_ids' device, max_seqlen)`` of the ``batch * seq_len`` flattened tokens.

    One host sync (the start flags are copied to the host once); the result is cached for the same
    ``position_ids`` tensor, so the layers of one forward pay it once.
    """
    key = (batch, seq_len, position_ids._version)
    hit = _boundary_cache.get("entry")
    if hit is not None and hit[0] is position_ids and hit[1] == key:
        return hit[2]
    pos = position_ids.expand(batch, seq_len)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = start.reshape(-1).cpu().nonzero().flatten()  # the host sync
    cu_host = torch.cat([starts, torch.tensor([batch * seq_len])]).to(torch.int32)
    max_seqlen = int(cu_host.diff().max())
    result = (cu_host.to(position_ids.device, non_blocking=True), max_seqlen)
    _boundary_cache["entry"] = (position_ids, key, result)
    return result


def _explicit_boundaries(kwargs: dict, device) -> tuple[torch.Tensor, int] | None:
    for cu_name, max_name in (("cu_seq_lens_q", "max_length_q"), ("cu_seqlens", "max_seqlen")):
        cu = kwargs.get(cu_name)
        if cu is not None:
            max_seqlen = kwargs.get(max_name)
            if max_seqlen is None:
                raise ValueError(f"fastpref attention: {cu_name} given without {max_name}")
            return cu.to(device=device, dtype=torch.int32), int(max_seqlen)
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
                cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
                bounds = (cu, T)
            else:
                bounds = cu_seqlens_from_position_ids(pos, B, T)
        cu, max_seqlen = bounds
        _check_window(kwargs.get("sliding_window"), max_seqlen)
        out = varlen_attention(q, k, v, cu, max_seqlen, causal=causal, softmax_scale=scaling, impl=_settings["impl"])
    return out.view(B, T, hq, D), None


def _check_window(window: int | None, max_seqlen: int) -> None:
    """A sliding window shorter than the longest sequence would mask keys the kernel attends to: refuse (before
    computing). The trainer refuses such configs before training (``fastpref.train.modeling.packing_refusal``)."""
    if window is not None and window < max_seqlen:
        raise ValueError(f"fastpref attention: sliding_window={window} < max_seqlen={max_seqlen} is not "
                         "implemented; load the model with another attn_implementation (data.pack=false)")


def _fastpref_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask without padding (packed rows included: the attention reads ``position_ids``); SDPA's mask otherwise.

    Checking a 2-D padding mask for zeros is a host sync, as in transformers' flash-attention mask builder.
    """
    from transformers.masking_utils import sdpa_mask

    if q_length == kv_length and (attention_mask is None or (attention_mask.shape[-1] == kv_length
                                                             and bool(attention_mask.all()))):
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
