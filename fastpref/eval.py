"""``fastpref eval``: how a trained policy compares with its reference, and with the tuning-free baselines.

Measured (``docs/eval.md``):

* **preference accuracy and reward margin** on held-out pairs: the DPO implicit reward
  ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023), summed log-probs of the response
  tokens from :func:`fastpref.train.modeling.sequence_logps` (the trainer's path), accuracy = share of pairs with
  ``r(chosen) > r(rejected)`` (TRL's ``rewards/accuracies``), margin = mean ``r(chosen) - r(rejected)``;
* **win rate** of the policy's sampled completions against an opponent's on the same prompts, each scored by a
  reward function (``--reward``, :func:`fastpref.rewards.get_reward_fn`), a sequence-classification reward model
  (``--reward-model``) or an LLM judge (``--judge``, the Self-Rewarding additive 5-point prompt, a score only from
  its ``Score: N`` line); a tie counts one half, a pair with an unscored side is left out (and counted). The
  opponent is the reference (``--mode reference``), or the base model prompted with URIAL (``--mode urial``: Lin
  et al. 2023, a fixed instruction + 3 stylistic examples) or OPO (``--mode opo``: Xu et al. 2023, principles
  retrieved per query with BM25 and put in the prompt);
* **mean completion length** (tokens, EOS included, as the rollouts count them) of both sides;
* **KL to the reference**: the sequence-level Monte-Carlo estimate ``mean_i [log pi(y_i|x_i) - log pi_ref(y_i|x_i)]``
  over the policy's own samples (unbiased for ``KL(pi || pi_ref)`` at temperature 1 and top-p 1, the defaults),
  with its standard error.

Models load from a directory ``fastpref train`` wrote (``final/``, full weights or a LoRA adapter over the run's
base model, with the run's ``config.yaml`` one level up), any Hugging Face causal-LM directory, or ``tiny``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

BASELINES_DIR = os.path.join(os.path.dirname(__file__), "data", "baselines")
URIAL_FILE = os.path.join(BASELINES_DIR, "urial.json")
OPO_FILE = os.path.join(BASELINES_DIR, "opo_principles.jsonl")
MODES = ("reference", "urial", "opo")


class EvalError(ValueError):
    """A problem the user can fix (a missing file, incompatible models); the CLI prints it on one line."""


# ------------------------------------------------------------------------------------------------ URIAL / OPO

def load_urial(path: str = URIAL_FILE) -> dict:
    """The URIAL prompt spec: ``{"instruction": str, "examples": [{"query", "answer"}, ...]}``."""
    spec = _read_json(path, "--urial")
    if not isinstance(spec.get("instruction"), str) or not isinstance(spec.get("examples"), list) or not all(
            isinstance(e, dict) and isinstance(e.get("query"), str) and isinstance(e.get("answer"), str)
            for e in spec["examples"]):
        raise EvalError(f"--urial {path}: expected {{'instruction': str, 'examples': [{{'query', 'answer'}}, ...]}}")
    return spec


def _block(text: str) -> str:
    return "```\n" + text + "\n```"


def urial_prompt(query: str, spec: dict) -> str:
    """URIAL's prompt for ``query`` (the layout of Re-Align/URIAL ``urial_prompts/*.txt``): ``# Instruction``, the
    instruction, each example as ``# Query:`` / ``# Answer:`` blocks between triple backticks, then the query and an
    open answer block; the base model's continuation is cut at the closing backticks (:func:`cut_completion`)."""
    parts = ["# Instruction\n\n" + spec["instruction"].strip() + "\n\n"]
    for ex in spec["examples"]:
        parts.append(f"# Query:\n{_block(ex['query'].strip())}\n\n# Answer:\n{_block(ex['answer'].strip())}\n\n")
    parts.append(f"# Query:\n{_block(query.strip())}\n\n# Answer:\n```\n")
    return "".join(parts)


_STOP = ("```", "# Query:")


