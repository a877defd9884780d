"""Gopher quality filter (Rae et al. 2021, section A.1.1): document length, word lengths, symbols,
bullets, alphabetic words and stop words, as datatrove implements it."""

from __future__ import annotations

from flows.data.filters.base import DocFilter
from flows.data.text import Doc, has_alpha, is_symbol


class GopherQuality(DocFilter):
    name = "gopher_quality"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.stop_words = frozenset(cfg.stop_words)

    def filter(self, doc: Doc):
        c, text, ws = self.cfg, doc.text, doc.words
        content = [w for w in ws if not is_symbol(w)]
        if len(content) < c.min_doc_words:
            return "short_doc"
        if len(content) > c.max_doc_words:
            return "long_doc"
        avg = sum(map(len, content)) / len(content)
        if avg < c.min_avg_word_length:
            return "below_avg_word_length"
        if avg > c.max_avg_word_length:
            return "above_avg_word_length"
        n = len(ws)
        if text.count("#") / n > c.max_symbol_word_ratio:
            return "too_many_hashes"
        if (text.count("...") + text.count("…")) / n > c.max_symbol_word_ratio:
            return "too_many_ellipsis"
        lines = text.splitlines()
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > c.max_bullet_lines_ratio:
            return "too_many_bullets"
        ellipsis = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ellipsis / len(lines) > c.max_ellipsis_lines_ratio:
            return "too_many_end_ellipsis"
        alpha = sum(map(has_alpha, ws))
        if alpha / n < c.min_alpha_words_ratio:
            return "below_alpha_ratio"
        # Case-sensitive, as in the reference implementation.
        if len(self.stop_words.intersection(ws)) < c.min_stop_words:
            return "few_stop_words"
        return True
