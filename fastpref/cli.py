"""The ``fastpref`` command: ``train``, ``eval``, ``bench``, ``info``.

Sub-commands import their machinery lazily so ``fastpref info`` stays fast and works without extras.
"""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: fastpref {train,eval,bench,info} ...

  fastpref train [CONFIG.yaml] [key=value ...]   train (no arguments: the embedded tiny demo; --demo key=value ...
                                                 for the demo with overrides)
  fastpref eval [CONFIG.yaml | --model DIR --data FILE] [--mode reference|urial|opo] [--reward NAME] ...
                                                 preference accuracy, margin, win rate, length and KL of a policy
                                                 against its reference or a tuning-free baseline (docs/eval.md)
  fastpref bench [--quick] [--op OP] ...         microbenchmarks of every kernel vs the alternatives
  fastpref info                                  versions, device, and which implementation each op uses
"""


_VERSIONS = (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
             ("datasets", "datasets"), ("trl", "trl"), ("liger_kernel", "liger-kernel"), ("flash_attn", "flash-attn"),
             ("deepspeed", "deepspeed"), ("tensorboard", "tensorboard"))
"""``(import name, distribution name)`` of what ``fastpref info`` reports."""


def info(argv: list[str] | None = None) -> int:
    """Print versions, the device, and the implementation ``impl="auto"`` picks for each op.

    Versions come from the installed distributions' metadata (``importlib.metadata``), so nothing but torch is
    imported (1.6 s instead of 5.5 s on a shared 2-core CPU, where importing peft, liger and deepspeed to read
    their ``__version__`` took most of the time)."""
    argparse.ArgumentParser(prog="fastpref info", description=info.__doc__.split("\n")[0]).parse_args(argv)
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    import fastpref
    from fastpref._impl import resolve_impl, triton_interpret

    print(f"fastpref      {fastpref.__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    for name, dist in _VERSIONS:
        try:
            ver = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            ver = "installed" if importlib.util.find_spec(name) is not None else "-"
        print(f"{name:<13} {ver}")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    print(f"device        {torch.cuda.get_device_name(0) if cuda else 'cpu'}"
          f"{f' (CUDA {torch.version.cuda})' if cuda else ''}")
    has_triton = importlib.util.find_spec("triton") is not None
    print(f"triton        {'available' if has_triton else 'not available'}"
          f"{' (TRITON_INTERPRET=1)' if triton_interpret() else ''}")
    # impl="auto" is the PyTorch twin off CUDA (resolve_impl's rule); only on CUDA is triton imported to decide
    impl = resolve_impl("auto", dev) if cuda else "torch"
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
    if cmd == "eval":
        from fastpref.eval import main as eval_main

        return eval_main(rest)
    if cmd == "bench":
        from fastpref.benchmarks.runner import main as bench_main

        return bench_main(rest)
    print(f"fastpref: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
