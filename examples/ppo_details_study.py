"""PPO on the bundled arithmetic task: today's recipe (fixed KL coefficient, raw rewards) against the adaptive KL
controller plus reward normalisation (Ziegler et al. 2019), on several seeds.

    python examples/ppo_details_study.py --out docs/results/ppo_details [--seeds 0 1 2]

Writes ``results.md`` (held-out reward before / after, KL to the reference against its target, per seed and
mean) and ``curves.png`` (held-out reward, train KL, KL coefficient per step) under ``--out``. Each run is
``fastpref train examples/ppo_arith.yaml`` with the overrides below, on CPU (about 10-60 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RECIPES = {
    "fixed KL, raw rewards": [],
    "adaptive KL": ["ppo.kl_target=6.0", "ppo.kl_horizon=300"],
    "adaptive KL + reward norm": ["ppo.kl_target=6.0", "ppo.kl_horizon=300", "ppo.kl_coef=0.1",
                                  "ppo.normalize_reward=true"],
}
KL_TARGET = 6.0
COMMON = ["data.eval_fraction=0.2"]  # ~200 held-out prompts instead of ~50: a less noisy held-out reward


def run(runs: str, name: str, seed: int, extra: list[str]) -> list[dict]:
    d = os.path.join(runs, f"{name.replace(' ', '_').replace(',', '').replace('+', 'plus')}_seed{seed}")
    cmd = [sys.executable, "-m", "fastpref.cli", "train", "examples/ppo_arith.yaml", f"output_dir={d}",
           f"train.seed={seed}", "resume=none", "train.save_every=0", *COMMON, *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(d, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/ppo_details")
    ap.add_argument("--runs", default="runs/ppo_details", help="where the runs' output directories go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, dict[int, list[dict]]] = {}
    t0 = time.time()
    for name, extra in RECIPES.items():
        for seed in args.seeds:
            results.setdefault(name, {})[seed] = run(args.runs, name, seed, extra)
            print(f"{name} seed {seed}: done ({time.time() - t0:.0f}s)", flush=True)

    lines = ["# PPO details on the arithmetic task", "",
             f"`python examples/ppo_details_study.py --out {args.out}` (CPU, {time.strftime('%Y-%m-%d')}): "
             "`examples/ppo_arith.yaml` (tiny Llama, 40 rollouts x 2 PPO epochs = 80 steps, 8 prompts x 4 samples "
             "per rollout), held-out reward = mean `arith` reward of one sample per held-out prompt.", "",
             "Recipes: " + "; ".join(f"**{k}**: `{' '.join(v) or 'the YAML as is'}`" for k, v in RECIPES.items())
             + ".",
             f"Common overrides: `{' '.join(COMMON)}`. The KL target ({KL_TARGET} nats per sequence, the paper's value and "
             "about where the fixed-coefficient run ends) and the horizon (300 samples, about 9 rollouts) were chosen "
             "on seeds 0-1 of a small grid (targets 3-8, horizons 32-300); the paper's horizon of 10000 samples "
             "would not move the coefficient within 40 rollouts of 32 samples. With reward normalisation the scores "
             "are scaled by the fitted gain (about 1 / 0.1 here), so the initial coefficient is scaled up too.", "",
             "| recipe | seed | held-out reward, step 0 | final | train KL, mean of the last 10 rollouts | final kl_coef |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for name, by_seed in results.items():
        finals, kls = [], []
        for seed, rows in by_seed.items():
            ev = [r for r in rows if r.get("phase") == "eval"]
            tr = [r for r in rows if r.get("phase") == "ppo" and "objective/kl" in r]  # one row per rollout
            kl = sum(r["objective/kl"] for r in tr[-10:]) / len(tr[-10:])
            coef = tr[-1].get("objective/kl_coef", float("nan"))
            finals.append(ev[-1]["eval/reward/mean"])
            kls.append(kl)
            lines.append(f"| {name} | {seed} | {ev[0]['eval/reward/mean']:.3f} | {ev[-1]['eval/reward/mean']:.3f} | "
                         f"{kl:.2f} | {coef:.4f} |")
        mean = sum(finals) / len(finals)
        std = (sum((f - mean) ** 2 for f in finals) / max(1, len(finals) - 1)) ** 0.5
        summary[name] = (mean, std, sum(kls) / len(kls))
    lines += ["", f"| recipe | final held-out reward, mean +- std over {len(args.seeds)} seeds | "
              "mean train KL (last 10 rollouts) |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]:.3f} +- {v[1]:.3f} | {v[2]:.2f} |" for k, v in summary.items()]
    lines += ["", "![curves](curves.png)", ""]
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for (name, by_seed), color in zip(results.items(), ("tab:blue", "tab:orange", "tab:green")):
        for seed, rows in by_seed.items():
            ev = [r for r in rows if r.get("phase") == "eval"]
            tr = [r for r in rows if r.get("phase") == "ppo" and "objective/kl" in r]
            lab = name if seed == args.seeds[0] else None
            ax[0].plot([r["step"] for r in ev], [r["eval/reward/mean"] for r in ev], color=color, label=lab)
            ax[1].plot([r["step"] for r in tr], [r["objective/kl"] for r in tr], color=color, alpha=0.7, label=lab)
            ax[2].plot([r["step"] for r in tr], [r.get("objective/kl_coef", 0) for r in tr], color=color, label=lab)
    ax[1].axhline(KL_TARGET, color="gray", ls="--", label="KL target")
    for a, t in zip(ax, ("held-out reward", "train KL to the reference (nats / sequence)", "KL coefficient")):
        a.set_title(t)
        a.set_xlabel("step")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=90)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
