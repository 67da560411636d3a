"""Writing and restoring a run's checkpoints and its ``final/`` directory: the trainer's side of
:mod:`fastpref.train.checkpoint` (which owns the format, its verification, what may change on resume and the
output directory's rules).

A checkpoint ``checkpoints/step-N`` is built in ``checkpoints/.tmp-step-N`` and renamed into place. What it holds,
and who writes it:

* the parallel backend's files (``model``, ``optimizer``, ``scheduler``, fp16 ``scaler``; DeepSpeed's ZeRO
  partitions), through ``Parallel.save_checkpoint`` (a collective under FSDP / DeepSpeed);
* ``rng``: python ``random``, numpy, torch CPU and CUDA generators (rank 0's);
* ``algorithm``: ``main`` (the algorithm's ``state_dict``), ``reference`` (a copied reference's weights, a
  precomputed cache) and ``optimizers`` (every extra optimizer of ``Runtime.build_optimizer``: its module's weights
  and AdamW state; the replicas are identical on every rank);
* ``trainer_state.json`` (step, data position, whether the reference was taken, the run's identity) and the
  manifest, last.

Rank 0 writes all but the backend's per-rank files; every rank reads. ``train.keep_checkpoints`` prunes the
oldest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable

import torch

from fastpref.train import checkpoint as ckpt
from fastpref.train.config import ConfigError


def seed_all(seed: int) -> None:
    """Seed python ``random``, torch and numpy (when installed) with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def rng_state() -> dict:
    """The process's random generators: python, torch CPU, numpy and (when present) every CUDA device's."""
    import numpy as np

    st = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Inverse of :func:`rng_state`."""
    import numpy as np

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class RunState:
    """Saves and restores one run's checkpoints (see the module docstring). ``rundir`` is the run's
    :class:`fastpref.train.checkpoint.RunDir`; ``say`` prints on rank 0."""

    def __init__(self, out: str, *, rank: int, world: int, rundir: ckpt.RunDir, keep: int,
                 say: Callable[[str], None]):
        self.out, self.rank, self.world, self.rundir, self.keep, self.say = out, rank, world, rundir, keep, say
        self.root = os.path.join(out, ckpt.CHECKPOINTS)

    def barrier(self) -> None:
        """Wait for every rank (nothing to do in one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def save(self, step: int, *, par, algo, runtime, reference, trainer_state: dict) -> None:
        """Write ``checkpoints/step-{step}`` (every rank calls it). ``trainer_state``: what
        ``trainer_state.json`` holds besides the step (the data position, ``reference_taken``, the run's
        identity)."""
        final = os.path.join(self.root, f"step-{step}")
        tmp = os.path.join(self.root, f".tmp-step-{step}")
        if self.rank == 0:
            self.rundir.own(ckpt.CHECKPOINTS)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.barrier()
        par.save_checkpoint(tmp)  # model, optimizer, schedule (a collective under FSDP / DeepSpeed)
        ref_state = reference.state_dict()
        self.barrier()
        if self.rank != 0:
            self.barrier()
            return
        ckpt.save_state(tmp, "rng", rng_state())
        ckpt.save_state(tmp, "algorithm", {"main": algo.state_dict(), "reference": ref_state,
                                           "optimizers": runtime.optimizer_state()})
        with open(os.path.join(tmp, ckpt.TRAINER_STATE), "w") as fh:
            json.dump({"step": step, **trainer_state}, fh)
        ckpt.write_manifest(tmp)  # last: every file with its size and sha256
        if os.path.exists(final) and not ckpt.remove_checkpoint(final, self.say):
            raise ckpt.CheckpointError(f"{final}: cannot be replaced: it holds files fastpref did not write")
        os.replace(tmp, final)
        if self.keep:
            for _, old in ckpt.checkpoint_dirs(self.root)[:-self.keep]:
                ckpt.remove_checkpoint(old, self.say)
        self.barrier()

    def load(self, resume: ckpt.Resume, *, par, algo, runtime, reference, device: torch.device,
             copy_reference: Callable[[], None]) -> tuple[int, bool]:
        """Restore the verified checkpoint ``resume`` (every rank): the backend's state, the algorithm's, the extra
        optimizers', the reference (``copy_reference()`` first builds a copy to load the weights into) and the RNG.
        Returns ``(step, reference_taken)``; a checkpoint that does not fit the run is a one-line
        :class:`fastpref.train.checkpoint.CheckpointError`."""
        path, st = resume.path, resume.state
        try:
            par.load_checkpoint(path)
            algo_state = ckpt.load_state(path, "algorithm", device)
            algo.load_state_dict(algo_state["main"])
            runtime.load_optimizer_state(algo_state.get("optimizers", {}))
            taken = st["reference_taken"]
            if taken:
                if reference.needs_copy:
                    copy_reference()
                reference.load_state_dict(algo_state["reference"])  # a copy's weights, a precomputed cache
            set_rng_state(ckpt.load_state(path, "rng"))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            if isinstance(e, (ConfigError, torch.OutOfMemoryError)):
                raise
            raise ckpt.CheckpointError(f"resume: {path} does not fit this run ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        return st["step"], taken

    def save_final(self, model, tokenizer, state: dict | None, algo) -> None:
        """Rank 0: ``final/`` (the model's ``save_pretrained`` with ``state`` when the backend gathered it, the
        tokenizer, the algorithm's own files), built in ``.tmp-final`` and renamed into place."""
        final = os.path.join(self.out, "final")
        tmp = os.path.join(self.out, ".tmp-final")
        self.rundir.own(".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, **({} if state is None else {"state_dict": state}))
        tokenizer.save_pretrained(tmp)
        algo.save_final(tmp)
        self.rundir.own("final", ckpt.files_below(tmp))  # recorded before the rename: the marker never lags
        shutil.rmtree(final, ignore_errors=True)  # (plan_start refused a final/ holding files fastpref did not write)
        os.replace(tmp, final)
