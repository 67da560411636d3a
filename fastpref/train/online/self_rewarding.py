"""Self-Rewarding language models (Yuan, Pang, Cho, Li, Sukhbaatar, Xu, Weston 2024, arXiv:2401.10020; no official
code; the prompt and the "Score: N" parsing as in lucidrains/self-rewarding-lm-pytorch).

The paper's iteration t (M_t -> M_{t+1}): the model M_t (frozen: the iteration's dataset is built before it
trains) samples ``generation.num_generations`` (the paper: N = 4, T = 0.7, top-p 0.9) responses for each of
``iteration_prompts`` prompts, judges each response itself ``judge_samples`` times (the paper: 3, averaged) with
the paper's LLM-as-a-judge prompt (Figure 2: the additive 5-point rubric, reproduced in
``DEFAULT_JUDGE_TEMPLATE``), rendered through the tokenizer's chat template when it has one; a judgement counts
only when it has the paper's ``Score: N`` line (``parse_judge_score(require_score_line=True)``; no other number is
taken; unparseable judgements are counted in ``judge/unparseable`` and warned about). The highest- and the
lowest-scored response of a prompt make a pair (ties and unscored responses give none), and M_{t+1} is trained
with DPO against the reference M_t.

EFT (the paper's evaluation fine-tuning data, judge prompt -> judgement with a score line): with ``eft_files``
(SFT rows, prompt + completion), iteration 0 is the paper's M_0 -> M_1 supervised step on them (the NLL of the
judgements) and the self-rewarding iterations start at iteration 1 (the IFT part of the paper's M_1 data is
assumed done: the policy given is instruction-tuned).

Self-instruction creation (the paper's Sec. 2.2, ``generate_prompts: true``): each self-rewarding iteration, M_t
(frozen, as for the responses) first writes the iteration's prompts itself. For each of the ``iteration_prompts``
seed prompts drawn from the training split (the seed IFT prompts), ``prompt_shots`` (the paper: 8) prompts of that
draw are sampled (seeded) and rendered into ``prompt_template`` (default ``DEFAULT_PROMPT_TEMPLATE``: Self-Instruct's
instruction-generation prompt, Wang et al. 2023, arXiv:2212.10560, yizhongw/self-instruct
``bootstrap_instructions.encode_prompt``: ``Come up with a series of tasks:``, the shots as ``1. ...`` to ``8. ...``,
then ``9.``); M_t continues it once (``prompt_max_new_tokens``, the ``generation`` sampling settings) and the text up
to the first newline is the new prompt. Dropped, and counted in ``prompts/empty``, ``prompts/too_long`` (the item
did not end within ``prompt_max_new_tokens``, or it exceeds ``data.max_prompt_length``) and ``prompts/duplicate``
(the same text, whitespace collapsed, as an earlier prompt of the iteration); the survivors (``prompts/kept``,
tokenised as the trainer tokenises prompt rows) are the prompts M_t then answers and judges. None surviving is a
warning and the one-line can't-learn error. Deviations: docs/online.md.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field

from fastpref.train.algorithms.base import register_algorithm
from fastpref.train.modeling import sequence_logps
from fastpref.train.online.common import (OnlineMicroBatch, Pair, PairDPOAlgorithm, PairDPOConfig, parse_judge_score,
                                          rollout_pairs, score_signal)
from fastpref.train.rollout import GenerationConfig, Rollout, encode, generate, pack, timed

log = logging.getLogger("fastpref.train")

# Self-Instruct's instruction-generation prompt (Wang et al. 2023, arXiv:2212.10560; yizhongw/self-instruct,
# self_instruct/bootstrap_instructions.py, encode_prompt): {examples} are the shots as "1. <prompt>" lines, {next}
# the number of the item M_t writes.
DEFAULT_PROMPT_TEMPLATE = "Come up with a series of tasks:\n{examples}\n{next}."

# Yuan et al. 2024, Figure 2 (the LLM-as-a-Judge prompt), with {prompt} / {response} for <INSTRUCTION_HERE> /
# <RESPONSE_HERE>.
DEFAULT_JUDGE_TEMPLATE = (
    "Review the user's question and the corresponding response using the additive 5-point\n"
    "scoring system described below. Points are accumulated based on the satisfaction of each\n"
    "criterion:\n"
    "- Add 1 point if the response is relevant and provides some information related to\n"
    "the user's inquiry, even if it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user's question,\n"
    "but does not completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user's question in a\n"
    "useful way, regardless of whether it seems to have been written by an AI Assistant or if it\n"
    "has elements typically found in blogs or search results.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,\n"
    "addressing the user's question directly and comprehensively, and is well-organized and\n"
    "helpful, even if there is slight room for improvement in clarity, conciseness or focus.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question\n"
    "by an AI Assistant, without extraneous information, reflecting expert knowledge, and\n"
    "demonstrating a high-quality, engaging, and insightful answer.\n\n"
    "User: {prompt}\n"
    "<response>{response}</response>\n\n"
    "After examining the user's instruction and the response:\n"
    "- Briefly justify your total score, up to 100 words.\n"
    "- Conclude with the score using the format: \"Score: <total points>\"\n"
    "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as\n"
    "necessary. To evaluate the response in alignment with this additive scoring model, we'll\n"
    "systematically attribute points based on the outlined criteria.")


@dataclass
class SelfRewardingConfig(PairDPOConfig):
    """Self-Rewarding settings."""

    reward: str | None = None
    """Only for the held-out reward metric (e.g. ``arith``); training uses the model's own judgements."""
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    """Judge prompt with ``{prompt}`` and ``{response}`` placeholders (default: the paper's Figure 2)."""
    judge_max_new_tokens: int = 256
    """Longest judgement (the prompt asks for up to 100 words and the score line)."""
    judge_temperature: float = 0.7
    """Sampling temperature of the judge."""
    judge_samples: int = 3
    """Judgements per response, averaged over the parseable ones (the paper: 3)."""
    max_score: float = 5.0
    """Top of the rubric's scale; parsed scores outside ``[0, max_score]`` are discarded."""
    judge_top_p: float = 0.9
    """Nucleus mass of the judge's sampling (the paper samples its judgements with the responses' T = 0.7, p = 0.9;
    lucidrains/self-rewarding-lm-pytorch ``eval_nucleus_p = 0.9``)."""
    eft_files: list[str] = field(default_factory=list)
    """EFT data (SFT rows: judge prompt -> judgement ending in ``Score: N``); iteration 0 trains on them."""
    generate_prompts: bool = False
    """Self-instruction creation (the paper's Sec. 2.2): M_t writes each iteration's prompts by few-shot prompting
    with seed prompts of the training split, instead of answering those seed prompts (see the module docstring)."""
    prompt_shots: int = 8
    """Seed prompts shown per generated prompt (the paper: 8-shot)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """Few-shot prompt with ``{examples}`` (the shots as ``1. <prompt>`` lines) and ``{next}`` (the number of the
    item to write); default: Self-Instruct's."""
    prompt_max_new_tokens: int = 64
    """Longest generated prompt, in tokens; an item that has not ended (newline or EOS) by then is too long."""

    def validate(self) -> None:
        super().validate()
        if "{prompt}" not in self.judge_template or "{response}" not in self.judge_template:
            raise ValueError("self_rewarding.judge_template must contain {prompt} and {response}")
        if "{examples}" not in self.prompt_template or "{next}" not in self.prompt_template:
            raise ValueError("self_rewarding.prompt_template must contain {examples} and {next}")
        if not (isinstance(self.prompt_shots, int) and self.prompt_shots >= 1):
            raise ValueError(f"self_rewarding.prompt_shots must be an int >= 1, got {self.prompt_shots!r}")
        self.judge_generation().validate()
        self.prompt_generation().validate()

    def judge_generation(self) -> GenerationConfig:
        return GenerationConfig(num_generations=self.judge_samples, max_new_tokens=self.judge_max_new_tokens,
                                temperature=self.judge_temperature, top_p=self.judge_top_p,
                                backend=self.generation.backend)

    def prompt_generation(self) -> GenerationConfig:
        """Sampling of the prompt writer: one item per few-shot prompt, the ``generation`` section's settings."""
        g = self.generation
        return GenerationConfig(num_generations=1, max_new_tokens=self.prompt_max_new_tokens,
                                temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, backend=g.backend)


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace made one space, stripped (as Self-Instruct normalises its shots)."""
    return re.sub(r"\s+", " ", text).strip()


def _prompt_text(row_prompt) -> str:
    """A seed row's prompt as text: the string, or the content of its last user turn (a conversational row)."""
    if isinstance(row_prompt, str):
        return row_prompt
    users = [m.get("content", "") for m in row_prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else ""


def fewshot_prompt(template: str, shots: list[str]) -> str:
    """The few-shot prompt-writing prompt: ``template`` with the shots as numbered lines and the next number."""
    lines = "\n".join(f"{i}. {_one_line(s)}" for i, s in enumerate(shots, start=1))
    return template.format(examples=lines, next=len(shots) + 1)


def parse_generated_prompt(text: str, truncated: bool) -> tuple[str | None, str | None]:
    """``(prompt, None)`` for M_t's continuation of a few-shot prompt (the text up to the first newline,
    whitespace collapsed), or ``(None, why)``: ``"empty"``, or ``"too_long"`` when the item did not end (no
    newline before the generation was cut at its token budget)."""
    head, newline, _ = text.partition("\n")
    if truncated and not newline:
        return None, "too_long"
    head = _one_line(head)
    return (head, None) if head else (None, "empty")


@dataclass
class EFTMicroBatch(OnlineMicroBatch):
    """Iteration 0's supervised micro-batch: the EFT judgements (prompt + judgement, packed), trained with NLL."""


@register_algorithm("self_rewarding")
class SelfRewarding(PairDPOAlgorithm):
    """M_t samples, judges its samples 3 times each, and M_{t+1} trains DPO on its highest- vs lowest-judged."""

    config_class = SelfRewardingConfig
    iterative = True

    def __init__(self, cfg, rt):
        super().__init__(cfg, rt)
        from fastpref.data.dataset import Tokenization, load_examples

        d = cfg.data
        self.tokenization = Tokenization(rt.tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                                         truncation=d.truncation, chat_template=d.chat_template)
        self.eft: list[dict] = []
        if self.sec.eft_files:
            self.eft = load_examples(list(self.sec.eft_files), "sft", self.tokenization, on_bad_row=d.on_bad_row)
            if not self.eft:
                raise ValueError(f"self_rewarding.eft_files={self.sec.eft_files}: no rows")
            random.Random(cfg.train.seed).shuffle(self.eft)  # files mixed (e.g. IFT + EFT rows) over the steps

    def judge_prompt(self, prompt: str, response: str) -> str:
        """The judge prompt, through the tokenizer's chat template (one user turn) when it has one."""
        text = self.sec.judge_template.format(prompt=prompt, response=response)
        tok = self.rt.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return text

    def judge(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        """The model's mean parsed score of each response over ``judge_samples`` judgements (None when none
        parses); ``judge/unparseable`` counts the judgements without a ``Score: N`` line."""
        sec, tok = self.sec, self.rt.tokenizer
        texts = [self.judge_prompt(p, r) for p, r in zip(prompts, responses)]
        n, out, bad = sec.judge_samples, [], 0
        for chunk in self.chunks(list(range(len(texts)))):
            ts = [texts[i] for i in chunk]
            jro = generate(self.rt.model, tok, [encode(tok, t) for t in ts], sec.judge_generation(), prompts=ts)
            self._timings["judge"] = self._timings.get("judge", 0.0) + jro.timings.get("generate", 0.0)
            for i in range(len(ts)):
                vals = [parse_judge_score(t, sec.max_score, require_score_line=True)
                        for t in jro.completions[i * n:(i + 1) * n]]
                bad += sum(v is None for v in vals)
                vals = [v for v in vals if v is not None]
                out.append(sum(vals) / len(vals) if vals else None)
        self.step_metrics["judge/unparseable"] = float(bad)
        self.step_metrics["judge/judgements"] = float(n * len(texts))
        return out

    def write_prompts(self, seeds: list[dict]) -> list[dict]:
        """Self-instruction creation: one new prompt per seed prompt's slot, written by the model as it is now
        (M_t) from ``prompt_shots`` seed prompts (a seeded draw from ``seeds``) in ``prompt_template``; the
        survivors (not empty, not too long, not a duplicate) as prompt examples (``prompt_ids``, ``row``), counted
        in ``prompts/*`` metrics."""
        from fastpref.data.dataset import BadRow

        sec, tok = self.sec, self.rt.tokenizer
        texts = [t for t in (_prompt_text(ex.get("row", {}).get("prompt")) for ex in seeds) if t.strip()]
        if not texts:
            raise ValueError("self_rewarding.generate_prompts: the training split has no text prompts to show M_t")
        chat = all(isinstance(ex.get("row", {}).get("prompt"), list) for ex in seeds)
        asks = [fewshot_prompt(sec.prompt_template, self.rng.sample(texts, min(sec.prompt_shots, len(texts))))
                for _ in seeds]
        counts = {"empty": 0, "too_long": 0, "duplicate": 0}
        seen, out = set(), []
        with timed(self._timings, "prompt_generation"):
            for chunk in self.chunks(asks):
                ro = generate(self.rt.model, tok, [encode(tok, a) for a in chunk], sec.prompt_generation(),
                              prompts=chunk)
                for text, cut in zip(ro.completions, ro.truncated):
                    new, why = parse_generated_prompt(text, cut)
                    if new is not None and new in seen:
                        why = "duplicate"
                    if why is None:
                        row = {"prompt": [{"role": "user", "content": new}] if chat else new}
                        try:
                            ids = self.tokenization.example(row)["prompt_ids"]
                        except BadRow:
                            why = "too_long"
                    if why is not None:
                        counts[why] += 1
                        continue
                    seen.add(new)
                    out.append({"prompt_ids": ids, "row": row, "source": f"generated:{self.round}:{len(out)}"})
        self.step_metrics.update({"prompts/attempts": float(len(asks)), "prompts/kept": float(len(out)),
                                  "prompts/in_seed_data": float(len(seen & {_one_line(t) for t in texts})),
                                  **{f"prompts/{k}": float(v) for k, v in counts.items()}})
        if not out:
            log.warning("%s: iteration %d: none of the %d prompts M_t wrote survived (empty %d, too long %d, "
                        "duplicate %d): nothing to answer this iteration", self.name, self.round, len(asks),
                        counts["empty"], counts["too_long"], counts["duplicate"])
        return out

    def build_iteration(self, prompts: list[dict]) -> list[Pair]:
        if self.eft and self.round == 0:
            return []  # iteration 0 is the supervised step on the EFT data (micro_batches)
        dropped = None
        if self.sec.generate_prompts:
            n = len(prompts)
            prompts = self.write_prompts(prompts)
            dropped = {"generated prompts dropped": (n - len(prompts), n)}
            if not prompts:
                self.report_signal(dropped)
                return []
        ro = Rollout.concat([self.rollout(chunk) for chunk in self.chunks(prompts)])
        scores = self.judge(ro.prompts, ro.completions)
        valid = [s for s in scores if s is not None]
        self.step_metrics["judge/parse_rate"] = len(valid) / len(scores)
        if valid:
            self.step_metrics["judge/mean_score"] = sum(valid) / len(valid)
        counts = score_signal(scores, ro.group_size)
        bad, total = int(self.step_metrics["judge/unparseable"]), int(self.step_metrics["judge/judgements"])
        counts.pop("unscored samples", None)
        if bad:
            counts["unparseable judgements"] = (bad, total)
        self.report_signal({**(dropped or {}), **counts})
        return rollout_pairs(ro, scores)

    # ---- EFT: iteration 0 trains the NLL of the judgements
    def micro_batches(self, examples: list[dict], step: int) -> list[OnlineMicroBatch]:
        if not (self.eft and self.round == 0):
            return super().micro_batches(examples, step)
        self._step = step
        per = -(-len(self.eft) // self.sec.steps_per_iteration)
        k = self._iter_step % self.sec.steps_per_iteration
        self._iter_step += 1
        exs = self.eft[k * per:(k + 1) * per] or self.eft[:per]
        with timed(self._timings, "pack"):
            batch = pack([e["prompt_ids"] for e in exs], [e["completion_ids"] for e in exs], self.device)
        self.step_metrics["eft/examples"] = float(len(exs))
        self.begin_train_phase(batch.input_ids.numel())
        return [EFTMicroBatch(batch)]

    def compute_loss(self, mb: OnlineMicroBatch):
        if not isinstance(mb, EFTMicroBatch):
            return super().compute_loss(mb)
        packed = mb.batch
        nll = -sequence_logps(self.rt.model, packed)
        loss = nll.sum() / packed.scored_lengths.sum().clamp(min=1)
        return loss, {"eft/nll": loss.detach()}
