"""Packaging: the kernels (fastpref/kernels/) and benchmarks/ install inside fastpref, never as top-level modules;
no top-level `kernels` importable from the repository root (it would shadow Hugging Face's `kernels`, which
transformers imports)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_layout(tmp_path):
    """From outside the repo: fastpref.kernels imports, a top-level `kernels` does not come from us."""
    code = ("import importlib.util, fastpref.kernels.logprobs, fastpref.benchmarks;"
            "s = importlib.util.find_spec('kernels');"
            "print('ok', s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("ok")
    assert str(ROOT / "kernels") not in line


def test_the_repository_root_does_not_shadow_the_kernels_distribution():
    """With the repo root first on sys.path (``python -m pytest`` from the root, ``python -m fastpref.cli``) a
    top-level ``kernels`` must not resolve to this repository: transformers >= 5.25 imports Hugging Face's
    ``kernels`` package at import time."""
    code = "import importlib.util; s = importlib.util.find_spec('kernels'); print('ok', s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("ok") and not line.split(" ", 1)[1].startswith(str(ROOT / "kernels")), line


def test_wheel_contents(tmp_path):
    """A built wheel holds fastpref/kernels/*.py and no top-level kernels/ or benchmarks/ package."""
    pytest.importorskip("setuptools")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {res.stderr[-300:]}")
    (whl,) = tmp_path.glob("fastpref-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "fastpref/kernels/logprobs.py" in names
    assert "fastpref/ops/logprobs.py" in names
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "benchmarks" not in tops, sorted(tops)
