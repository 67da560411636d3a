"""Checkpoints, resume and the output directory of ``fastpref train``: the on-disk format and the rules around it.

**Format.** A checkpoint ``checkpoints/step-N/`` holds safetensors and JSON files only, so nothing in it can
carry code (no pickle, no ``torch.load``):

* ``model``, ``optimizer``, ``scheduler``, ``scaler`` (the fp16 ``GradScaler``, when there is one), ``rng``
  (python ``random``, numpy, torch CPU and CUDA generators), ``algorithm`` (the algorithm's state and the
  reference: a copied model's weights, a precomputed cache): each a *state*, i.e. nested dicts (str or int keys),
  lists, tuples, tensors, numpy arrays and python scalars, written by :func:`save_state` as
  ``NAME.safetensors`` (every tensor, and numpy arrays as raw bytes) plus ``NAME.json`` (the rest, each tensor as
  a reference to its safetensors key). A few dataclasses of fastpref's own (``_OBJECT_TYPES``) are stored by their
  fields; any other object is refused when saving. DeepSpeed: ``deepspeed/zero-rank-R.*`` hold each rank's ZeRO
  partition (the state dict of DeepSpeed's ZeRO optimizer, with its loss scaler as plain values), written and read
  through the same two functions, never through DeepSpeed's own (pickling) checkpoint files.
* ``trainer_state.json``: the step, the data position, whether the reference was taken, the run's identity
  (checkpoint format of the backend, world size, data fingerprint) and its config (flattened ``key: value``).
* ``manifest.json``, written last: every other file of the directory with its size and sha256 (and a checksum of
  that list).

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed into place (``os.replace``), so a kill
leaves either the old or the new directory.

**Resume** (``resume=auto``) takes the newest checkpoint that verifies (:func:`verify_checkpoint`: manifest present
and valid, every file listed with the right size and sha256, no unlisted file, only ``.json`` / ``.safetensors``
files, JSON that parses, safetensors headers that parse, a ``trainer_state.json`` with an ``identity``). A damaged
one is skipped with a one-line warning naming the file; if none verifies the run stops with a one-line error.
``metrics.jsonl`` is cut back to the checkpoint's step (a partial last line is dropped with a warning).

**What may change on resume.** The new config is compared with the checkpoint's, key by key, and the data
fingerprint (sha256 of the training and held-out files' content; of the tokenised rows for the synthetic task)
with the checkpoint's. Every key is immutable unless :data:`MUTABLE` lists it: a change of an immutable key is
refused with one line listing ``key: old -> new``; a change of a mutable key is logged and takes effect (a new
``optim.lr`` or schedule setting updates the optimizer's learning rates and the schedule's base rates, see
:func:`retarget_lr`).

**Output directory.** fastpref deletes only what it wrote. ``output_dir/.fastpref-run.json`` (:class:`RunDir`)
records the run id, the top-level outputs fastpref created and the files it wrote in ``final/`` and ``plots/``. A
fresh start (``resume=none``, or ``auto`` without a checkpoint) refuses a directory without that marker that holds
anything; in a marked directory it clears fastpref's outputs (``checkpoints/``, ``tensorboard/``, ``final/``,
``plots/``, ``metrics.jsonl``, ``config.yaml``; the reference cache stays, it is keyed by content) and refuses,
before deleting anything, when one of those directories holds a file fastpref did not write.

**Trust.** Checkpoints and reference caches are untrusted input: they are parsed (JSON, safetensors), never
unpickled, and a checkpoint is used only after its manifest verifies (which catches damage, not a forger who
rewrites the manifest too; such a file still cannot run code: it can only fail to parse or hold other numbers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import torch

from fastpref.train.config import Config, ConfigError, config_to_dict

FORMAT = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MARKER = ".fastpref-run.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(ConfigError):
    """A checkpoint, reference cache or output directory fastpref refuses to use; the message names the file."""


# ------------------------------------------------------------------------------------------- state encoding

_TAG = "$"
_OBJECT_TYPES = {
    # the only classes a state may hold besides builtins, tensors and numpy arrays: dataclasses, stored by field
    "fastpref.train.rollout.Rollout",
    "fastpref.train.online.common.Pair",
}


def _type_name(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def flatten(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, skeleton)`` of a nested state: ``skeleton`` is JSON-serialisable and names each tensor by its
    key in ``tensors`` (the tensor's path, e.g. ``state.0.exp_avg``). :func:`unflatten` inverts it exactly: dict
    key types and order, tuple vs list, int vs float vs bool, non-finite floats, tensor dtypes and values.

    Encoded as JSON as they are: None, bool, int, finite float, str, lists, and dicts whose keys are all str (none
    equal to ``"$"``). Everything else is a tagged object ``{"$": kind, ...}``: ``tensor``, ``ndarray`` (raw bytes
    in the safetensors file), ``npscalar``, ``float`` (nan / inf), ``tuple``, ``set``, ``dict`` (other keys),
    ``dtype``, ``size`` (``torch.Size``), ``object`` (a dataclass in ``_OBJECT_TYPES``). Raises ``TypeError``
    naming the path for anything else."""
    import numpy as np

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def add(t: torch.Tensor, path: str) -> str:
        t = t.detach()
        if t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"checkpoint: cannot store {path or 'the state'}: a {type(t).__name__} with layout "
                            f"{t.layout} (gather it into a plain dense tensor first)")
        if t.device.type != "cpu":
            t = t.cpu()
        elif t.numel() and (t.untyped_storage().data_ptr() in storages or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared storage
        if t.numel():
            storages.add(t.untyped_storage().data_ptr())
        key = path or "tensor"
        if key in tensors:
            key = f"{key}#{len(tensors)}"
        tensors[key] = t.contiguous()
        return key

    def enc(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int) and type(x) is int:
            return x
        if type(x) is float:
            return x if math.isfinite(x) else {_TAG: "float", "value": repr(x)}
        if isinstance(x, torch.Tensor):
            return {_TAG: "tensor", "key": add(x, path)}
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc":
                raise TypeError(f"checkpoint: cannot store {path}: numpy array of dtype {x.dtype}")
            raw = torch.frombuffer(bytearray(np.ascontiguousarray(x).tobytes()), dtype=torch.uint8)
            return {_TAG: "ndarray", "key": add(raw, path), "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, np.generic):
            if x.dtype.kind not in "biuf":
                raise TypeError(f"checkpoint: cannot store {path}: numpy scalar of dtype {x.dtype}")
            return {_TAG: "npscalar", "dtype": x.dtype.str, "value": enc(x.item(), path)}
        if isinstance(x, torch.dtype):
            return {_TAG: "dtype", "name": str(x).removeprefix("torch.")}
        if isinstance(x, torch.Size):
            return {_TAG: "size", "items": list(x)}
        if isinstance(x, dict):
            if all(type(k) is str for k in x) and _TAG not in x:
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {_TAG: "dict", "items": [[enc(k, f"{path}.<key>"), enc(v, f"{path}.{k}" if path else str(k))]
                                            for k, v in x.items()]}
        if type(x) is tuple:
            return {_TAG: "tuple", "items": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if type(x) is list:
            return [enc(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]
        if type(x) in (set, frozenset):
            return {_TAG: "set", "frozen": type(x) is frozenset, "items": [enc(v, f"{path}.<item>") for v in x]}
        name = _type_name(x)
        if name in _OBJECT_TYPES and dataclasses.is_dataclass(x):
            return {_TAG: "object", "type": name,
                    "fields": {f.name: enc(getattr(x, f.name), f"{path}.{f.name}") for f in dataclasses.fields(x)}}
        raise TypeError(f"checkpoint: cannot store {path or 'the state'}: objects of type {name} are not part of "
                        "the checkpoint format (fastpref.train.checkpoint)")

    return tensors, enc(obj, "")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """Inverse of :func:`flatten`; raises :class:`CheckpointError` naming ``where`` for anything malformed."""
    import numpy as np

    def bad(msg: str):
        return CheckpointError(f"{where}: {msg}")

    def tensor(key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise bad(f"refers to a tensor {key!r} that its safetensors file does not hold")
        return tensors[key]

    def dec(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            raise bad(f"unexpected JSON value of type {type(x).__name__}")
        if _TAG not in x:
            return {k: dec(v) for k, v in x.items()}
        kind = x[_TAG]
        try:
            if kind == "tensor":
                return tensor(x["key"])
            if kind == "tuple":
                return tuple(dec(v) for v in x["items"])
            if kind == "dict":
                return {_hashable(dec(k)): dec(v) for k, v in x["items"]}
            if kind == "float":
                if x["value"] not in ("nan", "inf", "-inf"):
                    raise bad(f"bad float {x['value']!r}")
                return float(x["value"])
            if kind == "set":
                items = [_hashable(dec(v)) for v in x["items"]]
                return frozenset(items) if x.get("frozen") else set(items)
            if kind == "ndarray":
                dt = np.dtype(str(x["dtype"]))
                if dt.kind not in "biufc":
                    raise bad(f"numpy dtype {dt} is not allowed")
                raw = tensor(x["key"])
                return np.frombuffer(raw.cpu().numpy().tobytes(), dtype=dt).reshape([int(n) for n in x["shape"]]).copy()
            if kind == "npscalar":
                dt = np.dtype(str(x["dtype"]))
                if dt.kind not in "biuf":
                    raise bad(f"numpy dtype {dt} is not allowed")
                return dt.type(dec(x["value"]))
            if kind == "dtype":
                dt = getattr(torch, str(x["name"]), None)
                if not isinstance(dt, torch.dtype):
                    raise bad(f"unknown torch dtype {x['name']!r}")
                return dt
            if kind == "size":
                return torch.Size([int(n) for n in x["items"]])
            if kind == "object":
                name = x["type"]
                if name not in _OBJECT_TYPES:
                    raise bad(f"objects of type {name!r} are not part of the checkpoint format")
                mod, _, cls_name = name.rpartition(".")
                cls = getattr(importlib.import_module(mod), cls_name)
                fields = {f.name for f in dataclasses.fields(cls)}
                if set(x["fields"]) != fields:
                    raise bad(f"{name} fields {sorted(x['fields'])} != {sorted(fields)}")
                return cls(**{k: dec(v) for k, v in x["fields"].items()})
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"malformed {kind!r} entry ({type(e).__name__}: {e})") from None
        raise bad(f"unknown entry kind {kind!r}")

    return dec(skeleton)


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        return tuple(_hashable(v) for v in k)
    return k


def _read_json(path: str) -> Any:
    """Strict JSON (no NaN literals, no duplicate keys); :class:`CheckpointError` naming ``path`` otherwise."""

    def no_dups(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"), object_pairs_hook=no_dups, parse_constant=no_constants)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:120]})") from None


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, allow_nan=False)
    os.replace(tmp, path)


def save_state(directory: str, name: str, obj: Any) -> None:
    """Write ``obj`` (see :func:`flatten`) as ``directory/name.safetensors`` + ``directory/name.json``."""
    from safetensors.torch import save_file

    tensors, skeleton = flatten(obj)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, f"{name}.safetensors"), metadata={"fastpref": f"state-{FORMAT}"})
    with open(os.path.join(directory, f"{name}.json"), "w") as fh:
        json.dump({"fastpref_state": FORMAT, "state": skeleton}, fh, allow_nan=False)


def load_state(directory: str, name: str, device: torch.device | str = "cpu") -> Any:
    """Read a state written by :func:`save_state`, tensors on ``device``; :class:`CheckpointError` naming the file
    for a missing, truncated or malformed one (nothing is unpickled)."""
    from safetensors.torch import load_file

    jpath, spath = os.path.join(directory, f"{name}.json"), os.path.join(directory, f"{name}.safetensors")
    doc = _read_json(jpath)
    if not isinstance(doc, dict) or doc.get("fastpref_state") != FORMAT or "state" not in doc:
        raise CheckpointError(f"{jpath}: not a fastpref state file (format {FORMAT})")
    if not os.path.exists(spath):
        raise CheckpointError(f"{spath}: missing")
    try:
        tensors = load_file(spath, device=str(device))
    except Exception as e:  # safetensors' own errors (header too large, truncated, ...): it never runs code
        raise CheckpointError(f"{spath}: not a valid safetensors file ({str(e)[:120]})") from None
    return unflatten(doc["state"], tensors, jpath)


# ------------------------------------------------------------------------------------------- files and manifest

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Every entry below ``directory`` that is not a directory, as sorted relative paths (``/`` separated)."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/"))
    return sorted(out)


