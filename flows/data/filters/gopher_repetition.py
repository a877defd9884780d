"""Gopher repetition filter (Rae et al. 2021, Table A1): repeated lines, paragraphs and n-grams.

It follows datatrove's reference implementation line by line where the paper leaves details open,
so that the same thresholds mean the same thing (bench/data.py checks the kept sets agree).
"""

from __future__ import annotations

import re

import numpy as np

from flows.data.filters._text import duplicates
from flows.data.filters.base import DocFilter
from flows.data.text import Doc

_PARAGRAPH_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")

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


class GopherRepetition(DocFilter):
    name = "gopher_repetition"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.top = [(int(n), float(f)) for n, f in cfg.top_n_grams]
        self.dup = [(int(n), float(f)) for n, f in cfg.dup_n_grams]

    def filter(self, doc: Doc):
        c, text = self.cfg, doc.text
        if not text:
            return "empty"
        paragraphs = _PARAGRAPH_RE.split(text.strip())
        n_dup, chars = duplicates(paragraphs)
        if n_dup / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES_RE.split(text)
        n_dup, chars = duplicates(lines)
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
