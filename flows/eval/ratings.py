"""Pairwise ratings on the sealed prompt set: candidate against reference (the champion) per use case.

Both models answer every prompt (greedy, chat template). A judge compares the two answers twice,
once in each order, to cancel its position bias: the candidate wins a prompt when the judge prefers
it in both orders, loses when it prefers the reference in both, and ties otherwise (identical
answers tie without a judge). The win rate is (wins + ties / 2) / n, with a bootstrap 95% interval
over prompts, overall and per use case.

Judges (the task spec's `judge:`):
  {kind: likelihood, model: smollm2, margin: 0.05}
                                        (default) an LLM reads each answer as its own reply to the
                                        request: the answer with the higher mean log-likelihood per
                                        token wins, ties within `margin` nats. It rewards answers
                                        that read as natural replies (broken models lose every
                                        prompt) and is blind to correctness beyond that.
  {kind: llm, model: smollm2}           an LLM asked "A or B?": P(A) from its next-token
                                        log-likelihoods of "A" and "B". SmolLM2-135M as this judge
                                        picks the first-shown answer almost always: use a larger one.
  {kind: reward_model, path: DIR}       herd's Bradley-Terry reward model (flows/finetune/rewards.py):
                                        P(A) = sigmoid(r_A - r_B)

Only aggregates leave this module: counts and rates, never a prompt or an answer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from model.errors import HerdError

JUDGE_PROMPT = (
    "Compare two responses to the same request.\n\nRequest:\n{prompt}\n\nResponse A:\n{a}\n\n"
    "Response B:\n{b}\n\nWhich response is more helpful, correct and clearly written? "
    "Answer with the single letter A or B."
)
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Verdict:
    use_case: str
    score: float  # 1 win, 0.5 tie, 0 loss (for the candidate)
    first_preferred: tuple[bool, bool] | None = None  # the judge picked the first-shown answer, per order


def verdict(use_case: str, p_cand_first: float, p_ref_first: float) -> Verdict:
    """p_*: the judge's probability that the FIRST-shown answer is better, per order."""
    cand_ab, cand_ba = p_cand_first > 0.5, p_ref_first < 0.5
    score = 1.0 if cand_ab and cand_ba else 0.0 if not cand_ab and not cand_ba else 0.5
    return Verdict(use_case, score, (p_cand_first > 0.5, p_ref_first > 0.5))


