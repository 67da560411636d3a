"""The embedded default (``fastpref train`` with no arguments): SFT warm-up then DPO on the letter-run task
reaches the promised held-out preference accuracy (> 0.8, from 0.5 at the start of DPO) and writes its outputs."""

import json
import os
import re

from fastpref.train.cli import main


def test_embedded_default_reaches_promised_accuracy(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["--demo", f"output_dir={out}", "--quiet"]) == 0
    text = capsys.readouterr().out
    m = re.search(r"held-out preference accuracy: ([0-9.]+)", text)
    assert m, text[-2000:]
    acc = float(m.group(1))
    assert acc > 0.8, text[-2000:]
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    evals = [r for r in recs if "eval/rewards/accuracies" in r]
    # the first DPO evaluation is measured against a reference equal to the policy up to 20 steps earlier;
    # accuracy must rise over the run, not just be high because of the SFT warm-up
    assert evals[-1]["eval/rewards/accuracies"] == acc or abs(evals[-1]["eval/rewards/accuracies"] - acc) < 1e-3
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"]
    assert {"config.yaml", "metrics.jsonl", "final", "plots", "checkpoints"} <= set(os.listdir(out))
