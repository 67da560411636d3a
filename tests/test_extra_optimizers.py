"""Extra trainable modules (PPO's separate critic, APO's reward model) get their optimizer from
``Runtime.build_optimizer``: the run's schedule, ``optim`` betas / eps / weight decay, clipping to
``optim.max_grad_norm``, gradients averaged over ranks (the replicas stay identical when the ranks see different
data), and their weights and AdamW state checkpointed and resumed with the run, through the trainer too."""

from __future__ import annotations

import pytest
import torch
from test_online_common import one_cpu_thread  # noqa: F401  (autouse fixture: one CPU thread)
from test_online_common import assert_same_params, interrupted_and_resumed
from torchrun import TESTS, run_ranks

from fastpref.data.arith import arith_sft_rows
from fastpref.train.algorithms.base import Runtime
from fastpref.train.config import Config
from fastpref.train.schedule import lr_lambda

PREF = ["examples/data/arith_pref.jsonl"]
APO_KW = dict(rows=arith_sft_rows(32, seed=0), preference_files=PREF, rm_init_steps=2, steps_per_iteration=2,
              rm_steps=1, gen_num_generations=3, gen_max_new_tokens=3, iteration_prompts=8)
PPO_KW = dict(gen_num_generations=2, gen_max_new_tokens=3, num_ppo_epochs=2, critic="separate", critic_lr=3e-2)


def _runtime(**optim) -> Runtime:
    cfg = Config(algorithm="sft")
    cfg.train.max_steps = 10
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return Runtime(cfg, torch.nn.Linear(3, 1), None, torch.device("cpu"))


def test_build_optimizer_schedule_clipping_adamw_settings_and_state():
    rt = _runtime(lr=1.0, warmup_steps=2, schedule="linear", max_grad_norm=0.5, betas=[0.8, 0.9], eps=1e-6,
                  weight_decay=0.1)
    mod = torch.nn.Linear(4, 2)
    opt = rt.build_optimizer(mod, 0.2, name="critic")
    assert rt.optimizers == {"critic": opt}
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-6
    assert opt.param_groups[0]["weight_decay"] == 0.1
    again = rt.build_optimizer(torch.nn.Linear(1, 1), 0.1, name="critic")  # an algorithm rebuilt on the runtime
    assert rt.optimizers == {"critic": again}
    opt = rt.build_optimizer(mod, 0.2, name="critic")
    sched = lr_lambda(rt.cfg, 10)
    for done in (0, 1, 5):
        rt.steps_done = done
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(done))
        (100 * mod(x).square().sum()).backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in mod.parameters()]))
        m = opt.update()
        assert m["critic/lr"] == pytest.approx(0.2 * sched(done))            # the run's schedule at its position
        torch.testing.assert_close(m["critic/grad_norm"], norm)               # the norm before clipping
        assert all(p.grad is None for p in mod.parameters())
    assert opt.state_dict()["state"][0]["step"] == 3
    # what the trainer checkpoints: the module's weights and the optimizer's state, by name
    state = rt.optimizer_state()
    rt2 = _runtime(lr=1.0)
    mod2 = torch.nn.Linear(4, 2)
    opt2 = rt2.build_optimizer(mod2, 0.2, name="critic")
    rt2.load_optimizer_state(state)
    assert_same_params(mod, mod2)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        for i in (0, 1):
            assert torch.equal(opt.state_dict()["state"][i][k], opt2.state_dict()["state"][i][k]), k
    with pytest.raises(ValueError, match=r"checkpoint holds \['critic'\], this run builds \[\]"):
        _runtime().load_optimizer_state(state)


def test_clipping_follows_max_grad_norm():
    rt = _runtime(max_grad_norm=1e-3)
    mod = torch.nn.Linear(4, 1)
    opt = rt.build_optimizer(mod, 0.1, name="rm")
    mod(torch.ones(2, 4)).sum().mul(50).backward()
    grads_seen = {}
    opt.register_step_pre_hook(lambda o, a, k: grads_seen.update(
        norm=torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in mod.parameters()]))))
    m = opt.update()
    assert float(m["rm/grad_norm"]) > 1.0 and float(grads_seen["norm"]) == pytest.approx(1e-3, rel=1e-3)
    rt_off = _runtime(max_grad_norm=None)
    opt_off = rt_off.build_optimizer(torch.nn.Linear(1, 1), 0.1, name="rm")
    assert "rm/grad_norm" not in opt_off.update()


# ------------------------------------------------------------------------------------------- two gloo ranks

_DDP_SCRIPT = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
import fastpref.train.distributed as distributed
from test_online_common import make_algo, run_steps
from test_extra_optimizers import APO_KW, PPO_KW

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()

