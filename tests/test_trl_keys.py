"""TRL's names of common keys (``fastpref.train.config.TRL_KEYS``) work in YAML and as ``key=value`` overrides, each
mapped to the fastpref key (per algorithm where TRL's meaning depends on the trainer) and said once; keys without
an equivalent are one-line errors; "did you mean" hints name the right key; and ``key=value`` alone starts from the
plain defaults while a bare ``fastpref train`` stays the demo."""

import logging

import pytest

from fastpref.train.cli import embedded_default, main
from fastpref.train.config import (TRL_KEYS, TRL_UNSUPPORTED, Config, ConfigError, config_to_dict, dump_config,
                                   load_config)


def _get(cfg, dotted):
    d = config_to_dict(cfg)
    for p in dotted.split("."):
        d = d[p]
    return d


# (overrides, {fastpref key: expected value}, expected log line)
MAPPED = [
    (["learning_rate=1e-5"], {"optim.lr": 1e-5}, "TRL key 'learning_rate' -> optim.lr"),
    (["per_device_train_batch_size=4"], {"train.batch_size": 4}, "-> train.batch_size"),
    (["gradient_accumulation_steps=2"], {"train.grad_accum": 2}, "-> train.grad_accum"),
    (["max_length=128", "max_prompt_length=64"], {"data.max_length": 128, "data.max_prompt_length": 64},
     "TRL key 'max_prompt_length' -> data.max_prompt_length"),
    (["num_train_epochs=3"], {"train.epochs": 3, "train.max_steps": 0}, "and train.max_steps=0"),
    (["num_train_epochs=3", "max_steps=50"], {"train.epochs": 3, "train.max_steps": 50}, "-> train.max_steps"),
    (["num_train_epochs=3", "train.max_steps=50"], {"train.max_steps": 50}, "-> train.epochs"),
    (["max_steps=-1"], {"train.max_steps": 0}, "TRL key 'max_steps' -> train.max_steps=0"),
    (["warmup_ratio=0.1", "train.max_steps=100"], {"optim.warmup_steps": 10}, "warmup_ratio' -> optim.warmup_steps"),
    (["warmup_ratio=0.1", "max_steps=100", "train.sft_warmup_steps=20"], {"optim.warmup_steps": 8}, "= 8"),
    (["warmup_steps=0.05", "train.max_steps=100"], {"optim.warmup_steps": 5}, "(a share of the steps"),
    (["warmup_steps=7"], {"optim.warmup_steps": 7}, "TRL key 'warmup_steps' -> optim.warmup_steps"),
    (["weight_decay=0.01"], {"optim.weight_decay": 0.01}, "-> optim.weight_decay"),
    (["max_grad_norm=0"], {"optim.max_grad_norm": None}, "-> optim.max_grad_norm=None"),
    (["max_grad_norm=0.5"], {"optim.max_grad_norm": 0.5}, "-> optim.max_grad_norm"),
    (["adam_beta1=0.8", "adam_beta2=0.95", "adam_epsilon=1e-6"], {"optim.betas": [0.8, 0.95], "optim.eps": 1e-6},
     "TRL key 'adam_beta2' -> optim.betas[1]"),
    (["lr_scheduler_type=linear"], {"optim.schedule": "linear"}, "-> optim.schedule"),
    (["lr_scheduler_type=constant_with_warmup"], {"optim.schedule": "constant"}, "-> optim.schedule=constant"),
    (["seed=3", "logging_steps=5", "save_steps=10", "save_total_limit=1", "eval_steps=20"],
     {"train.seed": 3, "train.log_every": 5, "train.save_every": 10, "train.keep_checkpoints": 1,
      "train.eval_every": 20}, "TRL key 'eval_steps' -> train.eval_every"),
    (["bf16=true"], {"train.precision": "bf16-mixed"}, "TRL key 'bf16' -> train.precision=bf16-mixed"),
    (["fp16=true"], {"train.precision": "fp16-mixed"}, "-> train.precision=fp16-mixed"),
    (["bf16=false"], {"train.precision": "auto"}, "TRL key 'bf16'=False: nothing to change"),
    (["gradient_checkpointing=true"], {"model.gradient_checkpointing": True}, "-> model.gradient_checkpointing"),
    (["model_name_or_path=tiny"], {"model.name_or_path": "tiny"}, "-> model.name_or_path"),
    (["dataset_name=data/train.jsonl"], {"data.train_files": ["data/train.jsonl"]}, "-> data.train_files"),
    (["resume_from_checkpoint=true"], {"resume": "auto"}, "-> resume=auto"),
    (["packing=true"], {"data.pack": True}, "TRL key 'packing' -> data.pack"),
    (["use_peft=true", "lora_r=4", "lora_alpha=8"], {"model.lora.enabled": True, "model.lora.r": 4,
                                                     "model.lora.alpha": 8}, "-> model.lora.r"),
    (["precompute_ref_log_probs=true"], {"reference.mode": "precompute"}, "-> reference.mode=precompute"),
    (["beta=0.2"], {"dpo.beta": 0.2}, "TRL key 'beta' -> dpo.beta"),
    (["algorithm=kto", "beta=0.2", "desirable_weight=1.5"], {"kto.beta": 0.2, "kto.desirable_weight": 1.5},
     "-> kto.desirable_weight"),
    (["loss_type=ipo"], {"dpo.loss_type": "ipo"}, "TRL key 'loss_type' -> dpo.loss_type"),
    (["beta=0.04", "algorithm=grpo"], {"grpo.beta": 0.04, "dpo.beta": 0.1}, "TRL key 'beta' -> grpo.beta"),
    (["algorithm=simpo", "simpo_gamma=0.8"], {"simpo.gamma": 0.8}, "TRL key 'simpo_gamma' -> simpo.gamma"),
    (["algorithm=cpo", "simpo_gamma=0.8", "cpo_alpha=0.5", "alpha=0.1"],
     {"cpo.simpo_gamma": 0.8, "cpo.cpo_alpha": 0.5, "cpo.alpha": 0.1}, "TRL key 'alpha' -> cpo.alpha"),
    (["loss_type=[sigmoid,sft]", "loss_weights=[1,0.5]", "ld_alpha=0.5", "discopop_tau=0.1"],
     {"dpo.loss_type": ["sigmoid", "sft"], "dpo.loss_weights": [1.0, 0.5], "dpo.ld_alpha": 0.5,
      "dpo.discopop_tau": 0.1}, "TRL key 'ld_alpha' -> dpo.ld_alpha"),
    (["f_divergence_type=alpha_divergence", "f_alpha_divergence_coef=0.3", "rpo_alpha=0.5"],
     {"dpo.f_divergence_type": "alpha_divergence", "dpo.f_alpha_divergence_coef": 0.3, "dpo.rpo_alpha": 0.5},
     "TRL key 'rpo_alpha' -> dpo.rpo_alpha"),
    (["algorithm=rm", "center_rewards_coefficient=0.01", "loss_type=log_exp"],
     {"rm.center_rewards_coefficient": 0.01, "rm.loss_type": "log_exp"}, "-> rm.center_rewards_coefficient"),
    (["algorithm=grpo", "loss_type=dr_grpo", "num_generations=8", "max_completion_length=32", "temperature=0.7",
      "epsilon_high=0.28", "num_iterations=2"],
     {"grpo.loss_type": "dr_grpo", "grpo.generation.num_generations": 8, "grpo.generation.max_new_tokens": 32,
      "grpo.generation.temperature": 0.7, "grpo.epsilon_high": 0.28, "grpo.num_iterations": 2},
     "TRL key 'max_completion_length' -> grpo.generation.max_new_tokens"),
    (["algorithm=online_dpo", "beta=0.3"], {"online_dpo.beta": 0.3}, "-> online_dpo.beta"),
    (["algorithm=ppo", "kl_coef=0.1", "num_ppo_epochs=2"], {"ppo.kl_coef": 0.1, "ppo.num_ppo_epochs": 2},
     "TRL key 'kl_coef' -> ppo.kl_coef"),
]


