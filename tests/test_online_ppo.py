"""PPO with a value head: learning on the arithmetic task, the rollout's KL-penalised rewards / GAE / whitening
against a naive per-sequence recomputation, the packed <-> padded conversion, and resume mid-epochs."""

from __future__ import annotations

import pytest
import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, interrupted_and_resumed, make_algo, run_steps

from fastpref.data.arith import arith_reward
from fastpref.train.online.ppo import from_padded, to_padded
from fastpref.train.rollout import pack
from fastpref.train.schedule import lr_lambda


def test_to_from_padded_hand_case():
    b = pack([[1, 2], [3]], [[4, 5, 6], [7]])
    vals = torch.arange(b.targets.numel(), dtype=torch.float32) + 1  # tokens 1..N
    # sequence 0 = [1,2,4,5,6]: completion targets at positions 1,2,3; sequence 1 = [3,7]: position 5
    assert b.targets.tolist() == [-100, 4, 5, 6, -100, 7, -100]
    assert to_padded(vals, b).tolist() == [[2.0, 3.0, 4.0], [6.0, 0.0, 0.0]]
    back = from_padded(to_padded(vals, b), b)
    assert back.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 6.0, 0.0]


def test_ppo_raises_mean_reward_on_arith():
    algo, ex = make_algo("ppo", gen_num_generations=4, gen_max_new_tokens=2, num_ppo_epochs=2, kl_coef=0.01)
    hist, _ = run_steps(algo, ex, 60, lr=2e-2)
    r = [h["objective/scores"] for h in hist if "objective/scores" in h]
    assert len(r) == 30
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.2, f"PPO mean reward did not rise: {first:.3f} -> {last:.3f}"
    for key in ("objective/kl", "value/clipfrac", "loss/value", "clip_ratio/region_mean", "entropy"):
        assert key in hist[-1] or key in hist[-2], key


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_rollout_advantages_match_naive_gae(critic):
    kl_coef, gamma, lam = 0.3, 0.9, 0.8
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=4, kl_coef=kl_coef, gamma=gamma, lam=lam,
                         critic=critic)
    model = algo.rt.model.double()
    algo.ref_module().double()
    with torch.no_grad():                                      # the reference differs from the policy
        for p in algo.ref_module().parameters():
            p.add_(0.05 * torch.randn_like(p))
    if critic == "shared":
        torch.nn.init.normal_(algo.value_head.weight, std=0.5)     # non-trivial values

        def hidden_values(ids):
            return algo.value_head(model.get_decoder()(input_ids=ids[None]).last_hidden_state[0])
    else:
        algo.critic.double()
        torch.nn.init.normal_(algo.critic.head.weight, std=0.5)
        with torch.no_grad():                                  # its own trunk, not the policy's
            for p in algo.critic.trunk.parameters():
                p.add_(0.05 * torch.randn_like(p))

        def hidden_values(ids):
            return algo.critic.head(algo.critic.trunk(input_ids=ids[None]).last_hidden_state[0])
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:3], 0)
    b = mb.batch
    ref_model = algo.ref_module()
    adv_all, ret_all = [], []
    for i in range(b.scored_lengths.numel()):
        s, e = b.cu_seqlens_host[i], b.cu_seqlens_host[i + 1]
        ids = b.input_ids[0, s:e]
        n_c = int(b.scored_lengths[i])
        n_p = ids.numel() - n_c
        comp = ids[n_p:]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            lr = torch.log_softmax(ref_model(input_ids=ids[None]).logits[0].double(), -1)
            v = hidden_values(ids).squeeze(-1).double()
        pos = range(n_p - 1, n_p - 1 + n_c)
        logp = torch.stack([lp[t, comp[j]] for j, t in enumerate(pos)])
        refp = torch.stack([lr[t, comp[j]] for j, t in enumerate(pos)])
        vals = torch.stack([v[t] for t in pos])
        text = algo.rt.tokenizer.decode([t for t in comp.tolist() if t != algo.rt.tokenizer.eos_token_id])
        score = arith_reward(None, [text], answer=[ex[i // 2]["row"]["answer"]])[0]
        r = -kl_coef * (logp - refp)
        r[-1] += score
        adv, last = [0.0] * n_c, 0.0
        for t in reversed(range(n_c)):
            nxt = vals[t + 1] if t + 1 < n_c else 0.0
            last = r[t] + gamma * nxt - vals[t] + gamma * lam * last
            adv[t] = last
        adv = torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in adv])
        adv_all.append(adv)
        ret_all.append(adv + vals)
    adv, ret = torch.cat(adv_all), torch.cat(ret_all)
    white = (adv - adv.mean()) / torch.sqrt(adv.var(unbiased=True) + 1e-8)
    on = b.targets != -100
    torch.testing.assert_close(mb.returns[on].double(), ret, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mb.advantages[on].double(), white, rtol=1e-5, atol=1e-6)
    assert bool((mb.advantages[~on] == 0).all())


@pytest.mark.parametrize("critic", [{}, {"critic": "separate", "critic_lr": 3e-2}], ids=["shared", "separate"])
def test_ppo_resume_mid_epochs_continues_identically(critic):
    kw = dict(gen_num_generations=2, gen_max_new_tokens=3, num_ppo_epochs=3, **critic)
    a, b, _ = interrupted_and_resumed("ppo", kw, 4, 3)       # rollout 2 is used by steps 4, 5, 6
    assert_same_params(a.rt.model, b.rt.model)
    if critic:
        assert_same_params(a.critic, b.critic)
        assert a.critic_opt.state_dict()["state"][0]["step"] == b.critic_opt.state_dict()["state"][0]["step"] == 7


def _policy_trunk(model):
    return dict(model.get_decoder().named_parameters())


def test_separate_critic_is_a_fresh_copy_of_the_policy_trunk_with_its_own_optimizer():
    algo, _ = make_algo("ppo", critic="separate", critic_lr=0.25)
    model, critic = algo.rt.model, algo.critic
    assert not hasattr(model, "value_head") and algo.value_head is None
    trunk = _policy_trunk(model)
    assert dict(critic.trunk.named_parameters()).keys() == trunk.keys()
    for n, p in critic.trunk.named_parameters():
        assert torch.equal(p, trunk[n]) and p.data_ptr() != trunk[n].data_ptr(), n
    assert not critic.head.weight.any() and not critic.head.bias.any()
    ids = {id(p) for p in model.parameters()}
    assert all(p.requires_grad and id(p) not in ids for p in critic.parameters())
    assert [g["lr"] for g in algo.critic_opt.param_groups] == [0.25]
    algo2, _ = make_algo("ppo", critic="separate")
    assert algo2.critic_opt.param_groups[0]["lr"] == algo2.cfg.optim.lr


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_value_loss_reaches_the_policy_only_through_a_shared_critic(critic):
    """Same micro-batch, ``vf_coef`` 0.1 vs 1.0: with a separate critic the policy's gradients are identical and the
    critic's are 10x; with the shared head the trunk's gradients change."""
    algo, ex = make_algo("ppo", gen_num_generations=2, gen_max_new_tokens=3, critic=critic)
    head = algo.critic.head if critic == "separate" else algo.value_head
    torch.nn.init.normal_(head.weight, std=0.5)
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:4], 1)
    critic_params = list(algo.critic.parameters()) if critic == "separate" else []
    grads = []
    for vf in (0.1, 1.0):
        algo.sec.vf_coef = vf
        algo.rt.model.zero_grad(set_to_none=True)
        for p in critic_params:
            p.grad = None
        loss, _ = algo.compute_loss(mb)
        loss.backward()
        grads.append(({n: p.grad.clone() for n, p in _policy_trunk(algo.rt.model).items() if p.grad is not None},
                      [p.grad.clone() for p in critic_params]))
    (pol_a, cri_a), (pol_b, cri_b) = grads
    assert pol_a.keys() == pol_b.keys() and pol_a
    same = all(torch.equal(pol_a[n], pol_b[n]) for n in pol_a)
    assert same == (critic == "separate")
    for ga, gb in zip(cri_a, cri_b):
        torch.testing.assert_close(gb, 10 * ga, rtol=1e-4, atol=1e-4 * float(ga.abs().max()))
    assert critic == "shared" or any(g.abs().sum() > 0 for g in cri_a)


