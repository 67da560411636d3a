"""Experiment trackers of a run (``train.report_to``), next to the ``metrics.jsonl`` file that is always written.

TRL's ``report_to`` names and meanings: ``tensorboard`` (``<output_dir>/tensorboard``), ``wandb``, ``mlflow``,
``trackio``; ``none`` turns every tracker off; null (the default) is ``tensorboard`` when it is installed and
nothing otherwise (fastpref's behaviour before the key existed). Each tracker is an optional extra
(``pip install 'fastpref[wandb]'`` ...), imported only when named; a named tracker that is not installed is a
one-line error before any model is built (:func:`check_report_to`).

Every tracker gets the same records as ``metrics.jsonl`` (numbers only, keyed by the trainer step), on rank 0 only.
Resume: TensorBoard purges the events a killed run wrote after its checkpoint (``purge_step``); W&B and MLflow
continue the same run (its id is kept in ``<output_dir>/trackers.json``) and drop nothing, so a metric logged after
the checkpoint and before the kill appears twice there (W&B refuses steps that go back: they are skipped with
its own warning). Offline use: ``WANDB_MODE=offline`` (files under ``<output_dir>/wandb``), ``MLFLOW_TRACKING_URI``
(default: a file store in ``<output_dir>/mlruns``, with ``MLFLOW_ALLOW_FILE_STORE=true``), ``TRACKIO_*`` as trackio documents.
"""

from __future__ import annotations

import importlib.util
import json
import os

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # each is its package's import name and fastpref's extra


def resolve_report_to(value) -> list[str]:
    """The trackers ``train.report_to`` names: a name, a list of names, ``none`` / ``[]`` (none), ``all`` (every
    installed one) or null (tensorboard when installed). Raises ``ValueError`` naming the key on an unknown name."""
    if value is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    names = [value] if isinstance(value, str) else list(value)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return [t for t in TRACKERS if _installed(t)]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"train.report_to: unknown tracker(s) {bad}; choose from {list(TRACKERS)}, 'all' or 'none'")
    return list(dict.fromkeys(names))


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_report_to(value) -> list[str]:
    """:func:`resolve_report_to`, and a one-line error for a named tracker that is not installed."""
    names = resolve_report_to(value)
    for n in names:
        if not _installed(n):
            raise ValueError(f"train.report_to={n}: the {n!r} package is not installed (pip install 'fastpref[{n}]')")
    return names


class Reporter:
    """The run's trackers. ``log(record)`` takes a ``metrics.jsonl`` record (``step`` plus metrics); ``close()``
    at the end. Construct on rank 0 only."""

    def __init__(self, names: list[str], out_dir: str, *, config: dict, run_name: str, start_step: int = 0,
                 own=None):
        self.names, self.out = list(names), out_dir
        self._tb = self._wandb = self._mlflow = self._trackio = None
        ids_path = os.path.join(out_dir, "trackers.json")
        ids = {}
        if start_step and os.path.isfile(ids_path):
            with open(ids_path) as fh:
                ids = json.load(fh)
        own = own or (lambda name: None)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            own("tensorboard")
            # purge_step: events a killed run logged after its checkpoint are dropped, not duplicated
            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
        if "wandb" in self.names:
            import wandb

            own("wandb")
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastpref"), name=run_name,
                                     dir=out_dir, config=config, id=ids.get("wandb"),
                                     resume="allow" if ids.get("wandb") else None, reinit=True)
            ids["wandb"] = self._wandb.id
        if "mlflow" in self.names:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                # A local file store under output_dir (no server, works offline); MLflow 3 wants the opt-in for it.
                own("mlruns")
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri("file://" + os.path.abspath(os.path.join(out_dir, "mlruns")))
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fastpref"))
            self._mlflow = mlflow
            run = mlflow.start_run(run_id=ids.get("mlflow"), run_name=None if ids.get("mlflow") else run_name)
            ids["mlflow"] = run.info.run_id
            if not start_step:
                mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})
        if "trackio" in self.names:
            import trackio

            self._trackio = trackio
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fastpref"), name=run_name, config=config,
                         resume="allow")
        if ids:
            own("trackers.json")
            with open(ids_path, "w") as fh:
                json.dump(ids, fh)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        nums = {k: float(v) for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not nums:
            return
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(nums, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({_mlflow_key(k): v for k, v in nums.items()}, step=step)
        if self._trackio is not None:
            self._trackio.log(nums, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._trackio is not None:
            self._trackio.finish()
        self._tb = self._wandb = self._mlflow = self._trackio = None


def _mlflow_key(k: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . / space``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out
