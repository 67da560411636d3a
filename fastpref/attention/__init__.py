"""Packed (variable-length) causal attention with GQA, its HF ``AttentionInterface`` registration, and
shared-prefix attention (a prompt stored and attended once for all of its responses)."""

from fastpref.attention.varlen import varlen_attention

__all__ = ["varlen_attention"]