def bootstrap_ci(scores: list[float], n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    x = np.asarray(scores, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def win_rate_metrics(verdicts: list[Verdict]) -> dict[str, float]:
    """`win_rate` (+ `_lo`, `_hi`), wins/ties/losses, and the same per use case (`<use case>/...`)."""

    def block(vs: list[Verdict], prefix: str) -> dict[str, float]:
        s = [v.score for v in vs]
        lo, hi = bootstrap_ci(s)
        return {
            f"{prefix}win_rate": sum(s) / len(s),
            f"{prefix}win_rate_lo": lo,
            f"{prefix}win_rate_hi": hi,
            f"{prefix}wins": float(sum(x == 1.0 for x in s)),
            f"{prefix}ties": float(sum(x == 0.5 for x in s)),
            f"{prefix}losses": float(sum(x == 0.0 for x in s)),
        }

    if not verdicts:
        raise HerdError("win rate: no judged prompts")
    out = block(verdicts, "")
    judged = [v.first_preferred for v in verdicts if v.first_preferred is not None]
    if judged:  # the judge's position bias: how often it picks whichever answer is shown first
        out["judge_first_position_rate"] = sum(a + b for a, b in judged) / (2 * len(judged))
    by = defaultdict(list)
    for v in verdicts:
        by[v.use_case].append(v)
    for uc, vs in sorted(by.items()):
        out.update(block(vs, f"{uc}/"))
        out[f"{uc}/n"] = float(len(vs))
    return out


class LLMJudge:
    """P(first answer better) from a chat model's next-token log-likelihoods of "A" and "B"."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_answer_chars: int = 1500):
        from flows.eval.scoring import Scorer

        self.tok = tokenizer
        self.scorer = Scorer(model, tokenizer, batch_size=batch_size)
        self.max_answer_chars = max_answer_chars
        self.letters = [tokenizer.encode("A"), tokenizer.encode("B")]

    def prefer_first(self, items: list[tuple[str, str, str]]) -> list[float]:
        reqs = []
        room = self.scorer.max_length - 2
        for prompt, a, b in items:
            text = JUDGE_PROMPT.format(prompt=prompt, a=a[: self.max_answer_chars], b=b[: self.max_answer_chars])
            ctx = self.tok.encode_chat([{"role": "user", "content": text}])[-room:]
            reqs += [(ctx, self.letters[0]), (ctx, self.letters[1])]
        lls = self.scorer.loglikelihood_tokens(reqs)
        return [1.0 / (1.0 + math.exp(lls[2 * i + 1][0] - lls[2 * i][0])) for i in range(len(items))]


class LikelihoodJudge:
    """P(first better): 1, 0 or 0.5 as the first answer's mean token log-likelihood (as the judge's
    reply to the request) beats the second's by more than `margin`, trails it, or neither."""

    def __init__(self, model, tokenizer, batch_size: int = 8, margin: float = 0.05, max_answer_tokens: int = 256):
        from flows.eval.scoring import Scorer

        self.tok = tokenizer
        self.scorer = Scorer(model, tokenizer, batch_size=batch_size)
        self.margin, self.max_answer_tokens = margin, max_answer_tokens
        self.cache: dict[tuple[str, str], float] = {}

    def _scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        todo = [p for p in dict.fromkeys(pairs) if p not in self.cache]
        reqs = []
        for prompt, answer in todo:
            cont = self.tok.encode(answer)[: self.max_answer_tokens]
            ctx = self.tok.encode_chat([{"role": "user", "content": prompt}])[
                -(self.scorer.max_length - len(cont) - 1) :
            ]
            reqs.append((ctx, cont))
        scored = self.scorer.loglikelihood_tokens([r for r in reqs if r[1]]) if any(r[1] for r in reqs) else []
        it = iter(scored)
        for (prompt, answer), (_, cont) in zip(todo, reqs):
            self.cache[(prompt, answer)] = next(it)[0] / len(cont) if cont else -math.inf  # an empty answer loses
        return [self.cache[p] for p in pairs]

    def prefer_first(self, items: list[tuple[str, str, str]]) -> list[float]:
        first = self._scores([(p, a) for p, a, _ in items])
        second = self._scores([(p, b) for p, _, b in items])
        return [0.5 if (a == b or abs(a - b) <= self.margin) else float(a > b) for a, b in zip(first, second)]


class RewardJudge:
    """P(first answer better) = sigmoid(r_first - r_second) from herd's reward model."""

    def __init__(self, path):
        from flows.finetune.rewards import load_reward_model

        self.rm, self.tok = load_reward_model(path)

    def _reward(self, prompt: str, answer: str) -> float:
        import torch

        ids = self.tok.encode_chat(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], add_generation_prompt=False
        )[-self.rm.config.max_seq_len :]
        with torch.no_grad():
            return float(self.rm(torch.tensor([ids]), torch.tensor([len(ids)]))[0])

    def prefer_first(self, items: list[tuple[str, str, str]]) -> list[float]:
        out = []
        for prompt, a, b in items:
            d = self._reward(prompt, a) - self._reward(prompt, b)
            out.append(1.0 / (1.0 + math.exp(-d)))
        return out


def make_judge(spec: dict | None, batch_size: int = 8):
    spec = dict(spec or {"kind": "likelihood", "model": "smollm2"})
    kind = spec.get("kind", "likelihood")
    if kind in ("likelihood", "llm"):
        from model.sources import load_for_inference

        model, tok = load_for_inference(str(spec.get("model", "smollm2")), "float32", "auto")
        if kind == "llm":
            return LLMJudge(model, tok, batch_size)
        return LikelihoodJudge(model, tok, batch_size, float(spec.get("margin", 0.05)))
    if kind == "reward_model":
        if not spec.get("path"):
            raise HerdError("judge: kind reward_model needs 'path' (a reward model folder from the rm stage)")
        return RewardJudge(spec["path"])
    raise HerdError(f"judge: kind {kind!r} is not likelihood, llm or reward_model")


def judge_pairs(judge, prompts: list[tuple[str, str]], cand: list[str], ref: list[str]) -> list[Verdict]:
    """prompts: (use case, prompt text); both orders judged; identical answers tie unjudged."""
    out: list[Verdict | None] = [None] * len(prompts)
    todo = []
    for i, ((uc, _prompt), a, b) in enumerate(zip(prompts, cand, ref)):
        if " ".join(a.split()) == " ".join(b.split()):
            out[i] = Verdict(uc, 0.5)
        else:
            todo.append(i)
    if todo:
        ab = judge.prefer_first([(prompts[i][1], cand[i], ref[i]) for i in todo])
        ba = judge.prefer_first([(prompts[i][1], ref[i], cand[i]) for i in todo])
        for i, p1, p2 in zip(todo, ab, ba):
            out[i] = verdict(prompts[i][0], p1, p2)
    return out