def write_manifest(directory: str) -> None:
    """``directory/manifest.json``: every other file below ``directory`` with its size and sha256 (written last)."""
    files = {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                   "sha256": sha256_file(os.path.join(directory, rel))}
             for rel in _files(directory) if rel != MANIFEST}
    with open(os.path.join(directory, MANIFEST), "w") as fh:
        json.dump({"fastpref_checkpoint": FORMAT, "files": files, "files_sha256": _files_sha256(files)}, fh, indent=1)


def _files_sha256(files: dict) -> str:
    """The manifest's own checksum (of its ``files`` entry), so that damage to the manifest names the manifest."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_manifest(directory: str) -> None:
    """Raise :class:`CheckpointError` naming the first bad file of ``directory``: manifest missing or malformed, a
    listed file missing or of another size or sha256, a file the manifest does not list, a file that is not
    ``.json`` / ``.safetensors``, JSON that does not parse, a safetensors header that does not parse."""
    from safetensors import safe_open

    mpath = os.path.join(directory, MANIFEST)
    m = _read_json(mpath)
    if not (isinstance(m, dict) and m.get("fastpref_checkpoint") == FORMAT and isinstance(m.get("files"), dict)):
        raise CheckpointError(f"{mpath}: not a fastpref checkpoint manifest (format {FORMAT})")
    listed = m["files"]
    if m.get("files_sha256") != _files_sha256(listed):
        raise CheckpointError(f"{mpath}: its own checksum differs from its content")
    present = [rel for rel in _files(directory) if rel != MANIFEST]
    for rel in present:
        if rel not in listed:
            raise CheckpointError(f"{os.path.join(directory, rel)}: not listed in {MANIFEST}")
    for rel, meta in sorted(listed.items()):
        path = os.path.join(directory, rel)
        if rel.startswith("/") or ".." in rel.split("/") or not isinstance(meta, dict):
            raise CheckpointError(f"{mpath}: bad entry {rel!r}")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        if not rel.endswith((".json", ".safetensors")):
            raise CheckpointError(f"{path}: unexpected file type (a checkpoint holds .json and .safetensors only)")
        size = os.path.getsize(path)
        if size != meta.get("size"):
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {meta.get('size')} (truncated?)")
        if sha256_file(path) != meta.get("sha256"):
            raise CheckpointError(f"{path}: sha256 differs from the manifest")
        if rel.endswith(".json"):
            _read_json(path)
        else:
            try:
                with safe_open(path, framework="pt") as fh:
                    fh.keys()
            except Exception as e:
                raise CheckpointError(f"{path}: not a valid safetensors file ({str(e)[:120]})") from None


def verify_checkpoint(path: str) -> dict:
    """The ``trainer_state.json`` of checkpoint directory ``path`` once the manifest verifies and the state holds
    a step, the reference flag, an identity and a config; :class:`CheckpointError` naming the bad file."""
    verify_manifest(path)
    spath = os.path.join(path, TRAINER_STATE)
    st = _read_json(spath)
    if not isinstance(st, dict):
        raise CheckpointError(f"{spath}: expected a JSON object")
    if not isinstance(st.get("identity"), dict):
        raise CheckpointError(f"{spath}: no 'identity' (the run this checkpoint belongs to): refused")
    for key, typ in (("step", int), ("reference_taken", bool), ("config", dict)):
        if not isinstance(st.get(key), typ):
            raise CheckpointError(f"{spath}: {key!r} missing or not a {typ.__name__}")
    return st


def checkpoint_dirs(root: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the ``step-N`` directories in ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = [(int(n[5:]), os.path.join(root, n)) for n in os.listdir(root)
           if n.startswith("step-") and n[5:].isdigit() and os.path.isdir(os.path.join(root, n))]
    return sorted(out)


@dataclasses.dataclass
class Resume:
    """A verified checkpoint to resume from and its ``trainer_state.json``."""

    path: str
    state: dict


def select_checkpoint(resume: str, root: str, say: Callable[[str], None]) -> Resume | None:
    """The checkpoint ``resume`` (``auto``: the newest intact one in ``root``, after a one-line warning for each
    damaged newer one; a path: that one, which must verify) or None (``none``; ``auto`` without a checkpoint)."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.exists(os.path.join(resume, TRAINER_STATE)):
            raise ConfigError(f"resume={resume!r}: not a checkpoint directory (no {TRAINER_STATE})")
        return Resume(resume, verify_checkpoint(resume))
    dirs = checkpoint_dirs(root)
    damaged = []
    for _, path in reversed(dirs):
        try:
            return Resume(path, verify_checkpoint(path))
        except CheckpointError as e:
            damaged.append(str(e))
            say(f"warning: checkpoint {path} is damaged ({e}); trying the one before")
    if damaged:
        raise CheckpointError(f"resume=auto: no intact checkpoint in {root} (newest: {damaged[0]}); remove the damaged "
                              "ones to start over, or start over with resume=none")
    return None


