"""The one launcher of the multi-process CPU tests: ``torchrun --standalone --nproc_per_node=N`` (gloo), or a plain
interpreter for ``nproc=1``, in a clean environment (no inherited ``WORLD_SIZE`` / ``RANK`` / ``MASTER_*``, one
thread per process, DeepSpeed on its CPU accelerator). Used by test_train_ddp, test_train_distributed,
test_online_ppo and test_extra_optimizers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
"""This directory (scripts that import the test helpers put it on ``sys.path``)."""


def require_gloo() -> None:
    """Skip the calling test when torch.distributed or its gloo backend is missing."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def run_ranks(args: list[str], *, nproc: int = 2, timeout: int = 600, env_extra: dict | None = None,
              cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` (``ARGS``: a script path or ``-m module`` and its arguments) in ``nproc`` processes and
    return the finished process; a non-zero exit fails the test with the tail of its output."""
    if nproc > 1:
        require_gloo()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
           **(env_extra or {})}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    r = subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=cwd or os.path.dirname(TESTS))
    assert r.returncode == 0, f"{' '.join(map(str, args))}: exit {r.returncode}\n" + r.stdout[-3000:] + r.stderr[-5000:]
    return r