@pytest.mark.parametrize("overrides, want, line", MAPPED, ids=[" ".join(c[0]) for c in MAPPED])
def test_trl_key_maps_to_the_fastpref_key_and_says_so(overrides, want, line, caplog):
    notes = []
    with caplog.at_level(logging.INFO, logger="fastpref.config"):
        cfg = load_config(None, overrides, notes=notes)
    for k, v in want.items():
        assert _get(cfg, k) == pytest.approx(v) if isinstance(v, float) else _get(cfg, k) == v, k
    assert any(line in n for n in notes), notes
    assert [r.getMessage() for r in caplog.records if r.name == "fastpref.config"] == notes
    trl_names = {o.split("=", 1)[0] for o in overrides} & set(TRL_KEYS)
    assert len(notes) == len(trl_names)  # one line per TRL key


def test_yaml_with_trl_names_and_each_said_once(tmp_path, capsys):
    p = tmp_path / "trl.yaml"
    p.write_text("algorithm: dpo\nlearning_rate: 5.0e-7\nper_device_train_batch_size: 2\nbeta: 0.1\n"
                 "max_length: 256\nmax_prompt_length: 128\nmax_steps: 20\nwarmup_ratio: 0.1\nbf16: false\n"
                 "report_to: none\noutput_dir: runs/x\n")
    cfg = load_config(str(p), ["learning_rate=1e-6"])
    assert cfg.optim.lr == 1e-6 and cfg.train.batch_size == 2 and cfg.data.max_length == 256
    assert cfg.optim.warmup_steps == 2 and cfg.output_dir == "runs/x"
    assert load_config(None, [], base=None) == Config()  # nothing leaks between loads
    rc = main(["--print-config", str(p), "learning_rate=1e-6"])
    out, err = capsys.readouterr()
    assert rc == 0 and "lr: 1.0e-06" in out and "TRL" not in out  # stdout stays YAML
    assert err.count("TRL key 'learning_rate' -> optim.lr") == 1
    assert load_config_roundtrip(cfg, tmp_path) == cfg


