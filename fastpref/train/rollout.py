"""Rollouts for on-line methods: generate with the KV cache, then pack prompt + completion for training.

Stages (``generate`` is timed in ``Rollout.timings``, the algorithms time the others):

1. ``generate``: HF ``model.generate`` (KV cache, sampling with temperature / top-p / top-k, ``max_new_tokens``,
   ``num_generations`` samples per prompt, stop at EOS). Prompts are left-padded for the batched generate; the
   completions are cut after their first EOS (the EOS is kept: the policy learns to stop). A completion that
   hits ``max_new_tokens`` without EOS is marked ``truncated``. The optional vLLM backend (``backend="vllm"``)
   is imported lazily and only used when installed.
2. ``pack``: the ``G`` completions of a prompt become consecutive sequences ``prompt + completion`` of one
   packed :class:`fastpref.data.batch.Batch`, built by the collator's packer (``targets`` shifted, ``-100`` on
   prompt tokens and on the last token; ``cu_seqlens`` on the device with its host copy).
3. ``forward``: ``fastpref.train.modeling.decoder_hidden`` runs the decoder trunk only (never the
   ``[tokens, vocab]`` logits) and returns the packed ``hidden [N, H]``; the losses then use the fused LM-head
   kernels. With the model loaded for packing (``data.pack=true``: ``attn_implementation="fastpref"``, varlen
   attention) the trunk runs on the packed tokens; otherwise on the right-padded ``[S, L]`` batch, gathered back
   into the packed layout (same result, padding FLOPs spent).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fastpref.data.batch import Batch
from fastpref.data.collate import pack_sequences


@dataclass
class GenerationConfig:
    """Sampling settings for rollouts."""

    num_generations: int = 4
    """Completions per prompt (GRPO's G, online DPO's K)."""
    max_new_tokens: int = 16
    """Longest completion, in tokens; a completion without EOS by then is ``truncated``."""
    temperature: float = 1.0
    """Sampling temperature (> 0). The training log-probs use the same temperature, as TRL."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Top-k sampling (0: off; the checkpoint's own generation config is never used, so no hidden top-k)."""
    backend: str = "hf"
    """``hf`` (``model.generate``) or ``vllm`` (only when installed)."""

    def validate(self) -> None:
        if not (isinstance(self.num_generations, int) and self.num_generations >= 1):
            raise ValueError(f"generation.num_generations must be an int >= 1, got {self.num_generations!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"generation.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"generation.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0, got {self.top_k}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"generation.backend must be 'hf' or 'vllm', got {self.backend!r}")


@dataclass
class Rollout:
    """``num_generations`` completions per prompt; completion ``i`` belongs to prompt ``i // group_size``."""

    prompts: list[str]
    """One prompt text per completion (repeated ``group_size`` times)."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """Completion tokens, cut after the first EOS (kept)."""
    completions: list[str]
    """Decoded completions, special tokens skipped."""
    truncated: list[bool]
    """True where no EOS was generated within ``max_new_tokens``."""
    group_size: int
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of ``generate`` (a selection or concatenation starts empty)."""

    def __len__(self) -> int:
        return len(self.completion_ids)

    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completion_ids], dtype=torch.int64)

    def select(self, idx: list[int]) -> "Rollout":
        """The completions at ``idx`` (in that order); ``group_size`` is kept, so select whole groups."""
        return Rollout([self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx],
                       [self.completion_ids[i] for i in idx], [self.completions[i] for i in idx],
                       [self.truncated[i] for i in idx], self.group_size)

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        if not parts:
            raise ValueError("Rollout.concat: needs at least one rollout")
        out = Rollout([], [], [], [], [], parts[0].group_size)
        for p in parts:
            out.prompts += p.prompts
            out.prompt_ids += p.prompt_ids
            out.completion_ids += p.completion_ids
            out.completions += p.completions
            out.truncated += p.truncated
        return out


@contextmanager
def timed(timings: dict, key: str):
    """Add the wall time of the block to ``timings[key]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def _special_ids(tokenizer) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("rollout: the tokenizer has no eos_token_id; completions could never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special prefix (e.g. BOS), for a Hugging Face tokenizer or the
    built-in character tokenizer (both have ``encode(text, add_special_tokens=...)``)."""
    return list(tokenizer.encode(text, add_special_tokens=True))


