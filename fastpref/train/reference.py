"""Reference log-probs for the DPO family and KTO: a frozen copy, the LoRA base, a precomputed cache, or none.

One small class per ``reference.mode``, all with the interface of :class:`ReferenceMode`, built by
:func:`make_reference` from the resolved mode (the trainer resolves ``auto``). All modes return per-sequence summed
log-probs of the scored tokens, computed from the last hidden states with ``fastpref.ops.linear_logprobs`` under
``torch.no_grad()``; the reference never gets gradients.

* ``copy`` (:class:`CopyReference`): ``copy.deepcopy`` of the policy at the moment the reference is taken (after
  the SFT warm-up), ``requires_grad=False``, eval mode. Saved in checkpoints when it differs from the initial model.
* ``lora_base`` (:class:`LoraBaseReference`): the policy itself inside ``model.disable_adapter()``: no second copy.
* ``precompute`` (:class:`PrecomputeReference`): one pass over every train and held-out example when the reference
  is taken; the result (``[examples, sequences per example]`` fp32) is cached in ``reference.cache_dir`` as a
  safetensors file (never a pickle) under a key (:func:`cache_key`) that hashes the config keys that change it, the
  tokenised data, the data files' content and the reference weights themselves (sha256 of every parameter and
  buffer, :func:`weights_sha256`), so a model whose weights were replaced does not reuse a stale cache. Later runs
  load it; a checkpoint holds the cache itself, so a resume does not recompute it from a policy that has moved on.
* ``none`` (:class:`NoReference`): reference-free losses (ORPO, SimPO, CPO); asking it for log-probs is an error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch

from fastpref.data.batch import Batch
from fastpref.train.modeling import sequence_logps


class ReferenceMode:
    """The interface of every reference mode; ``sequence_logps(batch)`` -> ``[rows]`` fp32 (no grad), for a
    :class:`fastpref.data.batch.Batch` in either layout.

    The trainer calls :meth:`take` when the reference is taken (after the SFT warm-up; with a frozen copy built by
    the parallel backend when :attr:`needs_copy`, or :meth:`PrecomputeReference.precompute` when
    :attr:`precomputed`), saves :meth:`state_dict` in every checkpoint under the ``reference`` key of
    ``algorithm`` and restores it with :meth:`load_state_dict`. On-line algorithms take per-token log-probs from
    :meth:`network` (when :attr:`live`) and iterative ones :meth:`refresh` a copy to the current policy.
    """

    mode: ClassVar[str] = ""
    """The ``reference.mode`` this class implements (named in messages)."""
    needs_copy: ClassVar[bool] = False
    """Taking the reference makes a frozen copy of the policy (the trainer asks the parallel backend for it)."""
    precomputed: ClassVar[bool] = False
    """Taking the reference fills a log-prob cache in one pass over the data (the trainer runs it)."""

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy
        self.model: torch.nn.Module | None = None
        """The frozen copy (``copy`` only; None otherwise and before it is taken)."""
        self.cache: torch.Tensor | None = None
        """The precomputed ``[examples, slots]`` fp32 log-probs (``precompute`` only)."""

    @property
    def live(self) -> bool:
        """Whether :meth:`network` gives a frozen reference network now (a taken copy, the LoRA base)."""
        return False

    def take(self, model: torch.nn.Module | None = None) -> None:
        """Freeze the reference from the current policy; only ``copy`` keeps something (``model``: a frozen copy
        already made, e.g. gathered from FSDP shards)."""

    def refresh(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights into a ``copy`` reference (iterative / on-line methods)."""
        raise ValueError(f"Reference.refresh: only a taken 'copy' reference can be refreshed (mode={self.mode})")

    @contextmanager
    def network(self) -> Iterator[torch.nn.Module]:
        """The network whose forward gives the reference log-probs, in eval mode for the ``with`` block."""
        raise ValueError("reference.mode=none: this algorithm needs reference log-probs; set reference.mode to copy, "
                         "lora_base or precompute")
        yield  # pragma: no cover  (a generator, for @contextmanager)

    @torch.no_grad()
    def compute(self, batch: Batch) -> torch.Tensor:
        """Log-probs of ``batch`` from the reference network itself (no cache), through the trainer's one log-prob
        path (``fastpref.train.modeling.sequence_logps``)."""
        with self.network() as net:
            return sequence_logps(net, batch)

    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs of every row of ``batch`` (``[rows]`` fp32, no grad)."""
        return self.compute(batch)

    def state_dict(self) -> dict:
        """What a checkpoint keeps (``{}``: nothing; a copy's ``model`` weights; a precomputed ``cache``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


@contextmanager
def _eval(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode for the block, its train/eval mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class NoReference(ReferenceMode):
    """``reference.mode=none``: reference-free losses; :meth:`network` (and so every log-prob) is an error."""

    mode = "none"


class CopyReference(ReferenceMode):
    """``reference.mode=copy``: a frozen deep copy of the policy, saved in checkpoints, refreshable."""

    mode = "copy"
    needs_copy = True

    @property
    def live(self) -> bool:
        return self.model is not None

    def take(self, model: torch.nn.Module | None = None) -> None:
        if model is None:
            model = copy.deepcopy(self.policy).eval()
            for p in model.parameters():
                p.requires_grad_(False)
        self.model = model

    def refresh(self, model: torch.nn.Module) -> None:
        if self.model is None:
            super().refresh(model)
        self.model.load_state_dict(model.state_dict())

    @contextmanager
    def network(self) -> Iterator[torch.nn.Module]:
        if self.model is None:
            raise RuntimeError("Reference: the copy has not been taken yet")
        yield self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()} if self.model is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "model" in state:
            if self.model is None:
                self.take()
            self.model.load_state_dict(state["model"])


class LoraBaseReference(ReferenceMode):
    """``reference.mode=lora_base``: the policy with its LoRA adapters disabled (no second copy)."""

    mode = "lora_base"

    @property
    def live(self) -> bool:
        return True

    @contextmanager
    def network(self) -> Iterator[torch.nn.Module]:
        with _eval(self.policy), self.policy.disable_adapter():
            yield self.policy


class PrecomputeReference(ReferenceMode):
    """``reference.mode=precompute``: log-probs of every example from one no-grad pass of the policy when the
    reference is taken, cached on disk and in checkpoints; looked up by ``batch.uid``."""

    mode = "precompute"
    precomputed = True

    @contextmanager
    def network(self) -> Iterator[torch.nn.Module]:
        with _eval(self.policy):  # the policy as it is when the reference is taken: only precompute() uses it
            yield self.policy

    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        """The cached rows of ``batch.uid`` in the batch's layout: padded rows ``[0, P)`` are sequence slot 0 of
        the examples and ``[P, 2P)`` slot 1; packed sequences are interleaved (slot 0, slot 1 of example 0, ...)."""
        if self.cache is None:
            raise RuntimeError("Reference: precompute cache not built")
        if batch.uid is None:
            raise ValueError("reference.mode=precompute: the batch has no uid (the examples carry none)")
        held = getattr(self, "_on_device", None)  # (cache, its copy on the batch's device): looked up there, no sync
        if held is None or held[0] is not self.cache or held[1].device != batch.device:
            held = self._on_device = (self.cache, self.cache.to(batch.device))
        rows = held[1][batch.uid]                                # [P, slots]
        return rows.reshape(-1) if batch.packed else rows.t().reshape(-1)

    def precompute(self, examples: list[dict], collate: Callable[[list[dict]], Batch], batch_size: int,
                   cache_dir: str, key: str, log: Callable[[str], None] = print) -> None:
        """Fill the cache for ``examples`` (each with ``uid`` = its index) from
        ``cache_dir/ref_logps-KEY.safetensors`` or by one no-grad pass of the current policy. A cache file that
        does not parse, or holds another key or shape, is recomputed (with a warning naming it)."""
        path = os.path.join(cache_dir, f"ref_logps-{key}.safetensors")
        if os.path.exists(path):
            self.cache = _read_cache(path, key, len(examples), log)
            if self.cache is not None:
                log(f"reference log-probs: loaded {self.cache.shape[0]} examples from {path}")
                return
        rows = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = collate(chunk)
            lp = self.compute(batch).float().cpu()
            rows.append(lp.view(len(chunk), -1) if batch.packed else lp.view(-1, len(chunk)).t())
        self.cache = torch.cat(rows)
        from safetensors.torch import save_file

        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        save_file({"logps": self.cache.contiguous()}, tmp, metadata={"key": key})
        os.replace(tmp, path)
        log(f"reference log-probs: computed {self.cache.shape[0]} examples, cached in {path}")

    def state_dict(self) -> dict:
        return {"cache": self.cache} if self.cache is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state.get("cache"), torch.Tensor):
            raise ValueError("resume: the checkpoint holds no precomputed reference log-probs")
        self.cache = state["cache"].float().cpu()