_CKPT_FILE = re.compile(r"^((manifest|trainer_state)\.json|(model|optimizer|scheduler|scaler|rng|algorithm|engine"
                        r"|deepspeed/zero-rank-\d+)\.(json|safetensors))$")
"""The files fastpref writes into a checkpoint directory (relative paths)."""


def remove_checkpoint(path: str, say: Callable[[str], None]) -> bool:
    """Delete checkpoint directory ``path``: the files fastpref writes there, then the directories left empty. A
    file fastpref did not write stays (with a warning); returns whether the directory is gone."""
    foreign = [rel for rel in _files(path) if not _CKPT_FILE.match(rel)]
    for rel in _files(path):
        if _CKPT_FILE.match(rel):
            os.remove(os.path.join(path, rel))
    for root, _, _ in os.walk(path, topdown=False):  # children before their parents
        if not os.listdir(root):
            os.rmdir(root)
    if foreign:
        say(f"warning: kept {path}: it holds {os.path.join(path, foreign[0])}, which fastpref did not write")
    return not os.path.exists(path)


# ------------------------------------------------------------------------------------------- config on resume

MUTABLE: dict[str, str] = {
    # key: why it may change between a checkpoint and its resume (every other key is immutable)
    "output_dir": "where the run writes",
    "resume": "how the checkpoint is chosen",
    "optim.lr": "the optimizer's learning rates and the schedule's base rates are set to it",
    "optim.warmup_steps": "the schedule is evaluated with the new value from the resumed step on",
    "optim.schedule": "the schedule is evaluated with the new value from the resumed step on",
    "optim.min_lr_ratio": "the schedule is evaluated with the new value from the resumed step on",
    "optim.max_grad_norm": "clipping of the steps to come",
    "train.max_steps": "length of the run (extends a finished run); the schedule's horizon follows",
    "train.epochs": "length of the run without train.max_steps",
    "train.eval_every": "evaluation cadence", "train.eval_batches": "evaluation size",
    "train.log_every": "logging cadence", "train.save_every": "checkpoint cadence",
    "train.keep_checkpoints": "how many checkpoints are kept", "train.plots": "output only",
    "train.device": "where the run computes", "train.cpu_threads": "CPU threads",
    "model.gradient_checkpointing": "memory for compute; the same gradients",
    "reference.cache_dir": "where a precomputed reference is cached (a resume reads it from the checkpoint)",
    "data.train_files": "the files may move: their content is compared (data fingerprint)",
    "data.eval_files": "the files may move: their content is compared (data fingerprint)",
    **{f"{algo}.skip_unscored": "the same results with less LM-head work" for algo in ("dpo", "kto", "orpo", "simpo",
                                                                                       "cpo")},
}
"""Config keys that may differ between a checkpoint and the run resuming it. Every other key (model, data
settings, algorithm and its section, loss, reference.mode, seed, batch sizes, warm-up, precision, the optimizer's
betas / eps / weight decay, the parallel backend, ...) is immutable: a change is refused."""

_SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.schedule", "optim.min_lr_ratio", "train.max_steps",
                  "train.epochs")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_snapshot(cfg: Config) -> dict:
    """The config a checkpoint records: flattened ``key: value`` of the built-in sections and of the sections of
    the algorithms this run uses (its own; SFT's with a warm-up)."""
    d = config_to_dict(cfg)
    keep = {"algorithm", "output_dir", "resume", "model", "reference", "data", "optim", "train", cfg.algorithm}
    if cfg.train.sft_warmup_steps:
        keep.add("sft")
    return json.loads(json.dumps(_flat({k: v for k, v in d.items() if k in keep}), default=str))


def data_fingerprint(cfg: Config, examples: list[dict]) -> str:
    """sha256 of the content of ``data.train_files`` and ``data.eval_files`` (a saved dataset directory: of every
    file in it), in order; for the synthetic task (no files) of the tokenised ``examples``."""
    h = hashlib.sha256()
    d = cfg.data
    if not d.train_files:
        h.update(b"synthetic")
        for e in examples:
            h.update(json.dumps({k: v for k, v in e.items() if k.endswith("_ids") or k == "label"},
                                sort_keys=True, default=str).encode())
    for role, files in (("train", d.train_files), ("eval", d.eval_files)):
        for f in files:
            h.update(role.encode())
            paths = [os.path.join(f, rel) for rel in _files(f)] if os.path.isdir(f) else [f]
            for p in paths:
                h.update(sha256_file(p).encode())
    return h.hexdigest()


