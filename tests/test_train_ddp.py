"""Data parallelism on CPU: ``torchrun --nproc_per_node=2`` (gloo) gives the same losses and the same final
weights as one process running the same global batch as ``grad_accum=2`` micro-batches."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--demo", "data.synthetic_rows=64", "train.batch_size=4", "train.sft_warmup_steps=1", "train.max_steps=3",
        "train.eval_every=0", "train.log_every=1", "train.plots=false", "data.eval_fraction=0.1", "--quiet"]


def _run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
            if r["phase"] != "eval"]


def test_two_process_gloo_matches_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "fastpref.cli", "train", f"output_dir={single}", "train.grad_accum=2", *ARGS], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastpref.cli",
          "train", f"output_dir={ddp}", "train.grad_accum=1", *ARGS], env)
    a, b = _losses(single), _losses(ddp)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa = load_file(str(single / "final" / "model.safetensors"))
    wb = load_file(str(ddp / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