def same_on_ranks(module):
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    out = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return torch.equal(out[0], out[1])

def run(name, kw, module, steps, average=True):
    algo, ex = make_algo(name, **kw)
    assert same_on_ranks(module(algo)), "the replicas must start equal"
    real = distributed.average_grads
    if not average:  # the old path: the extra module's own AdamW, no reduction over ranks
        distributed.average_grads = lambda params: None
    try:
        shift = 16 * rank  # the ranks train on different prompts
        run_steps(algo, ex[shift:] + ex[:shift], steps, batch_size=4)
    finally:
        distributed.average_grads = real
    return same_on_ranks(module(algo))

print("apo rm same:", run("apo", APO_KW, lambda a: a.rm, 3), flush=True)
print("apo rm same without averaging:", run("apo", APO_KW, lambda a: a.rm, 3, average=False), flush=True)
dist.destroy_process_group()
'''


def test_apo_reward_model_stays_identical_over_two_gloo_ranks_that_see_different_data(tmp_path):
    """APO's reward model on 2 gloo processes, each rank rolling out its own prompts: averaged gradients keep the
    replicas bit-identical. The second run takes the old path (no reduction of the extra module's gradients): its
    reward models drift apart, which is what the test catches. (PPO's separate critic: the same check through the
    trainer, ``test_online_ppo.test_separate_critic_gradients_are_averaged_over_torchrun_ranks``.)"""
    script = tmp_path / "ddp_extra.py"
    script.write_text(_DDP_SCRIPT)
    r = run_ranks([script, TESTS])
    assert "apo rm same: True" in r.stdout, r.stdout
    assert "apo rm same without averaging: False" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("name,kw,attr,opt", [("apo", APO_KW, "rm", "rm_opt"), ("ppo", PPO_KW, "critic", "critic_opt")])
def test_extra_optimizer_state_survives_a_kill_and_resume_exactly(name, kw, attr, opt):
    a, b, _ = interrupted_and_resumed(name, kw, 3, 2)
    assert_same_params(getattr(a, attr), getattr(b, attr))
    sa, sb = getattr(a, opt).state_dict()["state"], getattr(b, opt).state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert "rm" not in a.state_dict() and "critic" not in a.state_dict()  # saved once: as the run's extra state


def _apo_cfg(tmp_path, name):
    from fastpref.train.algorithms.base import load_builtin_algorithms
    from fastpref.train.config import load_config

    load_builtin_algorithms()
    return load_config("examples/apo_arith.yaml", [
        f"output_dir={tmp_path / name}", "train.plots=false", "train.max_steps=4", "train.batch_size=4",
        "train.save_every=2", "train.eval_every=0", "train.log_every=1", "optim.schedule=cosine",
        "optim.warmup_steps=1", "apo.steps_per_iteration=2", "apo.rm_init_steps=2", "apo.rm_steps=1",
        "apo.iteration_prompts=4", "apo.generation.num_generations=2"])


def test_apo_reward_model_through_the_trainer_resumes_exactly_on_the_run_schedule(tmp_path):
    """A 4-step APO run (iterations start at steps 1 and 3) against one killed after step 2 and resumed: the
    step-4 checkpoint's reward model and its AdamW state are identical, and the RM's learning rate at step 3 is
    ``rm_lr`` times the run's schedule there."""
    import json

    from fastpref.train import checkpoint as ckpt
    from fastpref.train.trainer import Trainer

    Trainer(_apo_cfg(tmp_path, "full"), quiet=True).run()
    Trainer(_apo_cfg(tmp_path, "cut"), quiet=True, stop_after=2).run()
    torch.manual_seed(4321)  # the resumed run must not depend on the process's RNG state
    Trainer(_apo_cfg(tmp_path, "cut"), quiet=True).run()
    sa, sb = (ckpt.load_state(str(tmp_path / run / "checkpoints" / "step-4"), "algorithm")["optimizers"]["rm"]
              for run in ("full", "cut"))
    assert sa["model"].keys() == sb["model"].keys() and sa["model"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for i, st in sa["optimizer"]["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], sb["optimizer"]["state"][i][k]), (i, k)
    assert int(sa["optimizer"]["state"][0]["step"]) == 2 + 2  # rm_init_steps, then one RM step per iteration
    recs = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    (r3,) = [r for r in recs if r["step"] == 3 and r["phase"] == "apo"]
    cfg = _apo_cfg(tmp_path, "cut")
    assert r3["rm/lr"] == pytest.approx(cfg.sections["apo"].rm_lr * lr_lambda(cfg, 4)(2))