REFERENCE_MODES: dict[str, type[ReferenceMode]] = {c.mode: c for c in (CopyReference, LoraBaseReference,
                                                                       PrecomputeReference, NoReference)}
"""``{reference.mode: class}`` of the resolved modes (``auto`` is resolved by the trainer first)."""


def make_reference(mode: str, policy: torch.nn.Module) -> ReferenceMode:
    """The reference of the resolved ``mode`` (``copy``, ``lora_base``, ``precompute`` or ``none``) for ``policy``."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference.mode={mode!r}: expected one of {', '.join(REFERENCE_MODES)} (auto is resolved "
                         "by the trainer)")
    return REFERENCE_MODES[mode](policy)


def _read_cache(path: str, key: str, n: int, log: Callable[[str], None]) -> torch.Tensor | None:
    """The ``[n, slots]`` fp32 log-probs of cache file ``path``, or None (after a warning) when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta, t = fh.metadata() or {}, fh.get_tensor("logps")
    except Exception as e:  # a damaged or foreign file: safetensors parses, it never runs code
        log(f"warning: reference cache {path} is not a valid safetensors file ({str(e)[:100]}); recomputing")
        return None
    if meta.get("key") != key or t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != n:
        log(f"warning: reference cache {path} holds other log-probs (key {meta.get('key')!r}, {tuple(t.shape)} "
            f"{t.dtype}; expected {n} rows); recomputing")
        return None
    return t


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of ``model``'s parameters and buffers (names, dtypes, shapes, bytes), in name order. Sharded
    parameters hash this rank's part (FSDP2 ``DTensor``: the local shard; DeepSpeed ZeRO-3: ``ds_tensor``), which
    is what a per-rank cache needs."""
    h = hashlib.sha256()
    items = dict(model.named_buffers())
    items.update(model.named_parameters())
    for name in sorted(items):
        t = items[name]
        t = getattr(t, "ds_tensor", None) if getattr(t, "ds_tensor", None) is not None else t
        if hasattr(t, "to_local"):
            t = t.to_local()
        t = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(items[name].shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(cfg_parts: dict, examples: list[dict], *, weights: str, data: str) -> str:
    """Hash of the config parts that change reference log-probs, the tokenised examples, the data content
    (``data``: :func:`fastpref.train.checkpoint.data_fingerprint`) and the reference weights (``weights``:
    :func:`weights_sha256`)."""
    h = hashlib.sha256(json.dumps(cfg_parts, sort_keys=True, default=str).encode())
    h.update(f"weights={weights};data={data};".encode())
    for e in examples:
        for k in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids"):
            if k in e:
                h.update(k.encode())
                h.update(bytes(str(e[k]), "ascii"))
    return h.hexdigest()[:16]
