"""The one batch type of fastpref: what the collators and the rollout packer build and every algorithm, the model
forward and the fused kernels read.

Two layouts of the same meaning (``S`` sequences; ``targets[t]`` is the token predicted at position ``t``, i.e.
``input_ids[t + 1]`` where it is scored, else ``-100``, so prompt tokens, padding and each sequence's last
position are never scored):

* **padded** (``packed`` is False): ``input_ids``/``attention_mask``/``position_ids``/``targets`` ``[S, T]``,
  right-padded; pairs in TRL's order (rows ``0..P-1`` chosen, ``P..2P-1`` rejected).
* **packed** (``packed`` is True): one row ``input_ids``/``position_ids`` ``[1, N]`` of the sequences concatenated
  (positions restarting at 0 per sequence), ``targets [N]``, ``cu_seqlens`` int32 ``[S + 1]`` token boundaries on
  the batch's device AND ``cu_seqlens_host``, the same boundaries as a tuple of Python ints built on the host with
  the batch (never read back from the device: chunk planning, the varlen twin and ``max_seqlen`` need no sync);
  pairs interleaved (sequence ``2i`` chosen, ``2i + 1`` rejected), groups consecutive; ``unit_bounds`` the token
  boundaries of the units that must stay whole in a chunk (``fastpref.ops.plan_chunks``).

Per-row payloads that come with the data are typed fields: KTO's ``labels`` and its mismatched-pair batch
``kl`` (another :class:`Batch`), the examples' ``uid`` (the precomputed-reference cache key), the reward
model's pair ``margin``. Payloads computed by
an algorithm (advantages, old log-probs, ...) live in that algorithm's own micro-batch dataclass, which holds the
:class:`Batch`. Built by ``fastpref.data.packing`` (``pack_examples``, ``collate_padded``) through
``fastpref.data.collate``; the trainer reads only :attr:`Batch.num_seqs`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch of tokenised sequences, padded or packed (module docstring)."""

    input_ids: torch.Tensor
    """``[S, T]`` padded, ``[1, N]`` packed; int64."""
    targets: torch.Tensor
    """Shifted targets, ``[S, T]`` padded, ``[N]`` packed; int64, ``-100`` where nothing is scored."""
    position_ids: torch.Tensor
    """``[S, T]`` padded (0.. per row), ``[1, N]`` packed (restarting per sequence); int64."""
    seq_index: torch.Tensor
    """``[S]`` int64: which input example (of the list given to the packer) each row / packed sequence is."""
    scored_lengths: torch.Tensor
    """``[S]`` int64: scored tokens per sequence (a completion's length for rollouts)."""
    scored_lengths_host: tuple[int, ...] | None = None
    """The same counts as Python ints, counted on the host by the collator (in row / sequence order): what the
    fused losses' ``skip_unscored`` plans with, so it needs no read-back."""
    attention_mask: torch.Tensor | None = None
    """``[S, T]`` 1 on real tokens, 0 on padding (padded only)."""
    cu_seqlens: torch.Tensor | None = None
    """``[S + 1]`` int32 sequence boundaries on the batch's device (packed only)."""
    cu_seqlens_host: tuple[int, ...] | None = None
    """The same boundaries as Python ints, built on the host (packed only)."""
    max_seqlen: int = 0
    """Longest sequence, in tokens (a Python int)."""
    unit_bounds: tuple[int, ...] | None = None
    """Token boundaries ``(0, ..., N)`` of the units (packed only): a pair, a group, or one sequence."""
    unit_size: int = 1
    """Sequences per unit: 1 (SFT, KTO, rollouts), 2 (a preference pair)."""
    labels: torch.Tensor | None = None
    """``[S]`` bool: KTO's desirable (True) / undesirable label of each example."""
    uid: torch.Tensor | None = None
    """``[examples]`` int64: the examples' ``uid`` (index into the precomputed reference cache)."""
    kl: Batch | None = None
    """KTO: the mismatched pairs (prompt ``i`` with completion ``i + 1``) for the reference point ``z0``."""
    margin: torch.Tensor | None = None
    """``[P]`` fp32: the pairs' reward margins (TRL's ``RewardTrainer`` column; the ``rm`` loss reads it)."""

    @property
    def packed(self) -> bool:
        """Whether the batch is in the packed layout (it has ``cu_seqlens``)."""
        return self.cu_seqlens is not None

    @property
    def num_seqs(self) -> int:
        """Number of sequences ``S`` (rows when padded); no device access."""
        return len(self.cu_seqlens_host) - 1 if self.packed else self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Token positions in the batch: ``N`` packed, ``S * T`` padded (padding included)."""
        return self.input_ids.numel()

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def scored_mask(self) -> torch.Tensor:
        """Float 1.0 where a target is scored (``targets != -100``), the shape of ``targets``."""
        return (self.targets != IGNORE_INDEX).float()

    def split_pairs(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence ``values [2P]`` of a pair batch -> ``(chosen [P], rejected [P])`` in either layout."""
        if self.packed:
            return values[0::2], values[1::2]
        p = values.shape[0] // 2
        return values[:p], values[p:]

    def loss_layout(self) -> dict:
        """The layout keyword arguments of the fused losses (``fastpref.losses.fused_preference``) for this batch:
        the packed boundaries (device tensor and host copy) and the host scored-token counts; nothing is read back
        from the device."""
        kw: dict = {"scored_lengths_host": self.scored_lengths_host}
        if self.packed:
            kw.update(cu_seqlens=self.cu_seqlens, cu_seqlens_host=self.cu_seqlens_host)
        return kw

    def token_seq_ids(self) -> torch.Tensor:
        """``[N]`` int64 sequence index of each packed token, on the device (no host sync: the output size is
        known)."""
        if not self.packed:
            raise ValueError("Batch.token_seq_ids: only for a packed batch")
        lens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=lens.device), lens,
                                       output_size=self.targets.numel())

    def to(self, device, non_blocking: bool = False) -> Batch:
        """A copy with every tensor (and the ``kl`` batch) on ``device``; the host fields are shared."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, Batch):
                v = v.to(device, non_blocking=non_blocking)
            out[f.name] = v
        return replace(self, **out)
