"""Guard rails: every bad config value, combination and data file ends ``fastpref train`` with one line
``fastpref: error: ...`` naming the key (or the file, row and field), exit status 2, no traceback, before any
model is built and before anything is written to ``output_dir``; runs that cannot learn print a warning first.

Each case runs the real CLI (:func:`fastpref.train.cli.main`: YAML/overrides, ``validate_config``, the trainer's
start and data loading) with the model builder replaced by a sentinel, so reaching the model counts as a miss.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastpref.train.trainer as trainer_mod
from fastpref.train.cli import main


class ModelBuilt(Exception):
    """Raised by the stand-in model builder: the run got past every check."""


@pytest.fixture
def no_model(monkeypatch):
    def sentinel(*args, **kwargs):
        raise ModelBuilt()

    monkeypatch.setattr(trainer_mod, "build_model", sentinel)


def _rows(tmp_path, name, rows, *, jsonl=True):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows))
    return str(p)


PAIR = {"prompt": "abc>", "chosen": "def", "rejected": "xyz"}

# (case id, overrides; "{tmp}" is the test's tmp_path, expected substring of the error)
CONFIG_CASES = [
    ("max_grad_norm_negative", ["optim.max_grad_norm=-1"], "optim.max_grad_norm=-1.0: expected a value > 0"),
    ("warmup_covers_all_steps", ["train.sft_warmup_steps=160"],
     "train.sft_warmup_steps=160 >= train.max_steps=160: algorithm=dpo would never run"),
    ("beta_zero", ["dpo.beta=0"], "dpo.beta=0.0: expected a value > 0"),
    ("beta_negative", ["dpo.beta=-0.5"], "dpo.beta=-0.5: expected a value > 0"),
    ("beta_nan", ["dpo.beta=nan"], "dpo.beta=nan: expected a finite number"),
    ("label_smoothing_2", ["dpo.label_smoothing=2"], "dpo.label_smoothing=2.0: expected a value in [0, 0.5)"),
    ("lr_inf", ["optim.lr=inf"], "optim.lr=inf: expected a finite number"),
    ("lr_zero", ["optim.lr=0"], "optim.lr=0.0: expected a value > 0"),
    ("max_steps_inf", ["train.max_steps=inf"], "train.max_steps: expected an integer, got 'inf'"),
    ("batch_size_nan", ["train.batch_size=nan"], "train.batch_size: expected an integer, got 'nan'"),
    ("batch_size_zero", ["train.batch_size=0"], "train.batch_size=0: expected a value > 0"),
    ("betas_above_one", ["optim.betas=[2,0.999]"], "optim.betas[0]=2.0: expected a value in [0, 1)"),
    ("betas_three", ["optim.betas=[0.9,0.99,0.999]"], "optim.betas=[0.9, 0.99, 0.999]: expected two numbers"),
    ("eps_negative", ["optim.eps=-1"], "optim.eps=-1.0: expected a value > 0"),
    ("weight_decay_negative", ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: expected a value >= 0"),
    ("min_lr_ratio_2", ["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2.0: expected a value in [0, 1]"),
    ("schedule_unknown", ["optim.schedule=step"], "optim.schedule='step': expected one of cosine"),
    ("device_tpu", ["train.device=tpu"], "train.device='tpu': expected auto, cpu, cuda or cuda:<index>"),
    ("hidden_size_30", ["model.tiny.hidden_size=30"],
     "model.tiny.hidden_size=30 must be a multiple of model.tiny.num_attention_heads=4"),
    ("head_dim_odd", ["model.tiny.hidden_size=36"], "the head dimension must be even"),
    ("kv_heads_3", ["model.tiny.num_key_value_heads=3"],
     "model.tiny.num_key_value_heads=3 must divide model.tiny.num_attention_heads=4"),
    ("layers_zero", ["model.tiny.num_hidden_layers=0"], "model.tiny.num_hidden_layers=0: expected a value > 0"),
    ("lora_r_zero", ["model.lora.enabled=true", "model.lora.r=0"], "model.lora.r=0: expected a value > 0"),
    ("lora_dropout_1", ["model.lora.dropout=1"], "model.lora.dropout=1.0: expected a value in [0, 1)"),
    ("lora_unknown_module", ["model.lora.enabled=true", "model.lora.target_modules=[nosuch]"],
     "model.lora.target_modules: 'nosuch' is not a module of the tiny Llama"),
    ("lora_no_modules", ["model.lora.enabled=true", "model.lora.target_modules=[]"],
     "model.lora.target_modules is empty"),
    ("lora_base_without_lora", ["reference.mode=lora_base"], "reference.mode=lora_base needs model.lora.enabled"),
    ("output_dir_empty", ["output_dir="], "output_dir is empty"),
    ("output_dir_is_a_file", ["output_dir={tmp}/afile"], "afile is a file, not a directory"),
    ("output_dir_under_a_file", ["output_dir={tmp}/afile/run"], "afile is a file, not a directory"),
    ("chat_template_tiny", ["data.chat_template={{% for m in messages %}}{{{{ m.content }}}}{{% endfor %}}"],
     "data.chat_template: the tiny model's character tokenizer has no chat template"),
    ("synthetic_rows_zero", ["data.synthetic_rows=0"], "data.synthetic_rows=0: expected a value >= 2"),
    ("eval_fraction_one", ["data.eval_fraction=1"], "data.eval_fraction=1.0: expected a value in [0, 1)"),
    ("prompt_longer_than_total", ["data.max_prompt_length=40"], "data.max_prompt_length=40 must be < data.max_length"),
    ("format_unknown", ["data.format=csv"], "data.format='csv': expected one of"),
    ("truncation_unknown", ["data.truncation=cut"], "data.truncation='cut': expected one of"),
    ("dtype_unknown", ["model.dtype=float8"], "model.dtype='float8': expected one of"),
    ("grad_accum_zero", ["train.grad_accum=0"], "train.grad_accum=0: expected a value > 0"),
    ("epochs_zero", ["train.epochs=0"], "train.epochs=0: expected a value > 0"),
    ("log_every_zero", ["train.log_every=0"], "train.log_every=0: expected a value > 0"),
    ("save_every_negative", ["train.save_every=-1"], "train.save_every=-1: expected a value >= 0"),
    ("seed_negative", ["train.seed=-3"], "train.seed=-3: expected a value >= 0"),
    ("cpu_threads_zero", ["train.cpu_threads=0"], "train.cpu_threads=0: expected a value > 0"),
    ("warmup_lr_zero", ["train.sft_warmup_lr=0"], "train.sft_warmup_lr=0.0: expected a value > 0"),
    ("loss_type_unknown", ["dpo.loss_type=nosuch"], "dpo.loss_type='nosuch' is not a dpo loss type"),
    ("exo_pair_without_smoothing", ["dpo.loss_type=exo_pair"], "'exo_pair' needs 0 < label_smoothing < 1"),
    ("kto_weight_zero", ["algorithm=kto", "kto.desirable_weight=0"],
     "kto.desirable_weight=0.0: expected a value > 0"),
    ("kto_precompute", ["algorithm=kto", "reference.mode=precompute"], "reference.mode=precompute is not supported"),
    ("rm_loss_type", ["algorithm=rm", "rm.loss_type=sigmoid"], "rm.loss_type='sigmoid': expected one of"),
    ("grpo_temperature_zero", ["algorithm=grpo", "grpo.generation.temperature=0"],
     "grpo.generation.temperature must be > 0"),
    ("grpo_top_p_2", ["algorithm=grpo", "grpo.generation.top_p=2"], "grpo.generation.top_p must be in (0, 1]"),
    ("grpo_beta_negative", ["algorithm=grpo", "grpo.beta=-1"], "grpo.beta must be >= 0"),
    ("grpo_beta_nan", ["algorithm=grpo", "grpo.beta=nan"], "grpo.beta=nan: expected a finite number"),
    ("grpo_one_generation", ["algorithm=grpo", "grpo.generation.num_generations=1"],
     "generation.num_generations >= 2"),
    ("grpo_unknown_reward", ["algorithm=grpo", "grpo.reward=nosuch"], "grpo.reward='nosuch': reward: unknown"),
    ("grpo_reward_module_missing", ["algorithm=grpo", "grpo.reward=no_such_module:fn"],
     "grpo.reward='no_such_module:fn': reward: cannot load"),
    ("online_dpo_beta_zero", ["algorithm=online_dpo", "online_dpo.beta=0"], "online_dpo.beta must be > 0"),
    ("comma_is_one_path", ["data.train_files={tmp}/a,b.jsonl"], "a,b.jsonl: no such file or directory"),
]
if torch.cuda.is_available():
    CONFIG_CASES.append(("device_index_too_high", ["train.device=cuda:99"], "train.device='cuda:99': this machine"))
else:
    CONFIG_CASES.append(("device_cuda_on_cpu", ["train.device=cuda"], "train.device='cuda': no CUDA device"))


def _run(tmp_path, argv, capsys):
    """``fastpref train ARGV`` (output_dir under tmp_path unless given); ``(status, stdout, stderr, out_dir)``."""
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={out}")
    rc = main(argv if any(a.endswith(".yaml") for a in argv) else ["--demo", *argv])  # the demo + overrides
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, out


def _assert_refused(rc, err, out, needle):
    assert rc == 2, err
    assert err.startswith("fastpref: error: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("overrides, needle", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value_is_one_line_naming_the_key(tmp_path, capsys, no_model, overrides, needle):
    (tmp_path / "afile").write_text("not a directory")
    rc, _, err, out = _run(tmp_path, list(overrides), capsys)
    _assert_refused(rc, err, out, needle)


def _yaml_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"loss:\n  beta: 0.1\n# caf\xe9\n")
    return [str(p)], "c.yaml: not UTF-8 text"


def _yaml_duplicate_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  beta: 0.1\n  beta: 0.2\n")
    return [str(p)], "c.yaml: line 3: duplicate key 'beta' (first given on line 2)"


def _json_deep(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    return [f"data.train_files=[{p}]"], "deep.json: JSON nested too deeply to read"


def _jsonl_deep_row(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text(json.dumps(PAIR) + "\n" + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return [f"data.train_files=[{p}]"], "deep.jsonl: line 2 (row 1): JSON nested too deeply"


def _json_duplicate_key(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"prompt": "a>", "chosen": "b", "rejected": "c"}, {"prompt": "a>", "chosen": "b", "chosen": "c"}]')
    return [f"data.train_files=[{p}]"], "d.json: row 1: duplicate key 'chosen'"


def _jsonl_duplicate_key(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(PAIR) + "\n" + '{"prompt": "a>", "prompt": "b>", "chosen": "x", "rejected": "y"}\n')
    return [f"data.train_files=[{p}]"], "d.jsonl: line 2 (row 1): duplicate key 'prompt'"


def _data_not_utf8(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9>", "chosen": "a", "rejected": "b"}\n')
    return [f"data.train_files=[{p}]"], "latin1.jsonl: not UTF-8 text"


def _grpo_without_answer(tmp_path):
    path = _rows(tmp_path, "prompts.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    return ["algorithm=grpo", f"data.train_files=[{path}]"], \
        "prompts.jsonl: row 0: field 'answer': missing (grpo.reward=arith_reward needs it)"


def _empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    return [f"data.train_files=[{p}]"], f"no usable training rows in {p}: 0 rows read"


def _all_skipped(tmp_path):
    path = _rows(tmp_path, "bad.jsonl", [{"prompt": "a>", "chosen": "b"}] * 3)
    return [f"data.train_files=[{path}]", "data.on_bad_row=skip"], \
        f"no usable training rows in {path}: 3 rows read, 3 skipped (first: {path}: row 0: field 'rejected'"


def _bad_row(tmp_path):
    path = _rows(tmp_path, "d.jsonl", [PAIR, {"prompt": "a>", "chosen": 3, "rejected": "b"}])
    return [f"data.train_files=[{path}]"], "d.jsonl: row 1: field 'chosen': expected a string, got int"


FILE_CASES = [_yaml_not_utf8, _yaml_duplicate_key, _json_deep, _jsonl_deep_row, _json_duplicate_key,
              _jsonl_duplicate_key, _data_not_utf8, _grpo_without_answer, _empty_file, _all_skipped, _bad_row]


@pytest.mark.parametrize("make", FILE_CASES, ids=[f.__name__[1:] for f in FILE_CASES])
def test_bad_file_is_one_line_naming_file_row_field(tmp_path, capsys, no_model, make):
    argv, needle = make(tmp_path)
    rc, _, err, out = _run(tmp_path, argv, capsys)
    _assert_refused(rc, err, out, needle)


def test_valid_config_reaches_the_model(tmp_path, capsys, no_model):
    """The control: without a bad value the same path gets to the model builder (so a missed check fails)."""
    path = _rows(tmp_path, "ok.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 4)
    for argv in ([], ["algorithm=grpo", f"data.train_files=[{path}]"], ["algorithm=sft", "train.sft_warmup_steps=160"]):
        with pytest.raises(ModelBuilt):
            _run(tmp_path, list(argv), capsys)


@pytest.mark.parametrize("n_same, needle", [
    (4, "warning: chosen == rejected in every one of the 4 training pairs (first: "),
    (1, "warning: chosen == rejected in 1 of the 4 training pairs (first: "),
])
def test_identical_pairs_warn_before_training(tmp_path, capsys, no_model, n_same, needle):
    rows = [{"prompt": f"p{i}>", "chosen": "same", "rejected": "same" if i < n_same else "other"} for i in range(4)]
    path = _rows(tmp_path, "pairs.jsonl", rows)
    with pytest.raises(ModelBuilt):
        main([f"data.train_files=[{path}]", "data.eval_fraction=0", f"output_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert needle in out and "pairs.jsonl:0" in out
    assert ("cannot learn" in out) == (n_same == 4)


@pytest.mark.parametrize("algorithm", ["grpo", "online_dpo"])
def test_constant_reward_says_no_signal_once(algorithm, caplog):
    """Every group scored the same: GRPO's advantages are all 0 and online DPO finds no pair. The step is marked
    ``no_signal = 1`` in the metrics and a warning says so once per run, not at every step."""
    import logging

    from test_online_common import make_algo

    algo, ex = make_algo(algorithm, gen_num_generations=2, gen_max_new_tokens=2)
    for reward in (1.0, None):  # constant, then varying: the second step must not be marked
        algo.reward_fn = ((lambda p, c, **k: [reward] * len(c)) if reward is not None else
                          (lambda p, c, **k: [float(i % 2) for i in range(len(c))]))
        with caplog.at_level(logging.WARNING, logger="fastpref.train"):
            for step in (1, 2):
                algo.step_metrics = {}
                algo.micro_batches(ex[:4], step)
                assert ("no_signal" in algo.step_metrics) == (reward is not None)
                algo._uses_left = 0  # a fresh rollout each call
    said = [r.getMessage() for r in caplog.records if "trains on nothing" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{algorithm}: "), said


def test_info_imports_nothing_heavy():
    """``fastpref info`` reads versions from package metadata: none of the heavy extras is imported."""
    heavy = ("transformers", "peft", "datasets", "trl", "liger_kernel", "deepspeed", "triton", "tensorboard")
    code = ("import sys; from fastpref.cli import info; info([]); "
            f"print('IMPORTED', sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout
    assert "IMPORTED []" in out and "torch " in out and "impl=auto" in out, out
