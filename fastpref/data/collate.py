"""Padded collation of tokenised examples into ``input_ids``/``attention_mask``/shifted ``targets``.

Two layouts, told apart by the batch's keys:

* padded (the default): for preference batches the first ``P`` rows are the chosen and the last ``P`` the
  rejected responses of the same prompts (TRL's order);
* packed (``pack=True``; ``fastpref.data.packing``): one row ``input_ids [1, N]`` of concatenated sequences with
  ``position_ids`` restarting per sequence, ``targets [N]`` and ``cu_seqlens`` (CPU); pairs interleaved
  (sequence ``2i`` chosen, ``2i+1`` rejected), one bin per micro-batch so the example order is kept.
 ``targets[b, t]`` is the token predicted at
position ``t`` (``input_ids[b, t+1]``) where that token belongs to the response, else ``ignore_index``; so prompt
tokens, padding and the last position are never scored. Rows are right-padded. An SFT example may carry
``loss_mask`` (0/1 over prompt + response, ``fastpref.data.dataset``: every assistant turn of a conversation);
then exactly its 1-tokens are scored.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` uses the packed layout (it has ``cu_seqlens``)."""
    return "cu_seqlens" in batch


def split_pairs(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``values`` ``[2P]`` -> ``(chosen [P], rejected [P])`` in either layout."""
    if is_packed(batch):
        return values[0::2], values[1::2]
    p = values.shape[0] // 2
    return values[:p], values[p:]


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


def pack_sequences(seqs: list[tuple], *, unit_size: int = 1, device=None) -> dict:
    """``seqs`` (in order; pairs as chosen, rejected, chosen, ...) -> one packed row (see the module docstring);
    each item ``(prompt_ids, response_ids)`` or ``(prompt_ids, response_ids, loss_mask)``."""
    from fastpref.data.packing import pack_examples

    ex = [{"input_ids": s[0] + s[1], "labels": _labels(s)} for s in seqs]
    (pb,) = pack_examples(ex, sum(len(e["input_ids"]) for e in ex), unit_size=unit_size)
    out = {"input_ids": pb.input_ids, "position_ids": pb.position_ids, "targets": pb.targets}
    out = {k: v.to(device) if device is not None else v for k, v in out.items()}
    out["cu_seqlens"] = pb.cu_seqlens          # stays on the CPU: chunk planning without a device sync
    out["max_seqlen"] = pb.max_seqlen
    return out


def pad_sequences(seqs: list[tuple], pad_id: int, *, device=None,
                  ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """``seqs`` = ``[(prompt_ids, response_ids[, loss_mask]), ...]`` -> ``input_ids``, ``attention_mask``
    ``[B, T]`` and shifted ``targets`` ``[B, T]`` (int64), right-padded to the longest row."""
    if not seqs:
        raise ValueError("pad_sequences: empty batch")
    T = max(len(s[0]) + len(s[1]) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), ignore_index, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s[0]) + len(s[1])
        ids[b, :n] = torch.tensor(s[0] + s[1], dtype=torch.long)
        mask[b, :n] = 1
        if n > 1:
            targets[b, :n - 1] = torch.tensor(_labels(s, ignore_index)[1:], dtype=torch.long)
    return {k: v.to(device) if device is not None else v
            for k, v in {"input_ids": ids, "attention_mask": mask, "targets": targets}.items()}


def collate_preference(examples: list[dict], pad_id: int, device=None, pack: bool = False) -> dict:
    """Pairs -> a padded batch of ``2P`` rows (chosen first, then rejected), or with ``pack`` one packed row
    (pairs interleaved); plus ``uid`` ``[P]`` when the examples carry one."""
    if pack:
        seqs = [s for e in examples for s in ((e["prompt_ids"], e["chosen_ids"]), (e["prompt_ids"], e["rejected_ids"]))]
        batch = pack_sequences(seqs, unit_size=2, device=device)
    else:
        seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + \
               [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
        batch = pad_sequences(seqs, pad_id, device=device)
    _uids(batch, examples, device)
    return batch


def collate_single(examples: list[dict], pad_id: int, key: str = "completion_ids", device=None,
                   pack: bool = False) -> dict:
    """One sequence per example (SFT, KTO): ``prompt_ids + examples[key]``, padded or packed (scored: the response,
    or the example's ``loss_mask``); ``labels`` [B] bool when present."""
    seqs = [(e["prompt_ids"], e.get(key) or e["chosen_ids"], e.get("loss_mask")) for e in examples]
    batch = pack_sequences(seqs, device=device) if pack else pad_sequences(seqs, pad_id, device=device)
    if all("label" in e for e in examples):
        batch["labels"] = torch.tensor([bool(e["label"]) for e in examples], device=device)
    _uids(batch, examples, device)
    return batch


def _uids(batch: dict, examples: list[dict], device) -> None:
    if all("uid" in e for e in examples):
        batch["uid"] = torch.tensor([e["uid"] for e in examples], dtype=torch.long, device=device)
