"""Collation of tokenised examples into a :class:`fastpref.data.batch.Batch`, padded or packed.

Two layouts of one type (``Batch.packed`` tells them apart):

* padded (the default; ``fastpref.data.packing.collate_padded``): rows right-padded to the longest, with
  ``attention_mask``; for preference batches the first ``P`` rows are the chosen and the last ``P`` the rejected
  responses of the same prompts (TRL's order);
* packed (``pack=True``; ``fastpref.data.packing.pack_examples``, one bin per micro-batch so the example order
  is kept): one row ``input_ids [1, N]`` of concatenated sequences with ``position_ids`` restarting per
  sequence, ``targets [N]``, ``cu_seqlens`` on the device and its host copy ``cu_seqlens_host``; pairs interleaved
  (sequence ``2i`` chosen, ``2i+1`` rejected).

``targets[b, t]`` is the token predicted at position ``t`` (``input_ids[b, t+1]``) where that token belongs to
the response, else ``ignore_index``; so prompt tokens, padding and the last position are never scored. An SFT
example may carry ``loss_mask`` (0/1 over prompt + response, ``fastpref.data.dataset``: every assistant turn of a
conversation); then exactly its 1-tokens are scored. The rollouts of the on-line methods are packed by the same
:func:`pack_sequences`.
"""

from __future__ import annotations

import torch

from fastpref.data.batch import IGNORE_INDEX, Batch


def _labels(seq: tuple, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Labels of ``(prompt_ids, response_ids[, loss_mask])`` over prompt + response: the response tokens, or with a
    ``loss_mask`` the tokens where it is 1; ``ignore_index`` elsewhere."""
    p, r = seq[0], seq[1]
    mask = seq[2] if len(seq) > 2 else None
    if mask is None:
        return [ignore_index] * len(p) + list(r)
    ids = list(p) + list(r)
    if len(mask) != len(ids):
        raise ValueError(f"loss_mask has {len(mask)} entries for a sequence of {len(ids)} tokens")
    return [t if m else ignore_index for t, m in zip(ids, mask)]


def _examples(seqs: list[tuple], ignore_index: int = IGNORE_INDEX) -> list[dict]:
    return [{"input_ids": list(s[0]) + list(s[1]), "labels": _labels(s, ignore_index)} for s in seqs]


def pack_sequences(seqs: list[tuple], *, unit_size: int = 1, device=None) -> Batch:
    """``seqs`` (in order; pairs as chosen, rejected, chosen, ...) -> one packed :class:`Batch` (module
    docstring); each item ``(prompt_ids, response_ids)`` or ``(prompt_ids, response_ids, loss_mask)``."""
    from fastpref.data.packing import pack_examples

    ex = _examples(seqs)
    (batch,) = pack_examples(ex, max(1, sum(len(e["input_ids"]) for e in ex)), unit_size=unit_size)
    return batch.to(device) if device is not None else batch


def pad_sequences(seqs: list[tuple], pad_id: int, *, device=None, unit_size: int = 1,
                  ignore_index: int = IGNORE_INDEX) -> Batch:
    """``seqs`` = ``[(prompt_ids, response_ids[, loss_mask]), ...]`` -> a padded :class:`Batch` in the given row
    order: ``input_ids``, ``attention_mask``, ``position_ids`` and shifted ``targets`` ``[B, T]`` (int64),
    right-padded to the longest row."""
    from fastpref.data.packing import collate_padded

    if not seqs:
        raise ValueError("pad_sequences: empty batch")
    batch = collate_padded(_examples(seqs, ignore_index), pad_id, ignore_index=ignore_index)
    batch.unit_size = unit_size
    return batch.to(device) if device is not None else batch


def collate_preference(examples: list[dict], pad_id: int, device=None, pack: bool = False) -> Batch:
    """Pairs -> a padded batch of ``2P`` rows (chosen first, then rejected), or with ``pack`` one packed row
    (pairs interleaved); with ``uid`` ``[P]`` when the examples carry one."""
    if pack:
        seqs = [s for e in examples for s in ((e["prompt_ids"], e["chosen_ids"]), (e["prompt_ids"], e["rejected_ids"]))]
        batch = pack_sequences(seqs, unit_size=2, device=device)
    else:
        seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + \
               [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
        batch = pad_sequences(seqs, pad_id, device=device, unit_size=2)
    batch.uid = _uids(examples, device)
    return batch


def collate_single(examples: list[dict], pad_id: int, key: str = "completion_ids", device=None,
                   pack: bool = False) -> Batch:
    """One sequence per example (SFT, KTO): ``prompt_ids + examples[key]``, padded or packed (scored: the response,
    or the example's ``loss_mask``); with ``labels`` [B] bool and ``uid`` [B] when the examples carry them."""
    seqs = [(e["prompt_ids"], e.get(key) or e["chosen_ids"], e.get("loss_mask")) for e in examples]
    batch = pack_sequences(seqs, device=device) if pack else pad_sequences(seqs, pad_id, device=device)
    if all("label" in e for e in examples):
        batch.labels = torch.tensor([bool(e["label"]) for e in examples], device=device)
    batch.uid = _uids(examples, device)
    return batch


def _uids(examples: list[dict], device) -> torch.Tensor | None:
    if all("uid" in e for e in examples):
        return torch.tensor([e["uid"] for e in examples], dtype=torch.long, device=device)
    return None
