"""NSFW word filter.

The word list is better-profanity's `profanity_wordlist.txt` (916 English words and phrases,
MIT licence), read from the installed wheel. Matching is on whole words, lower-cased, as
C4's bad-words rule does.
"""

from __future__ import annotations

import re
from pathlib import Path

from flows.data.filters.base import DocFilter
from flows.data.text import Doc


def load_badwords() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("better_profanity")
    path = Path(list(spec.submodule_search_locations)[0]) / "profanity_wordlist.txt"
    return sorted({w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()})


class BadWords(DocFilter):
    name = "badwords"  # the list holds identifiers (len, kill, strip): code domains skip it

    def __init__(self, cfg, words: list[str] | None = None):
        super().__init__(cfg)
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
