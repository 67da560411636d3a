"""Shared-prefix attention: a prompt stored and attended ONCE for all of its responses.

A DPO pair (prompt, chosen, rejected) or a GRPO group (prompt, G completions) normally repeats the prompt in every
sequence. Here the packed row holds *segments* described by ``cu_seqlens`` (int32 ``[S + 1]``) plus a ``parent``
index per segment:

* a root segment (``parent[s] = -1``) attends causally to itself -- a prompt prefix, or an ordinary sequence;
* a response segment (``parent[s] = p``) attends fully to the tokens of segment ``p`` and causally to itself,
  i.e. exactly what its tokens would see in the full sequence ``prefix + response``.

Rules (checked by ``PrefixLayout.build``): a parent precedes its children, is itself a root, and its children are
the segments right after it (``p, p+1, ..., p+c``), so the queries that read a prefix form one contiguous token
range -- this is what lets the dK/dV kernel visit them with a loop bound instead of a search.

Row layout built by ``pack_shared_prefix`` for a unit (prompt ``x_0..x_{P-1}``, responses ``y^1..y^G``)::

    [x_0 .. x_{P-2}] [x_{P-1} y^1_0 .. y^1_{n1-1}] ... [x_{P-1} y^G_0 .. y^G_{nG-1}]
     prefix segment   response segment 1 (parent=prefix)   response segment G
    positions 0..P-2  P-1, P, ..., P-1+n1                   P-1, ..., P-1+nG

The prompt's LAST token is repeated at the start of every response segment: its hidden state predicts the
response's first token, which differs between responses, so it cannot be shared. Position ids of a response
continue after its prefix (rotary embeddings then see the same positions as in the full sequence), so every
response token's hidden state -- and log-prob -- equals the one of ``prompt + response`` run alone. Cost per unit:
``P - 1 + sum_g (n_g + 1)`` tokens instead of ``G P + sum_g n_g``.

Kernel: for segment ``s`` the forward/dQ key loop covers ``[pk_start[s], pk_end[s])`` (the parent, unmasked)
then the own causal range; the dK/dV loop of a prefix block covers its own causal queries then the children's
query range ``[cu[s + 1], q_child_end[s])`` unmasked (see ``fastpref.kernels.varlen_attention``).
With transformers, pass the layout through the model call: ``model(input_ids, position_ids=...,
fastpref_prefix=layout)`` with ``attn_implementation="fastpref"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpref.attention.varlen import _attention

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PrefixLayout:
    """Segments and their parents, with the kernel's derived key/query ranges (see the module docstring)."""

    cu_seqlens: torch.Tensor
    """int32 [S + 1] segment boundaries, on the compute device."""
    parent: tuple[int, ...]
    """Parent segment of each segment, -1 for roots."""
    max_seqlen: int
    """Longest segment (not counting its parent)."""
    cu_host: tuple[int, ...]
    ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    """(pk_start, pk_end, q_child_end) int32 [S] on the compute device."""

    @classmethod
    def build(cls, seqlens: list[int], parent: list[int], device=None) -> "PrefixLayout":
        """Layout of segments of ``seqlens`` tokens with ``parent`` indices (-1: none). Host lists, no sync."""
        if len(seqlens) != len(parent):
            raise ValueError(f"parent: {len(parent)} entries for {len(seqlens)} segments (seqlens)")
        if any((not isinstance(n, int)) or n < 0 for n in seqlens):
            raise ValueError(f"seqlens must be non-negative ints, got {seqlens}")
        cu = [0]
        for n in seqlens:
            cu.append(cu[-1] + n)
        for s, p in enumerate(parent):
            if p == -1:
                continue
            if not (0 <= p < s):
                raise ValueError(f"parent[{s}] = {p}: a parent must be an earlier segment (or -1)")
            if parent[p] != -1:
                raise ValueError(f"parent[{s}] = {p}: segment {p} has a parent itself (prefixes do not nest)")
            if any(parent[j] != p for j in range(p + 1, s)):
                raise ValueError(f"parent[{s}] = {p}: the children of a prefix must directly follow it")
        pk_start = [cu[p] if p >= 0 else cu[s] for s, p in enumerate(parent)]
        pk_end = [cu[p + 1] if p >= 0 else cu[s] for s, p in enumerate(parent)]
        q_child_end = [cu[s + 1] for s in range(len(seqlens))]
        for s, p in enumerate(parent):
            if p >= 0:
                q_child_end[p] = cu[s + 1]
        mk = lambda x: torch.tensor(x, dtype=torch.int32).to(device)  # noqa: E731
        return cls(mk(cu), tuple(parent), max(seqlens, default=0), tuple(cu),
                   (mk(pk_start), mk(pk_end), mk(q_child_end)))

    def to(self, device) -> "PrefixLayout":
        return PrefixLayout(self.cu_seqlens.to(device), self.parent, self.max_seqlen, self.cu_host,
                            tuple(t.to(device) for t in self.ranges))

    def parent_ranges(self) -> list[tuple[int, int]]:
        """Host (start, end) key range of each segment's parent ((0, 0) for roots)."""
        return [(self.cu_host[p], self.cu_host[p + 1]) if p >= 0 else (0, 0) for p in self.parent]


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PrefixLayout, *,
                     causal: bool = True, softmax_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """``varlen_attention`` over ``layout``'s segments, each response segment also attending fully to its parent.

    ``q [total, Hq, D]``, ``k``/``v`` ``[total, Hkv, D]`` as in ``varlen_attention``; differentiable w.r.t. all three.
    """
    if not isinstance(layout, PrefixLayout):
        raise ValueError(f"prefix_attention: layout must be a PrefixLayout, got {type(layout).__name__}")
    return _attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, causal=causal, softmax_scale=softmax_scale,
                      impl=impl, op="prefix_attention", ranges=layout.ranges, parent_ranges=layout.parent_ranges,
                      cu_host=layout.cu_host)


