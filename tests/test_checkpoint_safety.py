"""Checkpoints and resume as a careless or hostile user meets them (issue 13): nothing in a checkpoint or a reference
cache can run code, damaged checkpoints fall back to the newest intact one, fastpref deletes only what it wrote,
resume refuses changed settings that cannot change and applies those that can, a finished run is not retrained.
The on-disk format: ``fastpref.train.checkpoint``."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastpref.train import checkpoint as ckpt
from fastpref.train.cli import embedded_default, main
from fastpref.train.config import load_config
from fastpref.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(out, *extra):
    """4 pairs a step, a checkpoint every 2 steps, the reference taken (copied) after the step-1 SFT warm-up."""
    return load_config(None, [f"output_dir={out}", "data.synthetic_rows=48", "train.batch_size=4",
                              "train.max_steps=6", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
                              "train.plots=false", "data.eval_fraction=0.1", "train.sft_warmup_steps=1",
                              "data.max_length=24", "data.max_prompt_length=12", *extra], base=embedded_default())


def _run(out, *extra, stop_after=None):
    return Trainer(_cfg(out, *extra), quiet=True, stop_after=stop_after).run()


def _records(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed after step 5: checkpoints step-2 and step-4 on disk, metrics up to step 5."""
    out = tmp_path_factory.mktemp("killed") / "run"
    _run(out, stop_after=5)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-4"]
    return out


def _train_steps(out):
    return [r["step"] for r in _records(out) if r["phase"] != "eval"]


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _checkpoint_files(path):
    return sorted(json.load(open(os.path.join(path, ckpt.MANIFEST)))["files"]) + [ckpt.MANIFEST]


