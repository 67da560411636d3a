"""Iterative pair methods on the tiny model: online DPO, SPIN, DICE, Self-Rewarding (end to end, reference refresh,
pairing against hand-made cases, the DPO loss against an independent computation, resume mid-round)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, make_algo, restore, run_steps, snapshot

from fastpref.data.arith import arith_sft_rows
from fastpref.train.online.common import Pair
from fastpref.train.online.spin import spin_pairs


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_online_dpo_runs_refreshes_reference_and_matches_naive_dpo():
    algo, ex = make_algo("online_dpo", beta=0.5, steps_per_iteration=2, gen_num_generations=4, gen_max_new_tokens=3)
    # the loss of one micro-batch equals -log sigmoid(beta * margin) from independent fp64 log-probs
    model, ref = algo.rt.model.double(), algo.ref_module().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:4], 1)
    assert algo.step_metrics["pairs/count"] >= 1
    loss, m = algo.compute_loss(mb)
    b = mb.batch

    def seq_logp(net, i):
        s, e = b.cu_seqlens_host[i], b.cu_seqlens_host[i + 1]
        ids = b.input_ids[0, s:e]
        n_c = int(b.scored_lengths[i])
        lp = torch.log_softmax(net(input_ids=ids[None]).logits[0].double(), -1)
        return sum(lp[t - 1, ids[t]] for t in range(ids.numel() - n_c, ids.numel()))

    with torch.no_grad():
        n = b.scored_lengths.numel() // 2
        margins = torch.stack([(seq_logp(model, 2 * i) - seq_logp(ref, 2 * i))
                               - (seq_logp(model, 2 * i + 1) - seq_logp(ref, 2 * i + 1)) for i in range(n)])
    torch.testing.assert_close(loss.double(), -F.logsigmoid(0.5 * margins).mean(), rtol=1e-6, atol=1e-8)

    algo, ex = make_algo("online_dpo", steps_per_iteration=2, gen_num_generations=4, gen_max_new_tokens=3)
    ref0 = _params(algo.ref_module())
    hist, _ = run_steps(algo, ex, 3, batch_size=4, lr=1e-2)
    assert [h["round"] for h in hist] == [0.0, 1.0, 1.0]
    now = _params(algo.ref_module())
    assert any(not torch.equal(a, b) for a, b in zip(ref0, now)), "reference was not refreshed after the iteration"
    assert all("reward/mean" in h and "pairs/count" in h for h in hist)


@pytest.mark.parametrize("loss_type,alpha", [("ipo", 0.0), ("hinge", 0.1), ("sigmoid", 0.1)])
def test_online_dpo_other_loss_types_and_length_regularisation(loss_type, alpha):
    algo, ex = make_algo("online_dpo", loss_type=loss_type, length_alpha=alpha, gen_num_generations=3,
                         gen_max_new_tokens=3)
    hist, _ = run_steps(algo, ex, 2, batch_size=4)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


def test_pair_config_errors_surface_at_construction():
    with pytest.raises(ValueError, match="rdpo_alpha"):
        make_algo("online_dpo", loss_type="ipo", length_alpha=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        make_algo("online_dpo", loss_type="sigmoidd")
    with pytest.raises(ValueError, match="num_generations"):
        make_algo("online_dpo", gen_num_generations=1)


def test_spin_pairs_hand_made():
    pairs, same = spin_pairs([[1], [2], [3]], [[7, 1], [8, 1], [9, 1]], [[5, 1], [8, 1], [4]])
    assert same == 1
    assert pairs == [Pair([1], [7, 1], [5, 1]), Pair([3], [9, 1], [4])]
    with pytest.raises(ValueError, match="one gold"):
        spin_pairs([[1]], [[2]], [])


def test_spin_end_to_end_gold_is_chosen_and_generated_by_the_opponent():
    rows = arith_sft_rows(32, seed=0)
    algo, ex = make_algo("spin", rows=rows, steps_per_iteration=2, beta=0.1, gen_max_new_tokens=3, reward="arith")
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:4], 1)
    b = mb.batch
    tok = algo.rt.tokenizer
    for i in range(b.scored_lengths.numel() // 2):   # chosen = the gold answer + EOS
        e = b.cu_seqlens_host[2 * i + 1]
        n_c = int(b.scored_lengths[2 * i])
        assert tok.decode(b.input_ids[0, e - n_c:e].tolist()) in {r["answer"] for r in rows}
    hist, _ = run_steps(algo, ex, 3, batch_size=4, lr=1e-2)
    assert [h["round"] for h in hist] == [0.0, 1.0, 1.0]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


def test_self_rewarding_judges_with_the_frozen_model_and_pairs_extremes():
    # the iteration's dataset is built once, by M_t, when the iteration starts (the paper), no longer per step
    algo, ex = make_algo("self_rewarding", gen_num_generations=3, gen_max_new_tokens=2, judge_max_new_tokens=2,
                         judge_template="{prompt}{response}=", steps_per_iteration=2, iteration_prompts=2)
    scripted = iter([[4.0, None, 1.0, 2.0, 2.0, 2.0]])

    def judge(prompts, responses):                                  # hand-made judgements
        algo.step_metrics.update({"judge/unparseable": 3.0, "judge/judgements": 18.0})
        return next(scripted)

    algo.judge = judge
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:2], 1)
    assert algo.step_metrics["pairs/count"] == 1                     # group 2 is all ties
    assert algo.step_metrics["judge/parse_rate"] == pytest.approx(5 / 6)
    # the real judge: the tiny policy's own generations, 3 judgements each; with 2 new tokens none has a
    # "Score: N" line, so the whole iteration has nothing to learn: a one-line error, not a silent run
    del algo.judge
    from fastpref.train.online.common import CannotLearn

    algo.on_step_end(1)
    algo.on_step_end(2)                                              # next iteration
    with pytest.raises(CannotLearn, match="unparseable judgements: 18/18"):
        run_steps(algo, ex, 1, batch_size=2, start=2)
