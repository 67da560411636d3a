"""Resume: a run killed after its step-2 checkpoint (with metrics already written for step 3) and rerun with
``resume=auto`` ends with the same weights and the same metrics as an uninterrupted run."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fastpref.train.cli import embedded_default
from fastpref.train.config import ConfigError, load_config
from fastpref.train.trainer import Trainer


def _cfg(out, *extra):
    return load_config(None, [f"output_dir={out}", "data.synthetic_rows=96", "train.batch_size=4",
                              "train.grad_accum=2", "train.max_steps=5", "train.save_every=2", "train.eval_every=2",
                              "train.log_every=1", "train.plots=false", "data.eval_fraction=0.1", *extra],
                       base=embedded_default())


def _metrics(out):
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    for r in recs:
        r.pop("tokens_per_s", None)
    return recs


@pytest.mark.parametrize("warmup, extra", [(1, ()), (3, ()), (1, ("reference.mode=precompute",))],
                         ids=["ref-in-checkpoint", "ref-taken-after-resume", "precompute"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, warmup, extra):
    ref_out, cut_out = tmp_path / "full", tmp_path / "cut"
    Trainer(_cfg(ref_out, f"train.sft_warmup_steps={warmup}", *extra), quiet=True).run()
    t = Trainer(_cfg(cut_out, f"train.sft_warmup_steps={warmup}", *extra), quiet=True, stop_after=3)
    t.run()
    assert sorted(os.listdir(cut_out / "checkpoints")) == ["step-2"]
    assert max(r["step"] for r in _metrics(cut_out)) == 3
    # "kill" happened after step 3; the rerun continues from step 2
    torch.manual_seed(1234)  # a resumed run must not depend on the process's RNG state
    Trainer(_cfg(cut_out, f"train.sft_warmup_steps={warmup}", *extra), quiet=True).run()
    a = load_file(str(ref_out / "final" / "model.safetensors"))
    b = load_file(str(cut_out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ma, mb = _metrics(ref_out), _metrics(cut_out)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            if isinstance(v, str):
                assert v == rb[k]
            else:
                assert v == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    if warmup != 1 or extra:
        return
    # and training did change the weights (the comparison above is not vacuous)
    fresh = Trainer(_cfg(tmp_path / "zero", "train.max_steps=1", "train.sft_warmup_steps=0", "optim.lr=1e-30"),
                    quiet=True)
    fresh.run()
    z = load_file(str(tmp_path / "zero" / "final" / "model.safetensors"))
    assert any((z[k] - a[k]).abs().max() > 1e-3 for k in a)


def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(out, "train.sft_warmup_steps=0"), quiet=True, stop_after=2).run()
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"model.tiny"):
        Trainer(_cfg(out, "train.sft_warmup_steps=0", "model.tiny.hidden_size=32"), quiet=True).run()
    assert (out / "config.yaml").read_text() == before  # refused before anything was overwritten
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        Trainer(_cfg(out, "train.sft_warmup_steps=0", f"resume={tmp_path}"), quiet=True).run()


def _as_pre_sections_checkpoint(ckpt, **loss):
    """Rewrite ``ckpt``'s recorded config as a checkpoint written before the per-algorithm sections (issue 15)
    records it: no ``dpo.*`` keys, the shared ``loss.*`` section instead (``loss`` overrides its values)."""
    from fastpref.train.checkpoint import TRAINER_STATE, write_manifest
    from fastpref.train.config import LEGACY_LOSS_KEYS

    path = ckpt / TRAINER_STATE
    state = json.loads(path.read_text())
    conf = {k: v for k, v in state["config"].items() if not k.startswith("dpo.")}
    conf.update({f"loss.{k}": v for k, v in {**LEGACY_LOSS_KEYS, **loss}.items()})
    state["config"] = conf
    path.write_text(json.dumps(state))
    os.remove(ckpt / "manifest.json")
    write_manifest(str(ckpt))


def test_resume_reads_a_checkpoint_recorded_with_the_former_loss_section(tmp_path):
    """A run checkpointed before the per-algorithm sections (its config has ``loss.*``, no ``dpo.*``) resumes
    with the same settings, and is refused when a ``loss.*`` it recorded differs from today's ``dpo.*``."""
    out = tmp_path / "run"
    Trainer(_cfg(out, "train.sft_warmup_steps=0"), quiet=True, stop_after=2).run()
    _as_pre_sections_checkpoint(out / "checkpoints" / "step-2")
    Trainer(_cfg(out, "train.sft_warmup_steps=0"), quiet=True).run()
    assert max(r["step"] for r in _metrics(out)) == 5 and (out / "final" / "model.safetensors").exists()

    out2 = tmp_path / "run2"
    Trainer(_cfg(out2, "train.sft_warmup_steps=0"), quiet=True, stop_after=2).run()
    _as_pre_sections_checkpoint(out2 / "checkpoints" / "step-2", beta=0.2)
    with pytest.raises(ConfigError, match=r"dpo\.beta: 0\.2 -> 0\.1"):
        Trainer(_cfg(out2, "train.sft_warmup_steps=0"), quiet=True).run()
    _as_pre_sections_checkpoint(out2 / "checkpoints" / "step-2", beta=0.1, simpo_gamma=0.7)
    with pytest.raises(ConfigError, match=r"loss\.simpo_gamma: 0\.7 -> \(absent\)"):
        Trainer(_cfg(out2, "train.sft_warmup_steps=0"), quiet=True).run()