class _Payload:
    """Unpickling this writes ``path``: what a crafted checkpoint would do with a shell command instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def _plant(path, marker):
    """Replace file ``path`` with a torch.save pickle (a zip archive) that runs code when unpickled."""
    torch.save({"state": _Payload(marker)}, path)
    # the payload is live: unpickling it would create the marker
    assert not os.path.exists(marker)


# -------------------------------------------------------------------------------------------- the format

def test_state_round_trip_is_exact_and_refuses_foreign_objects(tmp_path):
    from fastpref.train.online.common import Pair
    from fastpref.train.rollout import Rollout

    random.seed(3)
    np.random.seed(5)
    w = torch.randn(3, 4)
    state = {
        "state": {0: {"step": torch.tensor(7.0), "exp_avg": w, "exp_avg_sq": w}},  # int keys, shared storage
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0]}],
        "python": random.getstate(), "numpy": np.random.get_state(), "np_scalar": np.float32(1.5),
        "odd": {(1, "a"): "tuple key", "$": "a dollar key", 2.5: float("nan")}, "inf": -math.inf,
        "bf16": torch.randn(5, dtype=torch.bfloat16), "empty": torch.zeros(0, 3), "view": w.t()[1:],
        "seen": {3, 1}, "dtype": torch.float16, "size": torch.Size([2, 3]),
        "pairs": [Pair([1], [2, 3], [4])],
        "packed": Rollout(["p"], [[1, 2]], [[3, 4]], ["c"], [False], 1, {"generate": 0.5}),
    }
    ckpt.save_state(str(tmp_path), "s", state)
    back = ckpt.load_state(str(tmp_path), "s")
    assert back["state"][0]["exp_avg"] is not None and list(back["state"]) == [0]
    torch.testing.assert_close(back["state"][0]["exp_avg_sq"], w, rtol=0, atol=0)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and type(back["param_groups"][0]["betas"]) is tuple
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    assert random.random() == (random.seed(3), random.random())[1]
    assert np.random.rand() == (np.random.seed(5), np.random.rand())[1]
    assert back["np_scalar"] == np.float32(1.5) and back["np_scalar"].dtype == np.float32
    assert back["odd"][(1, "a")] == "tuple key" and back["odd"]["$"] == "a dollar key"
    assert math.isnan(back["odd"][2.5]) and back["inf"] == -math.inf
    assert torch.equal(back["bf16"], state["bf16"]) and back["bf16"].dtype == torch.bfloat16
    assert back["empty"].shape == (0, 3) and torch.equal(back["view"], w.t()[1:])
    assert back["seen"] == {1, 3} and back["dtype"] is torch.float16 and back["size"] == torch.Size([2, 3])
    assert back["pairs"] == [Pair([1], [2, 3], [4])]
    assert back["packed"].completion_ids == [[3, 4]] and back["packed"].timings == {"generate": 0.5}
    with pytest.raises(TypeError, match=r"cannot store odd: objects of type .*_Payload"):
        ckpt.flatten({"odd": _Payload(tmp_path / "x")})
    # a crafted skeleton cannot name a class of its choosing
    doc = json.load(open(tmp_path / "s.json"))
    doc["state"]["pairs"][0]["type"] = "os.system"
    json.dump(doc, open(tmp_path / "s.json", "w"))
    with pytest.raises(ckpt.CheckpointError, match=r"s.json: objects of type 'os.system' are not part of"):
        ckpt.load_state(str(tmp_path), "s")


def test_no_unsafe_load_in_the_package():
    """Every checkpoint / cache read is JSON or safetensors: no torch.load, pickle or weights_only=False."""
    bad = []
    for top in ("fastpref", "benchmarks"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(root, f)).read()
                    for needle in ("torch.load(", "weights_only=False", "pickle.load", "import pickle"):
                        if needle in text:
                            bad.append(f"{os.path.join(root, f)}: {needle}")
    assert not bad, bad


def test_grad_scaler_state_is_checkpointed(tmp_path):
    from fastpref.train.distributed import Parallel

    def par():
        cfg = load_config(None, [f"output_dir={tmp_path}", "train.precision=fp16-mixed"])
        p = Parallel(cfg, torch.device("cpu"), 0, 1)
        q = torch.nn.Parameter(torch.ones(2))
        p.model = torch.nn.ParameterList([q])
        opt = torch.optim.AdamW([q], lr=0.1)
        p.attach(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        return p, q

    a, q = par()
    a.backward((q * float("inf")).sum())  # an inf gradient: the step is skipped and the scale halved
    a.step()
    assert a.loss_scale == 2.0 ** 15
    a.save_checkpoint(str(tmp_path))
    assert {"scaler.json", "scaler.safetensors"} <= set(os.listdir(tmp_path))
    b, _ = par()
    assert b.loss_scale == 2.0 ** 16
    b.load_checkpoint(str(tmp_path))
    assert b.loss_scale == 2.0 ** 15 and b.scaler.state_dict() == a.scaler.state_dict()


# -------------------------------------------------------------------------------------------- (a) pickles

def test_planted_pickles_never_run(killed, tmp_path, capsys):
    """A pickle payload in each file of the newest checkpoint, one at a time, with the manifest as it was (the
    file is damaged) and rewritten to match (a forger's checkpoint): resume never unpickles it, names the refused
    file and falls back to step-2."""
    names = _checkpoint_files(killed / "checkpoints" / "step-4")
    assert {"model.safetensors", "optimizer.json", "rng.safetensors", "algorithm.json", "trainer_state.json"} <= set(
        names)
    live = tmp_path / "live"
    _plant(tmp_path / "payload.pt", live)
    torch.load(tmp_path / "payload.pt", weights_only=False)  # what fastpref did with rng.pt before
    assert live.exists()
    for forged in (False, True):
        for name in names[:-1] if forged else names:
            run = _copy(killed, tmp_path / f"{name}-{forged}")
            ck = run / "checkpoints" / "step-4"
            marker = tmp_path / f"pwned-{name}-{forged}"
            _plant(ck / name, marker)
            if forged:
                ckpt.write_manifest(str(ck))
            capsys.readouterr()
            _run(run, stop_after=3)
            out = capsys.readouterr().out
            assert not marker.exists(), name
            assert f"checkpoint {ck} is damaged ({ck / name}: " in out, out
            assert f"resumed from {run / 'checkpoints' / 'step-2'} (step 2)" in out, out


def test_planted_pickle_in_the_reference_cache_never_runs(tmp_path, capsys):
    out = tmp_path / "pre"
    args = ("reference.mode=precompute", "train.sft_warmup_steps=0", "train.max_steps=1")
    _run(out, *args)
    (cache,) = os.listdir(out / "ref_cache")
    marker = tmp_path / "pwned"
    _plant(out / "ref_cache" / cache, marker)
    capsys.readouterr()
    _run(out, *args, "resume=none")
    text = capsys.readouterr().out
    assert not marker.exists()
    assert f"warning: reference cache {out / 'ref_cache' / cache} is not a valid safetensors file" in text, text
    assert "reference log-probs: computed" in text
    load_file(str(out / "ref_cache" / cache))  # rewritten as a valid cache


# -------------------------------------------------------------------------------------------- (b) damage

def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_every_damaged_file_falls_back_to_the_intact_checkpoint(killed, tmp_path):
    root = killed / "checkpoints"
    for name in _checkpoint_files(root / "step-4"):
        for how in ("truncate", "flip"):
            run = _copy(killed, tmp_path / f"{name}-{how}")
            _damage(run / "checkpoints" / "step-4" / name, how)
            warnings = []
            got = ckpt.select_checkpoint("auto", str(run / "checkpoints"), warnings.append)
            assert got.path == str(run / "checkpoints" / "step-2"), (name, how)
            assert len(warnings) == 1 and f"step-4/{name}:" in warnings[0] and "\n" not in warnings[0], warnings
    # an unlisted file and a file of another type are refused too
    run = _copy(killed, tmp_path / "extra")
    (run / "checkpoints" / "step-4" / "extra.pt").write_bytes(b"x")
    warnings = []
    assert ckpt.select_checkpoint("auto", str(run / "checkpoints"), warnings.append).path.endswith("step-2")
    assert "extra.pt: not listed in manifest.json" in warnings[0]


def test_damaged_checkpoint_end_to_end_and_none_intact(killed, tmp_path, capsys):
    run = _copy(killed, tmp_path / "one")
    _damage(run / "checkpoints" / "step-4" / "optimizer.safetensors", "truncate")
    capsys.readouterr()
    res = _run(run)
    out = capsys.readouterr().out
    assert "optimizer.safetensors: " in out and "truncated?" in out and "(step 2)" in out
    assert res.step == 6 and _train_steps(run) == [1, 2, 3, 4, 5, 6]
    run = _copy(killed, tmp_path / "none")
    _damage(run / "checkpoints" / "step-4" / "rng.json", "flip")
    _damage(run / "checkpoints" / "step-2" / "model.safetensors", "truncate")
    before = (run / "config.yaml").read_text()
    with pytest.raises(ckpt.CheckpointError) as e:
        _run(run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"resume=auto: no intact checkpoint in {run / 'checkpoints'}")
    assert "rng.json" in msg and "resume=none" in msg
    assert (run / "config.yaml").read_text() == before  # nothing was written
    rc = main([f"output_dir={run}", "data.synthetic_rows=48", "--quiet"])  # the CLI: one line, exit 2
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no intact checkpoint" in err


# -------------------------------------------------------------------------------------------- (c) user files

def test_fastpref_deletes_only_what_it_wrote(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match=r"holds files fastpref did not write .*notes.txt.*another "
                                                   r"output_dir"):
        _run(mine, "train.max_steps=2")
    assert os.listdir(mine) == ["notes.txt"]
    # a fastpref run directory: resume=none starts over, clearing fastpref's outputs and nothing else
    out = tmp_path / "run"
    _run(out, "train.max_steps=4")
    marker = json.load(open(out / ckpt.MARKER))
    assert {"checkpoints", "final", "metrics.jsonl", "config.yaml"} <= set(marker["created"])
    assert "model.safetensors" in marker["files"]["final"]
    (out / "notes.txt").write_text("mine")
    _run(out, "train.max_steps=2", "resume=none", "train.save_every=0")
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints").exists() and _train_steps(out) == [1, 2]
    # a file of the user's inside an output fastpref would clear: refused, nothing deleted
    _run(out, "train.max_steps=4", "resume=none")
    (out / "checkpoints" / "step-2" / "notes.txt").write_text("mine")
    (out / "final" / "README.md").write_text("mine")
    before = sorted(os.listdir(out / "checkpoints"))
    with pytest.raises(ckpt.CheckpointError, match=r"starting over would delete .*(README.md|notes.txt) and 1 more"):
        _run(out, "train.max_steps=4", "resume=none")
    assert sorted(os.listdir(out / "checkpoints")) == before and (out / "final" / "model.safetensors").exists()
    # the same file in final/ also stops a resumed run (final/ is replaced when it ends), before it trains
    os.remove(out / "checkpoints" / "step-2" / "notes.txt")
    with pytest.raises(ckpt.CheckpointError, match=r"replaces final/ when it ends.*README.md"):
        _run(out, "train.max_steps=6")
    # a run directory of an older fastpref (pickled checkpoints, no marker, no manifest) is not resumed
    old = tmp_path / "old"
    (old / "checkpoints" / "step-2").mkdir(parents=True)
    for f in ("model.pt", "optimizer.pt", "rng.pt"):
        torch.save({}, old / "checkpoints" / "step-2" / f)
    (old / "checkpoints" / "step-2" / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint .*manifest.json: missing"):
        _run(old)


def test_a_killed_checkpoint_write_is_cleared_by_a_fresh_start(killed, tmp_path):
    run = _copy(killed, tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints" / ".tmp-step-2").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step-2" / "model.safetensors").write_bytes(b"partial")
    res = _run(run, "train.max_steps=2")  # resume=auto without a checkpoint: starts over
    assert res.step == 2 and not (run / "checkpoints" / ".tmp-step-2").exists()


# -------------------------------------------------------------------------------------------- (d) identity

def test_a_checkpoint_without_identity_is_refused(killed, tmp_path, capsys):
    run = _copy(killed, tmp_path)
    for step in ("step-4", "step-2"):
        ck = run / "checkpoints" / step
        st = json.load(open(ck / ckpt.TRAINER_STATE))
        del st["identity"]
        json.dump(st, open(ck / ckpt.TRAINER_STATE, "w"))
        ckpt.write_manifest(str(ck))  # the manifest agrees: the identity check itself refuses
        if step == "step-4":
            warnings = []
            assert ckpt.select_checkpoint("auto", str(run / "checkpoints"), warnings.append).path.endswith("step-2")
            assert "trainer_state.json: no 'identity'" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint .*trainer_state.json: no 'identity'"):
        _run(run)
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: no 'identity'"):
        _run(run, f"resume={run / 'checkpoints' / 'step-2'}")


# -------------------------------------------------------------------------------------------- (e) config

def test_immutable_changes_are_refused_and_a_new_lr_takes_effect(killed, tmp_path, capsys):
    run = _copy(killed, tmp_path)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ckpt.CheckpointError) as e:
        _run(run, "dpo.beta=0.2", "reference.mode=precompute", "data.synthetic_rows=40")
    msg = str(e.value)
    assert "\n" not in msg and "cannot change mid-run" in msg
    for part in ("dpo.beta: 0.1 -> 0.2", 'reference.mode: "auto" -> "precompute"', "data.synthetic_rows: 48 -> 40",
                 "data content (sha256): "):
        assert part in msg, msg
    assert (run / "config.yaml").read_text() == before
    # mutable: the learning rate, the schedule and the run's length, logged and in effect
    capsys.readouterr()
    t = Trainer(_cfg(run, "optim.lr=0.05", "optim.warmup_steps=0", "optim.schedule=constant",
                     "train.max_steps=7"), quiet=True)
    t.run()
    out = capsys.readouterr().out
    assert "resume: changed since the checkpoint, in effect from now on: " in out
    assert "optim.lr: 0.003 -> 0.05" in out and "train.max_steps: 6 -> 7" in out
    lrs = {r["step"]: r["lr"] for r in _records(run) if "lr" in r}
    assert lrs[5] == pytest.approx(0.05, rel=1e-12) and lrs[7] == pytest.approx(0.05, rel=1e-12)
    assert lrs[4] != pytest.approx(0.05)
    assert t.sched.base_lrs == [0.05] and t.opt.param_groups[0]["initial_lr"] == 0.05


# -------------------------------------------------------------------------------------------- (f) stale cache

def test_replaced_weights_invalidate_the_reference_cache(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _run(tmp_path / "src", "train.max_steps=1", "train.sft_warmup_steps=0")
    model_dir = tmp_path / "model"
    shutil.copytree(tmp_path / "src" / "final", model_dir)
    args = (f"model.name_or_path={model_dir}", "reference.mode=precompute", "train.sft_warmup_steps=0",
            "train.max_steps=1", f"reference.cache_dir={tmp_path / 'cache'}", "train.save_every=0")
    _run(tmp_path / "a", *args)
    assert "reference log-probs: computed" in capsys.readouterr().out
    _run(tmp_path / "b", *args)
    assert "reference log-probs: loaded" in capsys.readouterr().out  # same weights: the cache is reused
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.0)
    m.save_pretrained(model_dir)
    _run(tmp_path / "c", *args)
    assert "reference log-probs: computed" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cache")) == 2


# -------------------------------------------------------------------------------------------- (g) finished

def test_a_finished_run_is_not_retrained(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [f"output_dir={out}", "data.synthetic_rows=48", "train.batch_size=4", "train.max_steps=4",
            "train.save_every=2", "train.eval_every=0", "train.sft_warmup_steps=1", "train.plots=false",
            "data.max_length=24", "data.max_prompt_length=12", "--quiet"]
    assert main(argv) == 0
    final = out / "final" / "model.safetensors"
    stamp, metrics = os.stat(final).st_mtime_ns, (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"the run in {out} is finished (step 4, final/ written); nothing to do" in text
    assert "larger train.max_steps (it continues from checkpoint step-4)" in text  # the last step is checkpointed
    assert os.stat(final).st_mtime_ns == stamp and (out / "metrics.jsonl").read_text() == metrics
    # a changed immutable setting is still refused, not "finished"
    assert main(argv + ["dpo.beta=0.3"]) == 2
    assert "dpo.beta: 0.1 -> 0.3" in capsys.readouterr().err
    # extending it resumes from where it ended
    assert main(argv[:-1] + ["train.max_steps=6", "train.log_every=1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "(step 4)" in text and "train.max_steps: 4 -> 6" in text
    assert os.stat(final).st_mtime_ns != stamp and _records(out)[-1]["step"] == 6


def test_tensorboard_is_trimmed_on_resume(killed, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _copy(killed, tmp_path)
    _run(run)  # resumed from step 4: the step-5 events of the killed run are purged
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


# -------------------------------------------------------------------------------------------- (h) metrics

def test_a_partial_metrics_line_is_dropped(killed, tmp_path, capsys):
    run = _copy(killed, tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "phase": "dpo", "lo')  # killed in the middle of a write
    capsys.readouterr()
    _run(run)
    assert f"warning: {run / 'metrics.jsonl'}: dropped the partial last line" in capsys.readouterr().out
    assert _train_steps(run) == [1, 2, 3, 4, 5, 6]


def test_data_files_are_compared_by_content_not_path(tmp_path, capsys):
    rows = [{"prompt": f"{c}{c}>", "chosen": c * 3, "rejected": "z" + c} for c in "abcdefghijklmnopqrstuvwx"]
    first = tmp_path / "a.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    _run(out, f"data.train_files=[{first}]", stop_after=3)
    moved = tmp_path / "moved.jsonl"
    shutil.move(first, moved)
    capsys.readouterr()
    _run(out, f"data.train_files=[{moved}]", stop_after=3)  # the same content elsewhere: resumed, logged
    assert f'data.train_files: ["{first}"] -> ["{moved}"]' in capsys.readouterr().out
    moved.write_text(moved.read_text().replace('"aaa"', '"aab"'))
    with pytest.raises(ckpt.CheckpointError, match=r"cannot change mid-run: data content \(sha256\): "):
        _run(out, f"data.train_files=[{moved}]")