def load_config_roundtrip(cfg, tmp_path):
    q = tmp_path / "dump.yaml"
    q.write_text(dump_config(cfg))
    return load_config(str(q))


REFUSED = [
    (["eval_strategy=steps"], "TRL key 'eval_strategy' has no fastpref equivalent: evaluation runs every "
                              "train.eval_every steps"),
    (["push_to_hub=true"], "TRL key 'push_to_hub' has no fastpref equivalent"),
    (["optim=adamw_torch"], "TRL key 'optim' has no fastpref equivalent: fastpref trains with AdamW"),
    (["num_generations=8"], "TRL key 'num_generations' has no fastpref equivalent for algorithm=dpo (off-line "
                            "algorithms generate nothing; on-line ones read <algorithm>.generation.num_generations, "
                            "e.g. grpo.generation.num_generations)"),
    (["max_completion_length=64", "algorithm=kto"], "no fastpref equivalent for algorithm=kto (off-line algorithms "
                                                    "limit prompt + response with data.max_length"),
    (["algorithm=ppo", "beta=0.1"], "TRL key 'beta' has no fastpref equivalent for algorithm=ppo"),
    (["lr_scheduler_type=polynomial"], "TRL key 'lr_scheduler_type'='polynomial' has no fastpref equivalent"),
    (["num_train_epochs=2", "warmup_ratio=0.1"], "TRL key 'warmup_ratio'=0.1: a share of the steps needs "
                                                 "train.max_steps > 0"),
    (["warmup_ratio=0.1", "optim.warmup_steps=5"], "TRL key 'warmup_ratio' and a warm-up in steps"),
    (["bf16=yes please"], "TRL key 'bf16': expected true or false"),
]