@dataclass
class SharedPrefixBatch:
    """One row in the shared-prefix layout. ``targets[t]`` is the token predicted at ``t`` (response tokens only,
    ``ignore_index`` elsewhere); ``response_segments[u][g]`` the segment index of response ``g`` of unit ``u``
    (index ``segment_sum(values, layout.cu_host)`` with it for per-response sums)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    layout: PrefixLayout
    response_segments: list[list[int]]


def pack_shared_prefix(prompts: list[list[int]], responses: list[list[list[int]]], *, device=None,
                       ignore_index: int = IGNORE_INDEX) -> SharedPrefixBatch:
    """Units ``(prompts[u], responses[u])`` -> one row in the layout of the module docstring.

    For DPO ``responses[u] = [chosen, rejected]``; for GRPO the ``G`` completions. Every response token is scored.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must be equal, non-empty lists")
    ids, pos, tgt, seqlens, parent, resp_seg = [], [], [], [], [], []
    for u, (p, rs) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"prompts[{u}]: empty prompt")
        if not rs or any(len(r) == 0 for r in rs):
            raise ValueError(f"responses[{u}]: needs at least one response, none of them empty")
        root = len(seqlens)
        ids += p[:-1]
        pos += range(len(p) - 1)
        tgt += [ignore_index] * (len(p) - 1)
        seqlens.append(len(p) - 1)
        parent.append(-1)
        resp_seg.append([])
        for r in rs:
            ids += [p[-1]] + list(r)
            pos += range(len(p) - 1, len(p) + len(r))
            tgt += list(r) + [ignore_index]
            resp_seg[-1].append(len(seqlens))
            seqlens.append(len(r) + 1)
            parent.append(root)
    return SharedPrefixBatch(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),
        position_ids=torch.tensor([pos], dtype=torch.long, device=device),
        targets=torch.tensor(tgt, dtype=torch.long, device=device),
        layout=PrefixLayout.build(seqlens, parent, device=device),
        response_segments=resp_seg,
    )
