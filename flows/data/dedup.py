"""Exact and near-duplicate detection.

Exact: a 64-bit hash of the normalised text. Near: MinHash over word 5-grams as FineWeb
computes it (datatrove's scheme, so that the same documents get the same signatures):
simplified text (lower case, numbers -> 0, punctuation -> space, diacritics stripped),
xxh64 of each n-gram string, then num_perm hashes (a*x + b) mod (2^61 - 1) with a, b drawn
from RandomState(seed). The permutation step is one vectorised numpy pass per batch.
Duplicate clusters: per band, sort the band keys and join neighbours with equal keys, then
connected components over at most bands x n edges -- O(n log n), never pairwise. Each
cluster keeps its first document (smallest `seq`).
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import xxhash

from flows.data.config import MinHashConfig

SIG_DTYPE = np.uint64
_MERSENNE = np.uint64((1 << 61) - 1)
_PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + "".join(
    map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b)))
)
_PUNCT_TRANS = str.maketrans({**{c: " " for c in _PUNCTUATION}, "‘": " ‘ "})  # spaCy keeps ‘ as a token
_NUMBERS_RE = re.compile(r"\d+(?:[.,،٫⎖⎗⎘]\d+)?")
# spaCy's English tokenizer splits these even without punctuation.
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                "wont": ("wo", "nt"), "cant": ("ca", "nt"), "dont": ("do", "nt"), "aint": ("ai", "nt"),
                **{w + "nt": (w, "nt") for w in ("did", "does", "is", "was", "are", "were", "could", "should",
                                                 "would", "has", "have", "had", "must", "need")},
                "im": ("i", "m"), "ive": ("i", "ve"), "wed": ("we", "d")}
_CHUNK = 1 << 13  # shingles per (chunk, num_perm) block: ~7 MB of uint64 for 112 hashes


def exact_hash(text: str) -> int:
    # xxhash 4 hashes bytes only; utf-8 is what 3.x hashed for a str, so digests are unchanged.
    return xxhash.xxh3_64_intdigest(text.encode())


def simplify(text: str) -> list[str]:
    text = _NUMBERS_RE.sub("0", text.lower()).translate(_PUNCT_TRANS)
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    words = text.split()
    if any(w in _SPLIT_WORDS for w in words):
        words = [part for w in words for part in _SPLIT_WORDS.get(w, (w,))]
    return words


class MinHasher:
    def __init__(self, cfg: MinHashConfig):
        self.cfg = cfg
        self.num_perm = cfg.bands * cfg.rows
        gen = np.random.RandomState(cfg.seed)
        self.a = gen.randint(1, _MERSENNE, dtype=np.uint64, size=self.num_perm)
        self.b = gen.randint(0, _MERSENNE, dtype=np.uint64, size=self.num_perm)

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures uint64 (n, num_perm), has_signature bool (n,)). A text with fewer
        words than the n-gram size has no shingle and so no signature (never a duplicate)."""
        n, k = len(texts), self.cfg.ngram
        sig = np.full((n, self.num_perm), np.iinfo(SIG_DTYPE).max, dtype=SIG_DTYPE)
        hashes, counts = [], np.zeros(n, dtype=np.int64)
        for i, text in enumerate(texts):
            ws = simplify(text)
            grams = [" ".join(ws[j : j + k]) for j in range(len(ws) - k + 1)]
            counts[i] = len(grams)
            hashes += (xxhash.xxh64_intdigest(g.encode()) for g in grams)
        has = counts > 0
        if has.any():
            shingles = np.array(hashes, dtype=np.uint64)
            starts = np.concatenate(([0], np.cumsum(counts[has])[:-1]))
            sig[has] = self._min_hash(shingles, starts)
        return sig, has

    def _min_hash(self, shingles: np.ndarray, starts: np.ndarray) -> np.ndarray:
        out = np.empty((len(starts), self.num_perm), dtype=SIG_DTYPE)
        bounds = np.append(starts, len(shingles))
        buf = np.empty((min(len(shingles), _CHUNK) + 1, self.num_perm), dtype=np.uint64)
        doc = 0
        while doc < len(starts):
            # Whole documents per chunk so that reduceat sees complete segments.
            last = max(doc + 1, int(np.searchsorted(bounds, bounds[doc] + _CHUNK, side="right")) - 1)
            last = min(last, len(starts))
            lo, hi = bounds[doc], bounds[last]
            h = buf[: hi - lo] if hi - lo <= len(buf) else np.empty((hi - lo, self.num_perm), dtype=np.uint64)
            np.multiply(shingles[lo:hi, None], self.a, out=h)  # wraps mod 2^64, as the reference does
            np.add(h, self.b, out=h)
            np.remainder(h, _MERSENNE, out=h)
            out[doc:last] = np.minimum.reduceat(h, bounds[doc:last] - lo, axis=0)
            doc = last
        return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[np.ndarray]:
    """Per band, a (n,) void array of the band's raw bytes: equal keys <=> equal rows."""
    sig = np.ascontiguousarray(sig[:, : bands * rows]).reshape(len(sig), bands, rows)
    width = rows * sig.dtype.itemsize
    return [np.ascontiguousarray(sig[:, b]).view(f"V{width}").ravel() for b in range(bands)]


def cluster_duplicates(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Component label per row: rows sharing any band key end up in one component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sig)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    src, dst = [], []
    for keys in band_keys(sig, bands, rows):
        order = np.argsort(keys, kind="stable")
        same = keys[order[1:]] == keys[order[:-1]]
        src.append(order[:-1][same])
        dst.append(order[1:][same])
    src, dst = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def duplicates_to_drop(seq: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Boolean mask of rows to drop: all but the smallest seq of each label."""
    order = np.lexsort((seq, labels))
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order[1:]] != labels[order[:-1]]
    drop = np.zeros(len(seq), dtype=bool)
    drop[order[~first]] = True
    return drop


def dedup_decisions(seq: np.ndarray, exact: np.ndarray, sig: np.ndarray, has_sig: np.ndarray, cfg: MinHashConfig | None, exact_on: bool) -> dict[int, str]:
    """seq -> drop reason for the candidates of one run (all still kept before dedup)."""
    reasons: dict[int, str] = {}
    alive = np.ones(len(seq), dtype=bool)
    if exact_on and len(seq):
        drop = duplicates_to_drop(seq, exact)
        reasons.update((int(s), "exact_dedup:duplicate") for s in seq[drop])
        alive &= ~drop
    if cfg is not None:
        idx = np.flatnonzero(alive & has_sig)
        labels = cluster_duplicates(sig[idx], cfg.bands, cfg.rows)
        drop = duplicates_to_drop(seq[idx], labels)
        reasons.update((int(s), "minhash:near_duplicate") for s in seq[idx][drop])
    return reasons
