"""fastpref.integrations.trl and TRL's reward-function signature (issue 16, items 1 and 5).

* TRL's own ``DPOTrainer``, ``GRPOTrainer`` (trivial reward, 2 generations, no vLLM) and ``SFTTrainer`` for 3 steps
  on a tiny Llama, once unpatched and once patched (SFT patched also padding-free on the ``"fastpref"``
  attention): every logged loss and metric and the final weights equal within fp32 tolerance, and the patched
  run computed every log-prob call with fastpref (none fell back to TRL's function).
* ``token_stats`` (what the patch computes) against an fp64 full-logits reference, TRL's ``ChunkedLogProbFunction``
  against the same reference, forward outputs and gradients; plain, biased + scaled + tempered, softcapped.
* A model's own fused forward (TRL's ``add_fused_lm_head``) patched vs TRL's, outputs and gradients, for families
  with an LM-head bias, a final softcap, a logit scale, and an unknown transform (refused: TRL's path, said once).
* Peak memory of the logits path (forward + backward), TRL's function vs fastpref's, measured as the peak of live
  tensor bytes allocated inside it (a ``TorchDispatchMode``), printed (``pytest -s``) and recorded in docs/trl.md.
* Reward functions called with TRL's signature by fastpref's reward-calling code: two of TRL's own
  (``trl.rewards.think_format_reward`` on conversational rows, ``get_repetition_penalty_reward`` on
  ``completion_ids``) through ``OnlineAlgorithm.score`` and a short fastpref GRPO run; columns inferred from
  signatures; ``None`` skipped by ``combine``.
"""

from __future__ import annotations

import importlib.util
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpref import rewards as R
from fastpref.train.modeling import LogitTransform

HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install -e .[test])")

# fp32 computations compared with each other or with an fp64 reference: relative to the largest magnitude
RTOL = 1e-5
ATOL = 1e-6


