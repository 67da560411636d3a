"""``fastpref bench``: run the benchmark registry and write CSV + markdown + PNG + ``summary.md``.

For each op (``--op``), each size of its sweep (GPU sizes on CUDA, CPU sizes with ``--quick`` or without CUDA)
and each provider: build the inputs, build the provider (``unavailable: <reason>`` when it cannot run here),
run one warm-up call (its loss is recorded so providers can be compared), measure the peak extra memory of one
call, then time it (see :mod:`fastpref.benchmarks.measure`). An out-of-memory error is recorded as ``OOM`` and
the sweep goes on. Output in ``--out`` (default ``bench-results/<device-slug>/`` under the current directory;
``--update-repo`` writes the repository's tracked ``benchmarks/results/<device-slug>/`` instead): ``<op>.csv``,
``<op>.md``, ``<op>.png`` per op, and ``summary.md`` over every ``<op>.csv`` found there (so a sweep split over
two invocations ends with one summary).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from fastpref.benchmarks import measure
from fastpref.benchmarks.providers import OPS, OpSpec, Unavailable

FIELDS = ["op", "case", "provider", "status", "median_ms", "q20_ms", "q80_ms", "n_timed", "peak_extra_mib", "loss",
          "useful_tflops", "actual_tflops", "frac_matmul_peak", "tokens_per_s", "matmul_peak_tflops", "dtype",
          "device", "date"]


def _load_e2e() -> None:
    try:
        from fastpref.benchmarks import e2e  # noqa: F401  (registers e2e-dpo / e2e-grpo)
    except ImportError as e:  # pragma: no cover - only when the module itself is broken
        print(f"fastpref bench: end-to-end ops unavailable ({e})", file=sys.stderr)


def case_label(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k != "dtype")


def _fmt(x, nd=3):
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        if math.isnan(x):
            return ""
        return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def run_case(op: OpSpec, params: dict, providers: list[str], device: torch.device, *, repeats: int,
             peak_tflops: float, budget_s: float | None = 4.0, log=print) -> list[dict]:
    """Every provider on one size; returns one row per provider. The first call (its loss recorded) is the
    warm-up, the second measures peak memory, then ``repeats`` timed calls (CPU: fewer once ``budget_s`` seconds
    of timed calls have passed; ``n_timed`` says how many)."""
    dtype = params.get("dtype", "bfloat16")
    base = dict(op=op.name, case=case_label(params), dtype=dtype, device=measure.device_slug(device),
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), matmul_peak_tflops=peak_tflops)
    rows = []
    try:
        inputs = op.make_inputs(params, device)
    except Exception as e:  # noqa: BLE001 - recorded per case, the sweep goes on
        status = "OOM" if measure.is_oom(e) else f"error: inputs: {type(e).__name__}: {e}"
        measure.release(device)
        return [dict(base, provider=p, status=status) for p in providers]
    useful = op.useful_flops(params)
    for name in providers:
        row = dict(base, provider=name)
        step = None
        try:
            step = op.providers[name](inputs, params, device)
            loss = step()
            measure.sync(device)
            peak = measure.peak_extra_bytes(step, device)
            t = measure.time_fn(step, device, repeats=repeats, warmup=0, budget_s=budget_s)
            actual = op.actual_flops.get(name, op.useful_flops)(params)
            row.update(status="ok", median_ms=t.median_ms, q20_ms=t.q20_ms, q80_ms=t.q80_ms, n_timed=t.n,
                       peak_extra_mib=None if peak is None else peak / 2**20, loss=float(loss.float()),
                       useful_tflops=useful / (t.median_ms * 1e-3) / 1e12,
                       actual_tflops=actual / (t.median_ms * 1e-3) / 1e12,
                       tokens_per_s=op.tokens(params) / (t.median_ms * 1e-3) if op.tokens(params) else None)
            row["frac_matmul_peak"] = row["actual_tflops"] / peak_tflops if peak_tflops else None
        except (Unavailable, ImportError) as e:
            row["status"] = f"unavailable: {e}"
        except Exception as e:  # noqa: BLE001
            if measure.is_oom(e):
                row["status"] = "OOM"
            else:
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if os.environ.get("FASTPREF_BENCH_TRACEBACK"):
                    traceback.print_exc()
        del step
        measure.release(device)
        rows.append(row)
        log(f"  {op.name:<10} {row['case']:<38} {name:<16} {row['status'][:60]:<10} "
            f"{_fmt(row.get('median_ms'))} ms  peak {_fmt(row.get('peak_extra_mib'))} MiB  "
            f"loss {_fmt(row.get('loss'), 6)}")
    del inputs
    measure.release(device)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k), 6) if isinstance(r.get(k), float) else r.get(k, "") for k in FIELDS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def markdown_table(rows: list[dict]) -> str:
    head = ("| case | provider | median ms (q20-q80) | peak extra MiB | useful TFLOP/s | actual TFLOP/s | "
            "of matmul peak | tokens/s | loss |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['provider']} | {r['status']} | | | | | | |")
            continue
        frac = _num(r.get("frac_matmul_peak"))
        lines.append(
            f"| {r['case']} | {r['provider']} | {_fmt(_num(r['median_ms']))} "
            f"({_fmt(_num(r['q20_ms']))}-{_fmt(_num(r['q80_ms']))}) | {_fmt(_num(r.get('peak_extra_mib')))} | "
            f"{_fmt(_num(r['useful_tflops']))} | {_fmt(_num(r['actual_tflops']))} | "
            f"{'' if frac is None else f'{100 * frac:.1f}%'} | {_fmt(_num(r.get('tokens_per_s')))} | "
            f"{_fmt(_num(r['loss']), 6)} |")
    return head + "\n".join(lines) + "\n"


def plot(op: OpSpec | None, rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for prov in dict.fromkeys(r["provider"] for r in ok):
        pr = {r["case"]: r for r in ok if r["provider"] == prov}
        xs = [i for i, c in enumerate(cases) if c in pr]
        axes[0].plot(xs, [_num(pr[cases[i]]["median_ms"]) for i in xs], marker="o", label=prov)
        mem = [(i, _num(pr[cases[i]].get("peak_extra_mib"))) for i in xs]
        mem = [(i, m) for i, m in mem if m is not None]
        if mem:
            axes[1].plot([i for i, _ in mem], [m for _, m in mem], marker="o", label=prov)
    for ax, lab in zip(axes, ("median time (ms, log)", "peak extra memory (MiB, log)")):
        ax.set_yscale("log")
        ax.set_ylabel(lab)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_op_outputs(out: Path, op: OpSpec, rows: list[dict], header: str) -> None:
    write_csv(out / f"{op.name}.csv", rows)
    (out / f"{op.name}.md").write_text(f"# {op.title}\n\n{header}\n\n{METHOD}\n\n{markdown_table(rows)}")
    plot(op, rows, out / f"{op.name}.png", f"{op.title} - {rows[0]['device'] if rows else ''}")


def write_summary(out: Path, header: str) -> Path:
    """``summary.md`` from every ``<op>.csv`` in ``out``: per op, all providers at the issue's target size when it
    ran (``OpSpec.headline``), else at the largest size that ran."""
    parts = [f"# Benchmark summary\n\n{header}\n"]
    order = list(OPS)
    for csv_path in sorted(out.glob("*.csv"), key=lambda q: (order.index(q.stem) if q.stem in order else len(order),
                                                               q.stem)):
        rows = read_csv(csv_path)
        if not rows:
            continue
        op = OPS.get(rows[0]["op"])
        ok_cases = [r["case"] for r in rows if r["status"] == "ok"]
        if not ok_cases:
            continue
        by_label = {case_label(p): p for p in ((op.gpu + op.quick) if op else [])}
        featured = op is not None and op.headline is not None and case_label(op.headline) in ok_cases
        case = case_label(op.headline) if featured else ok_cases[-1]
        sel = [r for r in rows if r["case"] == case]
        what = "Target size of the issue" if featured else "Largest case that ran"
        parts.append(f"## {op.title if op else rows[0]['op']}\n\n{what}: `{case}` "
                     f"(all sizes: [{csv_path.stem}.md]({csv_path.stem}.md), plot: "
                     f"[{csv_path.stem}.png]({csv_path.stem}.png))\n\n{markdown_table(sel)}")
        ref = next((r for r in sel if r["provider"] in ("torch", "hf-naive") and r["status"] == "ok"), None)
        notes = []
        for r in sel:
            if ref is None or r is ref or r["status"] != "ok":
                continue
            sp = _num(ref["median_ms"]) / _num(r["median_ms"])
            m_r, m_ref = _num(r.get("peak_extra_mib")), _num(ref.get("peak_extra_mib"))
            mem = f", peak extra {100 * m_r / m_ref:.1f}% of naive" if m_r is not None and m_ref else ""
            notes.append(f"- {r['provider']}: {sp:.2f}x the naive path's speed{mem}")
        params = by_label.get(case)
        if op and op.logits_elems and params:
            dt = params.get("dtype", "bfloat16")
            size = op.logits_elems(params) * torch.empty(0, dtype=getattr(torch, dt)).element_size() / 2**20
            for r in sel:
                m = _num(r.get("peak_extra_mib")) if r["status"] == "ok" else None
                if m is not None:
                    notes.append(f"- {r['provider']}: peak extra = {100 * m / size:.1f}% of the [tokens, V] {dt} "
                                 f"logits ({size:.0f} MiB)")
        if notes:
            parts.append("\n".join(notes) + "\n")
    path = out / "summary.md"
    path.write_text("\n".join(parts))
    return path


METHOD = ("Time: `triton.testing.do_bench` median (q20-q80) on CUDA, wall-clock median (q20-q80) of `--repeats` "
          "calls (fewer for slow providers: at most `--case-seconds` of timed calls, `n_timed` in the CSV) after a "
          "warm-up on CPU. Peak extra: CUDA `max_memory_allocated` minus the inputs; CPU resident-set "
          "high-water mark (`VmHWM` after `clear_refs`) minus `VmRSS` with the inputs alive. TFLOP/s: *useful* counts "
          "the op's minimal FLOPs (log-probs fwd+bwd 6NHV), *actual* the FLOPs the method really does (8NHV with a "
          "recompute backward); the fraction of the measured matmul peak uses *actual*. FLOP models: "
          "`benchmarks/providers.py`.")


def _merged_header(out: Path) -> str:
    """The run lines of every invocation that wrote into ``out`` (each writes ``header-<ops>.md``)."""
    heads = [p.read_text().strip() for p in sorted(out.glob("header-*.md"))]
    return "Runs:\n\n" + ("\n".join(dict.fromkeys(heads)) or "- (no run header found)") + "\n\n" + METHOD


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastpref bench", description=__doc__.split("\n\n")[0])
    _load_e2e()
    ap.add_argument("--quick", action="store_true", help="CPU-sized sweep (the default without CUDA)")
    ap.add_argument("--op", action="append", choices=sorted(OPS), help="op(s) to run (default: all)")
    ap.add_argument("--providers", help="comma-separated providers (default: all of each op)")
    ap.add_argument("--skip-providers", default="", help="comma-separated providers to leave out")
    ap.add_argument("--max-cases", type=int, default=None, help="only the first K sizes of each sweep")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case on CPU (CUDA: do_bench)")
    ap.add_argument("--case-seconds", type=float, default=4.0,
                    help="CPU: stop timing a provider after this many seconds of timed calls (at least one call)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output dir (default: bench-results/<device> under the current directory)")
    ap.add_argument("--update-repo", action="store_true",
                    help="write the repository's tracked benchmarks/results/<device>/ (to commit new numbers)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; no new case starts after this (its rows say 'skipped: time budget')")
    ap.add_argument("--summary-only", action="store_true",
                    help="only rebuild summary.md from the <op>.csv files in --out (e.g. after merging two parts)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick or device.type != "cuda"
    if args.update_repo and args.out is not None:
        ap.error("--update-repo writes benchmarks/results/<device>/; do not combine it with --out")
    if args.update_repo:
        args.out = Path(__file__).resolve().parent / "results" / measure.device_slug(device)
    if args.summary_only:
        if args.out is None:
            ap.error("--summary-only needs --out")
        print(f"fastpref bench: wrote {write_summary(args.out, _merged_header(args.out))}")
        return 0
    ops = [OPS[o] for o in (args.op or list(OPS))]
    out = args.out or Path("bench-results") / measure.device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    sel = [p for p in (args.providers or "").split(",") if p]
    skip = {p for p in args.skip_providers.split(",") if p}
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure.matmul_peak_tflops(device, peak_dtype)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "fastpref bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = (f"- `{cmd.strip()}`: {measure.device_name(device)}; {now}; measured matmul peak "
              f"({str(peak_dtype).replace('torch.', '')} {'8192^3' if device.type == 'cuda' else '1024^3'} torch.mm) "
              f"{peak:.3g} TFLOP/s"
              + (f"; load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine "
                 f"makes CPU timings noisy)" if device.type == "cpu" else ""))
    print(f"fastpref bench: {measure.device_name(device)}; matmul peak {peak:.2f} TFLOP/s; out {out}")
    for op in ops:
        provs = [p for p in (sel or list(op.providers)) if p in op.providers and p not in skip]
        sizes = (op.quick if quick else op.gpu)[: args.max_cases]
        rows: list[dict] = []
        for params in sizes:
            if args.time_budget is not None and time.monotonic() - t_start > args.time_budget:
                rows += [dict(op=op.name, case=case_label(params), provider=p, status="skipped: time budget",
                              device=measure.device_slug(device)) for p in provs]
            else:
                rows += run_case(op, params, provs, device, repeats=args.repeats, peak_tflops=peak,
                                 budget_s=args.case_seconds)
            write_op_outputs(out, op, rows, header)  # after every case: a killed run keeps what it measured
    (out / f"header-{'+'.join(o.name for o in ops)}.md").write_text(header + "\n")
    summary = write_summary(out, _merged_header(out))
    print(f"fastpref bench: wrote {summary}")
    return 0
