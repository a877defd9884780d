"""NSFW word filter and PII masking.

The word list is better-profanity's `profanity_wordlist.txt` (916 English words and phrases,
MIT licence), read from the installed wheel. Matching is on whole words, lower-cased, as
C4's bad-words rule does.
"""

from __future__ import annotations

import re
from pathlib import Path

from flows.data.config import BadWordsConfig, PIIConfig
from flows.data.text import Doc


def load_badwords() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("better_profanity")
    path = Path(list(spec.submodule_search_locations)[0]) / "profanity_wordlist.txt"
    return sorted({w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()})


class BadWords:
    name = "badwords"

    def __init__(self, cfg: BadWordsConfig, words: list[str] | None = None):
        self.cfg = cfg
        words = words if words is not None else load_badwords()
        # Longest first so that phrases win over their first word.
        alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        self.regex = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")

    def filter(self, doc: Doc):
        hits = 0
        for _ in self.regex.finditer(doc.text.lower()):
            hits += 1
            if hits > self.cfg.max_hits:
                return "nsfw_words"
        return True


_EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IPV4_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
# North-American and international forms: +44 20 7946 0958, (555) 123-4567, 555.123.4567.
_PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w)")


class PIIMasker:
    """Rewrites e-mails, IPv4 addresses and phone numbers to placeholders; never drops."""

    name = "pii"

    def __init__(self, cfg: PIIConfig):
        self.rules = [
            (rx, repl)
            for on, rx, repl in (
                (cfg.emails, _EMAIL_RE, "<EMAIL>"),
                (cfg.ips, _IPV4_RE, "<IP>"),
                (cfg.phones, _PHONE_RE, "<PHONE>"),
            )
            if on
        ]

    def filter(self, doc: Doc):
        text = doc.text
        for rx, repl in self.rules:
            text = rx.sub(repl, text)
        doc.text = text
        return True
