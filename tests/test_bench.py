"""Smoke tests of the benchmark runner (``fastpref bench``) on micro cases: outputs exist, numbers are sane.

The loss each provider reports is an independent computation per provider (naive full logits, our chunked
engine, TRL's chunked log-prob), so agreement between them checks the harness wires every provider to the same
problem; the memory assertion checks that the CPU peak-memory measurement sees the full-logits tensor.
"""

import csv
import math

import pytest
import torch

from fastpref.benchmarks import measure, runner
from fastpref.benchmarks.providers import OPS, OpSpec, Unavailable

CPU = torch.device("cpu")


def _rows(op, params, providers):
    return runner.run_case(OPS[op], params, providers, CPU, repeats=2, peak_tflops=1.0, log=lambda *_: None)


@pytest.mark.skipif(not measure.cpu_memory_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_logprobs_providers_agree_and_fused_uses_less_memory():
    # N*V fp32 logits = 128 MiB for the naive path; the fused path holds one chunk (~16 MiB) at a time.
    rows = {r["provider"]: r for r in _rows("logprobs", dict(N=1024, H=64, V=32768, dtype="float32"),
                                            ["torch", "fastpref-torch", "trl", "fastpref-triton"])}
    for p in ("torch", "fastpref-torch", "trl"):
        assert rows[p]["status"] == "ok", rows[p]
        assert rows[p]["median_ms"] > 0 and rows[p]["q20_ms"] <= rows[p]["median_ms"] <= rows[p]["q80_ms"]
        assert rows[p]["useful_tflops"] > 0
    ref = rows["torch"]["loss"]
    assert math.isfinite(ref) and 9.0 < ref < 12.0  # ~log(V) for random logits of this scale
    for p in ("fastpref-torch", "trl"):
        assert rows[p]["loss"] == pytest.approx(ref, rel=1e-5)
    naive, fused = rows["torch"]["peak_extra_mib"], rows["fastpref-torch"]["peak_extra_mib"]
    assert naive > 128, f"naive path must hold at least the [N, V] fp32 logits, measured {naive} MiB"
    assert fused < naive / 2, (fused, naive)
    # recompute engine: actual FLOPs 8NHV vs useful 6NHV
    assert rows["fastpref-torch"]["actual_tflops"] == pytest.approx(rows["fastpref-torch"]["useful_tflops"] * 8 / 6)
    assert rows["fastpref-triton"]["status"].startswith("unavailable: ")


def test_preference_and_policy_losses_agree():
    dpo = {r["provider"]: r for r in _rows("dpo", dict(B=2, T=32, H=32, V=512, dtype="float32"),
                                           ["torch", "fastpref-torch"])}
    grpo = {r["provider"]: r for r in _rows("grpo", dict(G=4, T=32, H=32, V=512, dtype="float32"),
                                            ["torch", "fastpref-torch"])}
    for rows in (dpo, grpo):
        assert rows["torch"]["status"] == "ok" and rows["fastpref-torch"]["status"] == "ok", rows
        assert rows["fastpref-torch"]["loss"] == pytest.approx(rows["torch"]["loss"], rel=1e-4, abs=1e-6)
    assert 0.0 < dpo["torch"]["loss"] < 5.0


def test_failures_are_recorded_not_raised(tmp_path, monkeypatch):
    def oom(x, p, d):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    def missing(x, p, d):
        raise Unavailable("peer not installed")

    def broken(x, p, d):
        raise RuntimeError("bad kernel")

    def fine(x, p, d):
        return lambda: x["a"].sum()

    fake = OpSpec(name="fake", title="fake op", make_inputs=lambda p, d: dict(a=torch.ones(4)),
                  providers=dict(oom=oom, missing=missing, broken=broken, fine=fine), useful_flops=lambda p: 8.0,
                  actual_flops={}, gpu=[], quick=[dict(n=4)], x_key="n")
    monkeypatch.setitem(OPS, "fake", fake)
    assert runner.main(["--op", "fake", "--out", str(tmp_path), "--repeats", "1", "--device", "cpu"]) == 0
    with open(tmp_path / "fake.csv") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert rows["oom"]["status"] == "OOM"
    assert rows["missing"]["status"] == "unavailable: peer not installed"
    assert rows["broken"]["status"].startswith("error: RuntimeError: bad kernel")
    assert rows["fine"]["status"] == "ok" and float(rows["fine"]["loss"]) == 4.0


def test_main_writes_csv_markdown_plot_summary(tmp_path):
    rc = runner.main(["--quick", "--op", "logprobs", "--providers", "torch,fastpref-torch", "--max-cases", "1",
                      "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("logprobs.csv", "logprobs.md", "logprobs.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = (tmp_path / "summary.md").read_text()
    assert "matmul peak" in summary and "fastpref-torch" in summary and "`fastpref bench --quick" in summary
    with open(tmp_path / "logprobs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["torch", "fastpref-torch"]
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    assert float(rows[0]["matmul_peak_tflops"]) > 0
    # a second invocation (another op) into the same dir: --summary-only merges both runs' lines and tables
    (tmp_path / "summary.md").unlink()
    assert runner.main(["--summary-only", "--out", str(tmp_path)]) == 0
    assert "`fastpref bench --quick" in (tmp_path / "summary.md").read_text()


def test_device_slug():
    assert measure.device_slug(CPU).startswith("cpu-")
    assert " " not in measure.device_slug(CPU)


@pytest.mark.parametrize("op", ["e2e-dpo", "e2e-grpo"])
def test_end_to_end_steps_agree(op):
    from fastpref.benchmarks import e2e  # noqa: F401  (registers the end-to-end ops)

    size = dict(V=512, H=32, I=64, L=1, heads=2, kv=1, T=32, dtype="float32", **({"B": 2} if op == "e2e-dpo"
                                                                                   else {"G": 4}))
    fast = ["fastpref", "fastpref-packed"] + (["fastpref-packed-skip"] if op == "e2e-dpo" else [])
    rows = {r["provider"]: r for r in _rows(op, size, ["hf-naive", *fast])}
    assert rows["hf-naive"]["status"] == "ok", rows["hf-naive"]
    for p in fast:
        if rows[p]["status"].startswith("unavailable"):
            continue
        assert rows[p]["status"] == "ok", rows[p]
        # the first step's loss (same seeded model, same batch): padded fused, packed fused and full logits agree
        assert rows[p]["loss"] == pytest.approx(rows["hf-naive"]["loss"], rel=1e-4, abs=1e-5)
        assert rows[p]["tokens_per_s"] > 0


def test_default_out_is_under_cwd_never_the_tracked_results(tmp_path, monkeypatch):
    """Without --out the results go to ./bench-results/<device>/; the repository's benchmarks/results/ only with
    --update-repo (which refuses --out)."""
    fake = OpSpec(name="fake", title="fake op", make_inputs=lambda p, d: dict(a=torch.ones(4)),
                  providers=dict(fine=lambda x, p, d: (lambda: x["a"].sum())), useful_flops=lambda p: 8.0,
                  actual_flops={}, gpu=[], quick=[dict(n=4)], x_key="n")
    monkeypatch.setitem(OPS, "fake", fake)
    monkeypatch.setattr(measure, "matmul_peak_tflops", lambda *a: 1.0)
    repo_results = runner.Path(runner.__file__).resolve().parent / "results"
    before = sorted(p for p in repo_results.rglob("*")) if repo_results.exists() else []
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    monkeypatch.chdir(tmp_path)
    assert runner.main(["--op", "fake", "--repeats", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "bench-results" / measure.device_slug(CPU) / "fake.csv").is_file()
    after = sorted(p for p in repo_results.rglob("*")) if repo_results.exists() else []
    assert after == before and all(p.stat().st_mtime_ns == mtimes[p] for p in after)
    with pytest.raises(SystemExit):
        runner.main(["--op", "fake", "--update-repo", "--out", str(tmp_path / "x")])
