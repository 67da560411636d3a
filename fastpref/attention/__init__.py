"""Packed (variable-length) causal attention with GQA, its HF ``AttentionInterface`` registration, and
shared-prefix attention (a prompt stored and attended once for all of its responses)."""

from fastpref.attention.hf import register_hf_attention
from fastpref.attention.prefix import PrefixLayout, SharedPrefixBatch, pack_shared_prefix, prefix_attention
from fastpref.attention.varlen import varlen_attention

__all__ = ["varlen_attention", "register_hf_attention", "prefix_attention", "PrefixLayout", "SharedPrefixBatch",
           "pack_shared_prefix"]