def assert_close(got, want, what: str, rtol: float = RTOL):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale + ATOL, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with TRL unpatched."""
    if HAS_TRL:
        import fastpref.integrations.trl as ft

        ft.unpatch()
        yield ft
        ft.unpatch()
    else:
        yield None


# ------------------------------------------------------------------------------------------------ patching

@needs_trl
def test_import_registers_attention_and_leaves_trl_alone(_unpatched):
    import trl.trainer.dpo_trainer as dpo_mod
    import trl.trainer.utils as utils
    from transformers import AttentionInterface
    from trl.kernels import ChunkedLogProbFunction

    ft = _unpatched
    assert ft.ATTN_IMPLEMENTATION == "fastpref" and "fastpref" in AttentionInterface._global_mapping
    assert utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert dpo_mod.add_fused_lm_head is utils.add_fused_lm_head
    assert not ft.is_patched()


@needs_trl
def test_patch_is_idempotent_a_context_manager_and_version_gated(_unpatched, monkeypatch, caplog):
    import trl
    import trl.trainer.grpo_trainer as grpo_mod
    import trl.trainer.utils as utils

    ft = _unpatched
    trl_fn, trl_add = utils._ChunkedLogProbFunction, utils.add_fused_lm_head
    ft.patch()
    patched_fn = utils._ChunkedLogProbFunction
    assert ft.is_patched() and patched_fn is not trl_fn and grpo_mod.add_fused_lm_head is not trl_add
    ft.patch()  # idempotent: nothing wrapped twice
    assert utils._ChunkedLogProbFunction is patched_fn and patched_fn.trl_fn is trl_fn
    ft.unpatch()
    ft.unpatch()
    assert utils._ChunkedLogProbFunction is trl_fn and grpo_mod.add_fused_lm_head is trl_add
    with ft.patch() as handle:
        assert handle.active
    assert not ft.is_patched() and utils._ChunkedLogProbFunction is trl_fn
    with pytest.raises(ValueError, match="impl must be one of"):
        ft.patch(impl="cuda")
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(RuntimeError, match=r"tested with trl>=1\.16\.0,<1\.17, found trl 1\.15\.2"):
        ft.patch()
    assert not ft.is_patched()
    ft.patch(allow_untested=True)
    assert ft.is_patched()
    # TRL's reading of the config disagrees with fastpref's family table: fastpref's is used, said once
    ft._compare(LogitTransform(softcap=3.0), None, 1.0)
    assert "using fastpref's (the model's own forward)" in caplog.text


# ------------------------------------------------------------------------------------------------ the op

def _reference(h, w, b, t, temperature, tr: LogitTransform):
    """fp64 full logits: (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)."""
    z = h.double() @ w.double().T + (0 if b is None else b.double())
    z = z * tr.logit_scale
    if tr.softcap is not None:
        z = tr.softcap * torch.tanh(z / tr.softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    return (logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1), torch.logsumexp(2 * logp, -1),
            z.mean(-1), z.argmax(-1) == t)


CASES = {"plain": (LogitTransform(), 1.0, False),
         "bias_scale_temperature": (LogitTransform(logit_scale=0.25), 0.7, True),
         "softcap": (LogitTransform(softcap=2.5), 1.3, True)}


@needs_trl
@pytest.mark.parametrize("case", list(CASES))
def test_token_stats_match_fp64_reference_and_trl(case):
    from trl.kernels import ChunkedLogProbFunction

    from fastpref.integrations.trl import OUTPUTS, token_stats

    tr, temp, has_bias = CASES[case]
    g = torch.Generator().manual_seed(1)
    N, H, V = 70, 24, 301
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.6).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if has_bias else None
    t = torch.randint(0, V, (N,), generator=g)
    raw = h[:5].detach() @ w.detach().T + (0 if b is None else b.detach())
    t[:5] = raw.argmax(-1)  # some targets are the top-1 (the transforms are monotonic), for a non-trivial is_top1
    leaves = [x for x in (h, w, b) if x is not None]
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)  # upstream gradients of logp and entropy

    def run(fn):
        out = fn()
        grads = torch.autograd.grad((out[0] * gl).sum() + (out[1] * ge).sum(), leaves)
        return [o.detach() for o in out], grads

    ref, ref_grads = run(lambda: _reference(h, w, b, t, temp, tr))
    ours, our_grads = run(lambda: token_stats(h, w, t, bias=b, temperature=temp, transform=tr, outputs=OUTPUTS))
    trls, trl_grads = run(lambda: ChunkedLogProbFunction.apply(h, w, b, t, temp, 32768, tr.softcap, tr.logit_scale,
                                                                OUTPUTS[1:]))
    assert ref[4][:5].all() and not ref[4].all()
    for name, r, o, x in zip(OUTPUTS, ref, ours, trls):
        if name == "is_top1":
            assert o.dtype == torch.bool and torch.equal(o, r) and torch.equal(x, r), name
        else:
            assert o.dtype == torch.float32, name
            assert_close(o, r, f"fastpref {name} vs fp64")
            assert_close(x, r, f"TRL {name} vs fp64")
    for i, (r, o, x) in enumerate(zip(ref_grads, our_grads, trl_grads)):
        assert_close(o, r, f"fastpref grad {i} vs fp64")
        assert_close(x, r, f"TRL grad {i} vs fp64")
    # only what is asked is computed
    only = token_stats(h, w, t, bias=b, temperature=temp, transform=tr, outputs=("log_probs",))
    assert only[0] is not None and all(x is None for x in only[1:])


# A model's own fused forward (TRL's add_fused_lm_head), patched vs TRL's: families with a bias, a softcap, a logit
# scale (TRL reads them from the config, fastpref from its family table: they agree), and an unknown family with a
# transform, which fastpref refuses, so it falls back to TRL's function (said once).
FAMILIES = {"llama": ("Llama", {}), "phi_bias": ("Phi", {}),
            "gemma2_softcap": ("Gemma2", {"final_logit_softcapping": 2.0}),
            "granite_scale": ("Granite", {"logits_scaling": 0.25}), "cohere_scale": ("Cohere", {"logit_scale": 4.0}),
            "unknown_transform": ("Llama", {"logits_scaling": 2.0})}


@needs_trl
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_fused_forward_patched_equals_trl(family, _unpatched, caplog):
    import copy

    import transformers
    import trl.trainer.sft_trainer as sft_mod

    ft = _unpatched
    name, over = FAMILIES[family]
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **over)
    torch.manual_seed(0)
    base = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(4.0)  # large logits: the transforms matter
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (3, 10), generator=g)
    labels = ids.masked_fill(torch.arange(10) < 4, -100)
    labels[1, 8:] = -100
    runs = []
    for patched in (False, True):
        model = copy.deepcopy(base)
        if patched:
            ft.patch()
        sft_mod.add_fused_lm_head(model, temperature=0.8, outputs=ft.OUTPUTS)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        loss = (out.log_probs * torch.linspace(0.5, 1.5, 9)).sum() + 0.3 * out.entropy.sum()
        params = [p for p in model.parameters() if p.requires_grad]
        runs.append(([getattr(out, o).detach() for o in ft.OUTPUTS], torch.autograd.grad(loss, params)))
        marked = hasattr(model, "_fastpref_trl_transform")
        ft.unpatch()
    refused = family == "unknown_transform"
    assert marked != refused
    assert refused == any("TRL's own log-prob path is used" in r.getMessage() for r in caplog.records)
    assert not any("fastpref's family table" in r.getMessage() for r in caplog.records)  # TRL and fastpref agree
    (out0, g0), (out1, g1) = runs
    for o, a, b in zip(ft.OUTPUTS, out0, out1):
        if o == "is_top1":
            assert torch.equal(a, b), f"{family}: {o}"
        else:
            assert_close(b, a, f"{family}: {o}")
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert_close(b, a, f"{family}: grad {i}")


# ------------------------------------------------------------------------------------------------ peak memory

class PeakBytes(TorchDispatchMode):
    """Peak of the bytes of live tensors allocated by ops run inside (one count per storage, freed when the
    storage is); works through autograd's backward (the mode is part of the thread-local state it propagates)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.live:
                    self.live[key] = st.nbytes()
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key, 0)


