"""Scale-out of ``fastpref train`` on CPU with gloo: FSDP2 (``train.fsdp``) and DeepSpeed ZeRO-2/3
(``train.deepspeed``) in two processes give the same losses and final weights as one process running the same
global batch as ``grad_accum=2`` micro-batches, also across a kill and ``resume=auto``; impossible settings are
ConfigErrors that name the key. (Plain torchrun DDP: ``tests/test_train_ddp.py``.)"""

import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastpref.train.cli import embedded_default
from fastpref.train.config import ConfigError, load_config
from fastpref.train.distributed import DeepSpeedParallel, deepspeed_config, parallel_kind
from fastpref.train.trainer import Trainer
from torchrun import run_ranks

# The run used by every comparison: SFT warm-up step 1, then DPO (the reference is taken at step 2).
ARGS = ["data.synthetic_rows=64", "train.batch_size=4", "train.sft_warmup_steps=1", "train.eval_every=0",
        "train.log_every=1", "train.plots=false", "data.eval_fraction=0.1"]


def needs_deepspeed(fn):
    """Marked ``deepspeed`` (``.ci/run`` runs these with the extra: ``pytest -m deepspeed``), skipped without it."""
    skip = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                              reason="needs the deepspeed extra (pip install -e '.[test,deepspeed]')")
    return pytest.mark.deepspeed(skip(fn))


_SCRIPT = """
import sys
from fastpref.train.cli import embedded_default
from fastpref.train.config import load_config
from fastpref.train.trainer import Trainer
stop = int(sys.argv[1]) or None
Trainer(load_config(None, sys.argv[2:], base=embedded_default()), quiet=True, stop_after=stop).run()
"""


def run_train(tmp_path, args, *, nproc=1, stop_after=0, env_extra=None):
    """``fastpref train ARGS`` in ``nproc`` processes (torchrun for ``nproc > 1``), stopped after step
    ``stop_after`` when it is > 0."""
    script = tmp_path / "run_train.py"
    script.write_text(_SCRIPT)
    run_ranks([script, stop_after, *args], nproc=nproc, env_extra=env_extra)


def records(out):
    """``metrics.jsonl`` without the timing field."""
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    for r in recs:
        r.pop("tokens_per_s", None)
    return recs


def train_losses(out):
    return [(r["step"], r["loss"]) for r in records(out) if r["phase"] != "eval"]


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_same_weights(a, b, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)

gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="torch.distributed with gloo is not available")
STEPS = ["train.max_steps=4", "train.save_every=2", "resume=auto"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run every multi-process run must reproduce."""
    out = tmp_path_factory.mktemp("single")
    run_train(out, [f"output_dir={out}/run", "train.grad_accum=2", *ARGS, *STEPS])
    return out / "run"


def _assert_matches(single_out, out):
    a, b = train_losses(single_out), train_losses(out)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    assert_same_weights(final_weights(single_out), final_weights(out))


def _killed_and_resumed(tmp_path, args):
    """Two processes stopped after step 3 (the step-2 checkpoint on disk), then rerun with resume=auto."""
    out = tmp_path / "run"
    full = [f"output_dir={out}", "train.grad_accum=1", *ARGS, *STEPS, *args]
    run_train(tmp_path, full, nproc=2, stop_after=3)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2"]
    assert not (out / "final").exists()
    run_train(tmp_path, full, nproc=2)
    return out


# ---------------------------------------------------------------------------------------------------- FSDP

@gloo
@pytest.mark.slow
def test_fsdp_full_shard_two_processes_match_one_process(single, tmp_path):
    out = tmp_path / "run"
    # held-out evaluation (a no-grad forward) right before the step-2 checkpoint: the gather must still work
    run_train(tmp_path, [f"output_dir={out}", "train.grad_accum=1", *ARGS, *STEPS, "train.fsdp=full_shard",
                         "train.eval_every=2"], nproc=2)
    _assert_matches(single, out)
    # the checkpoint holds the gathered (full) weights, not a rank's shard
    state = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert state["model.embed_tokens.weight"].shape == final_weights(out)["model.embed_tokens.weight"].shape


@gloo
@pytest.mark.slow
def test_fsdp_shard_grad_op_killed_and_resumed_matches_one_process(single, tmp_path):
    # the reference copy (taken at step 2) and the sharded optimizer state go through the step-2 checkpoint
    out = _killed_and_resumed(tmp_path, ["train.fsdp=shard_grad_op", "train.eval_every=2"])
    _assert_matches(single, out)
    # a run with another backend refuses the FSDP checkpoint (before anything is overwritten)
    cfg = load_config(None, [f"output_dir={out}", "train.grad_accum=1", *ARGS, *STEPS], base=embedded_default())
    with pytest.raises(ConfigError, match=r"checkpoint_format='fsdp', this run has checkpoint_format='plain'"):
        Trainer(cfg, quiet=True).run()


# ---------------------------------------------------------------------------------------------------- DeepSpeed

def _ds_config(tmp_path, stage):
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        # 0: partition every parameter, so that the tiny model's LM head really is gathered for the loss
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}))
    return path


@gloo
@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero2_two_processes_match_one_process(single, tmp_path):
    # killed after step 3 and resumed: ZeRO-1/2 restore the module weights, then each rank's partition
    out = _killed_and_resumed(tmp_path, [f"train.deepspeed={_ds_config(tmp_path, 2)}"])
    _assert_matches(single, out)
    assert (out / "checkpoints" / "step-2" / "deepspeed" / "zero-rank-1.safetensors").is_file()


@gloo
@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero3_killed_and_resumed_matches_one_process(single, tmp_path):
    out = _killed_and_resumed(tmp_path, [f"train.deepspeed={_ds_config(tmp_path, 3)}",
                                         "reference.mode=precompute"])
    _assert_matches(single, out)


# ---------------------------------------------------------------------------------------------------- errors

def _cfg(*extra):
    return load_config(None, ["data.synthetic_rows=16", *extra], base=embedded_default())


def test_impossible_parallel_settings_name_the_key(monkeypatch, tmp_path):
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert parallel_kind(_cfg()) == "single"
    with pytest.raises(ConfigError, match=r"train.fsdp=full_shard: needs torchrun .*not set: WORLD_SIZE, RANK, "):
        parallel_kind(_cfg("train.fsdp=full_shard"))
    with pytest.raises(ConfigError, match=r"train.fsdp='zero3': expected one of off, full_shard, shard_grad_op"):
        parallel_kind(_cfg("train.fsdp=zero3"))
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert parallel_kind(_cfg()) == "ddp"
    assert parallel_kind(_cfg("train.fsdp=shard_grad_op")) == "fsdp"
    with pytest.raises(ConfigError, match=r"train.fsdp=full_shard and train.deepspeed=.* are exclusive"):
        parallel_kind(_cfg("train.fsdp=full_shard", "train.deepspeed=ds.json"))
    with pytest.raises(ConfigError, match=r"train.fsdp=full_shard with model.lora.enabled=true"):
        parallel_kind(_cfg("train.fsdp=full_shard", "model.lora.enabled=true"))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match=r"train.deepspeed='ds.json': the deepspeed package is not installed"):
        parallel_kind(_cfg("train.deepspeed=ds.json"))


@needs_deepspeed
def test_deepspeed_without_a_launcher_names_the_key(monkeypatch):
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"train.deepspeed='ds.json': needs a launcher .*not set: RANK, MASTER"):
        parallel_kind(_cfg("train.deepspeed=ds.json"))


def _write(tmp_path, ds):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


@needs_deepspeed
def test_deepspeed_config_fills_auto_and_rejects_contradictions(tmp_path):
    zero2 = {"zero_optimization": {"stage": 2}}
    autos = {**zero2, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    cfg = _cfg("train.batch_size=4", "train.grad_accum=3", "optim.max_grad_norm=0.5", "model.dtype=bfloat16",
               f"train.deepspeed={_write(tmp_path, autos)}")
    ds = deepspeed_config(cfg, world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    # absent keys are filled too; matching values are accepted
    ds = deepspeed_config(_cfg("train.batch_size=4", "optim.max_grad_norm=null", f"train.deepspeed="
                               f"{_write(tmp_path, {**zero2, 'train_micro_batch_size_per_gpu': 4})}"), world=1)
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.0 and "bf16" not in ds

    def bad(ds, match, *extra):
        with pytest.raises(ConfigError, match=match):
            deepspeed_config(_cfg("train.batch_size=4", *extra, f"train.deepspeed={_write(tmp_path, ds)}"), world=2)

    bad({**zero2, "train_micro_batch_size_per_gpu": 8},
        r"train_micro_batch_size_per_gpu=8 contradicts train.batch_size \(= 4\); set it to \"auto\"")
    bad({**zero2, "train_batch_size": 64}, r"train_batch_size=64 contradicts train.batch_size \* train.grad_accum")
    bad({**zero2, "gradient_clipping": 2.0}, r"gradient_clipping=2.0 contradicts optim.max_grad_norm")
    bad({**zero2, "optimizer": {"type": "AdamW"}}, r"remove 'optimizer': fastpref builds AdamW")
    bad({**zero2, "scheduler": {"type": "WarmupLR"}}, r"remove 'scheduler'")
    bad({"zero_optimization": {"stage": 0}}, r"zero_optimization.stage=0: expected 1, 2 or 3")
    bad({"train_micro_batch_size_per_gpu": 4}, r"zero_optimization.stage=None: expected 1, 2 or 3")
    bad({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}},
        r"zero_optimization.reduce_bucket_size=\"auto\": fastpref fills \"auto\" only in")
    bad({**zero2, "gradient_clippping": 1.0}, r"unknown key 'gradient_clippping'; did you mean 'gradient_clipping'")
    bad([1, 2], r"expected a JSON object")
    # ZeRO-3 partitions the parameters: a deep-copied reference is refused, also when reference.mode=auto picks it
    par = DeepSpeedParallel(_cfg(f"train.deepspeed={_write(tmp_path, {'zero_optimization': {'stage': 3}})}"),
                            torch.device("cpu"), 0, 1)
    par.check_reference("precompute")
    with pytest.raises(ConfigError, match=r"reference.mode=auto \(auto resolves to copy here\).*use "
                                          r"reference.mode=precompute"):
        par.check_reference("copy")
    with pytest.raises(ConfigError, match=r"train.deepspeed='/nonexistent.json': no such file"):
        deepspeed_config(_cfg("train.deepspeed=/nonexistent.json"), world=1)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        deepspeed_config(_cfg(f"train.deepspeed={tmp_path / 'broken.json'}"), world=1)
