"""``train.precision``: config checks, the fp16 gradient scaler's step, and end-to-end runs that resume (issue 14)."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import _metrics  # metrics.jsonl records without the timing field

from fastpref.train.cli import embedded_default
from fastpref.train.config import ConfigError, load_config
from fastpref.train.distributed import Parallel
from fastpref.train.precision import Precision
from fastpref.train.trainer import Trainer


@pytest.mark.parametrize("overrides, match", [
    (["train.precision=bf16-mixed", "model.dtype=bfloat16"],
     "train.precision=bf16-mixed contradicts model.dtype=bfloat16: bf16-mixed means fp32 master weights"),
    (["train.precision=fp16-mixed", "model.dtype=float16"], "train.precision=fp16-mixed contradicts model.dtype"),
    (["train.precision=bf16"], "train.precision=bf16 contradicts model.dtype=float32"),
    (["train.precision=fp32", "model.dtype=bfloat16"], "train.precision=fp32 contradicts model.dtype=bfloat16"),
    (["train.precision=fp16-mixed", "train.deepspeed=ds.json"], "DeepSpeed does its own mixed precision"),
    (["train.precision=fp16-mixed", "train.fsdp=full_shard"], "fp16-mixed with train.fsdp=full_shard"),
    (["train.precision=fp16"], "train.precision='fp16': expected one of auto, fp32, bf16, bf16-mixed, fp16-mixed"),
    (["algorithm=ppo", "train.precision=fp16-mixed", "ppo.critic=separate"], "fp16-mixed with ppo.critic=separate"),
])
def test_contradictory_precision_is_refused_in_one_line(overrides, match):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["output_dir=/tmp/x", *overrides])
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides", [["train.precision=bf16", "model.dtype=bfloat16"], ["train.precision=fp32"],
                                       ["model.dtype=bfloat16"], ["train.precision=bf16-mixed"]])
def test_consistent_precision_loads(overrides):
    load_config(None, ["output_dir=/tmp/x", *overrides])


def test_autocast_only_for_the_mixed_modes():
    dev = torch.device("cpu")
    for name, dtype in (("auto", None), ("fp32", None), ("bf16-mixed", torch.bfloat16),
                        ("fp16-mixed", torch.float16)):
        cfg = load_config(None, ["output_dir=/tmp/x", f"train.precision={name}"])
        a = torch.ones(2, 2)
        with Precision(cfg, dev).autocast():
            assert (a @ a).dtype == (dtype or torch.float32)


def _parallel(precision: str) -> tuple[Parallel, torch.nn.Parameter]:
    cfg = load_config(None, ["output_dir=/tmp/x", f"train.precision={precision}", "optim.max_grad_norm=1e6"])
    par = Parallel(cfg, torch.device("cpu"), 0, 1)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([p], lr=0.1)
    par.attach(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda done: 1.0 / (done + 1)))
    return par, p


def test_fp16_scaler_unscales_before_clipping_and_skips_inf_steps():
    ref, q = _parallel("auto")
    par, p = _parallel("fp16-mixed")
    assert par.scaler is not None and ref.scaler is None
    scale0 = par.loss_scale
    for model_par, w in ((ref, q), (par, p)):
        model_par.backward((w * torch.tensor([3.0, 4.0])).sum())
    g_ref = ref.step()
    g = par.step()
    assert g == pytest.approx(g_ref) == pytest.approx(5.0)   # the norm of the unscaled gradient
    torch.testing.assert_close(p.detach(), q.detach())       # the same AdamW update as without scaling
    assert par.sched.last_epoch == 1 and par.loss_scale == scale0
    before = p.detach().clone()
    par.backward((p * torch.tensor([float("inf"), 1.0])).sum())  # overflow: the step must be skipped
    g = par.step()
    assert not torch.isfinite(torch.tensor(g))
    torch.testing.assert_close(p.detach(), before)                  # no update
    assert par.sched.last_epoch == 1                                 # the schedule waits too
    assert par.loss_scale == scale0 / 2                              # and the scale backs off
    assert p.grad is None


def _cfg(out, precision, *extra):
    return load_config(None, [f"output_dir={out}", "data.synthetic_rows=96", "train.batch_size=4",
                              "train.grad_accum=2", "train.max_steps=4", "train.save_every=2", "train.eval_every=2",
                              "train.log_every=1", "train.plots=false", "data.eval_fraction=0.1",
                              "train.sft_warmup_steps=1", f"train.precision={precision}", *extra],
                       base=embedded_default())



@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_run_trains_and_resumes(tmp_path, precision):
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = Trainer(_cfg(full, precision), quiet=True).run()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in res.train.items() if isinstance(v, float))
    recs = _metrics(full)
    assert {"sft_warmup", "dpo", "eval"} <= {r["phase"] for r in recs}
    if precision == "fp16-mixed":
        assert all("amp/loss_scale" in r for r in recs if r["phase"] != "eval")
    Trainer(_cfg(cut, precision), quiet=True, stop_after=3).run()
    Trainer(_cfg(cut, precision), quiet=True).run()
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32  # fp32 master weights
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for ra, rb in zip(_metrics(full), _metrics(cut)):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            assert v == rb[k] if isinstance(v, str) else v == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k
    # the run was mixed: the step-1 SFT loss differs from the same run in fp32 (autocast did something)
    ref = Trainer(_cfg(tmp_path / "fp32", "auto", "train.max_steps=1", "train.sft_warmup_steps=0",
                       "algorithm=sft"), quiet=True).run()
    mixed = Trainer(_cfg(tmp_path / "mixed", precision, "train.max_steps=1", "train.sft_warmup_steps=0",
                         "algorithm=sft"), quiet=True).run()
    assert mixed.train["loss"] != ref.train["loss"]
    assert mixed.train["loss"] == pytest.approx(ref.train["loss"], rel=2e-2)
