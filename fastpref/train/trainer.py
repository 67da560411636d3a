"""The training loop of ``fastpref train``: data, model, reference, optimizer, evaluation, logging, checkpoints.

One optimizer step::

    examples = the step's global batch (train.batch_size * train.grad_accum rows; the order is a function of
               train.seed and the step number only, so a resumed run sees the same batches)
    for micro-batch in algorithm.micro_batches(examples, step):
        loss, metrics = algorithm.compute_loss(micro-batch); backward(loss / n_micro)
    average over ranks, clip, AdamW step, schedule step, algorithm.on_step_end(step)

With ``train.sft_warmup_steps = W > 0`` steps ``1..W`` run SFT on the chosen responses (constant
``train.sft_warmup_lr``), then the reference is taken from the warmed-up policy and the main algorithm runs with
its own warm-up + cosine/linear schedule. Checkpoints (``checkpoints/step-N``) are written to a temporary
directory and renamed into place, and hold the trainable weights, optimizer, scheduler, RNG states, the step
(= data position), the algorithm's state and the reference (a copy's weights, a precomputed cache); ``resume=auto``
restarts from the newest intact one and truncates ``metrics.jsonl`` to it, so the continued run ends with the same
weights and metrics. Their format (safetensors + JSON, a manifest of checksums), what may change on resume, and
which files in ``output_dir`` fastpref may delete: ``fastpref.train.checkpoint``.

Scale-out (``fastpref.train.distributed``, ``docs/distributed.md``): launched by ``torchrun`` or ``deepspeed``
(``WORLD_SIZE`` set), each step's global batch is ``batch_size * grad_accum * world_size`` rows and rank ``r``
trains on its contiguous share, so the update equals a single process running ``grad_accum * world_size``
micro-batches of the same rows. The backend object (``self.par``) owns what differs: plain DDP averages the
gradients with one flattened all-reduce; ``train.fsdp`` shards the model with FSDP2 and keeps the LM head gathered
for the fused losses; ``train.deepspeed`` hands AdamW and the schedule to a DeepSpeed ZeRO engine. Checkpoints and
``final/`` hold full weights (DeepSpeed checkpoints: each rank's ZeRO partition). Logged metrics are averaged over
ranks; rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch

from fastpref.data.dataset import (DataError, LoadReport, Tokenization, identical_pairs, load_examples,
                                   split_examples)
from fastpref.train import checkpoint as ckpt
from fastpref.train.algorithms.base import ALGORITHMS, Algorithm, Runtime, load_builtin_algorithms
from fastpref.train.config import Config, config_to_dict, ConfigError, check_device_available, dump_config, validate_config
from fastpref.train.distributed import all_reduce_mean, init_process_group, make_parallel, parallel_kind
from fastpref.train.modeling import build_model, build_tokenizer, check_logits
from fastpref.train.precision import Precision
from fastpref.train.reference import cache_key, make_reference, weights_sha256
from fastpref.train.schedule import lr_lambda
from fastpref.train.reporting import Reporter, check_report_to

log = logging.getLogger("fastpref.train")

_CKPT = "checkpoints"


@dataclass
class RunResult:
    """What :func:`train` returns: the last logged train metrics, the last eval metrics, and timings."""

    step: int
    train: dict
    eval: dict
    seconds: float
    output_dir: str


# ------------------------------------------------------------------------------------------------ helpers

def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(cfg.train.device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _rng_state() -> dict:
    import numpy as np

    st = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tokens(examples: list[dict]) -> int:
    n = 0
    for e in examples:
        resp = [len(v) for k, v in e.items() if k.endswith("_ids") and k != "prompt_ids"]
        n += sum(resp) + len(e.get("prompt_ids", ())) * max(1, len(resp))
    return n


def _mean_metrics(items: list[tuple[int, dict]]) -> dict[str, float]:
    """Weighted means (weights = examples per micro-batch) of metric dicts of tensors or floats."""
    tot: dict[str, float] = {}
    wsum: dict[str, float] = {}
    for w, m in items:
        for k, v in m.items():
            v = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
            if math.isnan(v):
                continue
            tot[k] = tot.get(k, 0.0) + w * v
            wsum[k] = wsum.get(k, 0.0) + w
    return {k: tot[k] / wsum[k] for k in tot}


# ---------------------------------------------------------------------------------------------- the trainer

class Trainer:
    """One training run for a resolved :class:`Config`. ``run()`` trains and returns a :class:`RunResult`."""

    def __init__(self, cfg: Config, *, quiet: bool = False, stop_after: int | None = None):
        self.cfg = cfg
        self.quiet = quiet
        self.stop_after = stop_after  # tests: stop (as if killed) after this step
        self.out = cfg.output_dir
        self.rank, self.world = 0, 1
        self._bar = None

    # ---- printing
    def say(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    # ---- set-up
    def _load_data(self, algo_cls: type[Algorithm], tokenizer) -> None:
        cfg, d = self.cfg, self.cfg.data
        tok = Tokenization(tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                           truncation=d.truncation, chat_template=d.chat_template)
        kind = algo_cls.data_kind
        report = LoadReport()
        common = dict(fmt=d.format, on_bad_row=d.on_bad_row, report=report)
        spec = getattr(cfg.sections.get(cfg.algorithm), "reward", None)
        if spec:  # the columns the reward function reads (e.g. answer) must be in every row, checked now
            from fastpref.rewards import get_reward_fn, reward_columns

            fn = get_reward_fn(spec)
            common.update(columns=reward_columns(fn),
                          columns_for=f"{cfg.algorithm}.reward={getattr(fn, '__name__', spec)}")
        if d.train_files:
            train = load_examples(d.train_files, kind, tok, **common)
        else:
            from fastpref.data.synthetic import make_pattern_rows

            train = load_examples([], kind, tok, rows_override=make_pattern_rows(d.synthetic_rows, kind,
                                                                                 seed=cfg.train.seed), **common)
        if d.eval_files:
            held = load_examples(d.eval_files, kind, tok, **common)
        else:
            train, held = split_examples(train, d.eval_fraction, cfg.train.seed)
        if report.skipped:
            self.say(f"data: skipped {report.skipped} of {report.rows} rows (data.on_bad_row=skip); first: "
                     f"{report.reasons[0]}")
        if not train:
            where = ", ".join(d.train_files) or "the synthetic task"
            raise DataError(f"no usable training rows in {where}: {report.rows} rows read"
                            + (f", {report.skipped} skipped (first: {report.reasons[0]})" if report.skipped else ""))
        same = identical_pairs(train)
        if same:  # no preference signal in those pairs; in all of them the run cannot learn
            self.say(f"warning: chosen == rejected in {'every one' if len(same) == len(train) else len(same)} of the "
                     f"{len(train)} training pairs (first: {same[0]['source']}): such pairs carry no preference"
                     + (", so this run cannot learn" if len(same) == len(train) else ""))
        for i, e in enumerate(train + held):
            e["uid"] = i
        self.train_ex, self.eval_ex, self.report = train, held, report
        self.eval_rows = len(held)  # rows the last evaluation used (train.eval_batches may cap it)

    def _reference_mode(self, algo_cls) -> str:
        mode = self.cfg.reference.mode
        if mode != "auto":
            if algo_cls.needs_reference and mode == "none":
                raise ConfigError(f"algorithm={self.cfg.algorithm} needs a reference: reference.mode=none is not "
                                  "possible (use copy, lora_base or precompute)")
            return mode
        if not algo_cls.needs_reference:
            return "none"
        return "lora_base" if self.cfg.model.lora.enabled else "copy"

    def _global_batch(self, step: int) -> list[dict]:
        """This rank's share of the step's global batch (a pure function of seed, step and world size)."""
        n = len(self.train_ex)
        gbs = self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world
        spe = max(1, n // gbs)
        epoch, j = divmod(step - 1, spe)
        perm = list(range(n))
        random.Random(self.cfg.train.seed * 100003 + epoch).shuffle(perm)
        rows = perm[j * gbs:(j + 1) * gbs]
        share = -(-len(rows) // self.world)
        return [self.train_ex[i] for i in rows[self.rank * share:(self.rank + 1) * share]]

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        gbs = t.batch_size * t.grad_accum * self.world
        return t.sft_warmup_steps + t.epochs * max(1, len(self.train_ex) // gbs)

    # ---- checkpoints (format, verification and what may change on resume: fastpref.train.checkpoint)
    def _save(self, step: int) -> None:
        root = os.path.join(self.out, _CKPT)
        final = os.path.join(root, f"step-{step}")
        tmp = os.path.join(root, f".tmp-step-{step}")
        if self.rank == 0:
            self.rundir.own(_CKPT)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        self.par.save_checkpoint(tmp)  # model, optimizer, schedule (a collective under FSDP / DeepSpeed)
        ref_state = self.reference.state_dict()
        self._barrier()
        if self.rank != 0:
            self._barrier()
            return
        ckpt.save_state(tmp, "rng", _rng_state())
        ckpt.save_state(tmp, "algorithm", {"main": self.algo.state_dict(), "reference": ref_state})
        with open(os.path.join(tmp, ckpt.TRAINER_STATE), "w") as fh:
            json.dump({"step": step, "data_position": step * self.cfg.train.batch_size * self.cfg.train.grad_accum,
                       "reference_taken": self.ref_taken, **self.snapshot}, fh)
        ckpt.write_manifest(tmp)  # last: every file with its size and sha256
        if os.path.exists(final) and not ckpt.remove_checkpoint(final, self.say):
            raise ckpt.CheckpointError(f"{final}: cannot be replaced: it holds files fastpref did not write")
        os.replace(tmp, final)
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for _, old in ckpt.checkpoint_dirs(root)[:-keep]:
                ckpt.remove_checkpoint(old, self.say)
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _load(self, resume: ckpt.Resume) -> int:
        """Restore the verified checkpoint ``resume`` (every rank); returns its step."""
        path, st = resume.path, resume.state
        try:
            self.par.load_checkpoint(path)
            algo_state = ckpt.load_state(path, "algorithm", self.device)
            self.algo.load_state_dict(algo_state["main"])
            self.ref_taken = st["reference_taken"]
            if self.ref_taken:
                if self.reference.needs_copy:
                    self._copy_reference()
                self.reference.load_state_dict(algo_state["reference"])  # a copy's weights, a precomputed cache
            _set_rng_state(ckpt.load_state(path, "rng"))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            if isinstance(e, (ConfigError, torch.OutOfMemoryError)):
                raise
            raise ckpt.CheckpointError(f"resume: {path} does not fit this run ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        return st["step"]

    # ---- reference
    def _precompute(self) -> None:
        cfg = self.cfg
        parts = {"model": dataclass_dict(cfg.model), "train": dataclass_dict(cfg.train),
                 "optim": dataclass_dict(cfg.optim), "data": dataclass_dict(cfg.data)}
        key = cache_key(parts, self.train_ex + self.eval_ex, weights=weights_sha256(self.model), data=self.data_fp)
        cache_dir = cfg.reference.cache_dir or os.path.join(self.out, "ref_cache")
        if self.rank == 0 and not cfg.reference.cache_dir:
            self.rundir.own("ref_cache")
        if self.world > 1:  # every rank computes (FSDP / ZeRO-3 forwards are collectives) and writes its own file
            cache_dir = os.path.join(cache_dir, f"rank-{self.rank}")
        with self.amp.autocast():
            self.reference.precompute(self.train_ex + self.eval_ex, self.algo.collate, cfg.train.batch_size,
                                      cache_dir, key, log=self.say)

    def _copy_reference(self) -> None:
        """``reference.mode=copy``: a frozen copy of the current policy (gathered, unsharded, under FSDP)."""
        self.reference.take(self.par.frozen_copy(self._build_model))  # None: the reference deep-copies the policy

    def _take_reference(self) -> None:
        if self.reference.needs_copy:
            self._copy_reference()
        elif self.reference.precomputed:
            self._precompute()
        self.ref_taken = True

    # ---- evaluation and logging
    @torch.no_grad()
    def evaluate(self, algo: Algorithm) -> dict[str, float]:
        if not self.eval_ex:
            return {}
        self.model.eval()
        bs = self.cfg.train.batch_size
        items = []
        self.eval_rows = 0
        for i in range(0, len(self.eval_ex), bs):
            if self.cfg.train.eval_batches and i // bs >= self.cfg.train.eval_batches:
                break
            chunk = self.eval_ex[i:i + bs]
            with self.amp.autocast():
                items.append((len(chunk), algo.eval_metrics(algo.collate(chunk))))
            self.eval_rows += len(chunk)
        self.model.train()
        return {f"eval/{k}": v for k, v in _mean_metrics(items).items()}

    def _write(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.log(record)

    # ---- the run
    def run(self) -> RunResult:
        cfg = self.cfg
        self._bar = None
        t0 = time.time()
        validate_config(cfg)  # a Config built in code gets the checks load_config does, before anything is built
        check_device_available(cfg.train.device)
        load_builtin_algorithms()
        algo_cls = ALGORITHMS[cfg.algorithm]
        self.device = _device(cfg)
        if self.device.type == "cpu" and cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        kind = parallel_kind(cfg)
        self.rank, self.world = init_process_group(kind, self.device)
        self.par = make_parallel(cfg, kind, self.device, self.rank, self.world)
        self.amp = Precision(cfg, self.device)  # autocast of train.precision (the fp16 scaler is self.par.scaler)
        _seed_all(cfg.train.seed)
        tokenizer = build_tokenizer(cfg)
        self._load_data(algo_cls, tokenizer)            # bad data stops the run here, before any training
        ref_mode = self._reference_mode(algo_cls)
        self.par.check_reference(ref_mode)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.data_fp = ckpt.data_fingerprint(cfg, self.train_ex + self.eval_ex)
        self.snapshot = ckpt.run_snapshot(cfg, self.par.checkpoint_format, self.world, self.data_fp)
        # which checkpoint (verified, with fallback), config changes, a finished run, may output_dir be written:
        # decided (by rank 0, for every rank) reading only, before anything is written
        plan = ckpt.plan_start(cfg, self.snapshot, self._total_steps(), self.say, rank=self.rank, world=self.world)
        self.rundir = plan.rundir
        if plan.finished is not None:
            self.say(plan.finished)
            return RunResult(self.rundir.finished["step"], {}, {}, time.time() - t0, self.out)
        self._barrier()
        if self.rank == 0:
            self.rundir.start(fresh=plan.resume is None)  # a fresh start clears fastpref's own outputs only
            with open(os.path.join(self.out, "config.yaml"), "w") as fh:
                fh.write(dump_config(cfg))
            self.rundir.own("config.yaml")
            self.rundir.own("metrics.jsonl")
        self._barrier()

        self._build_model = lambda: build_model(cfg, tokenizer, algo_cls.model_kind, say=self.say)
        model = self._build_model().to(self.device)
        if algo_cls.model_kind == "causal_lm":  # the fused path must give the model's own log-probs, or refuse
            check_logits(model, pack=cfg.data.pack)
        self.model = self.par.wrap(model)
        self.model.train()
        self.reference = make_reference(ref_mode, self.model)
        rt = Runtime(cfg=cfg, model=self.model, tokenizer=tokenizer, device=self.device, reference=self.reference,
                     extras={"train_examples": self.train_ex}, total_steps=self._total_steps())
        try:
            self.algo = algo_cls(cfg, rt)
        except ValueError as e:  # a loss option the loss rejects (e.g. an unknown loss.type)
            raise ConfigError(f"algorithm={cfg.algorithm}: {e}") from None
        warm_algo = ALGORITHMS["sft"](cfg, rt) if cfg.train.sft_warmup_steps else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        total = self._total_steps()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, total))
        n_params = sum(p.numel() for p in params)
        self.par.attach(self.opt, self.sched)
        self.ref_taken = False
        start = 0
        if plan.resume is not None:
            start = self._load(plan.resume)
            if ckpt.schedule_changed(plan.changes):  # a new optim.lr / schedule / length takes effect now
                ckpt.retarget_lr(self.sched, o.lr)
            if self.rank == 0:
                ckpt.truncate_metrics(self.metrics_path, start, self.say)
            self.say(f"resumed from {plan.resume.path} (step {start})")
            if plan.changes:
                self.say("resume: changed since the checkpoint, in effect from now on: " + "; ".join(plan.changes))
        warm = cfg.train.sft_warmup_steps
        if not self.ref_taken and start >= warm:
            self._take_reference()
        self.algo.on_train_start()

        self.tb = None  # the run's trackers (train.report_to), rank 0 only; metrics.jsonl is always written
        if self.rank == 0:
            self.tb = Reporter(check_report_to(cfg.train.report_to), self.out, config=config_to_dict(cfg),
                               run_name=os.path.basename(os.path.abspath(self.out)), start_step=start,
                               own=self.rundir.own)
        if not self.quiet and self.rank == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc=cfg.algorithm, dynamic_ncols=True)
        self.say(f"fastpref train: algorithm={cfg.algorithm} model={cfg.model.name_or_path} "
                 f"({n_params / 1e6:.2f}M trainable) reference={ref_mode} train={len(self.train_ex)} "
                 f"eval={len(self.eval_ex)} steps={total} device={self.device} parallel={kind}x{self.world}")

        last_train: dict = {}
        last_eval: dict = {}
        if start == 0 and cfg.train.eval_every:  # the baseline point of the eval curves
            ev = self.evaluate(warm_algo if warm else self.algo)
            if ev:
                self._write({"step": 0, "phase": "eval", **ev})
        tok_count, t_window = 0, time.time()
        for step in range(start + 1, total + 1):
            in_warmup = step <= warm
            if not in_warmup and not self.ref_taken:
                self._take_reference()
            algo = warm_algo if in_warmup else self.algo
            examples = self._global_batch(step)
            algo.step_metrics = {}
            with self.amp.autocast():  # on-line algorithms roll out and score old / reference log-probs here
                micro = algo.micro_batches(examples, step)
            items = []
            for i, mb in enumerate(micro):
                self.par.begin_micro(last=i == len(micro) - 1)
                with self.amp.autocast():
                    loss, metrics = algo.compute_loss(mb)
                self.par.backward(loss / len(micro))
                rows = mb["cu_seqlens"].numel() - 1 if "cu_seqlens" in mb else mb["input_ids"].shape[0]
                items.append((rows, {"loss": loss.detach(), **metrics}))
            lr = self.opt.param_groups[0]["lr"]
            gnorm = self.par.step()  # reduce over ranks, clip, AdamW and schedule step
            algo.on_step_end(step)
            tok_count += algo.step_metrics.pop("tokens", None) or _tokens(examples)

            if step % cfg.train.log_every == 0 or step == total:
                rec = {"step": step, "phase": "sft_warmup" if in_warmup else cfg.algorithm,
                       **self._ranks_mean(_mean_metrics(items)), "lr": lr}
                if gnorm is not None:
                    rec["grad_norm"] = float(gnorm)
                if self.par.loss_scale is not None:
                    rec["amp/loss_scale"] = self.par.loss_scale
                rec.update({k: float(v) for k, v in algo.step_metrics.items()})
                dt = max(time.time() - t_window, 1e-9)
                rec["tokens_per_s"] = tok_count / dt
                tok_count, t_window = 0, time.time()
                from fastpref.train.diagnostics import observe  # warnings + diag/* flags (docs/trainer.md)

                rec.update(observe(self, rec, step))
                self._write(rec)
                last_train = rec
                if self._bar is not None:
                    post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                    for k in ("rewards/accuracies", "rewards/margins", "accuracy"):
                        if k in rec:
                            post[k.split("/")[-1][:6]] = f"{rec[k]:.3f}"
                    self._bar.set_postfix(post, refresh=False)
                else:
                    self.say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in rec.items()))
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
                ev = self.evaluate(algo)
                if ev:
                    self._write({"step": step, "phase": "eval", **ev})
                    last_eval = ev
                    self.say(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
            if cfg.train.save_every and (step % cfg.train.save_every == 0 or step == total):  # the last one: a longer
                # train.max_steps later continues from the end, not from the last periodic checkpoint
                self._save(step)
            if self._bar is not None:
                self._bar.update(1)
            if self.stop_after is not None and step >= self.stop_after:
                self._close()
                self._barrier()  # no rank leaves (and tears its process group down) while another still talks to it
                return RunResult(step, last_train, last_eval, time.time() - t0, self.out)

        self._close()
        state = self.par.final_state()  # full weights (a collective under FSDP / ZeRO-3), None: the model's own
        if self.rank != 0:
            self._barrier()
            return RunResult(total, last_train, last_eval, time.time() - t0, self.out)
        self._save_final(tokenizer, state, self.algo)
        self.rundir.finish(total, self.snapshot)  # a rerun of the same command says it is finished
        self._barrier()
        if cfg.train.plots:
            from fastpref.train.plots import plot_metrics

            plots = os.path.join(self.out, "plots")
            self.rundir.own("plots", [os.path.relpath(p, plots) for p in plot_metrics(self.metrics_path, plots)])
        secs = time.time() - t0
        acc = last_eval.get("eval/rewards/accuracies", last_eval.get("eval/accuracy"))
        if acc is not None:
            print(f"held-out preference accuracy: {acc:.3f}  ({self.eval_rows} pairs, step {total}, {secs:.1f}s) "
                  f"-> {self.out}", flush=True)
        else:
            print(f"done: step {total}, {secs:.1f}s -> {self.out}", flush=True)
        return RunResult(total, last_train, last_eval, secs, self.out)

    def _ranks_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """``metrics`` averaged over ranks (every rank logs the same keys: same algorithm, same batch shape)."""
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        all_reduce_mean([t])
        return dict(zip(keys, t.tolist()))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def _save_final(self, tokenizer, state: dict | None, algo: Algorithm) -> None:
        final = os.path.join(self.out, "final")
        tmp = os.path.join(self.out, ".tmp-final")
        self.rundir.own(".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, **({} if state is None else {"state_dict": state}))
        tokenizer.save_pretrained(tmp)
        algo.save_final(tmp)
        self.rundir.own("final", ckpt.files_below(tmp))  # recorded before the rename: the marker never lags
        shutil.rmtree(final, ignore_errors=True)  # (plan_start refused a final/ holding files fastpref did not write)
        os.replace(tmp, final)


def dataclass_dict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def train(cfg: Config, *, quiet: bool = False) -> RunResult:
    """Run ``cfg`` to the end (or resume it) and return the :class:`RunResult`."""
    return Trainer(cfg, quiet=quiet).run()
