"""Scale-out backends of ``fastpref train``: one process, torchrun DDP, FSDP2 and DeepSpeed ZeRO.

The trainer drives one :class:`Parallel` object (from :func:`make_parallel`) through a step::

    par.begin_micro(last)            # before each micro-batch's forward
    par.backward(loss / n_micro)
    grad_norm = par.step()           # reduce gradients, clip, optimizer and schedule step

and through ``save_checkpoint`` / ``load_checkpoint`` / ``final_state`` for files. The backends:

* :class:`Parallel` (one process, or torchrun DDP): gradients averaged over ranks with one flattened all-reduce,
  then ``clip_grad_norm_`` and AdamW; rank 0 writes the ``model`` / ``optimizer`` / ``scheduler`` (and fp16
  ``scaler``) states (safetensors + JSON, ``fastpref.train.checkpoint``).
* :class:`FSDPParallel` (``train.fsdp``): ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every decoder layer
  and on the root model. The root group holds the embedding, the final norm and the LM head (tied or not). The
  fused losses read ``get_output_embeddings().weight`` outside any module forward, and the trainer runs the
  decoder (``model.get_decoder()``), not the root module, so the root group is unsharded explicitly
  (``FSDPModule.unshard()``, from a forward pre-hook on the decoder and before each micro-batch); FSDP's
  post-backward callback reduce-scatters its gradients and reshards it, as for the layers. Checkpoints and
  ``final/`` hold the full (gathered) state, written by rank 0, so an FSDP run's ``final/`` is an ordinary Hugging
  Face checkpoint.
* :class:`DeepSpeedParallel` (``train.deepspeed``): ``deepspeed.initialize`` wraps the trainer's AdamW and
  schedule in the ZeRO optimizer; micro-batches go through ``engine.backward`` with the accumulation boundary
  set by hand (the number of micro-batches is the algorithm's), one ``engine.step()`` per optimizer step
  (reduction, clipping, AdamW, schedule). ZeRO-3: the LM head weight is all-gathered after the decoder's forward
  and stays gathered through the loss's backward, until ZeRO-3 releases it (after the tied embedding's backward,
  at the latest when its optimizer step partitions every parameter). Checkpoints: every rank writes its ZeRO
  partition (the ZeRO optimizer's ``state_dict()``) in fastpref's own format (``deepspeed/zero-rank-R``; the
  output directory must be shared), rank 0 the module (ZeRO-1/2), schedule and engine counters; resume loads them
  back through the ZeRO optimizer's ``load_state_dict``, as ``engine.load_checkpoint`` would, without DeepSpeed's
  pickled checkpoint files. ``final/`` from the consolidated 16-bit state (ZeRO-3) or rank 0's model (ZeRO-1/2).

An algorithm's extra trainable modules (PPO's separate critic, APO's reward model) stay outside the backend under
all four: full replicas on every rank, each with an :class:`ExtraOptimizer` that averages its gradients with a plain
all-reduce (no FSDP sharding, not in the DeepSpeed engine or its ZeRO partitions), clips, follows the run's schedule
and is checkpointed by the trainer (rank 0 writes it: the replicas are identical).

The trainer calls the decoder and the head directly (never ``engine.forward``), so the DeepSpeed backend does the
bookkeeping ``engine.forward`` does for ZeRO (``clear_backward_seen_flag`` before a forward, the backward
prologue before ``engine.backward``); without it ZeRO-3 loses all but the last micro-batch's gradients. Tested
with deepspeed 0.19.8.
"""

from __future__ import annotations

import atexit
import difflib
import json
import os
from collections.abc import Callable

import torch

from fastpref.train.config import Config, ConfigError
from fastpref.train.modeling import base_model, load_trainable_state, trainable_state
from fastpref.train.reference import REFERENCE_MODES

_LAUNCH_ENV = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")  # torch's env:// rendezvous