def _peak_bytes(fn, N: int, H: int, V: int) -> int:
    """Peak live bytes of ``fn(h, w, t)`` -> (logp, ...): forward, then backward of ``logp`` (TRL's trainers read
    the other outputs without gradient)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    with PeakBytes() as p:
        out = fn(h, w, t)
        out[0].sum().backward()
        del out
    return p.peak


@needs_trl
def test_logits_path_peak_memory():
    """The SFT/DPO call (log-probs, entropy, mean logits, top-1), forward + backward, fp32 on CPU: fastpref's peak
    stays one tile budget as the tokens grow (N = 256 -> 1024 at V = 16000), TRL's CPU path grows with N.
    docs/trl.md has the larger sizes."""
    from trl.kernels import ChunkedLogProbFunction

    from fastpref.integrations.trl import token_stats

    H, V = 64, 16000
    extra = ("entropy", "mean_logits", "is_top1")

    def ours(h, w, t):
        return token_stats(h, w, t, outputs=("log_probs", *extra))

    def trls(h, w, t):
        return ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, None, 1.0, extra)

    small, large, trl_large = _peak_bytes(ours, 256, H, V), _peak_bytes(ours, 1024, H, V), _peak_bytes(trls, 1024, H, V)
    mib = 1 << 20
    print(f"\nlogits path peak (H={H}, V={V}, fp32, CPU, forward+backward, SFT/DPO outputs): fastpref "
          f"{small / mib:.1f} MiB at N=256, {large / mib:.1f} MiB at N=1024; TRL 1.16 {trl_large / mib:.1f} MiB at "
          f"N=1024; one [N, V] fp32 logits tensor {1024 * V * 4 / mib:.1f} MiB at N=1024")
    assert large <= 1.05 * small + 4 * V * 4  # + the [N]-sized outputs and [N, H] gradient growing with N
    assert large < 0.25 * trl_large


# ------------------------------------------------------------------------------------------------ TRL's trainers

def _tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (no download): ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then
    printable ASCII and newline (BPE without merges)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = "\n" + "".join(chr(c) for c in range(32, 127))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A saved tiny Llama (hidden 32, 2 layers, vocab 256) and its tokenizer."""
    if not HAS_TRL:
        pytest.skip("trl is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok = _tokenizer()
    tok.save_pretrained(path)
    return str(path), tok


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _trainer(kind: str, path: str, tok, out_dir: str, *, patched: bool):
    import trl
    from datasets import Dataset

    # plain SGD: the final weights then differ by what the gradients differ by (Adam's m / sqrt(v) would turn fp32
    # rounding of near-zero gradients into lr-sized steps)
    common = dict(output_dir=out_dir, max_steps=3, per_device_train_batch_size=4, optim="sgd", learning_rate=0.1,
                  logging_steps=1,
                  report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0, bf16=False)  # TRL's configs default to bf16 autocast; fp32 here
    pairs = [(a, b) for a in range(4) for b in range(4)]
    if kind == "dpo":
        ds = Dataset.from_list([{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a * b + 1)}
                                for a, b in pairs])
        return trl.DPOTrainer(model=path, args=trl.DPOConfig(**common, beta=0.1), train_dataset=ds,
                              processing_class=tok)
    if kind == "grpo":
        ds = Dataset.from_list([{"prompt": f"{a}+{b}="} for a, b in pairs])
        args = trl.GRPOConfig(**common, num_generations=2, max_completion_length=6, beta=0.1, use_vllm=False)
        return trl.GRPOTrainer(model=path, reward_funcs=_length_reward, args=args, train_dataset=ds,
                               processing_class=tok)
    ds = Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b} since {a}+{b} is {a + b}"}
                            for a, b in pairs])
    # patched: also padding-free (TRL's collator: one row, position_ids + cu_seq_lens_q) on the fastpref attention
    extra = dict(padding_free=True, model_init_kwargs={"attn_implementation": "fastpref"}) if patched else {}
    return trl.SFTTrainer(model=path, args=trl.SFTConfig(**common, max_length=None, **extra), train_dataset=ds,
                          processing_class=tok)


