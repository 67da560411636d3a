"""Differentiable ops with an ``impl="auto"|"triton"|"torch"`` switch and a PyTorch twin each."""

from fastpref.ops._chunks import default_chunk_rows
from fastpref.ops.fused import fused_linear_chunked_loss, plan_chunks, segment_ids, segment_sum
from fastpref.ops.logprobs import linear_cross_entropy, linear_logprobs
from fastpref.ops.token_loss import token_policy_loss

__all__ = ["default_chunk_rows", "fused_linear_chunked_loss", "linear_cross_entropy", "linear_logprobs",
           "plan_chunks", "segment_ids", "segment_sum", "token_policy_loss"]