def cut_completion(text: str, stops: tuple[str, ...] = _STOP) -> str:
    """``text`` up to the first stop string (URIAL's end of an answer block), stripped."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut].strip()


_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset("a an and are as at be but by can do does for from how i in is it its my of on or so that "
                       "the their them there they this to was what when where which who why will with you your".split())


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text`` without common English stop words, each cut to its first 6
    letters (a crude stemmer: ``hacking`` / ``hacker`` -> ``hackin`` / ``hacker`` stay apart, ``principles`` /
    ``principle`` meet)."""
    return [w[:6] for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


class BM25:
    """Okapi BM25 (Robertson and Zaragoza 2009) over a list of documents: ``idf(t) = ln(1 + (N - n_t + 0.5) /
    (n_t + 0.5))`` (Lucene's non-negative form), ``score(q, d) = sum_t idf(t) f(t,d) (k1 + 1) / (f(t,d) + k1 (1 - b
    + b |d| / avgdl))`` over the query's distinct terms."""

    def __init__(self, docs: list[str], *, k1: float = 1.5, b: float = 0.75):
        if not docs:
            raise EvalError("BM25: no documents")
        self.k1, self.b = k1, b
        self.docs = [bm25_tokens(d) for d in docs]
        self.avgdl = sum(len(d) for d in self.docs) / len(self.docs)
        df: dict[str, int] = {}
        for d in self.docs:
            for t in set(d):
                df[t] = df.get(t, 0) + 1
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: str) -> list[float]:
        q = set(bm25_tokens(query))
        out = []
        for d in self.docs:
            s = 0.0
            for t in q:
                f = d.count(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * len(d) / self.avgdl))
            out.append(s)
        return out

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best-scoring documents (ties: the earlier document), only those scoring > 0."""
        s = self.scores(query)
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        return [i for i in order[:k] if s[i] > 0]


def load_principles(path: str = OPO_FILE) -> list[dict]:
    """Principles, one ``{"id", "text"}`` JSON object per line."""
    if not os.path.exists(path):
        raise EvalError(f"--principles {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"--principles {path}: line {i + 1}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise EvalError(f"--principles {path}: line {i + 1}: expected an object with a 'text' string")
            out.append(row)
    if not out:
        raise EvalError(f"--principles {path}: no principles")
    return out


OPO_TEMPLATE = ("Follow these principles when you answer.\n\nPrinciples:\n{principles}\n\n"
                "Question: {query}\nAnswer:")
"""fastpref's OPO prompt: the retrieved principles (numbered, best first) before the query. OPO (Xu et al. 2023,
Figure 2) puts the retrieved rules in the prompt of an unchanged model; this wording is fastpref's."""


class OPO:
    """OPO's prompt builder: BM25 over ``principles``, the ``k`` best for each query in :data:`OPO_TEMPLATE`; a query
    matching none gets the prompt without a principles block (``Question: ...\\nAnswer:``)."""

    def __init__(self, principles: list[dict], k: int = 3):
        if k < 1:
            raise EvalError(f"--opo-k must be >= 1, got {k}")
        self.principles, self.k = principles, k
        self.index = BM25([p["text"] for p in principles])

    def retrieve(self, query: str) -> list[dict]:
        return [self.principles[i] for i in self.index.top(query, self.k)]

    def prompt(self, query: str) -> str:
        hits = self.retrieve(query)
        if not hits:
            return f"Question: {query.strip()}\nAnswer:"
        lines = "\n".join(f"{i + 1}. {p['text']}" for i, p in enumerate(hits))
        return OPO_TEMPLATE.format(principles=lines, query=query.strip())


# ------------------------------------------------------------------------------------------------ models

