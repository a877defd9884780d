"""C4 filter (Raffel et al. 2020, section 2.2), as datatrove implements it."""

from __future__ import annotations

import re

from flows.data.filters.base import DocFilter
from flows.data.text import Doc, count_sentences, words

_CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCT = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4(DocFilter):
    """C4 line rules (drop lines; the document keeps the rest) and document rules."""

    name = "c4"

    def filter(self, doc: Doc):
        c = self.cfg
        sentences = 0
        kept = []
        for line in doc.text.splitlines():
            line = line.strip()
            ws = line.split()
            if c.max_word_length > 0 and any(len(w) > c.max_word_length for w in ws):
                continue
            if c.remove_citations:
                line = _CITATION_RE.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(_END_PUNCT) or line.endswith("...")):
                continue
            if len(ws) < c.min_words_per_line:
                continue
            lower = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if c.filter_javascript and "javascript" in lower:
                continue
            if c.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if c.filter_policy and any(p in lower for p in _POLICY):
                continue
            if c.min_num_sentences > 0:
                sentences += count_sentences(words(line))
            kept.append(line)
        if sentences < c.min_num_sentences:
            return "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return True