# DeepSpeed config keys fastpref fills from its own config ("auto") or checks against it.
_DS_AUTO = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "gradient_clipping", "bf16.enabled", "fp16.enabled")
# Top-level DeepSpeed sections read by literal name (the rest are constants in ``deepspeed.runtime.constants``);
# used only to catch misspellings.
_DS_SECTIONS = ("zero_optimization", "bf16", "fp16", "amp", "pipeline", "hybrid_engine", "weight_quantization",
                "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
                "aio", "compression_training", "autotuning", "elasticity", "checkpoint", "data_efficiency",
                "curriculum_learning", "nebula", "comms_logger", "compile", "sparse_attention", "zenflow",
                "sequence_parallel_size", "timers", "eigenvalue", "progressive_layer_drop", "quantize_training")


# ------------------------------------------------------------------------------------------- configuration

def parallel_kind(cfg: Config) -> str:
    """``single``, ``ddp``, ``fsdp`` or ``deepspeed`` for ``cfg`` and the launch environment; raises
    :class:`ConfigError` (naming the key) for impossible combinations."""
    t = cfg.train  # (train.fsdp's value itself is checked with the other choices by ``validate_config``)
    missing = ", ".join(v for v in _LAUNCH_ENV if v not in os.environ)  # what torchrun / deepspeed set
    if t.deepspeed is not None:
        if t.fsdp != "off":
            raise ConfigError(f"train.fsdp={t.fsdp} and train.deepspeed={t.deepspeed!r} are exclusive: DeepSpeed "
                              "ZeRO does the sharding itself (set train.fsdp=off or train.deepspeed=null)")
        try:
            import deepspeed
            from deepspeed.runtime.engine import DeepSpeedEngine
        except ImportError:
            raise ConfigError(f"train.deepspeed={t.deepspeed!r}: the deepspeed package is not installed "
                              "(pip install 'fastpref[deepspeed]')") from None
        if not hasattr(DeepSpeedEngine, "_backward_prologue"):  # see DeepSpeedParallel.backward
            raise ConfigError(f"train.deepspeed={t.deepspeed!r}: deepspeed {deepspeed.__version__} lacks the engine "
                              "internals the trainer uses; tested with deepspeed 0.19.8")
        if missing:
            raise ConfigError(f"train.deepspeed={t.deepspeed!r}: needs a launcher (deepspeed --num_gpus=N -m "
                              "fastpref.cli train ... or torchrun --nproc_per_node=N -m fastpref.cli train ...); "
                              f"not set: {missing}")
        if cfg.model.lora.enabled:
            raise ConfigError("train.deepspeed with model.lora.enabled=true is not supported (LoRA adapters are "
                              "small: use torchrun data parallelism, train.deepspeed=null)")
        return "deepspeed"
    if t.fsdp != "off":
        if missing:
            raise ConfigError(f"train.fsdp={t.fsdp}: needs torchrun (torchrun --nproc_per_node=N -m fastpref.cli "
                              f"train ...); not set: {missing}")
        if cfg.model.lora.enabled:
            raise ConfigError(f"train.fsdp={t.fsdp} with model.lora.enabled=true is not supported (LoRA adapters "
                              "are small: use torchrun data parallelism with train.fsdp=off)")
        if cfg.model.gradient_checkpointing:
            raise ConfigError(f"train.fsdp={t.fsdp} with model.gradient_checkpointing=true is not supported yet "
                              "(set one of them off)")
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed config of ``train.deepspeed`` with its ``"auto"`` entries filled; raises
    :class:`ConfigError` naming the key for a missing file, bad JSON, a value that contradicts fastpref's config,
    a section fastpref owns (``optimizer``, ``scheduler``), a ZeRO stage other than 1-3, an ``"auto"`` it cannot
    fill, or a misspelt top-level key."""
    t, path = cfg.train, cfg.train.deepspeed
    key = f"train.deepspeed={path!r}"
    try:
        with open(path) as fh:
            ds = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{key}: expected a JSON object")
    for owned, ours in (("optimizer", "optim.lr, optim.betas, optim.eps, optim.weight_decay"),
                        ("scheduler", "optim.warmup_steps, optim.schedule, optim.min_lr_ratio")):
        if owned in ds:
            raise ConfigError(f"{key}: remove {owned!r}: fastpref builds AdamW and the learning-rate schedule "
                              f"from {ours} and hands them to DeepSpeed")
    _check_top_level_keys(ds, key)
    zero = ds.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (1, 2, 3):
        raise ConfigError(f"{key}: zero_optimization.stage={stage!r}: expected 1, 2 or 3 (without ZeRO, use "
                          "torchrun data parallelism: train.deepspeed=null)")
    clip = 0.0 if cfg.optim.max_grad_norm is None else float(cfg.optim.max_grad_norm)  # DeepSpeed: 0 = off
    checked = {
        "train_micro_batch_size_per_gpu": (t.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "train_batch_size": (t.batch_size * t.grad_accum * world, "train.batch_size * train.grad_accum * world size"),
        "gradient_clipping": (clip, "optim.max_grad_norm"),
    }
    for name, (value, source) in checked.items():
        have = ds.get(name, "auto")
        if have == "auto":
            ds[name] = value
        elif not _same(have, value):
            raise ConfigError(f"{key}: {name}={have!r} contradicts {source} (= {value!r}); set it to \"auto\"")
    # precision: "auto" follows model.dtype; an explicit value is DeepSpeed's mixed precision (fp32 master weights),
    # whatever dtype the model was loaded in
    for section, on in (("bf16", cfg.model.dtype == "bfloat16"), ("fp16", cfg.model.dtype == "float16")):
        if isinstance(ds.get(section), dict) and ds[section].get("enabled") == "auto":
            ds[section]["enabled"] = on
    for dotted in _autos(ds):
        raise ConfigError(f"{key}: {dotted}=\"auto\": fastpref fills \"auto\" only in {', '.join(_DS_AUTO)}; "
                          "give a value")
    return ds


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _autos(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _autos(v, f"{prefix}{k}.")
    elif node == "auto":
        yield prefix[:-1]


def _check_top_level_keys(ds: dict, key: str) -> None:
    from deepspeed.runtime import constants

    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | set(_DS_SECTIONS)
    for k in ds:
        if k in known:
            continue
        close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"{key}: unknown key {k!r}; did you mean {close[0]!r}?")


# ------------------------------------------------------------------------------------------- process group

def init_process_group(kind: str, device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; initialises the default process group for a launched run (NCCL on CUDA, gloo on
    CPU). FSDP and DeepSpeed need one even with a single process."""
    if kind == "single":
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Destroyed while the interpreter is still alive: left to finalization, gloo's worker threads can abort the
        # process ("terminate called without an active exception", pytorch/pytorch#190489). Scripts may still use
        # the group after the run; atexit comes after them.
        atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """In-place mean over ranks of ``tensors`` (one flattened all-reduce)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, f in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


def average_grads(params: list[torch.nn.Parameter]) -> None:
    """Mean over ranks of the gradients of ``params`` (a missing gradient counts as zero), with one flattened
    all-reduce; nothing to do without an initialised process group of several ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    all_reduce_mean(grads)
    for p, g in zip(params, grads):
        p.grad = g