def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise EvalError(f"{what} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise EvalError(f"{what} {path}: not JSON ({e.msg}, line {e.lineno})") from None


def run_config_of(path: str):
    """The :class:`~fastpref.train.config.Config` of the run that wrote ``path`` (``<run>/config.yaml`` for
    ``<run>/final`` or ``<run>`` itself), or None."""
    from fastpref.train.config import load_config

    for d in (path, os.path.dirname(os.path.abspath(path))):
        f = os.path.join(d, "config.yaml")
        if os.path.isfile(f) and (os.path.isdir(os.path.join(d, "final")) or d != path):
            return load_config(f)
    return None


def _model_dir(path: str, what: str = "--model") -> str:
    """``path`` itself, or ``path/final`` for a run directory; ``what`` names the flag in the error."""
    if path != "tiny" and not os.path.exists(path):
        raise EvalError(f"{what} {path}: no such directory")
    if os.path.isdir(os.path.join(path, "final")) and not os.path.exists(os.path.join(path, "config.json")):
        return os.path.join(path, "final")
    return path


def load_tokenizer(path: str):
    """The tokenizer saved in model directory ``path`` (the character tokenizer for ``tiny``)."""
    from fastpref.data.tokenizer import CharTokenizer

    if path == "tiny" or CharTokenizer.is_saved_in(path):
        return CharTokenizer() if path == "tiny" else CharTokenizer.from_pretrained(path)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, tokenizer, run_cfg=None, what: str = "--model") -> torch.nn.Module:
    """A causal LM from ``path`` in eval mode, fp32, dropout off: ``tiny`` (the run's tiny shape and seed), a LoRA
    adapter directory (``adapter_config.json``; the base is the run's ``model.name_or_path``, from ``run_cfg``), a
    Hugging Face model directory, or a run directory (its ``final/``)."""
    from fastpref.train.config import Config, ConfigError
    from fastpref.train.modeling import disable_dropout

    d = _model_dir(path, what)
    try:
        if d == "tiny":
            return load_run_start(run_cfg or Config(), tokenizer)
        if os.path.exists(os.path.join(d, "adapter_config.json")):
            if run_cfg is None:
                raise EvalError(f"{d}: a LoRA adapter, but no run config.yaml next to it names its base model")
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_run_start(run_cfg, tokenizer), d)
        elif os.path.exists(os.path.join(d, "config.json")):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        else:
            raise EvalError(f"{d}: not a model directory (no config.json or adapter_config.json)")
    except (OSError, ConfigError) as e:
        raise EvalError(f"{d}: cannot load the model ({str(e).splitlines()[0]})") from None
    disable_dropout(model)
    return model.float().eval()


def load_run_start(run_cfg, tokenizer) -> torch.nn.Module:
    """The model a run of ``run_cfg`` started from (``model.name_or_path``; ``tiny``: the same seeded init), in
    eval mode, fp32, dropout off: the reference of a run without SFT warm-up."""
    from fastpref.train.config import ConfigError
    from fastpref.train.modeling import build_model, disable_dropout

    try:
        model = build_model(_base_config(run_cfg), tokenizer, say=lambda m: None)
    except ConfigError as e:
        raise EvalError(f"the run's model {run_cfg.model.name_or_path!r}: {e}") from None
    disable_dropout(model)
    return model.float().eval()


def warmed_reference(run_cfg, model: torch.nn.Module) -> str | None:
    """Load into ``model`` the reference a run with an SFT warm-up took (``reference.mode`` copy: its weights are in
    every checkpoint after the warm-up, ``algorithm.safetensors``), from the newest such checkpoint of
    ``output_dir/checkpoints``; returns that checkpoint's path, or None when there is none. (An iterative on-line
    method refreshes its reference: the checkpoint's is the one of that step.)"""
    from fastpref.train import checkpoint as ckpt

    warm = run_cfg.train.sft_warmup_steps
    for step, path in reversed(ckpt.checkpoint_dirs(os.path.join(run_cfg.output_dir, "checkpoints"))):
        if step <= warm:  # the reference is taken at the first step after the warm-up
            break
        try:
            state = ckpt.load_state(path, "algorithm")
        except ckpt.CheckpointError:
            continue
        weights = state.get("reference", {}).get("model") if isinstance(state, dict) else None
        if weights:
            try:
                model.load_state_dict(weights)
            except RuntimeError as e:
                raise EvalError(f"{path}: its reference does not fit the run's model ({str(e).splitlines()[0]})") \
                    from None
            return path
    return None


def run_beta(run_cfg) -> float:
    """The implicit-reward beta of the run: its algorithm section's ``beta`` (``dpo.beta``, ``kto.beta``,
    ``online_dpo.beta``, ...); 0.1 (TRL's default) without a run config or for an algorithm without one (sft, rm,
    ppo) or with a zero one (grpo's KL coefficient)."""
    sec = run_cfg.sections.get(run_cfg.algorithm) if run_cfg is not None else None
    return getattr(sec, "beta", None) or 0.1


