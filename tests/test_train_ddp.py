"""Data parallelism on CPU: ``torchrun --nproc_per_node=2`` (gloo) gives the same losses and the same final
weights as one process running the same global batch as ``grad_accum=2`` micro-batches."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torchrun import run_ranks

ARGS = ["--demo", "data.synthetic_rows=64", "train.batch_size=4", "train.sft_warmup_steps=1", "train.max_steps=3",
        "train.eval_every=0", "train.log_every=1", "train.plots=false", "data.eval_fraction=0.1", "--quiet"]


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
            if r["phase"] != "eval"]


def test_two_process_gloo_matches_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_ranks(["-m", "fastpref.cli", "train", f"output_dir={single}", "train.grad_accum=2", *ARGS], nproc=1)
    run_ranks(["-m", "fastpref.cli", "train", f"output_dir={ddp}", "train.grad_accum=1", *ARGS])
    a, b = _losses(single), _losses(ddp)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa = load_file(str(single / "final" / "model.safetensors"))
    wb = load_file(str(ddp / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