def run_snapshot(cfg: Config, checkpoint_format: str, world: int, fingerprint: str) -> dict:
    """``{"identity", "config"}`` as a checkpoint (and a finished run) records them."""
    return {"identity": {"checkpoint_format": checkpoint_format, "world_size": world, "data_fingerprint": fingerprint},
            "config": config_snapshot(cfg)}


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v)


_ABSENT = object()


def upgrade_recorded_config(recorded: dict, cfg: Config) -> dict:
    """A config snapshot recorded before the per-algorithm sections (issue 15), in today's keys: each ``loss.X``
    becomes the key it stands for under ``cfg.algorithm`` (``loss.beta`` -> ``dpo.beta``, as
    :func:`~fastpref.train.config.legacy_loss_target` maps a YAML's ``loss.*``); ``loss.type=auto`` and a former
    default of an option the algorithm lacks are dropped. A ``loss.X`` with a value today's algorithm cannot
    express stays, and is refused."""
    from fastpref.train.config import LEGACY_LOSS_KEYS, legacy_loss_target

    legacy = {k for k in recorded if k.startswith("loss.")}
    if not legacy:
        return recorded
    out = {k: v for k, v in recorded.items() if k not in legacy}
    for key in legacy:
        name, value = key.split(".", 1)[1], recorded[key]
        if name == "type" and value == "auto":
            continue
        target = legacy_loss_target(cfg, name) if name in LEGACY_LOSS_KEYS else None
        if target is not None:
            out.setdefault(target, value)
        elif not (name in LEGACY_LOSS_KEYS and value == LEGACY_LOSS_KEYS[name]):
            out[key] = value
    return out


