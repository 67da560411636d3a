"""Preference-run diagnostics (fastpref.train.diagnostics): synthetic metric sequences trigger exactly the
expected warnings at the expected steps; a healthy sequence triggers none; the trainer hook and the plot panel."""

from __future__ import annotations

import json

import pytest
import torch

from fastpref.train.diagnostics import NAMES, Diagnostics, Thresholds, observe, paired_length_metrics

W = 3  # window of these tests


def healthy(step: int) -> dict:
    """A run that learns: chosen steady (noisy), rejected falling, margins growing but not saturated."""
    noise = 0.05 * ((step * 7) % 3 - 1)
    return {"step": step, "phase": "dpo", "logps/chosen": -8.0 + noise, "logps/rejected": -8.0 - 0.2 * step,
            "lengths/chosen": 4.0, "lengths/rejected": 4.0, "rewards/chosen": 0.01 * step,
            "rewards/margins": 0.05 * step, "rewards/accuracies": min(0.98, 0.5 + 0.02 * step),
            "completion/mean_length": 10.0 + noise}


def run(records, **kw):
    warnings: list[str] = []
    d = Diagnostics(beta=0.1, reference_based=True, thresholds=Thresholds(window=W, **kw), warn=warnings.append)
    flags = {r["step"]: d.update(r["step"], r) for r in records}
    return warnings, flags


def test_healthy_sequence_triggers_nothing():
    warnings, flags = run([healthy(s) for s in range(1, 41)])
    assert warnings == []
    assert all(f == {} for f in flags.values())


def _first_flag(flags, name):
    return min((s for s, f in flags.items() if f.get(f"diag/{name}")), default=None)


def test_logps_both_falling():
    # chosen and rejected per-token log-probs fall by 0.1 nats/token per step from step 11 on; baseline -2 / -2
    recs = []
    for s in range(1, 31):
        r = healthy(s)
        drop = 0.1 * max(0, s - 10) * 4  # summed over 4 tokens
        r["logps/chosen"], r["logps/rejected"] = -8.0 - drop, -8.0 - drop
        recs.append(r)
    warnings, flags = run(recs)
    # recent mean over steps s-2..s of 0.1*(s-10-1) per token must exceed 0.5: (s-11) > 5 -> s = 17
    assert _first_flag(flags, "logps_falling") == 17
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 17: chosen and rejected log-probs")
    assert all(f.get("diag/logps_falling") for s, f in flags.items() if s >= 17)
    assert not any(k != "diag/logps_falling" for f in flags.values() for k in f)


def test_only_rejected_falling_is_healthy():
    recs = [healthy(s) | {"logps/rejected": -8.0 - 3.0 * s} for s in range(1, 31)]
    warnings, _ = run(recs)
    assert warnings == []


def test_length_drift():
    recs = [healthy(s) | {"completion/mean_length": 10.0 if s <= 10 else 10.0 + 2.0 * (s - 10)} for s in range(1, 31)]
    warnings, flags = run(recs)
    # recent mean of 10 + 2*(s-11) (steps s-2..s) > 15 -> s-11 > 2.5 -> s = 14
    assert _first_flag(flags, "length_drift") == 14
    assert [w.split(":")[0] for w in warnings] == ["warning"] and "step 14" in warnings[0]
    shrink = [healthy(s) | {"completion/mean_length": 10.0 if s <= 5 else 5.0} for s in range(1, 12)]
    w2, f2 = run(shrink)
    assert _first_flag(f2, "length_drift") == 8 and len(w2) == 1  # recent mean 5 < 10/1.5 once two of 3 are 5
    trl_name = [{k.replace("completion/", "completions/"): v for k, v in r.items()} for r in shrink]
    assert _first_flag(run(trl_name)[1], "length_drift") == 8  # TRL's key name works the same


def test_kl_blowup():
    # |rewards/chosen| / (beta * len) = kl per token; 0.1 * 4 * k -> k nats/token
    recs = [healthy(s) | {"rewards/chosen": -0.4 * (0.5 if s <= 10 else 3.0)} for s in range(1, 21)]
    warnings, flags = run(recs)
    # recent mean over 3: steps 11,12 at 3.0 and 10 at 0.5 -> (0.5+6)/3 = 2.17 > 2 at step 12
    assert _first_flag(flags, "kl_blowup") == 12
    assert len(warnings) == 1 and "nats/token from the reference" in warnings[0]
    # a reference-free algorithm (SimPO's rewards are beta * logps): no KL condition
    d = Diagnostics(beta=0.1, reference_based=False, thresholds=Thresholds(window=W))
    assert not any("diag/kl_blowup" in d.update(r["step"], r) for r in recs)