def decode(tokenizer, ids: list[int]) -> str:
    """Text of ``ids`` without EOS / padding."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return tokenizer.decode([i for i in ids if i not in drop])


def _cut_at_eos(row: list[int], eos: int) -> tuple[list[int], bool]:
    if eos in row:
        return row[:row.index(eos) + 1], False
    return row, True


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], cfg: GenerationConfig, *,
             prompts: list[str] | None = None, num_generations: int | None = None) -> Rollout:
    """Sample ``num_generations`` (default ``cfg.num_generations``) completions for each tokenized prompt.

    ``prompts`` (the texts, for reward functions) default to the decoded ``prompt_ids``. See the module docstring.
    """
    cfg.validate()
    if not prompt_ids or any(not p for p in prompt_ids):
        raise ValueError("rollout: prompt_ids must be a non-empty list of non-empty token lists")
    timings: dict[str, float] = {}
    eos, pad = _special_ids(tokenizer)
    G = num_generations or cfg.num_generations
    if prompts is None:
        prompts = [decode(tokenizer, p) for p in prompt_ids]
    with timed(timings, "generate"):
        if cfg.backend == "vllm":
            rows = _generate_vllm(model, prompt_ids, cfg, G)
        else:
            rows = _generate_hf(model, prompt_ids, cfg, G, eos, pad)
    completion_ids, truncated = [], []
    for r in rows:
        c, t = _cut_at_eos(r, eos)
        completion_ids.append(c)
        truncated.append(t)
    texts = [decode(tokenizer, c) for c in completion_ids]
    rep_prompts = [p for p in prompts for _ in range(G)]
    rep_ids = [list(ids) for ids in prompt_ids for _ in range(G)]
    return Rollout(rep_prompts, rep_ids, completion_ids, texts, truncated, G, timings)


def _generate_hf(model, p_ids: list[list[int]], cfg: GenerationConfig, G: int, eos: int, pad: int) -> list[list[int]]:
    from transformers import GenerationConfig as HFGenerationConfig

    dev = next(model.parameters()).device
    width = max(len(x) for x in p_ids)
    inp = torch.tensor([[pad] * (width - len(x)) + x for x in p_ids], device=dev)
    att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in p_ids], device=dev)
    was_training = model.training
    model.eval()
    try:
        # a fresh generation config: nothing inherited from the checkpoint's (its top_k=50, repetition penalty,
        # ...) may change the sampling distribution that the training log-probs assume
        gc = HFGenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_new_tokens=cfg.max_new_tokens, num_return_sequences=G, eos_token_id=eos,
                                pad_token_id=pad, use_cache=True)
        out = model.generate(input_ids=inp, attention_mask=att, generation_config=gc)
    finally:
        model.train(was_training)
    return out[:, width:].tolist()


def _generate_vllm(model, p_ids, cfg, G):  # pragma: no cover - needs vLLM and a GPU
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError("generation.backend='vllm' needs the vllm package installed") from None
    llm = getattr(model, "_fastpref_vllm", None)
    if llm is None:
        raise ValueError("generation.backend='vllm': attach a vllm.LLM with synced weights as "
                         "model._fastpref_vllm (weight sync is the caller's job)")
    params = vllm.SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k or -1, max_tokens=cfg.max_new_tokens)
    outs = llm.generate([{"prompt_token_ids": x} for x in p_ids], params, use_tqdm=False)
    return [list(c.token_ids) for o in outs for c in o.outputs]


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], device=None) -> Batch:
    """Pack ``prompt_i + completion_i`` sequences into one packed :class:`fastpref.data.batch.Batch` (the
    collator's packer, ``fastpref.data.collate.pack_sequences``; in order, so groups stay consecutive). Only
    completion tokens are targets; ``scored_lengths`` are the completion lengths."""
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError(f"pack: need as many prompts as completions (> 0), got {len(prompt_ids)} and "
                         f"{len(completion_ids)}")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(f"pack: prompt {i} is empty")
    return pack_sequences([(list(p), list(c)) for p, c in zip(prompt_ids, completion_ids)], device=device)


def pack_rollout(rollout: Rollout, device=None) -> Batch:
    """``pack`` of a rollout's prompt + completion sequences (groups stay consecutive)."""
    return pack(rollout.prompt_ids, rollout.completion_ids, device)
