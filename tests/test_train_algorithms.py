"""End-to-end on CPU with the tiny model: every algorithm trains a few steps and its held-out loss moves the right
way; the trainer's fused losses equal an independent fp64 computation from full logits; outputs exist and load;
reference modes (copy, precompute, lora_base) agree."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastpref.train.cli import embedded_default
from fastpref.train.config import load_config
from fastpref.train.trainer import Trainer


def tiny_cfg(tmp_path, *overrides, name="run"):
    base = embedded_default()
    return load_config(None, [f"output_dir={tmp_path / name}", "data.synthetic_rows=160", "train.batch_size=8",
                              "train.sft_warmup_steps=0", "train.max_steps=12", "train.eval_every=0",
                              "train.save_every=0", "train.log_every=1", "train.plots=false",
                              "data.eval_fraction=0.2", *overrides], base=base)


# algorithm -> (overrides, eval metric, direction): the held-out loss must improve.
CASES = {
    "sft": ([], "eval/loss"),
    "dpo": (["train.sft_warmup_steps=4"], "eval/loss"),
    "dpo-ipo": (["algorithm=dpo", "dpo.loss_type=ipo"], "eval/loss"),
    "kto": ([], "eval/loss"),
    "orpo": ([], "eval/loss"),
    "simpo": (["simpo.beta=2.0"], "eval/loss"),
    "cpo": ([], "eval/loss"),
    "rm": (["optim.lr=1e-3"], "eval/loss"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_algorithm_improves_held_out_loss(tmp_path, name):
    overrides, key = CASES[name]
    cfg = tiny_cfg(tmp_path, f"algorithm={name.split('-')[0]}", "train.eval_every=100", *overrides)
    res = Trainer(cfg, quiet=True).run()
    recs = [json.loads(ln) for ln in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    train_recs = [r for r in recs if r["phase"] != "eval"]
    assert [r["step"] for r in train_recs] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) for r in train_recs)
    evals = [r for r in recs if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 12]
    before, after = evals[0][key], evals[1][key]
    assert after == res.eval[key]
    assert after < before - 1e-3, f"{name}: {key} {before:.4f} -> {after:.4f}"


def test_outputs_exist_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tmp_path, "train.sft_warmup_steps=2", "train.max_steps=4", "train.save_every=2",
                   "train.plots=true", "train.eval_every=2")
    res = Trainer(cfg, quiet=True).run()
    out = cfg.output_dir
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert {"step", "loss", "rewards/accuracies", "rewards/margins", "lr"} <= set(recs[-2])
    assert "eval/rewards/accuracies" in recs[-1] and recs[-1]["step"] == 4
    assert load_config(os.path.join(out, "config.yaml")) == cfg
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-2", "step-4"]  # the last step too
    ck = os.path.join(out, "checkpoints", "step-2")
    assert {"model.safetensors", "optimizer.safetensors", "scheduler.json", "rng.json", "trainer_state.json",
            "algorithm.safetensors", "manifest.json"} <= set(
        os.listdir(ck))
    for p in ("loss.png", "reward_margins.png", "reward_accuracy.png"):
        assert os.path.getsize(os.path.join(out, "plots", p)) > 1000
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert any(n.startswith("events") for n in os.listdir(os.path.join(out, "tensorboard")))
    # final/ holds the trained weights: the loaded model reproduces the run's last held-out chosen log-probs
    from fastpref.data.collate import collate_preference

    tr = Trainer(cfg, quiet=True)
    tr._bar = None
    tr._load_data(__import__("fastpref.train.algorithms.preference", fromlist=["DPO"]).DPO, tr_tok := _tok())
    batch = collate_preference(tr.eval_ex, tr_tok.pad_token_id)
    with torch.no_grad():
        lp = _naive_seq_logps(model.double(), batch)
    P = len(tr.eval_ex)
    assert abs(lp[:P].mean().item() - res.eval["eval/logps/chosen"]) < 1e-3


def _tok():
    from fastpref.data.tokenizer import CharTokenizer

    return CharTokenizer()


def _naive_seq_logps(model, batch):
    """fp64 per-sequence log-probs from the full logits (independent of the fused path)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    t = batch.targets
    lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (t != -100)).sum(-1)


def _runtime(tmp_path, algo, *extra):
    from fastpref.train.algorithms.base import ALGORITHMS, Runtime, load_builtin_algorithms
    from fastpref.train.modeling import build_model, build_tokenizer
    from fastpref.train.reference import make_reference

    load_builtin_algorithms()
    cfg = tiny_cfg(tmp_path, f"algorithm={algo}", *extra)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok, ALGORITHMS[algo].model_kind)
    ref = make_reference("copy", model)
    ref.take()
    with torch.no_grad():  # make policy != reference
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rt = Runtime(cfg=cfg, model=model, tokenizer=tok, device=torch.device("cpu"), reference=ref)
    tr = Trainer(cfg, quiet=True)
    tr._bar = None
    tr._load_data(ALGORITHMS[algo], tok)
    return ALGORITHMS[algo](cfg, rt), tr.train_ex[:6], ref


