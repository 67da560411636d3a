"""pytest-benchmark suites over the benchmark registry: one test per (op, size, provider).

Not collected by the default ``pytest`` (``testpaths = ["tests"]``). Run from the repo root:

    pytest benchmarks/test_ops.py --benchmark-only                     # CPU-sized (the --quick sweep)
    pytest benchmarks/test_ops.py --benchmark-only -k "logprobs and fastpref"
    FASTPREF_BENCH_SIZES=gpu pytest benchmarks/test_ops.py --benchmark-only --benchmark-json=bench.json  # GPU sizes

Each test builds the provider exactly as ``fastpref bench`` does (:mod:`fastpref.benchmarks.providers`), skips
when the provider is unavailable here (the reason is the skip message), and times one forward+backward per
round; the loss value and the FLOP counts go into ``extra_info``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastpref.benchmarks import e2e  # noqa: F401  (registers the end-to-end ops)
from fastpref.benchmarks.measure import sync
from fastpref.benchmarks.providers import OPS, Unavailable
from fastpref.benchmarks.runner import case_label

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = os.environ.get("FASTPREF_BENCH_SIZES", "gpu" if DEVICE.type == "cuda" else "quick")

CASES = [pytest.param(op.name, params, prov, id=f"{op.name}-{case_label(params).replace(' ', ',')}-{prov}")
         for op in OPS.values() for params in (op.gpu if SIZES == "gpu" else op.quick) for prov in op.providers]


@pytest.fixture(scope="module")
def _inputs_cache():
    cache: dict = {}
    yield cache
    cache.clear()


@pytest.mark.parametrize(("op_name", "params", "provider"), CASES)
def test_op(benchmark, _inputs_cache, op_name, params, provider):
    op = OPS[op_name]
    key = (op_name, case_label(params))
    if key not in _inputs_cache:
        _inputs_cache.clear()  # one size alive at a time
        _inputs_cache[key] = op.make_inputs(params, DEVICE)
    inputs = _inputs_cache[key]
    try:
        step = op.providers[provider](inputs, params, DEVICE)
        loss = step()
    except (Unavailable, ImportError) as e:
        pytest.skip(f"unavailable: {e}")

    def run():
        step()
        sync(DEVICE)

    benchmark.extra_info.update(loss=float(loss.float()), useful_flops=op.useful_flops(params),
                                actual_flops=op.actual_flops.get(provider, op.useful_flops)(params),
                                tokens=op.tokens(params))
    benchmark.pedantic(run, rounds=3 if DEVICE.type == "cpu" else 10, warmup_rounds=1)