def _base_config(run_cfg):
    """``run_cfg`` with LoRA and packing off and fp32 weights: the run's starting model, as evaluation loads it."""
    import copy

    cfg = copy.deepcopy(run_cfg)
    cfg.model.lora.enabled = False
    cfg.model.dtype = "float32"
    cfg.model.gradient_checkpointing = False
    cfg.model.liger = False
    cfg.data.pack = False
    return cfg


def check_compatible(policy, reference, what: str = "reference") -> None:
    """Refuse a pair of models whose vocabularies differ (their log-probs and token ids would not line up)."""
    from fastpref.train.modeling import lm_head

    vp, vr = lm_head(policy)[0].shape[0], lm_head(reference)[0].shape[0]
    if vp != vr:
        raise EvalError(f"incompatible models: the policy has a vocabulary of {vp} tokens, the {what} {vr}")


# ------------------------------------------------------------------------------------------------ scoring

@torch.no_grad()
def pair_logps(model, examples: list[dict], pad_id: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs ``(chosen [P], rejected [P])`` (fp32, CPU) of preference ``examples``."""
    from fastpref.data.collate import collate_preference
    from fastpref.train.modeling import sequence_logps

    dev = next(model.parameters()).device
    cs, rs = [], []
    for i in range(0, len(examples), batch_size):
        batch = collate_preference(examples[i:i + batch_size], pad_id, device=dev)
        c, r = batch.split_pairs(sequence_logps(model, batch))
        cs.append(c.float().cpu())
        rs.append(r.float().cpu())
    return torch.cat(cs), torch.cat(rs)


def preference_metrics(policy, reference, examples: list[dict], pad_id: int, beta: float,
                       batch_size: int = 16) -> dict:
    """Held-out accuracy and margin of the DPO implicit reward (see the module docstring)."""
    pc, pr = pair_logps(policy, examples, pad_id, batch_size)
    rc, rr = pair_logps(reference, examples, pad_id, batch_size)
    ch, rj = beta * (pc.double() - rc.double()), beta * (pr.double() - rr.double())
    return {"pairs": len(examples), "accuracy": float((ch > rj).double().mean()),
            "margin": float((ch - rj).mean()), "reward_chosen": float(ch.mean()), "reward_rejected": float(rj.mean())}


@torch.no_grad()
def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     batch_size: int = 16) -> torch.Tensor:
    """Summed log-probs ``[S]`` (fp32, CPU) of each completion given its prompt (padded batches)."""
    from fastpref.data.collate import pad_sequences
    from fastpref.train.modeling import sequence_logps

    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        seqs = [(list(p), list(c)) for p, c in zip(prompt_ids[i:i + batch_size], completion_ids[i:i + batch_size])]
        out.append(sequence_logps(model, pad_sequences(seqs, pad_id, device=dev)).float().cpu())
    return torch.cat(out)


class JudgeScorer:
    """An LLM judge as a scorer: the Self-Rewarding additive 5-point prompt (Yuan et al. 2024, Figure 2,
    ``fastpref.train.online.self_rewarding.DEFAULT_JUDGE_TEMPLATE``) as a user turn of the tokenizer's chat template
    when it has one, one sampled judgement per response, the score from its ``Score: N`` line only (None when there
    is none)."""

    def __init__(self, model, tokenizer, gen_cfg, template: str | None = None):
        if template is None:
            from fastpref.train.online.self_rewarding import DEFAULT_JUDGE_TEMPLATE as template
        self.model, self.tokenizer, self.gen_cfg, self.template = model, tokenizer, gen_cfg, template
        self.__name__ = "judge"

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        from fastpref.train.online.common import parse_judge_score
        from fastpref.train.rollout import encode, generate

        texts = [self.template.format(prompt=p, response=c) for p, c in zip(prompts, completions)]
        if getattr(self.tokenizer, "chat_template", None):  # a chat judge reads the prompt as a user turn
            ids = [list(self.tokenizer.encode(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)) for t in texts]
        else:
            ids = [encode(self.tokenizer, t) for t in texts]
        ro = generate(self.model, self.tokenizer, ids, self.gen_cfg, prompts=texts, num_generations=1)
        return [parse_judge_score(t, require_score_line=True) for t in ro.completions]


def chosen_match(prompts, completions, chosen, **columns) -> list[float]:
    """1.0 where the stripped completion equals the row's stripped ``chosen`` response (a string), else 0.0: a
    reward for preference data whose chosen response is the one right answer (the bundled letter-run task);
    ``--reward fastpref.eval:chosen_match``."""
    from fastpref.rewards import completion_text

    return [float(completion_text(c).strip() == completion_text(g).strip()) for c, g in zip(completions, chosen)]


def _scores(scorer, prompts, completions, ids, columns) -> list[float | None]:
    if isinstance(scorer, JudgeScorer):
        return scorer(prompts, completions)
    from fastpref.rewards import score_rewards

    return score_rewards(scorer, prompts, completions, columns, completion_ids=ids).tolist()


def win_rate(a: list[float | None], b: list[float | None]) -> tuple[float | None, int, int]:
    """``(win rate of a over b, pairs compared, pairs left out)``: ties count 1/2, a pair with a None is left out."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None, 0, len(a)
    w = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs)
    return w / len(pairs), len(pairs), len(a) - len(pairs)


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class EvalOptions:
    """What ``fastpref eval`` runs (the CLI flags)."""

    model: str
    data: str | None = None
    reference: str | None = None
    mode: str = "reference"
    base: str | None = None
    reward: str | None = None
    reward_model: str | None = None
    judge: str | None = None
    beta: float | None = None
    num_prompts: int = 32
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    urial: str = URIAL_FILE
    principles: str = OPO_FILE
    opo_k: int = 3
    out: str | None = None
    device: str = "auto"
    run_cfg: object = None
    notes: list = field(default_factory=list)