def compare_runs(old: dict, new: dict, where: str, defaults: dict | None = None) -> list[str]:
    """Compare a recorded ``run_snapshot`` (``old``: a checkpoint's ``trainer_state.json`` or a finished run's)
    with this run's: raise :class:`CheckpointError` listing every immutable change as ``key: old -> new``; return
    the mutable changes in the same form.

    ``defaults`` (the snapshot of a default config of the run's algorithm): a key the record lacks is no change
    when this run has it at its default -- the record was written by a fastpref without that option (new options
    default to the former behaviour), e.g. before the per-algorithm sections (its ``loss.*`` keys upgraded by
    :func:`upgrade_recorded_config`)."""
    oi, ni = old.get("identity", {}), new["identity"]
    if oi.get("checkpoint_format") != ni["checkpoint_format"]:
        raise CheckpointError(f"resume: checkpoint {where} was written with checkpoint_format="
                              f"{oi.get('checkpoint_format')!r}, this run has checkpoint_format="
                              f"{ni['checkpoint_format']!r} (use resume=none or another output_dir)")
    refused, changed = [], []
    if oi.get("world_size") != ni["world_size"]:
        refused.append(f"world size (processes): {oi.get('world_size')} -> {ni['world_size']}")
    if oi.get("data_fingerprint") != ni["data_fingerprint"]:
        refused.append(f"data content (sha256): {str(oi.get('data_fingerprint'))[:12]} -> "
                       f"{ni['data_fingerprint'][:12]}")
    oc, nc = old.get("config", {}), new["config"]
    for key in sorted(set(oc) | set(nc)):
        a, b = oc.get(key, _ABSENT), nc.get(key, _ABSENT)
        if a is _ABSENT and defaults is not None and key in defaults:
            a = defaults[key]  # an option the old record could not hold: it ran at the default
        if a is not _ABSENT and b is not _ABSENT and a == b and type(a) is type(b):
            continue
        (changed if key in MUTABLE else refused).append(f"{key}: {_show(a)} -> {_show(b)}")
    if refused:
        raise CheckpointError(f"resume: {where} was written with settings that cannot change mid-run: "
                              f"{'; '.join(refused)} (start over with resume=none, or use another output_dir)")
    return changed


def schedule_changed(changes: list[str]) -> bool:
    """Whether the mutable ``changes`` (from :func:`compare_runs`) touch the learning rate or its schedule."""
    return any(c.split(":", 1)[0] in _SCHEDULE_KEYS for c in changes)