def test_separate_critic_steps_in_on_step_end_and_fits_the_returns():
    algo, ex = make_algo("ppo", gen_num_generations=4, gen_max_new_tokens=2, num_ppo_epochs=2, critic="separate",
                         critic_lr=2e-2)
    before = [p.detach().clone() for p in algo.critic.parameters()]
    hist, _ = run_steps(algo, ex, 24, lr=1e-3)
    sched = lr_lambda(algo.cfg, algo.cfg.train.max_steps)  # the run's schedule (test_ppo_details checks its values)
    assert [h["critic/lr"] for h in hist] == pytest.approx([2e-2 * sched(s) for s in range(24)])
    assert all(h["critic/grad_norm"] > 0 for h in hist)
    assert all(p.grad is None for p in algo.critic.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(algo.critic.parameters(), before))
    vl = [h["loss/value"] for h in hist]
    first, last = sum(vl[:4]) / 4, sum(vl[-4:]) / 4
    assert last < 0.5 * first, f"the critic's value loss did not fall: {first:.4f} -> {last:.4f}"


def _saved_tiny(tmp_path, kind: str, seed: int):
    """A tiny Llama of ``kind`` with perturbed weights (so that it differs from the policy), saved to a directory."""
    from fastpref.train.config import Config
    from fastpref.train.modeling import build_model, build_tokenizer

    cfg = Config(algorithm="ppo")
    cfg.model.tiny.hidden_size, cfg.model.tiny.intermediate_size = 32, 64
    model = build_model(cfg, build_tokenizer(cfg), kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    out = tmp_path / kind
    model.save_pretrained(out)
    return str(out), model


@pytest.mark.parametrize("kind", ["sequence_classification", "causal_lm"])
def test_separate_critic_from_a_saved_model(tmp_path, kind):
    """``critic_path``: an ``algorithm=rm``-style checkpoint keeps its score head; a causal LM gets a zero head."""
    path, saved = _saved_tiny(tmp_path, kind, seed=5)
    algo, ex = make_algo("ppo", critic="separate", critic_path=path, gen_num_generations=2, gen_max_new_tokens=2)
    want = dict(saved.get_decoder().named_parameters())
    got = dict(algo.critic.trunk.named_parameters())
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    if kind == "sequence_classification":
        assert torch.equal(algo.critic.head.weight, saved.score.weight)
    else:
        assert not algo.critic.head.weight.any()
    algo.step_metrics = {}
    (mb,) = algo.micro_batches(ex[:2], 1)
    assert (mb.values.abs().sum() > 0) == (kind == "sequence_classification")


def test_ppo_critic_config_errors(tmp_path):
    with pytest.raises(ValueError, match="ppo.critic must be one of"):
        make_algo("ppo", critic="twin")
    with pytest.raises(ValueError, match="set ppo.critic=separate"):
        make_algo("ppo", critic_path=str(tmp_path))
    with pytest.raises(ValueError, match="ppo.critic_lr must be > 0"):
        make_algo("ppo", critic="separate", critic_lr=0.0)
    with pytest.raises(ValueError, match="ppo.critic_path=.*not a model directory"):
        make_algo("ppo", critic="separate", critic_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ppo.critic_path=.*cannot load"):
        make_algo("ppo", critic="separate", critic_path=str(tmp_path))  # a directory without a model
    a, _ = make_algo("ppo")
    b, _ = make_algo("ppo", critic="separate")
    with pytest.raises(ValueError, match="another ppo.critic"):
        b.load_state_dict(a.state_dict())


def _trainer_cfg(tmp_path, name, **over):
    from fastpref.train.algorithms.base import load_builtin_algorithms
    from fastpref.train.config import load_config

    load_builtin_algorithms()
    args = [f"output_dir={tmp_path / name}", "train.plots=false", "train.max_steps=6", "train.batch_size=4",
            "train.save_every=3", "train.eval_every=0", "data.eval_fraction=0.05",
            "ppo.generation.num_generations=2"] + [f"{k}={v}" for k, v in over.items()]
    return load_config("examples/ppo_arith.yaml", args)


def _killed_and_resumed(tmp_path, **over):
    """Final weights (``final/*.safetensors``) of an uninterrupted 6-step run and of one killed after step 3 and
    resumed from its step-3 checkpoint (mid-rollout: 2 PPO epochs per rollout, rollouts at steps 1, 3, 5)."""
    from safetensors.torch import load_file

    from fastpref.train.trainer import Trainer

    Trainer(_trainer_cfg(tmp_path, "full", **over), quiet=True).run()
    Trainer(_trainer_cfg(tmp_path, "cut", **over), quiet=True, stop_after=3).run()
    torch.manual_seed(4321)  # the resumed run must not depend on the process's RNG state
    Trainer(_trainer_cfg(tmp_path, "cut", **over), quiet=True).run()
    name = "adapter_model.safetensors" if over.get("model.lora.enabled") == "true" else "model.safetensors"
    return (load_file(str(tmp_path / "full" / "final" / name)), load_file(str(tmp_path / "cut" / "final" / name)))


@pytest.mark.parametrize("over", [{"model.lora.enabled": "true"},
                                  {"ppo.critic": "separate", "ppo.critic_lr": "0.03"},
                                  {"model.lora.enabled": "true", "ppo.critic": "separate"}],
                         ids=["lora-shared-head", "separate-critic", "lora-separate-critic"])
def test_ppo_through_the_trainer_resumes_mid_epochs_to_the_same_weights(tmp_path, over):
    """With LoRA the trainer's checkpoint holds only the adapters: the shared value head (its value loss trains the
    adapters through the trunk, its values feed GAE) must survive a resume too; a separate critic, its optimizer
    and schedule as well (their values feed GAE of the rollout at step 5)."""
    if over.get("model.lora.enabled"):
        pytest.importorskip("peft")
    a, b = _killed_and_resumed(tmp_path, **over)
    assert a.keys() == b.keys() and (any("lora_" in k for k in a) or "model.lora.enabled" not in over)
    assert ("value_head.weight" in a) == (over.get("ppo.critic") != "separate" and "model.lora.enabled" not in over)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # final/ also holds the trained critic: final/critic/ (trunk + head), or the shared head next to the adapters
    from safetensors.torch import load_file

    critic_files = (["critic/model.safetensors", "critic/value_head.safetensors"] if over.get("ppo.critic")
                    else ["value_head.safetensors"])
    for name in critic_files:
        fa, fb = (load_file(str(tmp_path / run / "final" / name)) for run in ("full", "cut"))
        assert fa.keys() == fb.keys() and fa
        for k in fa:
            assert torch.equal(fa[k], fb[k]), (name, k)
    head = load_file(str(tmp_path / "full" / "final" / critic_files[-1]))["weight"]
    assert head.abs().sum() > 0  # trained away from its zero initialisation


_DDP_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
from fastpref.train.algorithms.base import load_builtin_algorithms
from fastpref.train.config import load_config
from fastpref.train.trainer import Trainer

load_builtin_algorithms()
cfg = load_config("examples/ppo_arith.yaml", [f"output_dir={sys.argv[1]}", "train.plots=false", "train.max_steps=2",
                  "train.batch_size=2", "train.eval_every=0", "ppo.critic=separate",
                  "ppo.generation.num_generations=2"])
t = Trainer(cfg, quiet=True)
t.run()
for name, mod in (("critic", t.algo.critic), ("policy", t.model)):
    flat = torch.cat([p.detach().reshape(-1) for p in mod.parameters()])
    out = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    if dist.get_rank() == 0:
        print(name, "same on both ranks:", torch.equal(out[0], out[1]), flush=True)
'''


def test_separate_critic_gradients_are_averaged_over_torchrun_ranks(tmp_path):
    """Two gloo processes roll out different prompts; their critics (like their policies) must stay identical."""
    from torchrun import run_ranks

    script = tmp_path / "ddp_critic.py"
    script.write_text(_DDP_SCRIPT)
    r = run_ranks([script, tmp_path / "out"])
    assert "critic same on both ranks: True" in r.stdout and "policy same on both ranks: True" in r.stdout
