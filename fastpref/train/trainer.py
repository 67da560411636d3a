"""The training loop of ``fastpref train``: data, model, reference, optimizer, evaluation, logging, checkpoints.

One optimizer step::

    examples = the step's global batch (train.batch_size * train.grad_accum rows; the order is a function of
               train.seed and the step number only, so a resumed run sees the same batches)
    for micro-batch in algorithm.micro_batches(examples, step):
        loss, metrics = algorithm.compute_loss(micro-batch); backward(loss / n_micro)
    average over ranks, clip, AdamW step, schedule step, algorithm.on_step_end(step)
    (an algorithm's extra modules -- a critic, a reward model -- step their Runtime.build_optimizer optimizers
    themselves; the trainer only tells them the schedule position, runtime.steps_done, and checkpoints them)

With ``train.sft_warmup_steps = W > 0`` steps ``1..W`` run SFT on the chosen responses (constant
``train.sft_warmup_lr``), then the reference is taken from the warmed-up policy and the main algorithm runs with
its own warm-up + cosine/linear schedule. Checkpoints (``checkpoints/step-N``, written and restored by
:class:`fastpref.train.run_state.RunState`) hold the trainable weights, optimizer, scheduler, RNG states, the step
(= data position), the algorithm's state, its extra optimizers (``Runtime.build_optimizer``) and the reference (a
copy's weights, a precomputed cache); ``resume=auto`` restarts from the newest intact one and truncates
``metrics.jsonl`` to it, so the continued run ends with the same weights and metrics. Their format (safetensors +
JSON, a manifest of checksums), what may change on resume, and which files in ``output_dir`` fastpref may delete:
``fastpref.train.checkpoint``. What is logged and printed (metrics.jsonl, trackers, progress bar):
:class:`fastpref.train.metrics.RunLog`.

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

import logging
import os
import random
import time
from dataclasses import dataclass

import torch

from fastpref.data.dataset import (DataError, LoadReport, Tokenization, identical_pairs, load_examples,
                                   split_examples)
from fastpref.train import checkpoint as ckpt
from fastpref.train.algorithms.base import ALGORITHMS, Algorithm, Runtime, load_builtin_algorithms
from fastpref.train.config import Config, ConfigError, check_device_available, dump_config, validate_config
from fastpref.train.distributed import init_process_group, make_parallel, parallel_kind
from fastpref.train.metrics import RunLog, count_tokens, mean_metrics
from fastpref.train.modeling import build_model, build_tokenizer, check_logits
from fastpref.train.precision import Precision
from fastpref.train.reference import cache_key, make_reference, weights_sha256
from fastpref.train.run_state import RunState, seed_all
from fastpref.train.schedule import lr_lambda

log = logging.getLogger("fastpref.train")


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


# ---------------------------------------------------------------------------------------------- the trainer

class Trainer:
    """One training run for a resolved :class:`Config`. ``run()`` trains and returns a :class:`RunResult`."""

    def __init__(self, cfg: Config, *, quiet: bool = False, stop_after: int | None = None):
        self.cfg = cfg
        self.quiet = quiet
        self.stop_after = stop_after  # tests: stop (as if killed) after this step
        self.out = cfg.output_dir
        self.rank, self.world = 0, 1
        self.metrics = RunLog(self.out, quiet=quiet)  # metrics.jsonl, trackers, progress bar, printed lines
        self.metrics_path = self.metrics.path

    def say(self, msg: str) -> None:
        """Print ``msg`` on rank 0 (through the progress bar while it runs)."""
        self.metrics.say(msg)

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

    # ---- checkpoints (written and restored by fastpref.train.run_state; the format: fastpref.train.checkpoint)
    def _save(self, step: int) -> None:
        t = self.cfg.train
        self.run_state.save(step, par=self.par, algo=self.algo, runtime=self.rt, reference=self.reference,
                            trainer_state={"data_position": step * t.batch_size * t.grad_accum,
                                           "reference_taken": self.ref_taken, **self.snapshot})

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
        return {f"eval/{k}": v for k, v in mean_metrics(items).items()}

    # ---- the run
    def run(self) -> RunResult:
        cfg = self.cfg
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
        self.metrics.rank, self.metrics.world, self.metrics.device = self.rank, self.world, self.device
        self.par = make_parallel(cfg, kind, self.device, self.rank, self.world)
        self.amp = Precision(cfg, self.device)  # autocast of train.precision (the fp16 scaler is self.par.scaler)
        seed_all(cfg.train.seed)
        tokenizer = build_tokenizer(cfg)
        self._load_data(algo_cls, tokenizer)            # bad data stops the run here, before any training
        ref_mode = self._reference_mode(algo_cls)
        self.par.check_reference(ref_mode)
        self.data_fp = ckpt.data_fingerprint(cfg, self.train_ex + self.eval_ex)
        self.snapshot = ckpt.run_snapshot(cfg, self.par.checkpoint_format, self.world, self.data_fp)
        # which checkpoint (verified, with fallback), config changes, a finished run, may output_dir be written:
        # decided (by rank 0, for every rank) reading only, before anything is written
        plan = ckpt.plan_start(cfg, self.snapshot, self._total_steps(), self.say, rank=self.rank, world=self.world)
        self.rundir = plan.rundir
        if plan.finished is not None:
            self.say(plan.finished)
            return RunResult(self.rundir.finished["step"], {}, {}, time.time() - t0, self.out)
        self.run_state = RunState(self.out, rank=self.rank, world=self.world, rundir=self.rundir,
                                  keep=cfg.train.keep_checkpoints, say=self.say)
        self.run_state.barrier()
        if self.rank == 0:
            self.rundir.start(fresh=plan.resume is None)  # a fresh start clears fastpref's own outputs only
            with open(os.path.join(self.out, "config.yaml"), "w") as fh:
                fh.write(dump_config(cfg))
            self.rundir.own("config.yaml")
            self.rundir.own("metrics.jsonl")
        self.run_state.barrier()

        self._build_model = lambda: build_model(cfg, tokenizer, algo_cls.model_kind, say=self.say)
        model = self._build_model().to(self.device)
        if algo_cls.model_kind == "causal_lm":  # the fused path must give the model's own log-probs, or refuse
            check_logits(model, pack=cfg.data.pack)
        self.model = self.par.wrap(model)
        self.model.train()
        self.reference = make_reference(ref_mode, self.model)
        self.rt = rt = Runtime(cfg=cfg, model=self.model, tokenizer=tokenizer, device=self.device,
                               reference=self.reference, rank=self.rank, world=self.world,
                               train_examples=self.train_ex, total_steps=self._total_steps())
        try:
            self.algo = algo_cls(cfg, rt)
        except ValueError as e:  # a loss option the loss rejects at construction
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
            start, self.ref_taken = self.run_state.load(plan.resume, par=self.par, algo=self.algo, runtime=rt,
                                                        reference=self.reference, device=self.device,
                                                        copy_reference=self._copy_reference)
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

        self.metrics.open(cfg, start=start, total=total, own=self.rundir.own)  # trackers, progress bar (rank 0)
        self.say(f"fastpref train: algorithm={cfg.algorithm} model={cfg.model.name_or_path} "
                 f"({n_params / 1e6:.2f}M trainable) reference={ref_mode} train={len(self.train_ex)} "
                 f"eval={len(self.eval_ex)} steps={total} device={self.device} parallel={kind}x{self.world}")

        last_train: dict = {}
        last_eval: dict = {}
        if start == 0 and cfg.train.eval_every:  # the baseline point of the eval curves
            self.metrics.eval_record(0, self.evaluate(warm_algo if warm else self.algo), echo=False)
        self.metrics.tokens.reset()  # the tokens/s window
        for step in range(start + 1, total + 1):
            in_warmup = step <= warm
            if not in_warmup and not self.ref_taken:
                self._take_reference()
            algo = warm_algo if in_warmup else self.algo
            examples = self._global_batch(step)
            algo.step_metrics = {}
            rt.steps_done = step - 1  # the extra optimizers' position in the run's schedule
            with self.amp.autocast():  # on-line algorithms roll out and score old / reference log-probs here
                micro = algo.micro_batches(examples, step)
            items = []
            for i, mb in enumerate(micro):
                self.par.begin_micro(last=i == len(micro) - 1)
                with self.amp.autocast():
                    loss, metrics = algo.compute_loss(mb)
                self.par.backward(loss / len(micro))
                rows = mb.num_seqs
                items.append((rows, {"loss": loss.detach(), **metrics}))
            lr = self.opt.param_groups[0]["lr"]
            gnorm = self.par.step()  # reduce over ranks, clip, AdamW and schedule step
            algo.on_step_end(step)
            self.metrics.tokens.add(rt.step_tokens or count_tokens(examples))
            rt.step_tokens = None

            if step % cfg.train.log_every == 0 or step == total:
                rec = self.metrics.train_record(step, "sft_warmup" if in_warmup else cfg.algorithm, items, lr=lr,
                                                grad_norm=gnorm, loss_scale=self.par.loss_scale,
                                                step_metrics=algo.step_metrics)
                from fastpref.train.diagnostics import observe  # warnings + diag/* flags (docs/trainer.md)

                rec.update(observe(self, rec, step))
                self.metrics.write(rec)
                self.metrics.show(rec)
                last_train = rec
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
                ev = self.evaluate(algo)
                self.metrics.eval_record(step, ev)
                last_eval = ev or last_eval
            if cfg.train.save_every and (step % cfg.train.save_every == 0 or step == total):  # the last one: a longer
                # train.max_steps later continues from the end, not from the last periodic checkpoint
                self._save(step)
            self.metrics.advance()
            if self.stop_after is not None and step >= self.stop_after:
                self.metrics.close()
                self.run_state.barrier()  # no rank leaves (and tears its process group down) while another talks
                return RunResult(step, last_train, last_eval, time.time() - t0, self.out)

        self.metrics.close()
        state = self.par.final_state()  # full weights (a collective under FSDP / ZeRO-3), None: the model's own
        if self.rank != 0:
            self.run_state.barrier()
            return RunResult(total, last_train, last_eval, time.time() - t0, self.out)
        self.run_state.save_final(self.model, tokenizer, state, self.algo)
        self.rundir.finish(total, self.snapshot)  # a rerun of the same command says it is finished
        self.run_state.barrier()
        if cfg.train.plots:
            from fastpref.train.plots import plot_metrics

            plots = os.path.join(self.out, "plots")
            self.rundir.own("plots", [os.path.relpath(p, plots) for p in plot_metrics(self.metrics_path, plots)])
        secs = time.time() - t0
        self.metrics.summary(last_eval, self.eval_rows, total, secs)
        return RunResult(total, last_train, last_eval, secs, self.out)


def dataclass_dict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def train(cfg: Config, *, quiet: bool = False) -> RunResult:
    """Run ``cfg`` to the end (or resume it) and return the :class:`RunResult`."""
    return Trainer(cfg, quiet=quiet).run()