def retarget_lr(sched: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After a resume that changed ``optim.lr`` or the schedule: base rate ``lr`` for every parameter group of
    ``sched``'s optimizer, and each group's current rate re-evaluated by the (rebuilt) schedule at its step, as if
    the run had been configured so from the start (``LambdaLR`` restores the old base rates from its state)."""
    groups = sched.optimizer.param_groups
    sched.base_lrs = [lr] * len(groups)
    for g, fn in zip(groups, sched.lr_lambdas):
        g["initial_lr"] = lr
        g["lr"] = lr * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]


# ------------------------------------------------------------------------------------------- metrics.jsonl

def truncate_metrics(path: str, step: int, say: Callable[[str], None]) -> None:
    """Keep the records of ``path`` up to ``step``; a line that is not a complete JSON record (a write cut short
    by a kill) is dropped with a one-line warning."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    keep = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            last = i == len(lines) or (i == len(lines) - 1 and not lines[-1])
            say(f"warning: {path}: dropped {'the partial last line' if last else f'line {i}'} (not a complete "
                "JSON record)")
            continue
        if rec.get("step", 0) <= step:
            keep.append(raw + b"\n")
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- output directory

_CLEARED = ("checkpoints", "tensorboard", "final", ".tmp-final", "plots", "metrics.jsonl", "config.yaml")
"""What a fresh start in a marked directory clears (when the marker says fastpref created it)."""
_RECORDED = ("final", "plots")
"""Directories whose files the marker lists one by one."""


class RunDir:
    """``output_dir`` and its marker ``.fastpref-run.json``: ``{"run_id", "created": [top-level names],
    "files": {"final": [...], "plots": [...]}, "finished": null | {"step", "identity", "config"}}``. Reading is
    done on every rank; only rank 0 writes."""

    def __init__(self, path: str):
        self.path = path
        self.marker = self._read()

    def _read(self) -> dict | None:
        p = os.path.join(self.path, MARKER)
        if not os.path.exists(p):
            return None
        m = _read_json(p)
        if not (isinstance(m, dict) and isinstance(m.get("run_id"), str) and isinstance(m.get("created"), list)
                and isinstance(m.get("files", {}), dict)):
            raise CheckpointError(f"{p}: not a fastpref run marker; remove it only if this directory is not a "
                                  "fastpref run")
        m.setdefault("files", {})
        m.setdefault("finished", None)
        return m

    @property
    def finished(self) -> dict | None:
        return self.marker.get("finished") if self.marker else None

    def _entries(self) -> list[str]:
        return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []

    def foreign(self) -> list[str]:
        """Paths (relative to ``output_dir``) of files fastpref did not write: every entry of an unmarked
        directory; in a marked one, what lies inside the outputs a fresh start would clear."""
        if self.marker is None:
            return self._entries()
        out = []
        for name in _CLEARED:
            top = os.path.join(self.path, name)
            if name not in self.marker["created"] or not os.path.exists(top):
                continue
            if not os.path.isdir(top) or os.path.islink(top):
                if name not in ("metrics.jsonl", "config.yaml") or os.path.islink(top):
                    out.append(name)
                continue
            for rel in _files(top):
                if not self._owns(name, rel):
                    out.append(f"{name}/{rel}")
        return out

    def _owns(self, name: str, rel: str) -> bool:
        if name == "checkpoints":
            first, _, rest = rel.partition("/")
            if first.startswith(".tmp-step-"):
                return True
            return bool(re.fullmatch(r"step-\d+", first)) and bool(_CKPT_FILE.match(rest))
        if name == "tensorboard":
            return "/" not in rel and rel.startswith("events.out.tfevents.")
        if name == ".tmp-final":
            return True
        return rel in self.marker["files"].get(name, [])

    def check_fresh_start(self) -> None:
        """Raise unless a fresh start may clear this directory: it is absent or empty, or marked and its outputs
        hold no file fastpref did not write."""
        foreign = self.foreign()
        if not foreign:
            return
        first = os.path.join(self.path, foreign[0])
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        if self.marker is None:
            raise CheckpointError(f"output_dir={self.path!r} holds files fastpref did not write ({first}{more}): "
                                  "choose another output_dir, or move those files away")
        raise CheckpointError(f"output_dir={self.path!r}: starting over would delete {first}{more}, which fastpref "
                              "did not write: move it away, or choose another output_dir")

    def check_target(self, resume_path: str) -> None:
        """Raise if a run resumed from ``resume_path`` may not write here. Resumed in place (the checkpoint is in
        this directory's ``checkpoints/``): nothing foreign in ``final/``, which the end of the run replaces (an
        unmarked directory is claimed: its checkpoint verified). Resumed from elsewhere: as a fresh start, except
        that nothing is cleared."""
        ckpts = os.path.abspath(os.path.join(self.path, CHECKPOINTS)) + os.sep
        if not os.path.abspath(resume_path).startswith(ckpts):
            self.check_fresh_start()
            return
        if self.marker is None:
            return
        bad = [f for f in self.foreign() if f.split("/")[0] in ("final", ".tmp-final")]
        if bad:
            raise CheckpointError(f"output_dir={self.path!r}: the run replaces final/ when it ends, and "
                                  f"{os.path.join(self.path, bad[0])} was not written by fastpref: move it away")

    # ---- writing (rank 0)
    def _save(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        _write_json(os.path.join(self.path, MARKER), self.marker)

    def start(self, *, fresh: bool) -> None:
        """Before a run writes: clear fastpref's outputs for a fresh start (``check_fresh_start`` passed), and
        write the marker (a resumed run in an unmarked directory claims the outputs that exist)."""
        if fresh and self.marker is not None:
            for name in _CLEARED:
                top = os.path.join(self.path, name)
                if name in self.marker["created"] and os.path.lexists(top):
                    shutil.rmtree(top) if os.path.isdir(top) and not os.path.islink(top) else os.remove(top)
            self.marker = {"run_id": uuid.uuid4().hex, "created": [n for n in self.marker["created"]
                                                                    if os.path.lexists(os.path.join(self.path, n))],
                           "files": {}, "finished": None}
        elif self.marker is None:
            existing = [n for n in _CLEARED if not fresh and os.path.lexists(os.path.join(self.path, n))]
            self.marker = {"run_id": uuid.uuid4().hex, "created": existing, "files": {}, "finished": None}
        else:
            self.marker["finished"] = None  # resumed or extended: no longer finished until final/ is rewritten
        self._save()

    def own(self, name: str, files: list[str] | None = None) -> None:
        """Record that fastpref created top-level ``name`` (and, for ``final`` / ``plots``, wrote ``files``)."""
        changed = False
        if name not in self.marker["created"]:
            self.marker["created"].append(name)
            changed = True
        if files is not None and name in _RECORDED:
            have = set(self.marker["files"].get(name, []))
            if not set(files) <= have:  # kept as a union: an entry is never forgotten while its file may exist
                self.marker["files"][name] = sorted(have | set(files))
                changed = True
        if changed:
            self._save()

    def finish(self, step: int, snapshot: dict) -> None:
        """Record that the run finished at ``step`` (``final/`` written) with ``snapshot`` (:func:`run_snapshot`)."""
        self.marker["finished"] = {"step": step, **snapshot}
        self._save()


def files_below(directory: str) -> list[str]:
    """Relative paths of the files below ``directory`` (what :meth:`RunDir.own` records for ``final/``)."""
    return _files(directory)


# ------------------------------------------------------------------------------------------- the start of a run

@dataclasses.dataclass
class StartPlan:
    """What :func:`plan_start` decided: resume from ``resume`` (None: a fresh start), the mutable ``changes``
    against it, or ``finished`` (a message: nothing to train)."""

    rundir: RunDir
    resume: Resume | None
    changes: list[str]
    finished: str | None = None


def plan_start(cfg: Config, snapshot: dict, total_steps: int, say: Callable[[str], None], *, rank: int = 0,
               world: int = 1) -> StartPlan:
    """Choose how a run starts, reading only, before anything is written: the checkpoint to resume (verified, with
    fallback), the config comparison, a finished run, and whether ``output_dir`` may be written / cleared. Raises
    :class:`CheckpointError` / :class:`ConfigError` with one line. Every rank calls it; with several, rank 0
    decides (it alone reads and hashes the checkpoint files) and broadcasts the decision, or the error."""
    if world == 1:
        return _plan_start(cfg, snapshot, total_steps, say)
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            plan = _plan_start(cfg, snapshot, total_steps, say)
            box[0] = ("plan", plan.resume, plan.changes, plan.finished)
        except ConfigError as e:
            box[0] = ("error", isinstance(e, CheckpointError), str(e))
    dist.broadcast_object_list(box, src=0)  # (between the run's own processes)
    kind, *rest = box[0]
    if kind == "error":
        raise (CheckpointError if rest[0] else ConfigError)(rest[1])
    return plan if rank == 0 else StartPlan(RunDir(cfg.output_dir), *rest)


def _upgraded(recorded: dict, cfg: Config) -> tuple[dict, dict]:
    """``(recorded snapshot in today's keys, the defaults)`` for :func:`compare_runs`."""
    conf = upgrade_recorded_config(recorded.get("config", {}), cfg)
    try:
        base = Config(algorithm=cfg.algorithm)
        base.train.sft_warmup_steps = cfg.train.sft_warmup_steps
        defaults = config_snapshot(base)
    except (ConfigError, ValueError, KeyError):  # an algorithm without a default config: compare strictly
        defaults = {}
    return {**recorded, "config": conf}, defaults


def _plan_start(cfg: Config, snapshot: dict, total_steps: int, say: Callable[[str], None]) -> StartPlan:
    out = cfg.output_dir
    rd = RunDir(out)
    resume = select_checkpoint(cfg.resume, os.path.join(out, CHECKPOINTS), say)
    fin = rd.finished if cfg.resume != "none" and os.path.isdir(os.path.join(out, "final")) else None
    changes: list[str] = []
    if resume is not None:
        rec, defaults = _upgraded(resume.state, cfg)
        changes = compare_runs(rec, snapshot, resume.path, defaults)
    elif fin is not None:
        rec, defaults = _upgraded(fin, cfg)
        changes = compare_runs(rec, snapshot, f"{out} (finished run)", defaults)
    if fin is not None and fin["step"] >= total_steps:
        last = checkpoint_dirs(os.path.join(out, CHECKPOINTS))
        how = (f"rerun with a larger train.max_steps (it continues from checkpoint step-{last[-1][0]})" if last else
               "start over with resume=none and a larger train.max_steps (train.save_every=0 left no checkpoint)")
        return StartPlan(rd, None, changes, finished=(
            f"fastpref train: the run in {out} is finished (step {fin['step']}, final/ written); nothing to do. To "
            f"train further, {how}; to retrain, resume=none"))
    if fin is not None and resume is None:
        raise CheckpointError(f"output_dir={out!r}: the run finished at step {fin['step']} and left no checkpoint "
                              f"(train.save_every=0), so it cannot be extended to {total_steps} steps: start over "
                              "with resume=none, or use another output_dir")
    if resume is None:
        rd.check_fresh_start()
    else:
        rd.check_target(resume.path)
    return StartPlan(rd, resume, changes)
