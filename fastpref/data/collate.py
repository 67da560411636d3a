"""Padded collation of tokenised examples into ``input_ids``/``attention_mask``/shifted ``targets``.

Layout (the project's padded convention, TRL's order): for preference batches the first ``P`` rows are the
chosen and the last ``P`` the rejected responses of the same prompts. ``targets[b, t]`` is the token predicted at
position ``t`` (``input_ids[b, t+1]``) where that token belongs to the response, else ``ignore_index``; so prompt
tokens, padding and the last position are never scored. Rows are right-padded.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def pad_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int, *, device=None,
                  ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """``seqs`` = ``[(prompt_ids, response_ids), ...]`` -> ``input_ids``, ``attention_mask`` ``[B, T]`` and
    shifted ``targets`` ``[B, T]`` (int64), right-padded to the longest row."""
    if not seqs:
        raise ValueError("pad_sequences: empty batch")
    T = max(len(p) + len(r) for p, r in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), ignore_index, dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r, dtype=torch.long)
        mask[b, :n] = 1
        if r:
            targets[b, len(p) - 1:n - 1] = torch.tensor(r, dtype=torch.long)
    return {k: v.to(device) if device is not None else v
            for k, v in {"input_ids": ids, "attention_mask": mask, "targets": targets}.items()}


def collate_preference(examples: list[dict], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Pairs -> a padded batch of ``2P`` rows (chosen first, then rejected) plus ``uid`` ``[P]`` when the
    examples carry one."""
    seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + \
           [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    batch = pad_sequences(seqs, pad_id, device=device)
    _uids(batch, examples, device)
    return batch


def collate_single(examples: list[dict], pad_id: int, key: str = "completion_ids", device=None) -> dict:
    """One sequence per example (SFT, KTO): ``prompt_ids + examples[key]``; ``labels`` [B] bool when present."""
    batch = pad_sequences([(e["prompt_ids"], e.get(key) or e["chosen_ids"]) for e in examples], pad_id,
                          device=device)
    if all("label" in e for e in examples):
        batch["labels"] = torch.tensor([bool(e["label"]) for e in examples], device=device)
    _uids(batch, examples, device)
    return batch


def _uids(batch: dict, examples: list[dict], device) -> None:
    if all("uid" in e for e in examples):
        batch["uid"] = torch.tensor([e["uid"] for e in examples], dtype=torch.long, device=device)
