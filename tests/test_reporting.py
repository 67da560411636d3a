"""``train.report_to``: which trackers a value names, one-line errors for unknown or missing ones, TRL's
``report_to`` alias, and short runs that log the same records as ``metrics.jsonl`` to TensorBoard, W&B (offline)
and MLflow (a file store under ``output_dir``). The W&B and MLflow tests need their extras and skip without them."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from fastpref.train import reporting
from fastpref.train.cli import main
from fastpref.train.config import ConfigError, load_config
from fastpref.train.reporting import check_report_to, resolve_report_to

HAS_TB = importlib.util.find_spec("tensorboard") is not None


def test_resolve_report_to():
    assert resolve_report_to(None) == (["tensorboard"] if HAS_TB else [])
    assert resolve_report_to("none") == resolve_report_to([]) == resolve_report_to(["none"]) == []
    assert resolve_report_to(["wandb", "mlflow", "wandb"]) == ["wandb", "mlflow"]
    assert set(resolve_report_to("all")) <= set(reporting.TRACKERS)
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['comet'\]"):
        resolve_report_to(["comet"])


def test_unknown_and_missing_trackers_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker\(s\) \['nosuch'\]"):
        load_config(None, ["train.report_to=[nosuch]"])
    monkeypatch.setattr(reporting, "_installed", lambda name: name != "wandb")
    with pytest.raises(ValueError, match=r"train.report_to=wandb: the 'wandb' package is not installed "
                                         r"\(pip install 'fastpref\[wandb\]'\)"):
        check_report_to(["tensorboard", "wandb"])


def test_trl_report_to_maps_to_train_report_to():
    cfg = load_config(None, ["report_to=none"])
    assert cfg.train.report_to == ["none"]
    cfg = load_config(None, ["report_to=[tensorboard]"])
    assert cfg.train.report_to == ["tensorboard"]


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _run(out, *extra):
    assert main([f"output_dir={out}", "algorithm=dpo", "train.max_steps=4", "train.eval_every=2", "--quiet",
                 *extra]) == 0


def test_report_to_none_writes_only_the_jsonl(tmp_path):
    out = tmp_path / "r"
    _run(out, "train.report_to=none")
    assert not (out / "tensorboard").exists() and _metrics(out)


@pytest.mark.skipif(not HAS_TB, reason="needs tensorboard (the [test] extra)")
def test_tensorboard_gets_the_jsonl_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    _run(out, "train.report_to=[tensorboard]")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    recs = [r for r in _metrics(out) if "loss" in r]
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in got] == [r["step"] for r in recs]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in recs], rel=1e-6)


@pytest.mark.trackers
def test_mlflow_file_store_gets_the_jsonl_records(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="needs the mlflow extra (pip install 'fastpref[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "r"
    _run(out, "train.report_to=[mlflow]")
    ids = json.loads((out / "trackers.json").read_text())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri="file://" + str(out / "mlruns"))
    hist = sorted(client.get_metric_history(ids["mlflow"], "loss"), key=lambda m: m.step)
    recs = [r for r in _metrics(out) if "loss" in r]
    assert [m.step for m in hist] == [r["step"] for r in recs]
    assert [m.value for m in hist] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    params = client.get_run(ids["mlflow"]).data.params
    assert params["algorithm"] == "dpo" and params["train.max_steps"] == "4"


@pytest.mark.trackers
def test_wandb_offline_run_gets_the_jsonl_records(tmp_path, monkeypatch):
    """A real offline W&B run (its files under output_dir/wandb); what it was sent is read through a spy on the
    run's ``log`` (wandb 0.31 keeps offline history in a binary format with no public reader)."""
    wandb = pytest.importorskip("wandb", reason="needs the wandb extra (pip install 'fastpref[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent, real_init = [], wandb.init

    def init(*args, **kw):
        run = real_init(*args, **kw)
        real_log = run.log
        run.log = lambda data, step=None, **k: (sent.append((step, dict(data))), real_log(data, step=step, **k))
        return run

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "r"
    _run(out, "train.report_to=[wandb]")
    ids = json.loads((out / "trackers.json").read_text())
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-") and d.endswith(ids["wandb"])]
    assert len(runs) == 1 and (out / "wandb" / runs[0] / f"run-{ids['wandb']}.wandb").stat().st_size > 0
    recs = [r for r in _metrics(out) if "loss" in r]
    losses = [(step, d["loss"]) for step, d in sent if "loss" in d]
    assert [s for s, _ in losses] == [r["step"] for r in recs]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