_NOT_COMPARED = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time", "total_flos"}


class _Counting:
    """Counts the calls of TRL's log-prob function (wrapped before patching: then it counts the fallbacks)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def apply(self, *args):
        self.calls += 1
        return self.fn.apply(*args)


@needs_trl
@pytest.mark.parametrize("kind", ["dpo", "grpo", "sft"])
def test_trl_trainer_patched_equals_unpatched(kind, tiny_llama, tmp_path, monkeypatch, _unpatched):
    import trl.trainer.utils as utils

    ft = _unpatched
    path, tok = tiny_llama
    counter = _Counting(utils._ChunkedLogProbFunction)
    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", counter)
    fastpref_calls = []
    inner = ft.token_stats
    monkeypatch.setattr(ft, "token_stats", lambda *a, **k: fastpref_calls.append(1) or inner(*a, **k))
    runs = {}
    for patched in (False, True):
        if patched:
            ft.patch()
        trainer = _trainer(kind, path, tok, str(tmp_path / f"p{int(patched)}"), patched=patched)
        trainer.train()
        runs[patched] = ([{k: v for k, v in e.items() if k not in _NOT_COMPARED} for e in trainer.state.log_history],
                         {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        if not patched:
            trl_calls, counter.calls = counter.calls, 0
        ft.unpatch()
    assert trl_calls > 0 and counter.calls == 0 and len(fastpref_calls) == trl_calls
    (logs0, w0), (logs1, w1) = runs[False], runs[True]
    assert len(logs0) == len(logs1) == 4  # 3 steps + the summary
    assert "loss" in logs0[0] and "entropy" in logs0[0]
    for step, (a, b) in enumerate(zip(logs0, logs1)):
        assert a.keys() == b.keys(), step
        for k in a:
            if isinstance(a[k], (int, float)) and math.isfinite(a[k]):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), f"step {step}: {k}"
    for name in w0:
        assert_close(w1[name], w0[name], f"final weight {name}")
    moved = max((w0[n] - w).abs().max().item() for n, w in _initial(path).items())
    assert moved > 1e-3  # training changed the weights (so equal weights mean something)


def _initial(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ------------------------------------------------------------------------------------------------ TRL reward signature

def test_reward_columns_inferred_from_signatures():
    def trl_style(completions, answer, *, level, bonus=1.0, log_extra=None, **kwargs):
        return [0.0] * len(completions)

    def needs_state(completions, trainer_state, **kwargs):
        return [0.0] * len(completions)

    assert R.reward_columns(trl_style) == ("answer", "level")
    assert R.reward_columns(lambda p, c: [0.0]) == ()           # the former positional call, other names
    assert R.reward_columns(R.exact_match) == ("answer",)        # declared columns win
    assert R.reward_columns(R.format_reward("x")) == ()
    with pytest.raises(ValueError, match="requires TRL GRPOTrainer's 'trainer_state'"):
        R.reward_columns(needs_state)


def test_call_reward_passes_trl_arguments_and_combine_skips_none():
    seen = {}

    def kw_only(*, completions, completion_ids):  # no **kwargs: gets only what it names
        seen["ids"] = completion_ids
        return [float(len(i)) for i in completion_ids]

    def sometimes(prompts, completions, **kwargs):
        seen["kw"] = sorted(kwargs)
        return [None if c == "b" else 1.0 for c in completions]

    out = R.score_rewards(kw_only, ["p", "q"], ["a", "bb"], {"answer": ["x", "y"]}, completion_ids=[[5], [6, 1]])
    assert out.tolist() == [1.0, 2.0] and seen["ids"] == [[5], [6, 1]]
    both = R.combine((sometimes, 2.0), (lambda p, c: [0.5] * len(c), 1.0))
    assert R.score_rewards(both, ["p", "p"], ["a", "b"], {"answer": [1, 2]}).tolist() == [2.5, 0.5]
    assert seen["kw"] == ["answer", "completion_ids"]
    only_none = R.combine((sometimes, 1.0))
    with pytest.raises(ValueError, match=r"returned None \(no score\) for completion 1 \(prompt index 0"):
        R.score_rewards(only_none, ["p", "p"], ["a", "b"], group_size=2)


def test_conversational_rows_get_message_completions():
    prompt = [{"role": "user", "content": "2+2?"}]
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen["p"], seen["c"] = prompts, completions
        return [1.0] * len(completions)

    R.score_rewards(spy, [prompt, prompt], ["4", "5"], {"answer": ["4", "4"]})
    assert seen["p"] == [prompt, prompt]
    assert seen["c"] == [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    # fastpref's built-ins read message completions too
    assert R.score_rewards(R.exact_match, [prompt, prompt], ["4", "5"], {"answer": ["4", "4"]}).tolist() == [1.0, 0.0]


@needs_trl
def test_trl_reward_functions_through_online_scoring():
    """trl.rewards.think_format_reward (conversational completions) and get_repetition_penalty_reward (token ids)
    through OnlineAlgorithm.score, the code fastpref's on-line trainers call; accuracy_reward's column inferred."""
    from test_online_common import make_algo
    from trl.rewards import accuracy_reward, get_repetition_penalty_reward, think_format_reward

    from fastpref.train.rollout import Rollout

    assert R.reward_columns(accuracy_reward) == ("solution",)
    rep = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    assert R.reward_columns(think_format_reward) == () and R.reward_columns(rep) == ()
    algo, _ = make_algo("grpo", reward=[[think_format_reward, 1.0], [rep, 0.5]])
    chat = [{"role": "user", "content": "Think, then answer: 1+1?"}]
    examples = [{"row": {"prompt": chat, "solution": "2"}}, {"row": {"prompt": chat, "solution": "2"}}]
    comps = ["<think>\nadd\n</think>\n2", "no tags 2", "<think>x</think>2", "2"]
    ids = [[7, 8, 7, 8, 7], [3, 4, 5], [9, 9, 9], [4]]   # repeated bigrams: 3 of 4, none, 2 of 2 (one unique), short
    ro = Rollout(prompts=["<rendered>"] * 4, prompt_ids=[[1]] * 4, completion_ids=ids, completions=comps,
                 truncated=[False] * 4, group_size=2)
    got = algo.score(ro, examples)
    fmt = think_format_reward([[{"content": c}] for c in comps])
    pen = rep(ids)
    assert fmt == [1.0, 0.0, 1.0, 0.0] and pen[0] < 0 and pen[1] == 0.0 and pen[2] < 0
    assert got.tolist() == pytest.approx([f + 0.5 * p for f, p in zip(fmt, pen)])


@needs_trl
def test_fastpref_grpo_trains_with_a_trl_reward_function():
    """A short fastpref GRPO run on the arithmetic task with TRL's repetition penalty combined with arith."""
    from test_online_common import make_algo, one_cpu_thread, run_steps  # noqa: F401
    from trl.rewards import get_repetition_penalty_reward

    from fastpref.data.arith import arith_reward

    rep = get_repetition_penalty_reward(ngram_size=1, max_penalty=-1.0)
    algo, ex = make_algo("grpo", reward=[[arith_reward, 1.0], [rep, 0.5]], gen_num_generations=4,
                         gen_max_new_tokens=3)
    seen = []
    inner = algo.score

    def spy(ro, examples):
        seen.append((ro, examples, inner(ro, examples)))
        return seen[-1][2]

    algo.score = spy
    hist, _ = run_steps(algo, ex, 2, batch_size=4)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["reward"]) for h in hist)
    ro, examples, got = seen[0]
    answers = [e["row"]["answer"] for e in examples for _ in range(ro.group_size)]
    want = [a + 0.5 * p for a, p in zip(arith_reward(ro.prompts, ro.completions, answer=answers),
                                        rep(ro.completion_ids))]
    assert got.tolist() == pytest.approx(want)
