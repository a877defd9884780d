"""Which domain a document belongs to: named by its source, else a small rule-based classifier.

Domains feed the token mix (flows/data/mixing.py) and decide which filters apply: documents
of a code domain skip language ID, the prose heuristics and the bad-words list, which would
drop most source files. The classifier is deliberately strict about "code": prose with a
few example lines (docstrings, tutorials) stays "general", so the prose filters still see it.
"""

from __future__ import annotations

import re
from pathlib import Path

from flows.data.config import InputConfig, MixConfig

GENERAL, CODE, MATH = "general", "code", "math"

# A line that reads as program text in common languages (Python, C-like, shell-free).
_CODE_LINE = re.compile(
    r"""^\s*(?:
        (?:def|class|async\s+def)\s+\w+.*:\s*$            # Python definitions
      | (?:import\s+[\w.]+|from\s+[\w.]+\s+import\s)        # imports
      | (?:return|raise|yield|pass|break|continue)\b        # statements
      | (?:if|elif|while|for|with|try|except|else|finally)\b.*:\s*(?:\#.*)?$
      | @\w[\w.]*                                           # decorators
      | \#include\b | (?:public|private|static|function|var|let|const)\s
      | [\w.\[\]]+\s*(?:[+\-*/|&]?=)\s*\S                   # assignments
      | [{}()\[\]]+;?\s*$                                   # bracket-only lines
      | .*[;{]\s*$                                          # C-like line ends
      | \#(?!\s*$).*                                        # comments
    )""",
    re.VERBOSE,
)
_MATH_TOKEN = re.compile(
    r"\\(?:frac|sum|int|sqrt|alpha|beta|theta|pi|cdot|leq|geq|infty)\b|\$[^$\n]+\$|\d\s*[+\-*/^=]\s*\d"
)
_WORD = re.compile(r"\S+")


def classify_domain(text: str) -> str:
    """code when at least 60% of >= 5 non-empty lines read as code; math when math tokens
    (LaTeX commands, inline $...$, digit-operator-digit) reach 5% of the words; else general."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) >= 5 and sum(1 for line in lines if _CODE_LINE.match(line)) >= 0.6 * len(lines):
        return CODE
    n_words = len(_WORD.findall(text))
    if n_words and len(_MATH_TOKEN.findall(text)) >= 0.05 * n_words:
        return MATH
    return GENERAL


# The embedded corpus names its documents' domains by id prefix (flows/data/embedded.py).
EMBEDDED_DOMAINS = {"pydoc:": GENERAL, "stdlib:": GENERAL, "code:": CODE, "lang:": GENERAL}


class DomainResolver:
    """source path (or the embedded corpus' id prefix) -> domain; the classifier otherwise."""

    def __init__(self, input_cfg: InputConfig, mix: MixConfig):
        # Longest configured path first: a file named inside a named directory wins.
        self.named = sorted(
            ((Path(p).resolve(), d) for p, d in input_cfg.domains.items()), key=lambda pd: -len(str(pd[0]))
        )
        self.classify = mix.classify
        self._cache: dict[str, str | None] = {}

    def _by_source(self, source: str) -> str | None:
        if source not in self._cache:
            path = Path(source).resolve()
            self._cache[source] = next((d for p, d in self.named if path == p or p in path.parents), None)
        return self._cache[source]

    def __call__(self, source: str, doc_id: str, text: str) -> str:
        if not source:
            for prefix, domain in EMBEDDED_DOMAINS.items():
                if doc_id.startswith(prefix):
                    return domain
        elif self.named:
            named = self._by_source(source)
            if named:
                return named
        return classify_domain(text) if self.classify else GENERAL
