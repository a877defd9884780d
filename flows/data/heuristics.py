"""Heuristic quality filters with the published thresholds (defaults in config.py).

Each filter is a pure object: `filter(doc) -> True | reason`. They follow the reference
implementations in datatrove line by line where the papers leave details open, so that
the same thresholds mean the same thing (bench/data.py checks the kept sets agree).
"""

from __future__ import annotations

import re

import numpy as np

from flows.data.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from flows.data.text import Doc, count_sentences, has_alpha, is_symbol, words

_PARAGRAPH_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in the repeats), first occurrence not counted."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


_MULT = np.uint64(0x9E3779B97F4A7C15)


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit key per n-gram of word ids (wrapping polynomial hash; collisions ~2^-64)."""
    keys = ids[: len(ids) - n + 1].copy()
    for k in range(1, n):
        keys = keys * _MULT + ids[k : len(ids) - n + 1 + k]
    return keys


def _top_ngram_chars(keys: np.ndarray, lens: np.ndarray, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length, spaces included, times its
    count); ties go to the n-gram seen first, as Counter.most_common does."""
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    best = counts.max()
    start = int(first[counts == best].min())
    return (int(lens[start : start + n].sum()) + n - 1) * int(best)


def _repeated_ngram_chars(keys: np.ndarray, lens: np.ndarray, n: int) -> int:
    """Characters in n-grams already seen; a repeat skips its own span so overlapping
    repeats are not counted twice (Gopher's "duplicate n-gram character fraction")."""
    if len(np.unique(keys)) == len(keys):
        return 0
    seen: set[int] = set()
    chars = i = 0
    keys_list = keys.tolist()
    while i < len(keys_list):
        key = keys_list[i]
        if key in seen:
            chars += int(lens[i : i + n].sum())
            i += n
        else:
            seen.add(key)
            i += 1
    return chars


class GopherRepetition:
    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig):
        self.cfg = cfg
        self.top = [(int(n), float(f)) for n, f in cfg.top_n_grams]
        self.dup = [(int(n), float(f)) for n, f in cfg.dup_n_grams]

    def filter(self, doc: Doc):
        c, text = self.cfg, doc.text
        if not text:
            return "empty"
        paragraphs = _PARAGRAPH_RE.split(text.strip())
        n_dup, chars = _duplicates(paragraphs)
        if n_dup / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES_RE.split(text)
        n_dup, chars = _duplicates(lines)
        if n_dup / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > c.dup_line_char_frac:
            return "dup_line_char_frac"
        ws = doc.words
        vocab: dict[str, int] = {}
        ids = np.array([vocab.setdefault(w, len(vocab)) for w in ws], dtype=np.uint64)
        lens = np.array([len(w) for w in ws], dtype=np.int64)
        for n, frac in self.top:
            if len(ws) >= n and _top_ngram_chars(_ngram_keys(ids, n), lens, n) / len(text) > frac:
                return f"top_{n}_gram"
        any_repeat = True
        for n, frac in self.dup:
            # No repeated n-gram means no repeated longer one either.
            if not any_repeat or len(ws) < n:
                break
            chars = _repeated_ngram_chars(_ngram_keys(ids, n), lens, n)
            any_repeat = chars > 0
            if chars / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return True


class GopherQuality:
    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig):
        self.cfg = cfg
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


_CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCT = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4:
    """C4 line rules (drop lines; the document keeps the rest) and document rules."""

    name = "c4"

    def __init__(self, cfg: C4Config):
        self.cfg = cfg

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


# Sentence-final characters of the scripts herd keeps by default (FineWeb's stop_chars).
_TERMINAL = tuple(".!?。！？؟۔।॥‼⁇⁈⁉‽")


class FineWeb:
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig):
        self.cfg = cfg

    def filter(self, doc: Doc):
        c, text = self.cfg, doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        if sum(1 for line in lines if line.endswith(_TERMINAL)) / len(lines) < c.line_punct_thr:
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= c.short_line_length) / len(lines) > c.short_line_thr:
            return "short_line_ratio"
        if _duplicates(lines)[1] / max(1, len(text) - text.count("\n")) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, len(doc.words)) > c.new_line_ratio:
            return "list_ratio"
        return True