def test_margin_saturation():
    recs = [healthy(s) | ({"rewards/accuracies": 1.0, "rewards/margins": 6.0} if s > 15 else {}) for s in range(1, 26)]
    warnings, flags = run(recs)
    # needs the whole recent window saturated (mean acc >= 0.99 with 0.98 before): steps 16, 17, 18 -> 18;
    # margin mean at 17 = (0.75 + 12) / 3 = 4.25 < 5
    assert _first_flag(flags, "margin_saturation") == 18
    assert len(warnings) == 1 and "saturated" in warnings[0]


def test_each_condition_warns_once_and_all_names_exist():
    recs = []
    for s in range(1, 31):
        r = healthy(s)
        if s > 5:
            r.update({"logps/chosen": -40.0, "logps/rejected": -80.0, "completion/mean_length": 40.0,
                      "rewards/chosen": -5.0, "rewards/accuracies": 1.0, "rewards/margins": 9.0})
        recs.append(r)
    warnings, flags = run(recs)
    assert len(warnings) == len(NAMES)
    assert set(flags[30]) == {f"diag/{n}" for n in NAMES}


def test_observe_skips_warmup_and_non_preference_records():
    class T:
        class cfg:
            class loss:
                beta = 0.1
        algo = None
        said: list = []

        def say(self, m):
            self.said.append(m)

    t = T()
    assert observe(t, {"phase": "sft_warmup", "logps/chosen": -1.0}, 1) == {}
    assert observe(t, {"phase": "grpo", "kl": 9.0, "completion/mean_length": 3.0}, 2) == {}
    assert not hasattr(t, "_diagnostics")
    observe(t, {"phase": "dpo", "rewards/margins": 0.1, "rewards/accuracies": 0.5}, 3)
    assert isinstance(t._diagnostics, Diagnostics)


@pytest.mark.parametrize("pack", [False, True])
def test_length_metrics_from_batch(pack):
    from fastpref.data.collate import collate_preference

    ex = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [7]},
          {"prompt_ids": [5], "chosen_ids": [7, 8, 9, 10, 11], "rejected_ids": [7, 8, 9]}]
    m = paired_length_metrics(collate_preference(ex, 0, pack=pack))
    assert m["lengths/chosen"].item() == 4.0 and m["lengths/rejected"].item() == 2.0
    assert isinstance(m["lengths/chosen"], torch.Tensor)


def test_train_run_logs_flags_and_plots_panel(tmp_path):
    """A real (tiny) DPO run with a high learning rate: lengths/* logged, the panel written; the run's flags are
    exactly the steps the warnings name."""
    from fastpref.train.config import load_config
    from fastpref.train.trainer import train

    out = tmp_path / "run"
    cfg = load_config(None, [f"output_dir={out}", "algorithm=dpo", "train.max_steps=12", "train.batch_size=8",
                             "data.synthetic_rows=120", "data.max_length=32", "data.max_prompt_length=16",
                             "optim.lr=0.02", "train.cpu_threads=1", "train.log_every=1"])
    train(cfg, quiet=True)
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    train_recs = [r for r in recs if r["phase"] == "dpo"]
    assert all(r["lengths/chosen"] > 0 for r in train_recs)
    assert (out / "plots" / "diagnostics.png").exists()


def test_resumed_run_flags_the_same_steps(tmp_path):
    """Killed after step 11 (checkpoint at 8) and resumed: the detector replays metrics.jsonl up to the checkpoint,
    so the diag/* flags per step equal the uninterrupted run's (here logps_falling from step 10 on)."""
    from fastpref.train.config import load_config
    from fastpref.train.trainer import Trainer

    args = ["algorithm=dpo", "train.max_steps=16", "train.batch_size=8", "data.synthetic_rows=120",
            "data.max_length=32", "data.max_prompt_length=16", "optim.lr=0.05", "train.cpu_threads=1",
            "train.log_every=1", "train.plots=false", "train.save_every=8", "train.eval_every=0"]

    def flags(out):
        return {r["step"]: sorted(k for k in r if k.startswith("diag/"))
                for r in map(json.loads, open(out / "metrics.jsonl")) if r["phase"] == "dpo"}

    full, cut = tmp_path / "full", tmp_path / "cut"
    Trainer(load_config(None, [f"output_dir={full}", *args]), quiet=True).run()
    Trainer(load_config(None, [f"output_dir={cut}", *args]), quiet=True, stop_after=11).run()
    Trainer(load_config(None, [f"output_dir={cut}", *args, "resume=auto"]), quiet=True).run()
    assert flags(cut) == flags(full)
    assert any(flags(full).values())  # the test exercises a run where a condition holds
