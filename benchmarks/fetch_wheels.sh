#!/usr/bin/env bash
# Download into ./.whl (git-ignored) the wheels the bare GPU machines lack: the benchmark peers and test oracles
# (liger-kernel, trl) and what trl needs beyond that image (datasets, dill, multiprocess), for Python 3.12 on
# x86-64, PINNED to the versions installed in this checkout's .venv (the ones the CPU tests ran against), so the
# GPU numbers compare the same library versions. Run from the repo root:  bash benchmarks/fetch_wheels.sh
# Then pass carry=[".whl"] to the device tool and run benchmarks/gpu_suite.sh (see benchmarks/README.md).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
git check-ignore -q .whl/probe.whl || { echo "fetch_wheels: .whl/ must be git-ignored (it is in .gitignore)" >&2; exit 1; }
PY=${PY:-.venv/bin/python}
pkgs=$("$PY" - <<'PYEOF'
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ("liger-kernel", "trl", "datasets", "dill", "multiprocess")))
PYEOF
)
mkdir -p .whl
for p in $pkgs "$@"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$p"
done
ls -la .whl
du -sh .whl
