"""The self-improvement loops (issue 17) on the bundled arithmetic task, 3 seeds each: held-out reward before
training and after every iteration.

    python examples/loops_study.py --out docs/results/loops [--seeds 0 1 2] [--loops spin dice ...] \
        [--set dice.gamma=0.0 ...] [--merge] [--dice-dpo-steps 20] [--premise]

Each run is ``fastpref train examples/<loop>_arith.yaml`` (tiny Llama, 3 iterations of 10 steps, self_rewarding
20, CPU) with ``train.eval_every`` = its steps per iteration: the held-out reward (``eval/reward/mean``, one sample
per held-out prompt, the arithmetic reward) at step 0 (the starting point) and at the end of every iteration.
DICE starts from a DPO-trained policy and its SFT reference, made first for each seed (``algorithm=sft`` on the
arithmetic SFT rows, then ``algorithm=dpo`` on the arithmetic preference pairs; the commands of
examples/dice_arith.yaml; ``--dice-dpo-steps`` for a longer DPO); a start already made under ``--runs`` for that
seed is reused. ``--set`` adds config overrides to every run of the loops studied (a variant of the committed
configs); ``--merge`` keeps the other loops' entries of an existing ``results.json``. Writes ``results.md`` (per
loop: mean +- sd over seeds per iteration, per-seed gain, seconds per run), ``results.json`` and ``curves.png``
under ``--out``. ``--premise`` (dice, self_rewarding) instead checks each seed's premise of the loop: does its own
scorer (DICE: pi_0's implicit reward; Self-Rewarding: M_1's judge) rank the policy's own samples by correctness.
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


def dice_start(runs: str, seed: int, dpo_steps: int = 20) -> list[str]:
    sft = os.path.join(runs, f"dice_start_sft_seed{seed}")
    dpo = os.path.join(runs, f"dice_start_dpo_seed{seed}" + (f"_{dpo_steps}steps" if dpo_steps != 20 else ""))
    base = ["examples/dice_arith.yaml", f"train.seed={seed}", "train.eval_every=0", "train.save_every=0",
            "train.plots=false", "resume=none"]
    if not os.path.isdir(os.path.join(sft, "final")):  # the start of a seed does not depend on the dice section
        train(base + ["algorithm=sft", "model.name_or_path=tiny", f"output_dir={sft}",
                      "data.train_files=[examples/data/arith_sft.jsonl]", "train.max_steps=40"])
    if not os.path.isdir(os.path.join(dpo, "final")):
        train(base + ["algorithm=dpo", f"model.name_or_path={sft}/final", f"output_dir={dpo}",
                      "data.train_files=[examples/data/arith_pref.jsonl]", f"train.max_steps={dpo_steps}"])
    return [f"model.name_or_path={dpo}/final", f"dice.reference_path={sft}/final"]


def run(runs: str, loop: str, seed: int, overrides: list[str] = (), dice_dpo_steps: int = 20) -> dict:
    d = os.path.join(runs, f"{loop}_seed{seed}")
    extra = (dice_start(runs, seed, dice_dpo_steps) if loop == "dice" else []) + list(overrides)
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
    return {"loop": loop, "seed": seed, "seconds": secs, "error": err, "overrides": list(overrides),
            "dice_dpo_steps": dice_dpo_steps if loop == "dice" else None,
            "eval": [evals[s] for s in sorted(evals)], "eval_steps": sorted(evals)}


def premise(runs: str, loop: str, seed: int, dice_dpo_steps: int = 20, n_prompts: int = 160) -> str:
    """Does the loop's own scorer rank the policy's own samples by correctness (the arithmetic reward)? DICE: pi_0's
    implicit reward (its DPO start against the SFT model); Self-Rewarding: M_1's judge (after iteration 0, the
    supervised IFT + EFT step, trained here for that iteration only). ``n_prompts`` fresh arithmetic prompts,
    the example config's sampling; the counts of best-vs-worst pairs whose chosen answer is the more / the less
    correct one, and the mean score of correct and of wrong samples."""
    import torch

    import fastpref.train.online  # noqa: F401  (registers the loops)
    from fastpref.data.arith import make_arith
    from fastpref.data.dataset import Tokenization
    from fastpref.train.algorithms.base import ALGORITHMS, Runtime
    from fastpref.train.config import load_config
    from fastpref.train.modeling import build_model, build_tokenizer
    from fastpref.train.online.common import best_worst_pairs, load_causal_lm
    from fastpref.train.reference import make_reference

    if loop == "dice":
        start = dice_start(runs, seed, dice_dpo_steps)
    else:
        m1 = os.path.join(runs, f"{loop}_m1_seed{seed}")
        if not os.path.isdir(os.path.join(m1, "final")):
            train([f"examples/{loop}_arith.yaml", f"output_dir={m1}", f"train.seed={seed}", "train.eval_every=0",
                   f"train.max_steps={steps_per_iteration(loop)}", *COMMON])
        start = [f"model.name_or_path={m1}/final"]
    cfg = load_config(f"examples/{loop}_arith.yaml", [f"train.seed={seed}", *start])
    torch.manual_seed(seed)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    ref = make_reference("copy", model)
    ref.take()
    algo = ALGORITHMS[loop](cfg, Runtime(cfg, model, tok, torch.device("cpu"), ref))
    if loop == "dice":
        algo.score_ref = load_causal_lm(cfg.sections["dice"].reference_path, model, "dice.reference_path").eval()
    t = Tokenization(tok, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    rows = make_arith(n_prompts, seed=100 + seed)  # not the training rows' seed
    exs = [{"prompt_ids": t.example({"prompt": r["prompt"]})["prompt_ids"], "row": r} for r in rows]
    scores, right = [], []
    with torch.no_grad():
        for chunk in algo.chunks(exs):
            ro = algo.rollout(chunk)
            algo.step_metrics = {}
            scores += (algo.implicit_rewards(ro).tolist() if loop == "dice" else algo.judge(ro.prompts, ro.completions))
            right += algo.score(ro, chunk).tolist()
    pairs = best_worst_pairs(scores, algo.sec.generation.num_generations)
    better = sum(right[w] > right[lo] for w, lo in pairs)
    worse = sum(right[w] < right[lo] for w, lo in pairs)
    ok = [x for x, a in zip(scores, right) if x is not None and a > 0.5]
    bad = [x for x, a in zip(scores, right) if x is not None and a <= 0.5]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return (f"{loop} seed {seed}: {sum(x is not None for x in scores)}/{len(scores)} samples scored, "
            f"{sum(right) / len(right):.3f} correct; {len(pairs)} best-vs-worst pairs: chosen more correct in "
            f"{better}, less correct in {worse}; mean score of correct samples {mean(ok):.3f}, of wrong ones "
            f"{mean(bad):.3f}")


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
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="config overrides for every run (a variant of the example configs)")
    ap.add_argument("--dice-dpo-steps", type=int, default=20, help="DPO steps of DICE's starting policy")
    ap.add_argument("--merge", action="store_true", help="keep the other loops' entries of the existing results.json")
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md / curves.png from results.json")
    ap.add_argument("--premise", action="store_true",
                    help="dice / self_rewarding: does the loop's own scorer rank its policy's samples (no study)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    if a.report_only:
        with open(path) as fh:
            report(json.load(fh), a.out, a.seeds, a.loops)
        return
    if a.premise:
        for loop in a.loops:
            for seed in a.seeds:
                print(premise(a.runs, loop, seed, a.dice_dpo_steps), flush=True)
        return
    results = []
    if a.merge and os.path.exists(path):
        with open(path) as fh:
            results = [r for r in json.load(fh) if r["loop"] not in a.loops]
    for loop in a.loops:
        for seed in a.seeds:
            r = run(a.runs, loop, seed, a.overrides, a.dice_dpo_steps)
            print(f"{loop} seed {seed}: {r['eval']} ({r['seconds']:.0f} s){' ' + r['error'] if r['error'] else ''}",
                  flush=True)
            results.append(r)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    loops = [lp for lp in LOOPS if any(r["loop"] == lp for r in results)] if a.merge else a.loops
    report(results, a.out, a.seeds, loops)


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
    notes = {f"`{r['loop']}`: " + " ".join(f"`{o}`" for o in r["overrides"])
             for r in results if r["loop"] in loops and r.get("overrides")}
    lines += ["", *(["Runs with overrides of the example config (`--set`): " + "; ".join(sorted(notes)) + "."]
                    if notes else []), "", "![held-out reward per iteration](curves.png)", ""]
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
