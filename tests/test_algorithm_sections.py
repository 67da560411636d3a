"""Each off-line algorithm owns its config section (``dpo.*``, ``kto.*``, ``orpo.*``, ``simpo.*``, ``cpo.*``,
``rm.*``, ``sft.*``): every option of every section reaches the loss the algorithm builds; the deprecated
``loss.*`` keys map to the sections (logged once; one they cannot map is refused); bad options are one-line errors
before any model is built; DPOP (``dpo.dpop_lambda``) against a hand computation in fp64 and a gradient check;
RPO (``dpo.rpo_alpha``) equals its list form; the reward model's ``margin`` column changes the loss as TRL's
``RewardTrainer`` does."""

import dataclasses
import json
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastpref.losses.fused_preference import FusedLinearDPOLoss
from fastpref.losses.preference import dpo_loss
from fastpref.train.cli import embedded_default, main
from fastpref.train.config import LEGACY_LOSS_KEYS, ConfigError, load_config
from fastpref.train.registry import ALGORITHMS, load_builtin_algorithms

load_builtin_algorithms()

OFFLINE = ("sft", "dpo", "kto", "orpo", "simpo", "cpo", "rm")


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", "train.sft_warmup_steps=0", *overrides],
                       base=embedded_default())


def _algorithm(cfg):
    """The algorithm of ``cfg`` built on the tiny model (its loss is built in ``__init__``)."""
    from fastpref.train.algorithms.base import Runtime
    from fastpref.train.modeling import build_model, build_tokenizer

    cls = ALGORITHMS[cfg.algorithm]
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok, cls.model_kind)
    return cls(cfg, Runtime(cfg=cfg, model=model, tokenizer=tok, device=torch.device("cpu")))


def _yaml(v):
    return json.dumps(v) if isinstance(v, list) else str(v)


