"""Packing tokenised examples into one row of concatenated sequences (no padding), and its padded twin.

Input: a list of examples, each a dict with ``input_ids`` (list of ints) and ``labels`` (same length,
``-100`` on prompt tokens, the token itself on scored tokens). Examples are grouped in consecutive *units*
of ``unit_size`` examples that must stay together and in order: 1 for SFT/KTO, 2 for a preference pair
(chosen then rejected), ``G`` for an RL group of ``G`` completions of one prompt.

``pack_examples`` places units into bins of at most ``max_tokens`` tokens by first-fit-decreasing (units
sorted by token count, largest first, each put into the first bin with room; Johnson 1973: at most
11/9 OPT + 6/9 bins) and returns one packed :class:`fastpref.data.batch.Batch` per bin. Within a bin units keep
their input order, so pairs stay interleaved (sequence ``2i`` chosen, ``2i + 1`` rejected) and group members
consecutive -- the project's packed-batch convention. Output per bin (``N`` tokens, ``S`` sequences)::

    input_ids       [1, N]   the sequences concatenated
    position_ids    [1, N]   0, 1, ... restarting at each sequence start
    targets         [N]      targets[t] = labels[t + 1] inside a sequence, -100 at each sequence's last token
    cu_seqlens      [S + 1]  int32 token boundaries (moved to the device with the batch)
    cu_seqlens_host tuple    the same boundaries as Python ints (chunk planning, attention: no device sync)
    max_seqlen      int
    seq_index       [S]      which input example each packed sequence is
    unit_bounds     tuple    token boundaries of the units (0, ..., N) (for ``fastpref.ops.plan_chunks``)

``collate_padded`` gives the same meaning without packing (``pack=false``): rows right-padded to the
longest, ``targets [B, T]`` shifted the same way, and for pairs the TRL row order (all chosen, then all
rejected).
"""

from __future__ import annotations

import torch

from fastpref.data.batch import IGNORE_INDEX, Batch


def _checked(examples: list[dict], unit_size: int) -> list[tuple[list[int], list[int]]]:
    if not isinstance(unit_size, int) or unit_size < 1:
        raise ValueError(f"unit_size must be a positive int, got {unit_size!r}")
    if not examples:
        raise ValueError("examples: empty list")
    if len(examples) % unit_size:
        raise ValueError(f"examples: {len(examples)} examples is not a multiple of unit_size={unit_size}")
    out = []
    for i, ex in enumerate(examples):
        if "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"example {i}: needs 'input_ids' and 'labels', has {sorted(ex)}")
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        if not ids:
            raise ValueError(f"example {i}: empty input_ids")
        if len(labels) != len(ids):
            raise ValueError(f"example {i}: labels has {len(labels)} entries, input_ids {len(ids)}")
        out.append((ids, labels))
    return out


def _shifted(labels: list[int], ignore_index: int) -> list[int]:
    return labels[1:] + [ignore_index]


def first_fit_decreasing(sizes: list[int], budget: int) -> list[list[int]]:
    """Bins (lists of item indices, ascending) of total size <= ``budget``: items sorted by size (largest first,
    ties by index), each into the first bin with room. Every size must be <= budget."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        for b, r in enumerate(room):
            if sizes[i] <= r:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(budget - sizes[i])
    return [sorted(b) for b in bins]


def pack_examples(examples: list[dict], max_tokens: int, *, unit_size: int = 1,
                  ignore_index: int = IGNORE_INDEX) -> list[Batch]:
    """First-fit-decreasing packing of units of ``unit_size`` consecutive examples into rows of at most
    ``max_tokens`` tokens. Raises ``ValueError`` naming the example when one is empty or its unit is longer
    than ``max_tokens``."""
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    seqs = _checked(examples, unit_size)
    n_units = len(seqs) // unit_size
    sizes = [sum(len(seqs[u * unit_size + j][0]) for j in range(unit_size)) for u in range(n_units)]
    for u, n in enumerate(sizes):
        if n > max_tokens:
            first = u * unit_size
            what = f"example {first}" if unit_size == 1 else f"examples {first}..{first + unit_size - 1} (one unit)"
            raise ValueError(f"{what}: {n} tokens > max_tokens={max_tokens}")
    batches = []
    for units in first_fit_decreasing(sizes, max_tokens):
        ids, tgt, pos, cu, index, unit_bounds, scored = [], [], [], [0], [], [0], []
        for u in units:
            for e in range(u * unit_size, (u + 1) * unit_size):
                s_ids, s_labels = seqs[e]
                shifted = _shifted(s_labels, ignore_index)
                ids += s_ids
                tgt += shifted
                pos += range(len(s_ids))
                cu.append(cu[-1] + len(s_ids))
                index.append(e)
                scored.append(sum(t != ignore_index for t in shifted))
            unit_bounds.append(cu[-1])
        batches.append(Batch(
            input_ids=torch.tensor([ids], dtype=torch.long),
            targets=torch.tensor(tgt, dtype=torch.long),
            position_ids=torch.tensor([pos], dtype=torch.long),
            seq_index=torch.tensor(index, dtype=torch.long),
            scored_lengths=torch.tensor(scored, dtype=torch.long),
            scored_lengths_host=tuple(scored),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            cu_seqlens_host=tuple(cu),
            max_seqlen=max(b - a for a, b in zip(cu, cu[1:])),
            unit_bounds=tuple(unit_bounds),
            unit_size=unit_size,
        ))
    return batches


def collate_padded(examples: list[dict], pad_id: int, *, unit_size: int = 1,
                   ignore_index: int = IGNORE_INDEX) -> Batch:
    """A padded :class:`Batch`: right-padded rows with the same target convention as ``pack_examples``. For pairs
    (``unit_size=2``, examples given as chosen, rejected, chosen, ...) rows follow TRL: all chosen first, then all
    rejected."""
    seqs = _checked(examples, unit_size)
    order = list(range(len(seqs)))
    if unit_size == 2:
        order = order[0::2] + order[1::2]
    T = max(len(s[0]) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    tgt = torch.full((B, T), ignore_index, dtype=torch.long)
    scored = []
    for row, e in enumerate(order):
        s_ids, s_labels = seqs[e]
        n = len(s_ids)
        shifted = _shifted(s_labels, ignore_index)
        ids[row, :n] = torch.tensor(s_ids)
        mask[row, :n] = 1
        pos[row, :n] = torch.arange(n)
        tgt[row, :n] = torch.tensor(shifted)
        scored.append(sum(t != ignore_index for t in shifted))
    return Batch(input_ids=ids, targets=tgt, position_ids=pos, seq_index=torch.tensor(order, dtype=torch.long),
                 scored_lengths=torch.tensor(scored, dtype=torch.long), scored_lengths_host=tuple(scored),
                 attention_mask=mask,
                 max_seqlen=max(len(s[0]) for s in seqs), unit_size=unit_size)
