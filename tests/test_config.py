"""Config loading: YAML + dotted overrides, type coercion, unknown keys with suggestions, registered sections,
--help / --print-config, and the CLI's error contract (``fastpref: error: ...``, exit 2, no traceback)."""

import dataclasses

import pytest

from fastpref.train.cli import embedded_default, main
from fastpref.train.config import (Config, ConfigError, config_help, dump_config, field_docs, load_config,
                                   register_config_section)


def test_yaml_then_overrides_with_coercion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algorithm: kto\nkto:\n  beta: 0.3\ntrain:\n  max_steps: 7\nmodel:\n  lora:\n    r: 4\n")
    cfg = load_config(str(p), ["kto.beta=0.25", "train.batch_size=3", "model.lora.enabled=true",
                               "model.lora.target_modules=[q_proj,v_proj]", "optim.max_grad_norm=null",
                               "train.cpu_threads=2",
                               "data.train_files=[a.json,b.jsonl]", "data.eval_files=/x/a,b.jsonl", "optim.lr=1e-3"])
    assert cfg.algorithm == "kto" and cfg.train.max_steps == 7 and cfg.model.lora.r == 4
    assert cfg.sections["kto"].beta == 0.25 and isinstance(cfg.sections["kto"].beta, float)
    assert cfg.train.batch_size == 3 and isinstance(cfg.train.batch_size, int)
    assert cfg.model.lora.enabled is True
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.max_grad_norm is None
    assert cfg.train.cpu_threads == 2
    assert cfg.data.train_files == ["a.json", "b.jsonl"]
    assert cfg.data.eval_files == ["/x/a,b.jsonl"]  # a plain string is one path, even with a comma
    assert cfg.optim.lr == 1e-3


@pytest.mark.parametrize("override, needle", [
    ("dpo.bta=0.1", "did you mean 'dpo.beta'"),
    ("trian.max_steps=3", "did you mean 'train'"),
    ("model.lora.rank=4", "did you mean 'model.lora.r'"),
    ("train.max_steps=abc", "train.max_steps: expected an integer"),
    ("train.max_steps=2.5", "expected an integer"),
    ("model.lora.enabled=maybe", "expected true or false"),
    ("reference.mode=frozen", "reference.mode='frozen': expected one of"),
    ("algorithm=dpoo", "did you mean 'dpo'"),
    ("train.batch_size=0", "train.batch_size=0: expected a value > 0"),
    ("loss", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_yaml_key_names_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        load_config(str(p))
    p.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(str(p))


def test_every_field_has_a_docstring():
    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING
                                        else None):
                walk(f.default_factory)
    walk(Config)
    text = config_help()
    assert "dpo.beta = 0.1" in text and "Inverse temperature" in text


def test_registered_section_round_trips():
    @dataclasses.dataclass
    class ToyOnline:
        """A toy on-line section."""
        num_generations: int = 4
        """Completions per prompt."""

    register_config_section("toy_online_section", ToyOnline)
    cfg = load_config(None, ["toy_online_section.num_generations=8"])
    assert cfg.section("toy_online_section").num_generations == 8
    with pytest.raises(ConfigError, match="did you mean 'toy_online_section.num_generations'"):
        load_config(None, ["toy_online_section.num_generation=8"])
    again = load_config(None, [])
    assert again.section("toy_online_section").num_generations == 4
    assert "toy_online_section.num_generations" in config_help()


def test_dump_round_trips(tmp_path):
    cfg = embedded_default()
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(str(p)) == cfg


def test_cli_help_print_config_and_errors(capsys, tmp_path):
    assert main(["--help"]) == 0
    assert "model.lora.enabled" in capsys.readouterr().out
    assert main(["--print-config", "--demo", "dpo.beta=0.5"]) == 0
    out = capsys.readouterr().out
    assert "beta: 0.5" in out and "sft_warmup_steps: 60" in out
    assert main(["dpo.bta=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpref: error: ") and "dpo.beta" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_every_example_config_loads():
    import glob

    paths = sorted(glob.glob("examples/*.yaml"))
    assert "examples/dpo_smollm2.yaml" in paths
    for p in paths:
        cfg = load_config(p)
        assert cfg.output_dir.startswith("runs/"), p


def test_a_section_the_algorithm_does_not_read_is_named_when_it_was_set(caplog):
    """``examples/online_dpo.yaml algorithm=dice``: the YAML's online_dpo settings would not reach dice; one
    warning names the section and the settings. A dumped config.yaml (every section at its defaults) says nothing."""
    import logging

    with caplog.at_level(logging.WARNING, logger="fastpref.config"):
        load_config("examples/online_dpo.yaml", ["algorithm=dice"])
    assert any("the online_dpo: section is ignored (algorithm=dice reads only its own dice: section)" in r.message
               and "online_dpo.steps_per_iteration" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastpref.config"):
        load_config("examples/online_dpo.yaml")
    assert not [r for r in caplog.records if "section is ignored" in r.message]


def test_a_dumped_config_loads_without_section_warnings(tmp_path, caplog):
    import logging

    p = tmp_path / "config.yaml"
    p.write_text(dump_config(Config(algorithm="dpo")))
    with caplog.at_level(logging.WARNING, logger="fastpref.config"):
        load_config(str(p))
    assert not [r for r in caplog.records if "section is ignored" in r.message]
