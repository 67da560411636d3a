"""``fastpref train [CONFIG.yaml | --demo] [key=value ...] [--print-config] [--quiet]``.

With no config at all (no file, no ``key=value``; flags aside) the run is the demo, the embedded default
(:func:`embedded_default`): a tiny Llama with a character tokenizer, SFT warm-up then DPO on the bundled letter-run
task, about a minute on 2 CPU cores; ``--demo`` starts from it with overrides. Otherwise the base is the plain
:class:`~fastpref.train.config.Config` defaults (``fastpref train --help``), so ``algorithm=dpo
train.max_steps=40`` runs 40 DPO steps and nothing else. ``key=value`` overrides apply last; TRL's names of common
keys (``learning_rate=1e-5``) are accepted and each mapping is printed once. Problems the user can fix (config keys
and values, bad data rows, unreadable files) end the command with ``fastpref: error: ...`` and exit status 2,
without a traceback.
"""

from __future__ import annotations

import os
import sys

from fastpref.train.config import Config, ConfigError, config_help, dump_config, load_config

USAGE = """usage: fastpref train [CONFIG.yaml | --demo] [key=value ...] [--print-config] [--quiet]

  CONFIG.yaml      YAML config (keys below); without one, key=value overrides start from the defaults below
  --demo           start from the embedded tiny demo (SFT warm-up + DPO), which is also what a bare
                   `fastpref train` runs
  key=value        dotted override, e.g. dpo.beta=0.2 train.max_steps=50 model.lora.enabled=true; TRL's names
                   of common keys work too (learning_rate=1e-5 per_device_train_batch_size=4, docs/data.md)
  --print-config   print the resolved config as YAML and exit
  --quiet          no progress bar: one log line per train.log_every steps
"""


def embedded_default() -> Config:
    """The no-argument run: tiny Llama (random init), 60 SFT warm-up steps then 100 DPO steps on the letter-run
    task, one CPU thread; about 10-15 s on a 2-core CPU, held-out preference accuracy ~0.97-0.99."""
    cfg = Config()
    cfg.algorithm = "dpo"
    cfg.output_dir = "runs/default"
    cfg.data.max_length = 32
    cfg.data.max_prompt_length = 16
    cfg.data.eval_fraction = 0.1
    cfg.sections["dpo"].beta = 0.1
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 5
    cfg.train.sft_warmup_steps = 60
    cfg.train.max_steps = 160
    cfg.train.batch_size = 32
    cfg.train.eval_every = 20
    cfg.train.log_every = 5
    cfg.train.save_every = 80
    cfg.train.cpu_threads = 1
    return cfg


def main(argv: list[str]) -> int:
    """Entry point of ``fastpref train``; returns the exit status."""
    from fastpref.data.dataset import DataError

    args = list(argv)
    if "-h" in args or "--help" in args:
        print(USAGE + "\nconfig keys (the defaults of a run with a YAML file or key=value overrides):\n"
              + config_help())
        return 0
    quiet = "--quiet" in args
    print_cfg = "--print-config" in args
    demo = "--demo" in args
    rest = [a for a in args if a not in ("--quiet", "--print-config", "--demo")]
    path = None
    if rest and "=" not in rest[0] and not rest[0].startswith("--"):
        path, rest = rest[0], rest[1:]
    bad = [a for a in rest if "=" not in a or a.startswith("--")]
    if bad:
        print(f"fastpref: error: unexpected argument {bad[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if demo and path:
        print(f"fastpref: error: --demo and a config file ({path}) exclude each other\n\n{USAGE}", file=sys.stderr)
        return 2
    demo = demo or (path is None and not rest)  # a bare `fastpref train` is the demo
    try:
        notes: list[str] = []
        cfg = load_config(path, rest, base=embedded_default() if demo else None, notes=notes)
        if os.environ.get("RANK", "0") == "0":  # once per run, not per torchrun process
            for note in notes:
                print(f"fastpref: {note}", file=sys.stderr)
        if print_cfg:
            print(dump_config(cfg), end="")
            return 0
        from fastpref.train.trainer import train

        train(cfg, quiet=quiet)
    except (ConfigError, DataError) as e:
        print(f"fastpref: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastpref: interrupted (resume with resume=auto)", file=sys.stderr)
        return 130
    return 0