def _other_model(path: str, tokenizer, run_cfg, what: str) -> torch.nn.Module:
    """A second model (reference, base, judge) for ``path``, with its own run's config when it is a run's output
    (``tiny``: the policy run's tiny shape and seed)."""
    return load_causal_lm(path, tokenizer, run_cfg if path == "tiny" else run_config_of(path), what)


def _query_text(ex: dict, tokenizer) -> str:
    """The prompt of an example as text: the row's ``prompt`` string, the last user message of a conversational
    prompt, else the decoded prompt tokens."""
    p = ex.get("row", {}).get("prompt") if isinstance(ex.get("row"), dict) else None
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        users = [m.get("content") for m in p if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return tokenizer.decode(ex["prompt_ids"])


def _load_data(opts: EvalOptions, tokenizer) -> list[dict]:
    from fastpref.data.dataset import DataError, LoadReport, Tokenization, load_examples, split_examples
    from fastpref.train.config import Config

    if opts.data is None and opts.run_cfg is None:
        raise EvalError(f"--model {opts.model}: no run config.yaml next to it says which rows are held out; "
                        "pass --data FILE")
    cfg = opts.run_cfg or Config()
    d = cfg.data
    tok = Tokenization(tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                       truncation=d.truncation, chat_template=d.chat_template)
    try:
        if opts.data is not None:
            if not os.path.exists(opts.data):
                raise EvalError(f"--data {opts.data}: no such file")
            return load_examples([opts.data], "preference", tok, report=LoadReport())
        if d.eval_files:  # `fastpref eval CONFIG`: the run's held-out rows, as the trainer chose them
            return load_examples(d.eval_files, "preference", tok)
        if d.train_files:
            rows = load_examples(d.train_files, "preference", tok)
        else:
            from fastpref.data.synthetic import make_pattern_rows

            rows = load_examples([], "preference", tok, rows_override=make_pattern_rows(d.synthetic_rows, "preference",
                                                                                          seed=cfg.train.seed))
        _, held = split_examples(rows, d.eval_fraction, cfg.train.seed)
        if not held:
            raise EvalError("the run holds out no rows (data.eval_fraction=0 and no data.eval_files); pass --data")
        return held
    except DataError as e:
        raise EvalError(str(e)) from None


def evaluate(opts: EvalOptions) -> dict:
    """Run the evaluation of ``opts``; returns the report (the JSON ``--out`` writes)."""
    from fastpref.rewards import RewardModelScorer, get_reward_fn, reward_columns
    from fastpref.train.rollout import GenerationConfig, encode, generate

    if opts.mode not in MODES:
        raise EvalError(f"--mode {opts.mode!r}: expected one of {', '.join(MODES)}")
    scorers = [s for s in (opts.reward, opts.reward_model, opts.judge) if s]
    if len(scorers) > 1:
        raise EvalError("--reward, --reward-model and --judge exclude each other")
    if opts.data is not None and not os.path.exists(opts.data):  # before any model is loaded
        raise EvalError(f"--data {opts.data}: no such file")
    torch.manual_seed(opts.seed)
    run_cfg = opts.run_cfg if opts.run_cfg is not None else (run_config_of(opts.model) if opts.model != "tiny"
                                                              else None)
    opts.run_cfg = run_cfg
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {opts.device}: CUDA is not available")
    tokenizer = load_tokenizer(_model_dir(opts.model))
    policy = load_causal_lm(opts.model, tokenizer, run_cfg).to(dev)
    if opts.reference is not None:
        reference = _other_model(opts.reference, tokenizer, run_cfg, "--reference")
        ref_name = opts.reference
    elif run_cfg is not None:  # the run's starting model (LoRA: the base without adapters)
        reference = load_run_start(run_cfg, tokenizer)
        ref_name = f"{run_cfg.model.name_or_path} (the run's starting model)"
        warm = run_cfg.train.sft_warmup_steps
        if warm and not run_cfg.model.lora.enabled:
            found = warmed_reference(run_cfg, reference)
            if found is not None:
                ref_name = f"the run's reference (after {warm} SFT warm-up steps), from {found}"
            else:
                opts.notes.append(f"the run's reference was its policy after {warm} SFT warm-up steps, which final/ "
                                  "does not hold and no checkpoint after the warm-up does; scoring against its "
                                  "starting model instead (pass --reference DIR for another)")
    else:
        raise EvalError(f"--model {opts.model}: no run config.yaml next to it names the reference; pass --reference")
    reference = reference.to(dev)
    check_compatible(policy, reference)
    beta = opts.beta if opts.beta is not None else run_beta(run_cfg)
    examples = _load_data(opts, tokenizer)
    if not examples:
        raise EvalError("no preference pairs to evaluate")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report: dict = {"model": opts.model, "reference": ref_name, "data": opts.data or "the run's held-out rows",
                    "mode": opts.mode, "beta": beta}
    report["preference"] = preference_metrics(policy, reference, examples, pad, beta, opts.batch_size)

    # ---- sampled completions on the prompts (first occurrence of each prompt, in data order)
    seen, prompt_ex = set(), []
    for e in examples:
        key = tuple(e["prompt_ids"])
        if key not in seen:
            seen.add(key)
            prompt_ex.append(e)
    prompt_ex = prompt_ex[:opts.num_prompts]
    gen = GenerationConfig(num_generations=1, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                           top_p=opts.top_p)
    try:
        gen.validate()
    except ValueError as e:
        raise EvalError(str(e).replace("generation.", "--").replace("_", "-")) from None
    prompts = [_query_text(e, tokenizer) for e in prompt_ex]
    p_ids = [list(e["prompt_ids"]) for e in prompt_ex]
    pol = generate(policy, tokenizer, p_ids, gen, prompts=prompts)
    pol_lp = completion_logps(policy, p_ids, pol.completion_ids, pad, opts.batch_size)
    ref_lp = completion_logps(reference, p_ids, pol.completion_ids, pad, opts.batch_size)
    kl = pol_lp.double() - ref_lp.double()
    n = kl.numel()
    policy_rep = {"mean_length": float(pol.lengths().double().mean()), "kl_to_reference": float(kl.mean()),
                  "kl_stderr": float(kl.std(unbiased=True) / math.sqrt(n)) if n > 1 else None}

    # ---- the opponent: the reference, or the base model with the URIAL / OPO prompt
    if opts.mode == "reference":
        opp_model, opp_ids = reference, p_ids
    else:
        if opts.base is not None:
            opp_model = _other_model(opts.base, tokenizer, run_cfg, "--base").to(dev)
            check_compatible(policy, opp_model, "base model")
        else:
            opp_model = reference
        if opts.mode == "urial":
            spec = load_urial(opts.urial)
            texts = [urial_prompt(q, spec) for q in prompts]
        else:
            opo = OPO(load_principles(opts.principles), opts.opo_k)
            texts = [opo.prompt(q) for q in prompts]
        opp_ids = [encode(tokenizer, t) for t in texts]
        limit = getattr(getattr(opp_model, "config", None), "max_position_embeddings", None)
        longest = max(len(x) for x in opp_ids) + opts.max_new_tokens
        if limit and longest > limit:
            opts.notes.append(f"--mode {opts.mode}: prompts of up to {longest - opts.max_new_tokens} tokens + "
                              f"{opts.max_new_tokens} new exceed the base model's max_position_embeddings={limit}")
    opp = generate(opp_model, tokenizer, opp_ids, gen, prompts=prompts)
    opp_texts = opp.completions if opts.mode == "reference" else [cut_completion(t) for t in opp.completions]
    opp_len = [len(c) for c in opp.completion_ids] if opts.mode == "reference" else \
        [len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in opp_texts]  # + EOS, as the rollouts count
    opponent_rep = {"name": opts.mode if opts.mode != "reference" else "reference",
                    "mean_length": sum(opp_len) / len(opp_len)}

    # ---- scoring
    scorer, scorer_name = None, None
    if opts.reward:
        try:
            scorer = get_reward_fn(opts.reward)
            cols = reward_columns(scorer)
        except ValueError as e:
            raise EvalError(f"--reward: {e}") from None
        scorer_name = getattr(scorer, "__name__", opts.reward)
    elif opts.reward_model:
        from transformers import AutoModelForSequenceClassification

        if not os.path.isdir(opts.reward_model):
            raise EvalError(f"--reward-model {opts.reward_model}: no such directory")
        try:
            rm = AutoModelForSequenceClassification.from_pretrained(_model_dir(opts.reward_model), num_labels=1)
        except (OSError, ValueError) as e:
            raise EvalError(f"--reward-model {opts.reward_model}: cannot load ({str(e).splitlines()[0]})") from None
        if rm.config.pad_token_id is None:
            rm.config.pad_token_id = pad
        scorer, scorer_name, cols = RewardModelScorer(rm.float().eval().to(dev), tokenizer), "reward_model", ()
    elif opts.judge:
        jm = _other_model(opts.judge, tokenizer, run_cfg, "--judge").to(dev)
        check_compatible(policy, jm, "judge")
        scorer = JudgeScorer(jm, tokenizer, GenerationConfig(num_generations=1, max_new_tokens=64, temperature=0.7,
                                                             top_p=0.9))
        scorer_name, cols = "judge", ()
    report["win_rate"] = None
    report["scorer"] = scorer_name
    if scorer is not None:
        columns = {}
        for c in cols:
            vals = [e["row"].get(c) if isinstance(e.get("row"), dict) else None for e in prompt_ex]
            if any(v is None for v in vals):
                raise EvalError(f"--reward {scorer_name}: needs a {c!r} column in every data row")
            columns[c] = vals
        try:
            a = _scores(scorer, prompts, pol.completions, pol.completion_ids, columns)
            b = _scores(scorer, prompts, opp_texts, opp.completion_ids, columns)
        except ValueError as e:
            raise EvalError(f"scoring: {e}") from None
        wr, compared, left_out = win_rate(a, b)
        report["win_rate"] = wr
        report["win_rate_pairs"] = compared
        report["win_rate_left_out"] = left_out
        valid_a, valid_b = [x for x in a if x is not None], [x for x in b if x is not None]
        policy_rep["mean_score"] = sum(valid_a) / len(valid_a) if valid_a else None
        opponent_rep["mean_score"] = sum(valid_b) / len(valid_b) if valid_b else None
    report["generation"] = {"prompts": len(prompt_ex), "max_new_tokens": opts.max_new_tokens,
                            "temperature": opts.temperature, "top_p": opts.top_p, "seed": opts.seed}
    report["policy"] = policy_rep
    report["opponent"] = opponent_rep
    report["samples"] = [{"prompt": p, "policy": x, "opponent": y}
                         for p, x, y in list(zip(prompts, pol.completions, opp_texts))[:3]]
    report["notes"] = list(opts.notes)
    return report


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown(report: dict) -> str:
    """The report as a markdown table (what ``fastpref eval`` prints)."""
    p, g, pol, opp = report["preference"], report["generation"], report["policy"], report["opponent"]
    rows = [("held-out pairs", p["pairs"]), ("preference accuracy", p["accuracy"]), ("reward margin", p["margin"]),
            ("reward chosen / rejected", f"{p['reward_chosen']:.4f} / {p['reward_rejected']:.4f}"),
            ("prompts sampled", g["prompts"]),
            (f"win rate vs {opp['name']} ({report['scorer'] or 'no scorer'})", report["win_rate"]),
            ("mean score policy / " + opp["name"],
             f"{_fmt(pol.get('mean_score'))} / {_fmt(opp.get('mean_score'))}"),
            ("mean length policy / " + opp["name"], f"{pol['mean_length']:.2f} / {opp['mean_length']:.2f}"),
            ("KL(policy || reference), nats/seq", pol["kl_to_reference"]), ("KL std. error", pol["kl_stderr"])]
    lines = [f"fastpref eval: {report['model']} vs {report['reference']} (beta={report['beta']}, "
             f"mode={report['mode']})", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> int:
    """Entry point of ``fastpref eval``; returns the exit status."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="fastpref eval", description="Preference accuracy, reward margin, win rate, "
                                 "length and KL of a trained policy against its reference or a tuning-free baseline "
                                 "(docs/eval.md).")
    ap.add_argument("config", nargs="?", help="a run's YAML config: evaluate its final/ on its held-out rows")
    ap.add_argument("--model", help="policy: a run directory, its final/, a Hugging Face directory, or tiny")
    ap.add_argument("--data", help="preference JSON/JSONL file (prompt, chosen, rejected)")
    ap.add_argument("--reference", help="reference model (default: the run's starting model)")
    ap.add_argument("--mode", default="reference", choices=MODES, help="the opponent of the win rate")
    ap.add_argument("--base", help="base model of --mode urial/opo (default: the reference)")
    ap.add_argument("--reward", help="reward function: exact_match, math_answer, arith, format:<re>, module:fn")
    ap.add_argument("--reward-model", help="sequence-classification reward model directory (algorithm=rm's final/)")
    ap.add_argument("--judge", help="causal-LM judge directory (the Self-Rewarding 5-point prompt)")
    ap.add_argument("--beta", type=float,
                    help="implicit-reward beta (default: the run's <algorithm>.beta, e.g. dpo.beta, else 0.1)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--urial", default=URIAL_FILE, help="URIAL prompt JSON (default: the bundled one)")
    ap.add_argument("--principles", default=OPO_FILE, help="OPO principles JSONL (default: the bundled set)")
    ap.add_argument("--opo-k", type=int, default=3, help="principles retrieved per query")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the table and the one-line errors
    from fastpref.data.dataset import DataError
    from fastpref.train.config import ConfigError, load_config

    try:
        run_cfg = None
        model = args.model
        if args.config:
            if os.path.isdir(args.config):
                raise EvalError(f"{args.config} is a directory: give the run's config.yaml, or --model {args.config}")
            if not os.path.exists(args.config):
                raise EvalError(f"{args.config}: no such file")
            run_cfg = load_config(args.config)
            model = model or os.path.join(run_cfg.output_dir, "final")
            if not os.path.isdir(model):
                raise EvalError(f"{model}: no such directory (train the run first: fastpref train {args.config})")
        elif model is None:
            raise EvalError("give a run config (fastpref eval CONFIG.yaml) or --model DIR [--data FILE]")
        if args.num_prompts < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
            raise EvalError("--num-prompts, --batch-size and --max-new-tokens must be >= 1")
        opts = EvalOptions(model=model, data=args.data, reference=args.reference, mode=args.mode, base=args.base,
                           reward=args.reward, reward_model=args.reward_model, judge=args.judge, beta=args.beta,
                           num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                           urial=args.urial, principles=args.principles, opo_k=args.opo_k, out=args.out,
                           device=args.device, run_cfg=run_cfg)
        report = evaluate(opts)
    except (EvalError, ConfigError, DataError) as e:
        print(f"fastpref: error: {e}", file=sys.stderr)
        return 2
    for note in report["notes"]:
        print(f"fastpref eval: note: {note}", file=sys.stderr)
    print(markdown(report))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0