# algorithm -> (every field of its section at a value other than its default, what the built loss must hold)
SKIP = {"skip_unscored": False}  # FusedLossOptions (default true), which the five fused sections inherit
SET = {
    "dpo": ({**SKIP, "beta": 0.3, "loss_type": ["sigmoid", "hinge"], "loss_weights": [0.7, 0.2], "label_smoothing": 0.1,
             "rpo_alpha": 0.4, "rdpo_alpha": 0.05, "ld_alpha": 0.5, "dpop_lambda": 2.0, "discopop_tau": 0.2,
             "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
            {**SKIP, "beta": 0.3, "loss_type": ["sigmoid", "hinge", "sft"], "loss_weights": [0.7, 0.2, 0.4],
             "label_smoothing": 0.1, "rdpo_alpha": 0.05, "ld_alpha": 0.5, "dpop_lambda": 2.0, "discopop_tau": 0.2,
             "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    "kto": ({**SKIP, "beta": 0.3, "loss_type": "apo_zero_unpaired", "desirable_weight": 1.5,
             "undesirable_weight": 0.5},
            {**SKIP, "beta": 0.3, "loss_type": "apo_zero_unpaired", "desirable_weight": 1.5,
             "undesirable_weight": 0.5}),
    "orpo": ({**SKIP, "beta": 0.3}, {**SKIP, "beta": 0.3}),
    "simpo": ({**SKIP, "beta": 2.0, "gamma": 0.8, "label_smoothing": 0.1, "alpha": 0.2},
              {**SKIP, "beta": 2.0, "loss_type": "simpo", "simpo_gamma": 0.8, "label_smoothing": 0.1, "alpha": 0.2,
               "cpo_alpha": 0.0}),
    "cpo": ({**SKIP, "beta": 0.3, "loss_type": "hinge", "label_smoothing": 0.1, "cpo_alpha": 0.5, "simpo_gamma": 0.8,
             "alpha": 0.2},
            {**SKIP, "beta": 0.3, "loss_type": "hinge", "label_smoothing": 0.1, "cpo_alpha": 0.5, "simpo_gamma": 0.8,
             "alpha": 0.2}),
    "rm": ({"loss_type": "log_exp", "center_rewards_coefficient": 0.01},
           {"loss_type": "log_exp", "center_rewards_coefficient": 0.01}),
}


def _loss_options(algo) -> dict:
    fn = algo.loss_fn
    if hasattr(fn, "keywords"):  # rm: a partial of reward_model_loss
        assert fn.keywords["validate"] is False
        return {k: v for k, v in fn.keywords.items() if k != "validate"}
    assert fn.validate is False  # the trainer's losses never sync on the step for input checks
    out = dict(fn.opts) if hasattr(fn, "opts") else {"beta": fn.beta}
    return {**out, "skip_unscored": fn.skip_unscored}


@pytest.mark.parametrize("name", list(SET))
def test_every_section_option_reaches_the_loss(tmp_path, name):
    values, want = SET[name]
    sec_cls = type(load_config(None, []).sections[name])
    fields = {f.name: f for f in dataclasses.fields(sec_cls)}
    assert set(values) == set(fields), "the test sets every option of the section"
    for k, v in values.items():  # each differs from its default, so arriving is not an accident
        assert v != getattr(sec_cls(), k), k
    cfg = _cfg(tmp_path, f"algorithm={name}", *(f"{name}.{k}={_yaml(v)}" for k, v in values.items()))
    got = _loss_options(_algorithm(cfg))
    assert {k: got[k] for k in want} == want


def test_sft_section_and_every_offline_algorithm_owns_one():
    cfg = load_config(None, [])
    for name in OFFLINE:
        assert ALGORITHMS[name].config_class is type(cfg.sections[name]), name
    assert cfg.sections["sft"].loss_type == "nll"
    assert not hasattr(cfg, "loss")  # one place each value lives
    with pytest.raises(ConfigError, match=r"sft.loss_type='dft': expected one of nll"):
        load_config(None, ["algorithm=sft", "sft.loss_type=dft"])


# ------------------------------------------------------------------------------------------ the loss.* alias

ALIASES = [
    ("dpo", ["loss.beta=0.3", "loss.type=ipo", "loss.label_smoothing=0.1"],
     ["dpo.beta=0.3", "dpo.loss_type=ipo", "dpo.label_smoothing=0.1"]),
    ("kto", ["loss.beta=0.2", "loss.type=apo_zero_unpaired", "loss.desirable_weight=1.5",
             "loss.undesirable_weight=0.5"],
     ["kto.beta=0.2", "kto.loss_type=apo_zero_unpaired", "kto.desirable_weight=1.5", "kto.undesirable_weight=0.5"]),
    ("orpo", ["loss.beta=0.4"], ["orpo.beta=0.4"]),
    ("simpo", ["loss.beta=2.0", "loss.simpo_gamma=0.8", "loss.label_smoothing=0.1"],
     ["simpo.beta=2.0", "simpo.gamma=0.8", "simpo.label_smoothing=0.1"]),
    ("cpo", ["loss.type=ipo", "loss.cpo_alpha=0.5", "loss.simpo_gamma=0.7"],
     ["cpo.loss_type=ipo", "cpo.cpo_alpha=0.5", "cpo.simpo_gamma=0.7"]),
    ("rm", ["loss.type=log_exp", "loss.center_rewards_coefficient=0.01"],
     ["rm.loss_type=log_exp", "rm.center_rewards_coefficient=0.01"]),
]


@pytest.mark.parametrize("name, old, new", ALIASES, ids=[a[0] for a in ALIASES])
def test_old_loss_keys_still_work_mapped_and_logged_once(name, old, new, caplog):
    notes: list[str] = []
    with caplog.at_level(logging.INFO, logger="fastpref.config"):
        cfg = load_config(None, [f"algorithm={name}", *old, old[0]], notes=notes)  # the first one given twice
    assert cfg == load_config(None, [f"algorithm={name}", *new])
    for o, n in zip(old, new):
        assert [x for x in notes if x.startswith(f"config: {o.split('=')[0]} ")] == \
               [f"config: {o.split('=')[0]} is deprecated -> {n.split('=')[0]}"]
    assert [r.getMessage() for r in caplog.records if r.name == "fastpref.config"] == notes


def test_an_old_loss_section_in_yaml_and_an_old_config_dump_load(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("algorithm: dpo\nloss:\n  type: sigmoid\n  beta: 0.2\n")
    assert load_config(str(p)).sections["dpo"].beta == 0.2
    # a config.yaml written before the sections: every loss.* key at its old default (auto, 0.5, ...)
    dump = tmp_path / "config.yaml"
    dump.write_text("algorithm: simpo\nloss:\n" + "".join(f"  {k}: {json.dumps(v)}\n"
                                                          for k, v in LEGACY_LOSS_KEYS.items()))
    assert load_config(str(dump)) == load_config(None, ["algorithm=simpo"])


@pytest.mark.parametrize("overrides, needle", [
    (["loss.simpo_gamma=0.7"], "loss.simpo_gamma: algorithm=dpo has no such loss option"),
    (["algorithm=orpo", "loss.label_smoothing=0.1"], "loss.label_smoothing: algorithm=orpo has no such loss option"),
    (["loss.bta=0.1"], "unknown config key 'loss.bta'; did you mean 'dpo.beta'?"),
    (["algorithm=grpo", "loss.beta=0.2"], "loss.beta: algorithm=grpo does not read loss.*"),
])
def test_an_old_loss_key_the_algorithm_has_no_option_for_is_refused(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


# -------------------------------------------------------------------------- one check, at config time

BAD = [
    (["dpo.loss_type=nosuch"], "dpo.loss_type='nosuch' is not a dpo loss type"),
    (["dpo.loss_type=[sigmoid,nosuch]"], "dpo.loss_type=['sigmoid', 'nosuch']: "),
    (["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1]"],
     "dpo.loss_weights=[1.0]: loss_weights has 1 entries but loss_type has 2"),
    (["dpo.loss_type=exo_pair"], "dpo.label_smoothing=0.0: 'exo_pair' needs 0 < label_smoothing < 1"),
    (["dpo.ld_alpha=1.5"], "dpo.ld_alpha=1.5: expected a value in [0, 1]"),
    (["dpo.loss_type=ipo", "dpo.dpop_lambda=1"], "dpo.dpop_lambda=1.0: dpop_lambda applies to the logit-based"),
    (["dpo.loss_type=ipo", "dpo.rdpo_alpha=0.1"], "dpo.rdpo_alpha=0.1: rdpo_alpha applies to the logit-based"),
    (["dpo.loss_type=[sigmoid,sft]", "dpo.rpo_alpha=1"], "dpo.rpo_alpha=1.0 adds the sft term"),
    (["dpo.loss_type=bco_pair", "dpo.f_divergence_type=forward_kl"],
     "dpo.f_divergence_type='forward_kl': f_divergence_type='forward_kl' is only defined"),
    (["algorithm=cpo", "cpo.loss_type=kto"], "cpo.loss_type='kto': expected one of sigmoid, hinge, ipo, simpo"),
    (["algorithm=kto", "kto.loss_type=sigmoid"], "kto.loss_type='sigmoid': expected one of kto, apo_zero_unpaired"),
]


@pytest.mark.parametrize("overrides, needle", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_options_are_one_line_errors_before_any_model_is_built(overrides, needle, monkeypatch, capsys, tmp_path):
    import fastpref.train.modeling as modeling
    import fastpref.train.trainer as trainer

    def no_model(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(modeling, "build_model", no_model)
    monkeypatch.setattr(trainer, "build_model", no_model, raising=False)
    assert main([f"output_dir={tmp_path / 'run'}", "train.sft_warmup_steps=0", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------------- DPOP

def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-5 - 3 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    pc[:3] = rc[:3] - 0.5 - torch.rand(3, generator=g, dtype=torch.float64)  # chosen below the reference: penalised
    pc[3:] = rc[3:] + 0.5 + torch.rand(n - 3, generator=g, dtype=torch.float64)  # above: no penalty
    return pc, pr, rc, rr


def test_dpop_matches_a_hand_computation_in_fp64():
    pc, pr, rc, rr = _pairs()
    beta, lam = 0.3, 2.0
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, dpop_lambda=lam)
    per = []
    for w, l, wr, lr in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = beta * ((w - wr) - (l - lr) - lam * max(0.0, wr - w))  # Pal et al. 2024, Eq. 3
        per.append(math.log1p(math.exp(-z)))  # -log sigmoid(z)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - sum(per) / len(per)) < 1e-12
    assert loss.item() > dpo_loss(pc, pr, rc, rr, beta=beta)[0].item()  # the penalty only adds
    assert torch.equal(m["rewards/chosen"], (beta * (pc - rc)).mean())  # rewards stay beta * log-ratio
    # the pairs above the reference are unchanged
    a = dpo_loss(pc[3:], pr[3:], rc[3:], rr[3:], beta=beta, dpop_lambda=lam)[0]
    assert torch.equal(a, dpo_loss(pc[3:], pr[3:], rc[3:], rr[3:], beta=beta)[0])


def test_dpop_gradient():
    pc, pr, rc, rr = _pairs()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, beta=0.3, dpop_lambda=2.0)[0], (pc, pr))
    # analytic: d loss / d pc_i = -(1 - sigmoid(z_i)) * beta * (1 + lam * [pc_i < rc_i]) / n
    loss = dpo_loss(pc, pr, rc, rr, beta=0.3, dpop_lambda=2.0)[0]
    (g,) = torch.autograd.grad(loss, pc)
    with torch.no_grad():
        below = (pc < rc).double()
        z = 0.3 * ((pc - rc) - (pr - rr) - 2.0 * (rc - pc).clamp(min=0))
        want = -(1 - torch.sigmoid(z)) * 0.3 * (1 + 2.0 * below) / pc.shape[0]
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)


def test_fused_dpo_passes_dpop_lambda():
    torch.manual_seed(0)
    P, T, H, V = 3, 7, 16, 40
    hidden = torch.randn(2 * P, T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64) / 4
    t = torch.randint(0, V, (2 * P, T))
    t[:, :2] = -100
    t[0, 5:] = -100
    with torch.no_grad():
        full = torch.log_softmax(hidden @ w.T, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
        seq = (full * (t != -100)).sum(-1)
    rc, rr = seq[:P] + torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64), seq[P:] + 0.5  # pairs 0, 2 penalised
    fused = FusedLinearDPOLoss(beta=0.3, dpop_lambda=2.0, validate=False)
    assert fused.opts["dpop_lambda"] == 2.0
    loss, _ = fused(hidden, w, t, ref_logps=(rc, rr))
    (g,) = torch.autograd.grad(loss, hidden)
    logp = (torch.log_softmax(hidden @ w.T, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)).sum(-1)
    want = dpo_loss(logp[:P], logp[P:], rc, rr, beta=0.3, dpop_lambda=2.0)[0]
    (gw,) = torch.autograd.grad(want, hidden)
    # the fused loss computes the per-sequence terms in fp32: fp32 tolerances against the fp64 reference
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), gw, rtol=1e-4, atol=1e-6)
    plain = FusedLinearDPOLoss(beta=0.3, validate=False)(hidden, w, t, ref_logps=(rc, rr))[0]
    assert loss.item() > plain.item() + 1e-6


# ------------------------------------------------------------------------------------------------------ RPO

def test_rpo_alpha_equals_the_list_form_and_the_nll_term():
    pc, pr, rc, rr = _pairs()
    lens = torch.tensor([3, 5, 4, 6, 2, 7])
    sec = load_config(None, ["dpo.rpo_alpha=0.4", "dpo.beta=0.2"]).sections["dpo"]
    got = dpo_loss(pc, pr, rc, rr, chosen_lengths=lens, rejected_lengths=lens + 1, **sec.loss_kwargs())[0]
    lst = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4],
                   chosen_lengths=lens, rejected_lengths=lens + 1)[0]
    assert torch.equal(got, lst)
    # TRL's RPO (Pang et al. 2024): the DPO loss + alpha * NLL of the chosen tokens, token mean over the batch
    hand = -F.logsigmoid(0.2 * ((pc - rc) - (pr - rr))).mean() + 0.4 * (-pc.sum() / lens.sum())
    torch.testing.assert_close(got, hand, rtol=1e-12, atol=1e-12)