@pytest.mark.parametrize("overrides, needle", REFUSED, ids=[" ".join(c[0]) for c in REFUSED])
def test_trl_key_without_equivalent_is_one_line(overrides, needle, capsys):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert main(["--print-config", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpref: error: TRL key") and err.count("\n") == 1


def test_report_to():
    """Mapped to train.report_to once that key exists; until then 'not supported yet' (none: nothing to do)."""
    has = "report_to" in {f for f in config_to_dict(Config())["train"]}
    if has:
        assert load_config(None, ["report_to=[tensorboard]"]).train.report_to is not None
    else:
        with pytest.raises(ConfigError, match="TRL key 'report_to' is not supported yet"):
            load_config(None, ["report_to=wandb"])
    notes = []
    load_config(None, ["report_to=none"], notes=notes)
    assert len(notes) == 1


HINTS = [
    ("grpo.num_generations=8", "did you mean 'grpo.generation.num_generations'?"),
    ("algorithm=grpo grpo.temprature=0.5", "did you mean 'grpo.generation.temperature'?"),
    ("optim.learning_rate=1", "did you mean 'optim.lr'?"),
    ("train.per_device_train_batch_size=2", "did you mean 'train.batch_size'?"),
    ("per_device_batch_size=2", "did you mean 'train.batch_size'?"),
    ("learnin_rate=1e-5", "did you mean 'optim.lr'?"),
    ("num_generation=8", "did you mean 'grpo.generation.num_generations'?"),
    ("algorithm=ppo num_generation=8", "did you mean 'ppo.generation.num_generations'?"),
    ("train.lr=1e-3", "did you mean 'optim.lr'?"),
    ("data.max_seq_length=128", "did you mean 'data.max_length'?"),
    ("dpo.bta=0.1", "did you mean 'dpo.beta'?"),
    ("loss.bta=0.1", "did you mean 'dpo.beta'?"),
    ("algorithm=simpo simpo.simpo_gamma=0.1", "did you mean 'simpo.gamma'?"),
    ("trian.max_steps=3", "did you mean 'train'?"),
]


@pytest.mark.parametrize("overrides, needle", HINTS, ids=[c[0] for c in HINTS])
def test_did_you_mean_names_the_right_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides.split())
    msg = str(e.value)
    assert needle in msg, msg
    assert "self_rewarding" not in msg and "'algorithm'" not in msg, msg


def test_every_trl_key_is_documented_and_resolves():
    text = open("docs/data.md", encoding="utf-8").read()
    for name in list(TRL_KEYS) + list(TRL_UNSUPPORTED):
        assert f"`{name}`" in text, name


def test_overrides_alone_start_from_plain_defaults_and_bare_train_is_the_demo(capsys, tmp_path):
    assert main(["--print-config"]) == 0
    assert capsys.readouterr().out == dump_config(embedded_default())  # bare `fastpref train`: the demo
    assert main(["--print-config", "algorithm=dpo", "train.max_steps=40"]) == 0
    out = capsys.readouterr().out
    assert out == dump_config(load_config(None, ["algorithm=dpo", "train.max_steps=40"]))
    assert "sft_warmup_steps: 0" in out and "max_steps: 40" in out  # 40 DPO steps, no SFT warm-up
    assert main(["--print-config", "--demo", "train.max_steps=200"]) == 0
    out = capsys.readouterr().out
    assert "sft_warmup_steps: 60" in out and "max_steps: 200" in out
    p = tmp_path / "c.yaml"
    p.write_text("dpo: {beta: 0.2}\n")
    assert main(["--demo", str(p)]) == 2
    assert "--demo and a config file" in capsys.readouterr().err
    assert main(["--bogus"]) == 2
    assert "unexpected argument '--bogus'" in capsys.readouterr().err