def test_dpo_loss_and_grad_match_full_logits_fp64(tmp_path):
    algo, exs, ref = _runtime(tmp_path, "dpo", "dpo.beta=0.3")
    batch = algo.collate(exs)
    loss, m = algo.compute_loss(batch)
    loss.backward()
    g = algo.rt.model.get_output_embeddings().weight.grad.clone()
    algo.rt.model.zero_grad()
    model64 = algo.rt.model.double()
    ref64 = ref.model.double()
    pol = _naive_seq_logps(model64, batch)
    with torch.no_grad():
        rl = _naive_seq_logps(ref64, batch)
    P = len(exs)
    z = 0.3 * ((pol[:P] - rl[:P]) - (pol[P:] - rl[P:]))
    naive = -F.logsigmoid(z).mean()
    naive.backward()
    assert abs(loss.item() - naive.item()) < 1e-4
    assert abs(m["rewards/accuracies"].item() - (z > 0).double().mean().item()) < 1e-6
    g64 = model64.get_output_embeddings().weight.grad
    assert (g.double() - g64).abs().max() < 1e-4 * max(1.0, g64.abs().max().item())


def test_sft_and_kto_match_full_logits_fp64(tmp_path):
    algo, exs, _ = _runtime(tmp_path, "sft")
    batch = algo.collate(exs)
    loss, _ = algo.compute_loss(batch)
    model64 = algo.rt.model.double()
    logits = model64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    naive = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - naive.item()) < 1e-4

    algo, exs, ref = _runtime(tmp_path, "kto", "kto.beta=0.5")
    batch = algo.collate(exs)
    loss, m = algo.compute_loss(batch)
    model64, ref64 = algo.rt.model.double(), ref.model.double()
    with torch.no_grad():
        rho = _naive_seq_logps(model64, batch) - _naive_seq_logps(ref64, batch)
        kl_b = batch.kl
        z0 = (_naive_seq_logps(model64, kl_b) - _naive_seq_logps(ref64, kl_b)).mean().clamp(min=0)
    lab = batch.labels
    per = torch.where(lab, 1 - torch.sigmoid(0.5 * (rho - z0)), 1 - torch.sigmoid(0.5 * (z0 - rho)))
    assert abs(loss.item() - per.mean().item()) < 1e-4
    assert abs(m["kl"].item() - z0.item()) < 1e-4


def test_reference_modes_agree(tmp_path):
    """precompute (cached on disk, reused by a second run) and copy give the same DPO run; lora_base runs."""
    args = ("algorithm=dpo", "train.max_steps=2")
    a = Trainer(tiny_cfg(tmp_path, *args, "reference.mode=copy", name="copy"), quiet=True).run()
    b = Trainer(tiny_cfg(tmp_path, *args, "reference.mode=precompute", name="pre"), quiet=True).run()
    assert abs(a.train["loss"] - b.train["loss"]) < 1e-5
    assert abs(a.eval["eval/loss"] - b.eval["eval/loss"]) < 1e-5
    cache = os.listdir(os.path.join(tmp_path, "pre", "ref_cache"))
    assert len(cache) == 1 and cache[0].startswith("ref_logps-")
    c = Trainer(tiny_cfg(tmp_path, *args, "reference.mode=precompute", "resume=none", name="pre"),
                quiet=True).run()
    assert abs(c.train["loss"] - b.train["loss"]) < 1e-6
    d = Trainer(tiny_cfg(tmp_path, *args, "model.lora.enabled=true", "optim.lr=1e-2", name="lora"),
                quiet=True).run()
    assert math.isfinite(d.train["loss"]) and os.path.exists(os.path.join(tmp_path, "lora", "final",
                                                                          "adapter_config.json"))


@pytest.mark.parametrize("algo", ["dpo", "sft", "kto"])
def test_packed_equals_padded(tmp_path, algo):
    """data.pack=true (one packed row, varlen attention, pairs interleaved) gives the padded batch's loss,
    metrics and LM-head gradient: the layouts differ, the math must not."""
    from fastpref.data.collate import collate_preference, collate_single

    algo_obj, exs, _ = _runtime(tmp_path, algo, "data.pack=true")
    assert algo_obj.rt.model.config._attn_implementation == "fastpref"
    pad = algo_obj.rt.tokenizer.pad_token_id
    results = []
    for pack in (False, True):
        if algo == "dpo":
            batch = collate_preference(exs, pad, pack=pack)
        else:
            batch = collate_single(exs, pad, pack=pack)
            if algo == "kto":
                batch.kl = collate_single([{"prompt_ids": e["prompt_ids"], "completion_ids": exs[(i + 1) % len(exs)]
                                               ["completion_ids"]} for i, e in enumerate(exs)], pad, pack=pack)
        assert batch.packed == pack
        algo_obj.rt.model.zero_grad()
        loss, m = algo_obj.compute_loss(batch)
        loss.backward()
        results.append((loss.detach(), m, algo_obj.rt.model.get_output_embeddings().weight.grad.clone()))
    (la, ma, ga), (lb, mb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    for k in ma:
        torch.testing.assert_close(mb[k], ma[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_precompute_cache_order_in_both_layouts(tmp_path):
    """The cached reference log-probs come back in each layout's sequence order (TRL rows / interleaved)."""
    from fastpref.data.collate import collate_preference
    from fastpref.train.reference import make_reference

    algo_obj, exs, _ = _runtime(tmp_path, "dpo", "data.pack=true")
    for i, e in enumerate(exs):
        e["uid"] = i
    model, pad = algo_obj.rt.model, algo_obj.rt.tokenizer.pad_token_id
    for pack_cache in (False, True):
        ref = make_reference("precompute", model)
        ref.precompute(exs, lambda c: collate_preference(c, pad, pack=pack_cache), 4, str(tmp_path / f"c{pack_cache}"),
                       "k", log=lambda m: None)
        for pack in (False, True):
            batch = collate_preference(exs[1:5], pad, pack=pack)
            torch.testing.assert_close(ref.sequence_logps(batch), ref.compute(batch), rtol=1e-5, atol=1e-4)
