"""Embedded verifiable tasks: generated prompts with exact answers, so rewards are real with no download.

Each task is a dict `{"id", "kind", "prompt", "answer"}`; `messages(task)` turns it into a chat and
`check(task, completion)` scores a completion in [0, 1] (1 = exact answer, 0.5 = the answer appears
inside a longer reply, 0 otherwise). The same seed gives the same tasks on every machine.
"""

from __future__ import annotations

import random
import re

SYSTEM = "You are a precise assistant. Reply with the answer only."

WORDS = (
    "apple river stone cloud green table light music paper house water plant horse bread chair glass "
    "tiger lemon ocean piano sugar candle forest silver window garden rabbit butter pencil rocket "
    "winter summer yellow purple orange planet dragon castle mirror basket ladder marble spider "
    "tomato violin wallet button camera jacket pillow"
).split()

KINDS = ("add", "sub", "upper", "last_word", "first_word", "count_words")


def _make(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        return f"What is {a} - {b}?", str(a - b)
    if kind == "upper":
        w = " ".join(rng.sample(WORDS, 2))
        return f"Write '{w}' in capital letters.", w.upper()
    if kind == "last_word":
        ws = rng.sample(WORDS, 3)
        return f"What is the last word in this list: {', '.join(ws)}?", ws[-1]
    if kind == "first_word":
        ws = rng.sample(WORDS, 3)
        return f"What is the first word in this list: {', '.join(ws)}?", ws[0]
    if kind == "count_words":
        n = rng.randint(2, 6)
        ws = [rng.choice(WORDS) for _ in range(n)]
        return f'How many words are in this sentence: "{" ".join(ws)}"?', str(n)
    raise ValueError(f"unknown task kind {kind!r}")


def generate_tasks(
    n: int, seed: int = 0, kinds: tuple[str, ...] | list[str] = KINDS, split: str = "train"
) -> list[dict]:
    """n tasks, round-robin over kinds. Splits use disjoint seeds and drop prompts seen in other splits'
    seeds, so held-out prompts never appear in training data."""
    offsets = {"train": 0, "heldout": 1_000_003, "rs": 2_000_029}
    rng = random.Random(seed * 7919 + offsets.get(split, hash(split) % 10_000_019))
    banned: set[str] = set()
    if split != "heldout":  # keep held-out prompts out of every other split
        banned = {t["prompt"] for t in generate_tasks(n_heldout_guard(n), seed, kinds, "heldout")}
    out, seen, i = [], set(), 0
    kinds = list(kinds)
    while len(out) < n and i < 50 * n + 100:
        kind = kinds[i % len(kinds)]
        i += 1
        prompt, answer = _make(kind, rng)
        if prompt in seen or prompt in banned:
            continue
        seen.add(prompt)
        out.append({"id": f"{split}-{len(out)}", "kind": kind, "prompt": prompt, "answer": answer})
    return out


def n_heldout_guard(n: int) -> int:
    return 200  # the largest held-out set the configs use


def messages(task: dict, system: str = SYSTEM) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": task["prompt"]}]


def normalize(text: str) -> str:
    text = text.strip().strip("\"'`").strip()
    return re.sub(r"[\s.!]+$", "", text).strip()


def check(task: dict, completion: str) -> float:
    """1.0 exact (after trimming quotes, spaces and a final period), 0.5 answer inside a longer reply, else 0."""
    answer = task["answer"]
    got = normalize(completion)
    if got == answer:
        return 1.0
    if re.search(r"(?<![\w])" + re.escape(answer) + r"(?![\w])", completion):
        return 0.5
    return 0.0


def exact_match(task: dict, completion: str) -> bool:
    return check(task, completion) == 1.0