class ExtraOptimizer(torch.optim.AdamW):
    """The AdamW of an algorithm's extra trainable module (PPO's separate critic, APO's reward model), built by
    :meth:`fastpref.train.algorithms.base.Runtime.build_optimizer` and stepped by the algorithm with :meth:`update`.

    The module is a full replica on every rank under every backend: it is never sharded by FSDP nor handed to the
    DeepSpeed engine, so :meth:`update` averages its gradients over ranks with one flattened all-reduce
    (:func:`average_grads`; a missing gradient counts as zero, so every rank must call it the same number of
    times), clips them to ``optim.max_grad_norm``, sets the learning rate ``lr * lr_lambda(done)`` of the run's
    schedule (:func:`fastpref.train.schedule.lr_lambda`) at the policy's position ``done`` (optimizer steps the
    trainer has taken), steps AdamW (``optim`` betas, eps, weight decay) and zeroes the gradients. The fp16
    gradient scaler does not cover it. The trainer checkpoints :meth:`checkpoint_state` (the module's weights and
    this optimizer's state) with the run and restores it on resume."""

    def __init__(self, name: str, module: torch.nn.Module, lr: float, cfg: Config, total_steps: int,
                 position: Callable[[], int]):
        from fastpref.train.schedule import lr_lambda

        o = cfg.optim
        self.name, self.module, self.base_lr, self.position = name, module, lr, position
        self.params = [p for p in module.parameters() if p.requires_grad]
        super().__init__(self.params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.max_grad_norm = o.max_grad_norm
        self.schedule = lr_lambda(cfg, total_steps)

    def update(self) -> dict[str, torch.Tensor | float]:
        """One step on the accumulated gradients; returns ``{name/grad_norm (before clipping, a 0-dim tensor: no
        host sync), name/lr}``."""
        average_grads(self.params)
        metrics: dict[str, torch.Tensor | float] = {}
        if self.max_grad_norm is not None:
            metrics[f"{self.name}/grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        lr = self.base_lr * self.schedule(self.position())
        for group in self.param_groups:
            group["lr"] = lr
        metrics[f"{self.name}/lr"] = lr
        self.step()
        self.zero_grad(set_to_none=True)
        return metrics

    def checkpoint_state(self) -> dict:
        """``{"model": the module's state_dict, "optimizer": AdamW's}``: what a checkpoint holds of it."""
        return {"model": self.module.state_dict(), "optimizer": self.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        self.module.load_state_dict(state["model"])
        self.load_state_dict(state["optimizer"])


# ------------------------------------------------------------------------------------------- backends

class Parallel:
    """One process, or torchrun data parallelism (full replicas, one all-reduce of the gradients per step)."""

    checkpoint_format = "plain"

    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int):
        from fastpref.train.precision import grad_scaler

        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.scaler = grad_scaler(cfg, device)
        """``torch.amp.GradScaler`` of ``train.precision=fp16-mixed`` (None otherwise): ``backward`` scales the loss,
        ``step`` unscales, clips and skips steps with inf/nan gradients. Its ``state_dict()`` (scale, growth
        tracker) is part of the resumable state: checkpoints save it and resume restores it
        (:meth:`_save_schedule` / :meth:`_load_schedule`)."""
        self._scale = self.scaler.get_scale() if self.scaler is not None else None  # no sync before the first step

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Prepare ``model`` (on ``device``) before the optimizer is built."""
        self.model = model
        return model

    def attach(self, opt: torch.optim.Optimizer, sched) -> None:
        """Take the optimizer and schedule built over the trainable parameters of the wrapped model."""
        self.opt, self.sched = opt, sched
        self.params = [p for group in opt.param_groups for p in group["params"]]

    def begin_micro(self, last: bool) -> None:
        """Called before each micro-batch's forward; ``last``: the step's last micro-batch."""

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> float | None:
        """Average the gradients over ranks, clip (``optim.max_grad_norm``), optimizer and schedule step, zero the
        gradients; returns the gradient norm before clipping (None without clipping). With the fp16 gradient
        scaler: unscale before clipping; a step with inf/nan gradients updates nothing (optimizer and schedule,
        as Accelerate) and halves the scale (one host sync per step to read it: :attr:`loss_scale`)."""
        self._average_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        gnorm = self._clip()
        if self.scaler is None:
            self.opt.step()
            self.sched.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()
            before, self._scale = self._scale, self.scaler.get_scale()
            if self._scale >= before:  # the scale only drops when the step was skipped for inf/nan gradients
                self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return gnorm

    @property
    def loss_scale(self) -> float | None:
        """The fp16 gradient scaler's current scale (None without one)."""
        return self._scale

    def _average_grads(self) -> None:
        average_grads(self.params)

    def _clip(self) -> float | None:
        clip = self.cfg.optim.max_grad_norm
        return None if clip is None else float(torch.nn.utils.clip_grad_norm_(self.params, clip))

    # ---- files
    def save_checkpoint(self, tmp: str) -> None:
        """Write the model, optimizer and schedule state (and the fp16 gradient scaler's) into the checkpoint
        directory ``tmp`` (called on every rank; ``tmp`` exists), as ``fastpref.train.checkpoint`` states."""
        from fastpref.train.checkpoint import save_state

        if self.rank == 0:
            save_state(tmp, "model", trainable_state(self.model))
            save_state(tmp, "optimizer", self.opt.state_dict())
        self._save_schedule(tmp)

    def load_checkpoint(self, path: str) -> None:
        """Inverse of :meth:`save_checkpoint` (every rank reads the files)."""
        from fastpref.train.checkpoint import load_state

        load_trainable_state(self.model, load_state(path, "model", self.device))
        self.opt.load_state_dict(load_state(path, "optimizer", self.device))
        self._load_schedule(path)

    def _save_schedule(self, tmp: str) -> None:
        """Rank 0: the schedule's state and, with ``train.precision=fp16-mixed``, the gradient scaler's (scale,
        growth tracker)."""
        from fastpref.train.checkpoint import save_state

        if self.rank == 0:
            save_state(tmp, "scheduler", self.sched.state_dict())
            if self.scaler is not None:
                save_state(tmp, "scaler", self.scaler.state_dict())

    def _load_schedule(self, path: str) -> None:
        from fastpref.train.checkpoint import CheckpointError, load_state

        self.sched.load_state_dict(load_state(path, "scheduler"))
        if self.scaler is not None:
            if not os.path.exists(os.path.join(path, "scaler.json")):
                raise CheckpointError(f"{path}: no scaler state (the fp16 gradient scaler of train.precision="
                                      "fp16-mixed)")
            self.scaler.load_state_dict(load_state(path, "scaler"))
            self._scale = self.scaler.get_scale()

    def final_state(self) -> dict[str, torch.Tensor] | None:
        """The full weights for ``final/`` (called on every rank); None: the model's own state is complete."""
        return None

    def check_reference(self, mode: str) -> None:
        """Raise :class:`ConfigError` if the resolved ``reference.mode`` cannot work with this backend."""

    def frozen_copy(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        """A frozen, unsharded copy of the policy for ``reference.mode=copy``; None: ``ReferenceMode.take()`` can
        deep-copy the policy itself."""
        return None


class FSDPParallel(Parallel):
    """FSDP2 (``fully_shard``) per decoder layer plus the root; see the module docstring."""

    checkpoint_format = "fsdp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        inner = base_model(model)
        layers = getattr(inner.get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError(f"train.fsdp={self.cfg.train.fsdp}: the model's decoder "
                              f"({type(inner.get_decoder()).__name__}) has no .layers to shard")
        reshard = self.cfg.train.fsdp == "full_shard"
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(inner, reshard_after_forward=False)
        # FSDP2 makes the first module whose forward runs the root: run the root once (one token, no grad) so
        # that it is the whole model, not the first decoder layer (the trainer never calls the root's forward).
        with torch.no_grad():
            inner(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        self.root = inner
        self._reshard_all()  # so that ``model.parameters()`` (for the optimizer) are the sharded DTensors
        inner.get_decoder().register_forward_pre_hook(lambda module, args: self.root.unshard())
        self.model = model
        return model

    def _reshard_all(self) -> None:
        """Register the sharded parameters in every group. A group stays unsharded after a no-grad forward (the
        root always, the layers with ``shard_grad_op``); the state-dict helpers map the optimizer's (sharded)
        parameters through ``model.named_parameters()``, so they run on resharded modules only."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def attach(self, opt: torch.optim.Optimizer, sched) -> None:
        from torch.distributed.tensor import DTensor

        super().attach(opt, sched)
        if not all(isinstance(p, DTensor) for p in self.params):  # built while a group was unsharded
            raise RuntimeError("FSDP: the optimizer holds unsharded parameters")

    def begin_micro(self, last: bool) -> None:
        self.root.unshard()  # for losses that read the head weight before running the decoder

    def _average_grads(self) -> None:
        """Nothing to do: FSDP reduce-scatters the gradients in the backward."""

    def _clip(self) -> float | None:
        """``clip_grad_norm_`` over sharded gradients: the squared norms of the local shards, summed over ranks."""
        clip = self.cfg.optim.max_grad_norm
        if clip is None:
            return None
        import torch.distributed as dist

        grads = [p.grad.to_local() for p in self.params if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            sq += g.float().pow(2).sum()
        dist.all_reduce(sq)
        norm = sq.sqrt()
        coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return float(norm)

    @staticmethod
    def _options(rank0_only: bool = True):
        """Gathered (full) state dicts: on rank 0 only, on the CPU; or on every rank, on the device."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)

    def _full_model_state(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self._reshard_all()
        return get_model_state_dict(self.model, options=self._options(rank0_only))

    def save_checkpoint(self, tmp: str) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from fastpref.train.checkpoint import save_state

        model_sd = self._full_model_state()
        opt_sd = get_optimizer_state_dict(self.model, self.opt, options=self._options())
        if self.rank == 0:
            save_state(tmp, "model", model_sd)
            save_state(tmp, "optimizer", opt_sd)
        self._save_schedule(tmp)

    def load_checkpoint(self, path: str) -> None:
        from torch.distributed.checkpoint import state_dict as dsd

        from fastpref.train.checkpoint import load_state

        opts = dsd.StateDictOptions(full_state_dict=True)  # every rank reads the full files and keeps its shard
        self._reshard_all()
        dsd.set_model_state_dict(self.model, load_state(path, "model"), options=opts)
        dsd.set_optimizer_state_dict(self.model, self.opt, load_state(path, "optimizer"), options=opts)
        self._load_schedule(path)

    def final_state(self) -> dict[str, torch.Tensor]:
        state = self._full_model_state()
        # one name per tied parameter (the gathered copies no longer share storage, which is how
        # ``save_pretrained`` recognises tied weights)
        seen: set[int] = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                state.pop(name, None)
            seen.add(id(p))
        return state

    def frozen_copy(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        state = self._full_model_state(rank0_only=False)
        with torch.random.fork_rng(devices=[]):  # building re-seeds the tiny model's init: keep the run's RNG
            ref = build()
        ref.load_state_dict(state)
        ref.to(self.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref


class DeepSpeedParallel(Parallel):
    """DeepSpeed ZeRO 1-3 around the trainer's AdamW and schedule; see the module docstring."""

    checkpoint_format = "deepspeed"

    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int):
        super().__init__(cfg, device, rank, world)
        self.ds_config = deepspeed_config(cfg, world)
        self.stage = self.ds_config["zero_optimization"]["stage"]

    def check_reference(self, mode: str) -> None:
        if self.stage == 3 and REFERENCE_MODES[mode].needs_copy:
            how = "" if self.cfg.reference.mode == "copy" else f" ({self.cfg.reference.mode} resolves to copy here)"
            raise ConfigError(f"reference.mode={self.cfg.reference.mode}{how}: a copied reference is not supported "
                              "with ZeRO-3 (train.deepspeed, partitioned parameters); use reference.mode=precompute")

    def attach(self, opt: torch.optim.Optimizer, sched) -> None:
        import deepspeed

        super().attach(opt, sched)
        self.ds_config.setdefault("zero_allow_untested_optimizer", True)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=opt, lr_scheduler=sched,
                                                    config=self.ds_config)
        if self.stage == 3:
            self._gather_head_after_decoder()

    def _gather_head_after_decoder(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        inner = base_model(self.model)
        if inner.get_output_embeddings() is None:  # a reward model: its score head runs in a module forward
            return
        head = inner.get_output_embeddings().weight

        def gather(module, args, output):
            if getattr(head, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE:
                head.all_gather([head])

        inner.get_decoder().register_forward_hook(gather)

    def begin_micro(self, last: bool) -> None:
        # what engine.forward does before a forward; the accumulation boundary is the step's last micro-batch
        self.engine.optimizer.clear_backward_seen_flag()
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine._backward_prologue()  # registered on the outputs by engine.forward, which is not used here
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float | None:
        self.engine.step()
        if self.cfg.optim.max_grad_norm is None:
            return None
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save_checkpoint(self, tmp: str) -> None:
        """Every rank: its ZeRO partition (``deepspeed/zero-rank-R``: the ZeRO optimizer's ``state_dict()``, its
        loss scaler as plain attributes, without the name -> fragment map only universal checkpoints use); rank 0:
        the module (ZeRO-1/2; under ZeRO-3 the fp32 partitions hold the weights), the schedule and the engine's
        step counters. What ``engine.save_checkpoint`` keeps, in fastpref's format."""
        from fastpref.train.checkpoint import save_state

        sd = dict(self.engine.optimizer.state_dict())
        sd["loss_scaler"] = {k: v for k, v in vars(sd["loss_scaler"]).items()
                             if v is None or isinstance(v, (bool, int, float))}
        sd["zero_stage"] = int(sd["zero_stage"])
        sd.pop("param_slice_mappings", None)
        save_state(os.path.join(tmp, "deepspeed"), f"zero-rank-{self.rank}", sd)
        if self.rank == 0:
            if self.stage < 3:
                save_state(tmp, "model", trainable_state(self.model))
            e = self.engine
            save_state(tmp, "engine", {"stage": self.stage, "world": self.world, "global_steps": e.global_steps,
                                       "global_samples": e.global_samples, "skipped_steps": e.skipped_steps})
        self._save_schedule(tmp)

    def load_checkpoint(self, path: str) -> None:
        """Inverse of :meth:`save_checkpoint`, in the order of ``engine.load_checkpoint``: module, schedule,
        counters, then every rank's ZeRO partition list through the ZeRO optimizer's ``load_state_dict``
        (``load_from_fp32_weights`` as the engine's config says), between ZeRO-3's checkpoint prologue and
        epilogue."""
        import copy

        from deepspeed.runtime.zero.config import ZeroStageEnum

        from fastpref.train.checkpoint import CheckpointError, load_state

        e, opt = self.engine, self.engine.optimizer
        counters = load_state(path, "engine")
        if (counters.get("stage"), counters.get("world")) != (self.stage, self.world):
            raise CheckpointError(f"{path}/engine.json: written by ZeRO-{counters.get('stage')} on "
                                  f"{counters.get('world')} processes; this run is ZeRO-{self.stage} on {self.world}")
        if e._optimizer_has_ckpt_event_prologue():
            opt.checkpoint_event_prologue()
        if self.stage < 3:
            load_trainable_state(self.model, load_state(path, "model", self.device))
        self._load_schedule(path)
        e.global_steps, e.global_samples = counters["global_steps"], counters["global_samples"]
        e.skipped_steps = counters["skipped_steps"]
        parts = []
        for r in range(self.world):  # every rank's partition, as engine.load_checkpoint reads them
            sd = load_state(os.path.join(path, "deepspeed"), f"zero-rank-{r}", self.device)
            scaler = copy.copy(opt.loss_scaler)
            for k, v in sd["loss_scaler"].items():
                if hasattr(scaler, k):
                    setattr(scaler, k, v)
            sd["loss_scaler"], sd["zero_stage"] = scaler, ZeroStageEnum(sd["zero_stage"])
            parts.append(sd)
        opt.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=e.zero_load_from_fp32_weights())
        if e._optimizer_has_ckpt_event_epilogue():
            opt.checkpoint_event_epilogue()

    def final_state(self) -> dict[str, torch.Tensor] | None:
        if self.stage != 3:
            return None
        return self.engine._zero3_consolidated_16bit_state_dict()


def make_parallel(cfg: Config, kind: str, device: torch.device, rank: int, world: int) -> Parallel:
    """The backend for ``kind`` (from :func:`parallel_kind`)."""
    if kind == "fsdp":
        return FSDPParallel(cfg, device, rank, world)
    if kind == "deepspeed":
        return DeepSpeedParallel(cfg, device, rank, world)
    return Parallel(cfg, device, rank, world)
