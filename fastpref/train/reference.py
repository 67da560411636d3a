"""Reference log-probs for the DPO family and KTO: a frozen copy, the LoRA base, a precomputed cache, or none.

All modes return per-sequence summed log-probs of the scored tokens, computed from the last hidden states with
``fastpref.ops.linear_logprobs`` under ``torch.no_grad()``; the reference never gets gradients.

* ``copy``: ``copy.deepcopy`` of the policy at the moment the reference is taken (after the SFT warm-up),
  ``requires_grad=False``, eval mode. Saved in checkpoints when it differs from the initial model.
* ``lora_base``: the policy itself inside ``model.disable_adapter()``: no second copy.
* ``precompute``: one pass over every train and held-out example when the reference is taken; the result
  (``[examples, sequences per example]`` fp32) is cached in ``reference.cache_dir`` as a safetensors file (never a
  pickle) under a key (:func:`cache_key`) that hashes the config keys that change it, the tokenised data, the data
  files' content and the reference weights themselves (sha256 of every parameter and buffer,
  :func:`weights_sha256`), so a model whose weights were replaced does not reuse a stale cache. Later runs load
  it; a checkpoint holds the cache itself, so a resume does not recompute it from a policy that has moved on.
* ``none``: reference-free losses (ORPO, SimPO, CPO); asking it for log-probs is an error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable

import torch

from fastpref.train.modeling import sequence_logps


class Reference:
    """Reference log-probs in one of the modes above; ``sequence_logps(batch)`` -> ``[rows]`` fp32."""

    def __init__(self, mode: str, policy: torch.nn.Module):
        self.mode = mode
        self.policy = policy
        self.model: torch.nn.Module | None = None
        self.cache: torch.Tensor | None = None

    def take(self) -> None:
        """Freeze the reference from the current policy (``copy``); other modes need nothing here."""
        if self.mode == "copy":
            self.model = copy.deepcopy(self.policy).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    def refresh(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights into a ``copy`` reference (iterative / on-line methods)."""
        if self.mode != "copy" or self.model is None:
            raise ValueError(f"Reference.refresh: only a taken 'copy' reference can be refreshed (mode={self.mode})")
        self.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def compute(self, batch: dict) -> torch.Tensor:
        """Log-probs of ``batch`` from the reference model itself (no cache)."""
        if self.mode == "copy":
            if self.model is None:
                raise RuntimeError("Reference: the copy has not been taken yet")
            return sequence_logps(self.model, batch)[0]
        if self.mode in ("lora_base", "precompute"):
            was_training = self.policy.training
            self.policy.eval()
            try:
                if self.mode == "lora_base":
                    with self.policy.disable_adapter():
                        return sequence_logps(self.policy, batch)[0]
                return sequence_logps(self.policy, batch)[0]
            finally:
                self.policy.train(was_training)
        raise ValueError("reference.mode=none: this algorithm needs reference log-probs; set reference.mode to copy, "
                         "lora_base or precompute")

    def sequence_logps(self, batch: dict) -> torch.Tensor:
        """Reference log-probs of every row of ``batch`` (``[rows]`` fp32, no grad). With ``precompute`` the rows
        are looked up by ``batch["uid"]`` in the batch's layout: padded rows ``[0, P)`` are sequence slot 0 of the
        examples and ``[P, 2P)`` slot 1; packed sequences are interleaved (slot 0, slot 1 of example 0, ...)."""
        if self.mode != "precompute":
            return self.compute(batch)
        if self.cache is None:
            raise RuntimeError("Reference: precompute cache not built")
        uid = batch["uid"].to(self.cache.device)
        rows = self.cache[uid]                                   # [P, slots]
        out = rows.reshape(-1) if "cu_seqlens" in batch else rows.t().reshape(-1)
        return out.to(batch["input_ids"].device)

    def precompute(self, examples: list[dict], collate: Callable[[list[dict]], dict], batch_size: int,
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
            rows.append(lp.view(len(chunk), -1) if "cu_seqlens" in batch else lp.view(-1, len(chunk)).t())
        self.cache = torch.cat(rows)
        from safetensors.torch import save_file

        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        save_file({"logps": self.cache.contiguous()}, tmp, metadata={"key": key})
        os.replace(tmp, path)
        log(f"reference log-probs: computed {self.cache.shape[0]} examples, cached in {path}")

    def state_dict(self) -> dict:
        """What a checkpoint keeps: a taken copy's weights, or the precomputed log-probs."""
        if self.mode == "copy" and self.model is not None:
            return {"model": self.model.state_dict()}
        if self.mode == "precompute" and self.cache is not None:
            return {"cache": self.cache}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if self.mode == "copy" and "model" in state:
            if self.model is None:
                self.take()
            self.model.load_state_dict(state["model"])
        elif self.mode == "precompute":
            if not isinstance(state.get("cache"), torch.Tensor):
                raise ValueError("resume: the checkpoint holds no precomputed reference log-probs")
            self.cache = state["cache"].float().cpu()


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
