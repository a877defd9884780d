"""What rejection sampling, DPO and the reward model share: sampling completions for task prompts
(batched, KV-cached generation) and building (chosen, rejected) pairs from the tasks' own answers.
It sits below its three users so that none of them imports another."""

from __future__ import annotations

import random

import torch

from flows.finetune import tasks as T
from flows.finetune.config import FinetuneConfig


def _params(fc: FinetuneConfig, seed: int):
    from model.generate import SamplingParams

    s = fc.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens, seed=seed)


@torch.no_grad()
def sample_completions(
    model, tokenizer, tasks: list[dict], fc: FinetuneConfig, seed: int | None = None, batch_prompts: int = 8
) -> list[list[str]]:
    """`sampling.n` completions per task, n copies of each prompt per batch (one KV cache)."""
    from model.generate import generate

    n = fc.sampling.n
    out = []
    base_seed = fc.sampling.seed if seed is None else seed
    was = model.training
    model.eval()
    for s in range(0, len(tasks), batch_prompts):
        chunk = tasks[s : s + batch_prompts]
        prompts = [tokenizer.encode_chat(T.messages(t, fc.data.system)) for t in chunk for _ in range(n)]
        gens = generate(model, prompts, _params(fc, base_seed + s), tokenizer)
        out += [[g.text for g in gens[i * n : (i + 1) * n]] for i in range(len(chunk))]
    model.train(was)
    return out


def wrong_answer(task: dict, rng: random.Random) -> str:
    a = task["answer"]
    if a.lstrip("-").isdigit():
        return str(int(a) + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
    if a.isupper():
        return a.lower()
    others = [w for w in T.WORDS if w != a]
    return rng.choice(others)


def task_pairs(tasks: list[dict], system: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": T.messages(t, system), "chosen": t["answer"], "rejected": wrong_answer(t, rng), "task": t}
        for t in tasks
    ]
