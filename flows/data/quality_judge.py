"""The judge: an earlier, small model rates documents 0-5 for educational value (FineWeb-Edu's recipe,
Penedo et al. 2024, which Llama 3 follows with Llama 2 as the judge).

The prompt is chat-formatted and ends with "Educational score: ", so the next token is the score's
digit. A rating is the expected digit under the next-token distribution renormalised over the six
tokens "0".."5" -- softmax over those six logits only, so the output projection is computed for six
rows of the vocabulary, at one position per document.

The rubric precedes the document, so its keys and values are computed once and every batch of
documents continues from that cached prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import HerdError

# FineWeb-Edu's additive rubric (its annotation prompt, condensed for a 135M judge).
EDU_RUBRIC = (
    "Below is an extract from a web page. Evaluate whether the page has a high educational value and "
    "could be useful in an educational setting for teaching from primary school to grade school levels "
    "using the additive 5-point scoring system described below. Points are accumulated based on the "
    "satisfaction of each criterion:\n"
    "- Add 1 point if the extract provides some basic information relevant to educational topics, even if"
    " it includes some irrelevant or non-academic content like advertisements and promotional material.\n"
    "- Add another point if the extract addresses certain elements pertinent to education but does not "
    "align closely with educational standards. It might mix educational content with non-educational "
    "material.\n"
    "- Award a third point if the extract is appropriate for educational use and introduces key concepts "
    "relevant to school curricula. It is coherent though it may not be comprehensive.\n"
    "- Grant a fourth point if the extract is highly relevant and beneficial for educational purposes, "
    "with a clear and consistent writing style, like a chapter from a textbook or a tutorial.\n"
    "- Bestow a fifth point if the extract is outstanding in its educational value, perfectly suited for "
    "teaching, with detailed reasoning that is easy to follow.\n"
    "A page with no educational content at all (navigation menus, cookie notices, legal terms, "
    "advertising, spam) scores 0."
)

# A second phrasing of the same question: the judge's agreement with itself across the two bounds
# how well any classifier can learn its ratings.
TEACHER_RUBRIC = (
    "You are a teacher choosing reading material for your students. Rate the text below from 0 to 5 by "
    "how much a student would learn from it.\n"
    "0: nothing to learn (menus, cookie banners, terms of service, adverts, spam).\n"
    "1: a little information, mostly noise.\n"
    "2: some useful facts, but disorganised or mixed with unrelated material.\n"
    "3: clear and informative; fine for a lesson.\n"
    "4: well explained, like a good textbook section or tutorial.\n"
    "5: excellent teaching material with careful, easy to follow explanations."
)

PROMPTS = {"fineweb_edu": EDU_RUBRIC, "teacher": TEACHER_RUBRIC}
SYSTEM = "You are a careful annotator of educational content."
ANSWER = "Educational score: "
DIGITS = "012345"


@dataclass(frozen=True)
class JudgeConfig:
    prompt: str = "fineweb_edu"  # a key of PROMPTS
    max_tokens: int = 256  # document tokens shown to the judge
    batch_size: int = 16


# Worked examples shown before the document (as earlier chat turns): a 135M judge given the rubric
# alone rates by its prior over digits -- cookie banners and legal text came out above textbook
# prose -- and anchors on the scale fix most of that. They are part of the cached prefix.
SHOTS = (
    (
        "Home | Products | Support | Contact | Log in\nThis website uses cookies to ensure you get the best "
        "experience. "
        "Accept | Decline\nTerms | Privacy | (c) 2023 Acme Inc.",
        0,
    ),
    (
        "The water cycle describes how water moves around the Earth. Heat from the Sun makes water in oceans and lakes "
        "evaporate into vapour. As the vapour rises it cools and condenses into tiny droplets that form clouds. When "
        "the "
        "droplets join and grow heavy they fall as rain or snow, and the water flows back to the sea.",
        4,
    ),
    (
        "Limited offer!!! Get cheap followers and likes now. Best casino bonus, click the link, free spins, 90% "
        "discount, "
        "order today!!!",
        0,
    ),
    (
        '"I cannot stay," said she, turning towards the window. "My aunt expects me before dinner, and you know how '
        'she worries." He bowed and said nothing.',
        1,
    ),
    (
        "By using this service you agree that the Company shall not be liable for any damages. These terms may change "
        "without notice. All rights reserved.",
        0,
    ),
)
TAIL = "\n\nAfter examining the extract, conclude with the total score as a single digit from 0 to 5."


def prompt_messages(prompt: str, document: str) -> list[dict]:
    """The chat: system, the rubric with the worked examples as earlier turns, then the document."""
    if prompt not in PROMPTS:
        raise HerdError(f"judge prompt {prompt!r}: choose one of {sorted(PROMPTS)}")
    msgs = [{"role": "system", "content": SYSTEM}]
    for i, (text, score) in enumerate(SHOTS):
        head = PROMPTS[prompt] + "\n\n" if i == 0 else ""
        msgs += [
            {"role": "user", "content": f"{head}The extract:\n{text}{TAIL}"},
            {"role": "assistant", "content": f"{ANSWER}{score}"},
        ]
    return msgs + [{"role": "user", "content": f"The extract:\n{document}{TAIL}"}]


def prompt_sha256(prompt: str) -> str:
    """Digest of everything the judge is shown besides the document (system, rubric, answer prefix)."""
    text = (
        "\x00".join(f"{m['role']}:{m['content']}" for m in prompt_messages(prompt, "\x01DOCUMENT\x01"))
        + "\x00"
        + ANSWER
    )
    return hashlib.sha256(text.encode()).hexdigest()


def judge_digest(model_dir: str | Path) -> str:
    """sha256 of the judge's weights file (model.safetensors, or the .gguf it was given)."""
    from flows.digest import sha256_file

    p = Path(model_dir)
    for f in [p] if p.is_file() else [p / "model.safetensors", *sorted(p.glob("*.safetensors"))]:
        if f.is_file():
            return sha256_file(f)
    raise HerdError(f"{model_dir}: no weights file to digest (model.safetensors)")