def _pair_examples(n=6, seed=0):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append({"prompt_ids": [rng.randrange(3, 90) for _ in range(rng.randint(2, 5))],
                    "chosen_ids": [rng.randrange(3, 90) for _ in range(rng.randint(1, 6))] + [1],
                    "rejected_ids": [rng.randrange(3, 90) for _ in range(rng.randint(1, 6))] + [1]})
    return out


def test_rpo_alpha_through_the_algorithm_equals_the_list_form(tmp_path):
    a = _algorithm(_cfg(tmp_path, "dpo.rpo_alpha=0.5", "reference.mode=none"))
    b = _algorithm(_cfg(tmp_path, "dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1,0.5]", "reference.mode=none"))
    assert a.loss_fn.opts == b.loss_fn.opts


# ------------------------------------------------------------------------------------- a 2-step training run

def _run_losses(tmp_path, name, *overrides):
    from fastpref.train.trainer import Trainer

    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        import random

        rng = random.Random(0)
        with open(data, "w") as fh:  # responses of different lengths, so LD-DPO's excess part is not empty
            for i in range(16):
                fh.write(json.dumps({"prompt": f"q{i}:", "chosen": "ab" * rng.randint(1, 4),
                                     "rejected": "xy" * rng.randint(1, 6)}) + "\n")
    cfg = load_config(None, [f"output_dir={tmp_path / name}", f"data.train_files=[{data}]", "data.eval_fraction=0",
                             "data.max_length=32", "data.max_prompt_length=8", "train.batch_size=8",
                             "train.max_steps=2", "train.log_every=1", "train.save_every=0", "train.plots=false",
                             "train.cpu_threads=1", "optim.lr=1e-2", "optim.warmup_steps=0", *overrides])
    Trainer(cfg, quiet=True).run()
    recs = [json.loads(ln) for ln in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    return [r["loss"] for r in recs if r.get("phase") != "eval" and "loss" in r]


def test_ld_alpha_and_rpo_alpha_change_a_two_step_run(tmp_path):
    base = _run_losses(tmp_path, "base")
    ld = _run_losses(tmp_path, "ld", "dpo.ld_alpha=0.5")
    rpo = _run_losses(tmp_path, "rpo", "dpo.rpo_alpha=1.0")
    assert len(base) == len(ld) == len(rpo) == 2
    # step 1: the policy is its reference, every log-ratio 0: the DPO loss is log 2 whatever ld_alpha is
    assert abs(base[0] - math.log(2)) < 1e-5 and abs(ld[0] - math.log(2)) < 1e-5
    assert abs(ld[1] - base[1]) > 1e-6  # after one update the LD weighting of the excess tokens shows
    assert rpo[0] > base[0] + 0.1  # + the chosen NLL (a few nats per token for an untrained model)


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_skip_unscored_trains_the_same_run(tmp_path, pack):
    """``dpo.skip_unscored`` (on by default: the head sees only the scored positions) gives the same two-step run
    as ``false`` (the head on every position)."""
    base = _run_losses(tmp_path, f"base-{pack}", f"data.pack={str(pack).lower()}", "dpo.skip_unscored=false")
    skip = _run_losses(tmp_path, f"skip-{pack}", f"data.pack={str(pack).lower()}")
    assert len(base) == len(skip) == 2 and abs(base[1] - base[0]) > 1e-4  # it trained
    assert skip == pytest.approx(base, rel=1e-5, abs=1e-6)


# -------------------------------------------------------------------------------------------- reward margin

def test_margin_column_is_kept_on_the_example(tmp_path):
    from fastpref.data.dataset import BadRow, Tokenization, load_examples, normalise_all
    from fastpref.data.tokenizer import CharTokenizer

    row = {"prompt": "a", "chosen": "b", "rejected": "c", "margin": 2}
    (ex,) = normalise_all(row, "preference")
    assert ex["margin"] == 2.0
    assert Tokenization(CharTokenizer()).example(ex)["margin"] == 2.0
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({**row, "margin": m}) + "\n" for m in (0.5, -1, 3)))
    assert [e["margin"] for e in load_examples([str(f)], "preference", Tokenization(CharTokenizer()))] == [0.5, -1, 3]
    assert "margin" not in normalise_all({k: v for k, v in row.items() if k != "margin"}, "preference")[0]
    with pytest.raises(BadRow) as e:
        normalise_all({**row, "margin": "big"}, "preference")
    assert e.value.field == "margin"


def test_rm_margin_changes_the_loss_as_trl_says(tmp_path):
    algo = _algorithm(_cfg(tmp_path, "algorithm=rm"))
    exs = _pair_examples(4)
    margins = [0.5, -1.0, 2.0, 0.0]
    with_m = [{**e, "margin": m} for e, m in zip(exs, margins)]
    with torch.no_grad():
        batch = algo.collate(with_m)
        loss, _ = algo.compute_loss(batch)
        r = algo.rewards(batch)
        plain_loss, _ = algo.compute_loss(algo.collate(exs))
    rc, rr = r[:4].double(), r[4:].double()
    want = -F.logsigmoid(rc - rr - torch.tensor(margins, dtype=torch.float64)).mean()  # TRL's RewardTrainer
    assert abs(loss.item() - want.item()) < 1e-5
    assert abs(plain_loss.item() - (-F.logsigmoid(rc - rr).mean()).item()) < 1e-5
    assert abs(loss.item() - plain_loss.item()) > 1e-3
    with pytest.raises(ValueError, match="have no 'margin' while the others do"):
        algo.collate(with_m[:2] + exs[2:])
