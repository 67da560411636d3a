"""The ``fastpref`` command: ``train``, ``bench``, ``info``.

Sub-commands import their machinery lazily so ``fastpref info`` stays fast and works without extras.
"""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: fastpref {train,bench,info} ...

  fastpref train [CONFIG.yaml] [key=value ...]   train (no config: the embedded tiny default)
  fastpref bench [--quick] [--op OP] ...         microbenchmarks of every kernel vs the alternatives
  fastpref info                                  versions, device, and which implementation each op uses
"""


def info(argv: list[str] | None = None) -> int:
    """Print versions, the device, and the implementation ``impl="auto"`` picks for each op."""
    argparse.ArgumentParser(prog="fastpref info", description=info.__doc__).parse_args(argv)
    import importlib
    import platform

    import torch

    import fastpref
    from fastpref._impl import resolve_impl, triton_available, triton_interpret

    print(f"fastpref      {fastpref.__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    for name in ("torch", "triton", "transformers", "peft", "datasets", "trl", "liger_kernel", "flash_attn",
                 "deepspeed", "tensorboard"):
        try:
            mod = importlib.import_module(name)
            ver = getattr(mod, "__version__", "installed")
        except Exception:
            ver = "-"
        print(f"{name:<13} {ver}")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    print(f"device        {torch.cuda.get_device_name(0) if cuda else 'cpu'}"
          f"{f' (CUDA {torch.version.cuda})' if cuda else ''}")
    print(f"triton        {'available' if triton_available() else 'not available'}"
          f"{' (TRITON_INTERPRET=1)' if triton_interpret() else ''}")
    impl = resolve_impl("auto", dev)
    for op in ("linear_logprobs", "linear_cross_entropy", "fused preference losses", "fused policy loss",
               "varlen_attention"):
        print(f"impl=auto     {op:<26} -> {impl}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return info(rest)
    if cmd == "train":
        from fastpref.train.cli import main as train_main

        return train_main(rest)
    if cmd == "bench":
        from fastpref.benchmarks.runner import main as bench_main

        return bench_main(rest)
    print(f"fastpref: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