class EduJudge:
    """Holds the judge model and the rubric's cached prefix; call it on a list of texts."""

    def __init__(self, model_dir: str | Path, cfg: JudgeConfig = JudgeConfig()):
        import torch

        from model.checkpoint import load_model
        from model.kv_cache import KVCache
        from model.tokenizer import load_tokenizer

        self.torch, self.cfg = torch, cfg
        model, mcfg = load_model(model_dir, dtype=torch.float32)
        self.model = model.eval().fuse_projections()
        self.tok = load_tokenizer(model_dir)
        self.answer = self.tok.encode(ANSWER)
        digit_ids = [self.tok.encode(d) for d in DIGITS]
        if any(len(i) != 1 for i in digit_ids):
            raise HerdError(f"{model_dir}: the tokenizer does not encode each digit 0-5 as one token")
        self.digit_ids = torch.tensor([i[0] for i in digit_ids])
        # The shared prefix: the longest run of tokens two unrelated documents' prompts agree on.
        a, b = (self.tok.encode_chat(prompt_messages(cfg.prompt, d)) for d in ("Alpha.", "Zulu 9"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        self.prefix = a[:n]
        tail = len(self.tok.encode_chat(prompt_messages(cfg.prompt, ""))) - len(self.prefix) + len(self.answer)
        self.cache = KVCache.for_model(mcfg, cfg.batch_size, len(self.prefix) + cfg.max_tokens + tail + 8)
        with torch.inference_mode():
            self.cache.select([0])
            self.model(torch.tensor([self.prefix]), cache=self.cache)
            self.cache.select(None)
        for row in range(1, cfg.batch_size):
            self.cache.copy_prefix(0, row, len(self.prefix))
        self.cache.lengths[0] = len(self.prefix)

    def _suffix(self, text: str) -> list[int]:
        """The prompt's tokens after the cached prefix, the document cut to max_tokens."""
        doc = " ".join(text.split())
        ids = self.tok.encode(doc)
        if len(ids) > self.cfg.max_tokens:
            doc = self.tok.decode(ids[: self.cfg.max_tokens])
        full = self.tok.encode_chat(prompt_messages(self.cfg.prompt, doc.strip() or "(empty)")) + self.answer
        n = len(self.prefix)
        if full[:n] != self.prefix:
            raise HerdError(f"judge prompt: document {text[:40]!r} changes the rubric's tokenisation")
        return full[n:]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Ratings in [0, 5], one per text."""
        torch = self.torch
        suffixes = [self._suffix(t) for t in texts]
        out = np.zeros(len(texts), dtype=np.float64)
        order = np.argsort([len(s) for s in suffixes], kind="stable")  # similar lengths share a batch
        w = self.model.output_weight[self.digit_ids]  # (6, dim)
        for i in range(0, len(order), self.cfg.batch_size):
            rows = order[i : i + self.cfg.batch_size]
            batch = [suffixes[r] for r in rows]
            T = max(map(len, batch))
            # Right padding is harmless: causal attention keeps it out of the real positions.
            ids = torch.tensor([s + [s[-1]] * (T - len(s)) for s in batch])
            last = torch.tensor([len(s) - 1 for s in batch])
            self.cache.lengths[: len(batch)] = len(self.prefix)
            self.cache.select(None if len(batch) == self.cfg.batch_size else list(range(len(batch))))
            with torch.inference_mode():
                logits = self.model(
                    ids, cache=self.cache, head=lambda h, _w, n=len(batch), last=last: h[torch.arange(n), last] @ w.T
                )
            p = torch.softmax(logits.float(), dim=-1).numpy()
            out[rows] = p @ np.arange(len(DIGITS), dtype=np.float64)
        self.cache.select(None)
        return out
