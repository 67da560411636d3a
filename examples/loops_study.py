"""The self-improvement loops (issue 17) on the bundled arithmetic task, 3 seeds each: held-out reward before
training and after every iteration.

    python examples/loops_study.py --out docs/results/loops [--seeds 0 1 2] [--loops spin dice ...]

Each run is ``fastpref train examples/<loop>_arith.yaml`` (tiny Llama, 3 iterations of 10 steps, self_rewarding
20, CPU) with ``train.eval_every`` = its steps per iteration: the held-out reward (``eval/reward/mean``, one sample
per held-out prompt, the arithmetic reward) at step 0 (the starting point) and at the end of every iteration.
DICE starts from a DPO-trained policy and its SFT reference, made first for each seed (``algorithm=sft`` on the
arithmetic SFT rows, then ``algorithm=dpo`` on the arithmetic preference pairs; the commands of
examples/dice_arith.yaml). Writes
``results.md`` (per loop: mean +- sd over seeds per iteration, per-seed gain, seconds per run), ``results.json``
and ``curves.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LOOPS = ["ilr_dpo", "spin", "self_rewarding", "dice", "apo"]
COMMON = ["data.eval_fraction=0.2", "train.save_every=0", "train.plots=false", "resume=none"]


def steps_per_iteration(loop: str) -> int:
    import yaml

    with open(f"examples/{loop}_arith.yaml") as fh:
        return int(yaml.safe_load(fh)[loop]["steps_per_iteration"])


def train(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "fastpref.cli", "train", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def dice_start(runs: str, seed: int) -> list[str]:
    sft, dpo = os.path.join(runs, f"dice_start_sft_seed{seed}"), os.path.join(runs, f"dice_start_dpo_seed{seed}")
    base = ["examples/dice_arith.yaml", f"train.seed={seed}", "train.eval_every=0", "train.save_every=0",
            "train.plots=false", "resume=none"]
    train(base + ["algorithm=sft", "model.name_or_path=tiny", f"output_dir={sft}",
                  "data.train_files=[examples/data/arith_sft.jsonl]", "train.max_steps=40"])
    train(base + ["algorithm=dpo", f"model.name_or_path={sft}/final", f"output_dir={dpo}",
                  "data.train_files=[examples/data/arith_pref.jsonl]", "train.max_steps=20"])
    return [f"model.name_or_path={dpo}/final", f"dice.reference_path={sft}/final"]


def run(runs: str, loop: str, seed: int) -> dict:
    d = os.path.join(runs, f"{loop}_seed{seed}")
    extra = dice_start(runs, seed) if loop == "dice" else []
    t0 = time.time()
    try:
        train([f"examples/{loop}_arith.yaml", f"output_dir={d}", f"train.seed={seed}",
               f"train.eval_every={steps_per_iteration(loop)}", *COMMON, *extra])
        err = None
    except subprocess.CalledProcessError as e:
        err = f"exit {e.returncode}"
    secs = time.time() - t0
    recs = []
    if os.path.exists(os.path.join(d, "metrics.jsonl")):
        with open(os.path.join(d, "metrics.jsonl")) as fh:
            recs = [json.loads(line) for line in fh]
    evals = {int(r["step"]): r["eval/reward/mean"] for r in recs if "eval/reward/mean" in r}
    return {"loop": loop, "seed": seed, "seconds": secs, "error": err,
            "eval": [evals[s] for s in sorted(evals)], "eval_steps": sorted(evals)}


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/loops")
    ap.add_argument("--runs", default="runs/loops_study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--loops", nargs="+", default=LOOPS)
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md / curves.png from results.json")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.report_only:
        with open(os.path.join(a.out, "results.json")) as fh:
            report(json.load(fh), a.out, a.seeds, a.loops)
        return
    results = []
    for loop in a.loops:
        for seed in a.seeds:
            r = run(a.runs, loop, seed)
            print(f"{loop} seed {seed}: {r['eval']} ({r['seconds']:.0f} s){' ' + r['error'] if r['error'] else ''}",
                  flush=True)
            results.append(r)
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    report(results, a.out, a.seeds, a.loops)


def report(results: list[dict], out: str, seeds: list[int], loops: list[str]) -> None:
    """``results.md`` and ``curves.png``; a run stopped by a can't-learn error keeps its held-out points."""
    lines = ["# The self-improvement loops on the arithmetic task", "",
             f"`python examples/loops_study.py` ({time.strftime('%Y-%m-%d')}, CPU, seeds {seeds}): held-out reward "
             "(one sample per held-out prompt, ~100 prompts, arithmetic reward) before training (iteration 0) and "
             "after each iteration (10 steps; self_rewarding 20, its iteration 0 being the IFT+EFT supervised step); "
             "mean +- sd over the seeds that got there. Gain = the last held-out point minus the start; `stopped` = "
             "the run ended with the one-line can't-learn error at the next iteration.", "",
             "| loop | start | after it. 1 | after it. 2 | after it. 3 | gain per seed | beats its start | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for loop in loops:
        rs = [r for r in results if r["loop"] == loop and len(r["eval"]) >= 2]
        cols = [fmt([r["eval"][i] for r in rs if len(r["eval"]) > i]) for i in range(4)]
        gains = [r["eval"][-1] - r["eval"][0] for r in rs]
        done = [g for g, r in zip(gains, rs) if not r["error"]]
        g = ", ".join(f"{x:+.3f}{' (stopped)' if r['error'] else ''}" for x, r in zip(gains, rs))
        beats = ("yes" if done and len(done) == len(rs) and min(done) > 0 else
                 "no" if not gains or statistics.mean(gains) <= 0 or not done else "mixed")
        secs = [r["seconds"] for r in results if r["loop"] == loop]
        lines.append(f"| `{loop}` | {' | '.join(cols)} | {g} | {beats} | {statistics.mean(secs):.0f} |")
    lines += ["", "![held-out reward per iteration](curves.png)", ""]
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(loops), figsize=(3.2 * len(loops), 3), sharey=True, squeeze=False)
    for ax, loop in zip(axes[0], loops):
        for r in [r for r in results if r["loop"] == loop]:
            ax.plot([s // steps_per_iteration(loop) for s in r["eval_steps"]], r["eval"], marker="o",
                    label=f"seed {r['seed']}{' (stopped)' if r['error'] else ''}")
        ax.set_title(loop)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out reward")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
