"""Shared on-line pieces: pairing, judge parsing, replay mixing, packing, rollout, log-probs vs full logits.

Also the small harness the other ``test_online_*`` files import (``make_algo``, ``run_steps``): it drives an
algorithm exactly as the trainer's step does (micro_batches -> compute_loss -> backward -> clip -> step ->
on_step_end) with the tiny Llama and the character tokenizer.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastpref.data.arith import make_arith
from fastpref.train.algorithms.base import ALGORITHMS, Runtime
from fastpref.train.config import Config
from fastpref.train.modeling import build_model, build_tokenizer
from fastpref.train.online import common
from fastpref.train.online.common import ReplayBuffer, best_worst_pairs, parse_judge_score
from fastpref.train.reference import make_reference
from fastpref.train.modeling import decoder_hidden, sequence_logps, token_logps
from fastpref.train.rollout import GenerationConfig, generate, pack


# ------------------------------------------------------------------------------------------------ harness

@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny models on a shared 2-core machine run fastest on one intra-op thread (as the trainer's
    ``train.cpu_threads`` default); the other ``test_online_*`` files import this fixture."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_algo(name: str, *, rows=None, n_rows: int = 64, seed: int = 0, ref: bool | None = None,
              train_stream: bool = False, **section):
    """(algorithm, examples) for ``name`` with a tiny model; ``gen_<field>`` keys set ``generation`` fields. The
    examples carry a ``uid`` as the trainer's do; ``train_stream`` also hands them to the algorithm as its training
    split (``rt.train_examples``)."""
    import fastpref.train.online  # noqa: F401  (registers)

    cfg = Config(algorithm=name)
    cfg.train.seed = seed
    cfg.model.tiny.hidden_size, cfg.model.tiny.intermediate_size = 32, 64
    sec = cfg.sections[name]
    for k, v in section.items():
        target, key = (sec.generation, k[4:]) if k.startswith("gen_") else (sec, k)
        if not hasattr(target, key):
            raise AttributeError(key)
        setattr(target, key, v)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    cls = ALGORITHMS[name]
    reference = make_reference("copy", model)
    if ref if ref is not None else (cls.needs_reference or section.get("beta", 0) > 0):
        reference.take()
    rows = rows if rows is not None else make_arith(n_rows, seed=seed)
    examples = [{"prompt_ids": tok.encode(r["prompt"]), "completion_ids": tok.encode(r["answer"]) + [tok.eos_token_id],
                 "row": r, "source": f"arith:{i}", "uid": i} for i, r in enumerate(rows)]
    rt = Runtime(cfg, model, tok, torch.device("cpu"), reference, train_examples=examples if train_stream else [])
    algo = cls(cfg, rt)
    return algo, examples


def run_steps(algo, examples, steps: int, *, lr: float = 1e-2, batch_size: int = 8, opt=None, start: int = 0):
    """``steps`` trainer-like steps; returns (metrics per step, optimizer)."""
    params = [p for p in algo.rt.model.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=lr)
    history = []
    for step in range(start, start + steps):
        batch = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        algo.step_metrics = {}
        algo.rt.steps_done = step  # as the trainer: where the extra optimizers read the run's schedule
        micro = algo.micro_batches(batch, step + 1)  # the trainer counts steps from 1
        opt.zero_grad(set_to_none=True)
        metrics = {}
        for mb in micro:
            loss, metrics = algo.compute_loss(mb)
            assert torch.isfinite(loss), f"step {step}: loss {loss}"
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        algo.on_step_end(step + 1)
        history.append({"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}, **algo.step_metrics})
    return history, opt


def snapshot(algo, opt) -> dict:
    """What the trainer's checkpoint holds (deep-copied), the extra optimizers (``Runtime.build_optimizer``:
    module weights and optimizer state) included."""
    ref = algo.rt.reference
    return copy.deepcopy({"model": algo.rt.model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict(),
                          "extra": algo.rt.optimizer_state(),
                          "ref": ref.state_dict() if ref is not None else {}, "rng": torch.get_rng_state()})


def restore(algo, snap: dict, lr: float = 1e-2):
    algo.rt.model.load_state_dict(snap["model"])
    if algo.rt.reference is not None:
        algo.rt.reference.load_state_dict(snap["ref"])
    algo.load_state_dict(copy.deepcopy(snap["algo"]))
    algo.rt.load_optimizer_state(copy.deepcopy(snap["extra"]))
    opt = torch.optim.AdamW([p for p in algo.rt.model.parameters() if p.requires_grad], lr=lr)
    opt.load_state_dict(snap["opt"])
    torch.set_rng_state(snap["rng"])
    return opt


def interrupted_and_resumed(name: str, kw: dict, before: int, after: int, *, batch_size: int = 4):
    """``(a, b, history)``: ``a`` runs ``before`` steps (``history``), is snapshotted as a checkpoint would be, and
    runs ``after`` more; ``b`` is a fresh algorithm of another seed restored from the snapshot that runs the same
    ``after`` steps. An exact resume leaves ``a`` and ``b`` identical."""
    a, ex = make_algo(name, **kw)
    history, opt = run_steps(a, ex, before, batch_size=batch_size)
    snap = snapshot(a, opt)
    run_steps(a, ex, after, batch_size=batch_size, opt=opt, start=before)
    b, _ = make_algo(name, seed=1, **kw)
    opt_b = restore(b, snap)
    run_steps(b, ex, after, batch_size=batch_size, opt=opt_b, start=before)
    return a, b, history


def assert_same_params(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), f"parameter {n} differs after resume"


# ------------------------------------------------------------------------------------------------ pairing

def test_best_worst_pairs_hand_cases():
    scores = [1.0, 3.0, 2.0,   5.0, 5.0, 5.0,   None, 2.0, 1.0,   0.0, None, None,   4.0, 1.0, 4.0]
    assert best_worst_pairs(scores, 3) == [(1, 0), (7, 8), (12, 13)]
    assert best_worst_pairs([0.5, 0.5], 2) == []
    with pytest.raises(ValueError, match="group_size"):
        best_worst_pairs([1.0, 2.0, 3.0], 2)


def test_rollout_pairs_use_best_and_worst_completions():
    from fastpref.train.rollout import Rollout

    ro = Rollout(["p"] * 4, [[5, 6]] * 4, [[10], [11], [12], [13]], ["a", "b", "c", "d"], [False] * 4, 4)
    (pair,) = common.rollout_pairs(ro, [0.1, 0.9, None, -1.0])
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([5, 6], [11], [13])


@pytest.mark.parametrize("text,expected", [
    ("The response is relevant.\nScore: 4", 4.0),
    ("score = 3", 3.0),
    ("Score: 2 ... after reflection, Score: 5", 5.0),
    ("Score: 8/10", 4.0),
    ("I'd give it 3 points.", 3.0),
    ("Score: 7", None),             # out of range
    ("no number at all", None),
    ("Score: -1", None),
    ("the score is 2.5", 2.5),
])
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text) == expected


def test_replay_mixing_ratio_fifo_and_state():
    buf = ReplayBuffer(capacity=5, seed=1)
    buf.add(list(range(8)))
    assert buf.items == [3, 4, 5, 6, 7]            # FIFO: the oldest went out
    fresh = ["a", "b", "c"]
    mixed = buf.mix(fresh, 0.5)                    # 3 fresh + round(3 * 0.5 / 0.5) = 3 replayed
    assert mixed[:3] == fresh and len(mixed) == 6 and set(mixed[3:]) <= set(buf.items)
    assert len(set(mixed[3:])) == 3                # sampled without replacement
    assert buf.mix(fresh, 0.0) == fresh
    assert len(buf.mix(fresh, 0.75)) == 3 + 5      # wants 9, the buffer has 5
    sd = copy.deepcopy(buf.state_dict())
    first = buf.mix(fresh, 0.5)
    buf2 = ReplayBuffer(seed=99)
    buf2.load_state_dict(sd)
    assert buf2.mix(fresh, 0.5) == first           # resume replays the same draw
    with pytest.raises(ValueError, match="ratio"):
        buf.mix(fresh, 1.0)


# ------------------------------------------------------------------------------------------------ packing

def test_pack_layout_hand_case():
    b = pack([[1, 2, 3], [4]], [[7, 8], [9, 5]])
    assert b.input_ids[0].tolist() == [1, 2, 3, 7, 8, 4, 9, 5]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    # targets[t] = next token where that token is a completion token
    assert b.targets.tolist() == [-100, -100, 7, 8, -100, 9, 5, -100]
    assert b.cu_seqlens.tolist() == [0, 5, 8] and b.cu_seqlens_host == (0, 5, 8)
    assert b.token_seq_ids().tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert b.scored_lengths.tolist() == [2, 2]


def test_pack_pairs_interleaves_chosen_and_rejected():
    b = common.pack_pairs([common.Pair([1], [2], [3, 4]), common.Pair([5, 6], [7], [8])])
    assert b.input_ids[0].tolist() == [1, 2, 1, 3, 4, 5, 6, 7, 5, 6, 8]
    assert b.scored_lengths.tolist() == [1, 2, 1, 1]


def _tiny(pack: bool = False):
    cfg = Config()
    cfg.model.tiny.hidden_size, cfg.model.tiny.intermediate_size = 32, 64
    cfg.data.pack = pack
    tok = build_tokenizer(cfg)
    return build_model(cfg, tok).double(), tok


@pytest.mark.parametrize("packed_attention", [False, True], ids=["padded-trunk", "varlen-trunk"])
def test_packed_logps_match_full_logits_per_sequence(packed_attention):
    """Per-token log-probs from the packed path vs an independent fp64 forward of each sequence alone, with the
    trunk run padded (sdpa) or packed (``attn_implementation="fastpref"``, data.pack=true)."""
    model, tok = _tiny(pack=packed_attention)
    assert (model.config._attn_implementation == "fastpref") == packed_attention
    oracle, _ = _tiny(pack=False)             # the same weights through transformers' own SDPA attention
    oracle.load_state_dict(model.state_dict())
    prompts = [tok.encode("1+2="), tok.encode("3*3=")]
    comps = [tok.encode("3") + [tok.eos_token_id], tok.encode("90")]
    b = pack(prompts, comps)
    logp = token_logps(model, b)
    seq = sequence_logps(model, b)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids = torch.tensor([p + c])
        full = torch.log_softmax(oracle(input_ids=ids).logits[0].double(), -1)
        want = torch.stack([full[len(p) - 1 + j, t] for j, t in enumerate(c)])
        s, e = b.cu_seqlens_host[i], b.cu_seqlens_host[i + 1]
        got = logp[s:e][b.targets[s:e] != -100]
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(seq[i].double(), want.sum(), rtol=1e-6, atol=1e-6)
    # the trunk's hidden states of the packed batch equal a single-sequence forward
    h = decoder_hidden(model, b)
    alone = oracle.get_decoder()(input_ids=torch.tensor([prompts[1] + comps[1]])).last_hidden_state[0]
    torch.testing.assert_close(h[b.cu_seqlens_host[1]:], alone)


def test_generate_groups_eos_and_truncation():
    model, tok = _tiny()
    model = model.float()
    torch.manual_seed(0)
    eos = tok.eos_token_id
    cfg = GenerationConfig(num_generations=3, max_new_tokens=4)
    p_ids = [tok.encode("1+1="), tok.encode("2+2=")]
    ro = generate(model, tok, p_ids, cfg, prompts=["1+1=", "2+2="])
    assert len(ro) == 6 and ro.group_size == 3
    assert ro.prompts == ["1+1="] * 3 + ["2+2="] * 3 and ro.prompt_ids[3] == p_ids[1]
    for c, t, text in zip(ro.completion_ids, ro.truncated, ro.completions):
        assert 1 <= len(c) <= 4
        assert (eos not in c) == t
        if eos in c:
            assert c.index(eos) == len(c) - 1           # cut right after the first EOS
        assert text == tok.decode([i for i in c if i != eos])
    assert ro.timings["generate"] > 0
    # a model whose LM head only emits EOS stops at once (an untied head: zero weight, bias on EOS)
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 20.0
    model.set_output_embeddings(head)
    ro = generate(model, tok, p_ids, GenerationConfig(num_generations=2, max_new_tokens=4, temperature=0.01))
    assert all(c == [eos] for c in ro.completion_ids) and not any(ro.truncated)
    assert ro.completions == [""] * 4


def test_generation_config_errors():
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5).validate()
    with pytest.raises(ValueError, match="backend"):
        GenerationConfig(backend="sglang").validate()


# ------------------------------------------------------------------------------------------------ trainer

@pytest.mark.parametrize("config,overrides", [
    ("examples/grpo_arith.yaml", []),
    ("examples/grpo_arith.yaml", ["data.pack=true", "grpo.beta=0.05", "reference.mode=copy"]),
    ("examples/ppo_arith.yaml", []),
    ("examples/online_dpo.yaml", []),
    ("examples/online_dpo.yaml", ["algorithm=spin", "data.train_files=[examples/data/arith_sft.jsonl]",
                                  "spin.generation.max_new_tokens=2", "spin.reward=arith"]),
    # dice, self_rewarding, apo, ilr_dpo: their own examples, run in tests/test_online_loops.py (dice from a policy
    # equal to its reference, self_rewarding with 2-token judgements and apo without preference data now stop
    # with a one-line can't-learn / config error, as their papers' methods cannot run so)
])
def test_every_algorithm_runs_through_the_trainer(tmp_path, config, overrides):
    """``fastpref train CONFIG`` end to end (3 steps, checkpoint, held-out eval, final model) for every method."""
    import json
    import os

    from fastpref.train.algorithms.base import load_builtin_algorithms
    from fastpref.train.config import load_config
    from fastpref.train.trainer import Trainer

    load_builtin_algorithms()
    cfg = load_config(config, [f"output_dir={tmp_path}", "train.max_steps=3", "train.batch_size=4",
                               "train.save_every=2", "train.eval_every=0", "train.plots=false",
                               "data.eval_fraction=0.02"] + overrides)
    res = Trainer(cfg, quiet=True).run()
    assert res.step == 3
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train = [r for r in recs if r.get("phase") == cfg.algorithm]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)
    assert all("time_share/train" in r and "tokens_per_s" in r for r in train)
    assert os.path.isdir(tmp_path / "final") and os.path.isdir(tmp_path / "checkpoints" / "step-2")


def test_sampling_distribution_is_the_tempered_softmax_the_losses_assume():
    """No hidden top-k (HF's default 50) or penalty: the mass sampled outside the 50 likeliest tokens equals
    their probability under softmax(logits / T)."""
    model, tok = _tiny()
    model = model.float()
    T = 3.0
    p_ids = tok.encode("1+2=")
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([p_ids])).logits[0, -1].double() / T, -1)
    top = set(probs.topk(50).indices.tolist())
    tail_mass = float(probs[[i for i in range(probs.numel()) if i not in top]].sum())
    torch.manual_seed(0)
    n = 3000
    ro = generate(model, tok, [p_ids], GenerationConfig(num_generations=n, max_new_tokens=1, temperature=T))
    frac = sum(c[0] not in top for c in ro.completion_ids) / n
    sd = (tail_mass * (1 - tail_mass) / n) ** 0.5
    assert tail_mass > 0.05 and abs(frac - tail_mass) < 5 * sd, (frac, tail_mass)
