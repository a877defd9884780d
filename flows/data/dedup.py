"""Exact and near-duplicate detection.

Exact: a 64-bit hash of the normalised text. Near: MinHash over word n-grams of the
simplified text (lower case, punctuation dropped, as FineWeb), banded LSH, and
duplicate clusters found by sorting each band's keys and joining neighbours with equal keys
(connected components over at most bands x n edges: O(n log n), never pairwise). Each
cluster keeps its first document (smallest `seq`).

Hashing is numpy-vectorised per batch: word hashes (xxh3, deterministic across processes),
n-gram hashes as a wrapping polynomial of word hashes, then num_perm multiply-shift hashes
h(x) = (a*x + b) mod 2^64 >> 32, i.e. 32-bit signatures.
"""
from __future__ import annotations

import re

import numpy as np
import xxhash

from flows.data.config import MinHashConfig

_WORD_RE = re.compile(r"[^\W_]+")
_MULT = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 1 << 14  # shingles per (chunk, num_perm) block: ~15 MB of uint64 for 112 hashes


def exact_hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text)


def simplify(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


class MinHasher:
    def __init__(self, cfg: MinHashConfig):
        self.cfg = cfg
        self.num_perm = cfg.bands * cfg.rows
        rng = np.random.default_rng(cfg.seed)
        self.a = rng.integers(1, 1 << 63, size=self.num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=self.num_perm, dtype=np.uint64)

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures uint32 (n, num_perm), has_signature bool (n,)). A text with fewer
        words than the n-gram size has no shingle and so no signature (never a duplicate)."""
        n, k = len(texts), self.cfg.ngram
        sig = np.full((n, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        word_lists = [simplify(t) for t in texts]
        counts = np.array([max(0, len(w) - k + 1) for w in word_lists], dtype=np.int64)
        has = counts > 0
        if not has.any():
            return sig, has
        flat = [w for ws, c in zip(word_lists, counts) if c for w in ws]
        hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, flat), dtype=np.uint64, count=len(flat))
        lengths = np.array([len(ws) for ws, c in zip(word_lists, counts) if c], dtype=np.int64)
        shingles = _shingles(hashes, lengths, k)
        starts = np.concatenate(([0], np.cumsum(counts[has])[:-1]))
        sig[has] = self._min_hash(shingles, starts)
        return sig, has

    def _min_hash(self, shingles: np.ndarray, starts: np.ndarray) -> np.ndarray:
        out = np.empty((len(starts), self.num_perm), dtype=np.uint32)
        bounds = np.append(starts, len(shingles))
        buf = np.empty((min(len(shingles), _CHUNK) + 1, self.num_perm), dtype=np.uint64)
        doc = 0
        while doc < len(starts):
            # Whole documents per chunk so that reduceat sees complete segments.
            last = max(doc + 1, int(np.searchsorted(bounds, bounds[doc] + _CHUNK, side="right")) - 1)
            last = min(last, len(starts))
            lo, hi = bounds[doc], bounds[last]
            h = buf[: hi - lo] if hi - lo <= len(buf) else np.empty((hi - lo, self.num_perm), dtype=np.uint64)
            np.multiply(shingles[lo:hi, None], self.a, out=h)
            np.add(h, self.b, out=h)
            np.right_shift(h, np.uint64(32), out=h)
            out[doc:last] = np.minimum.reduceat(h, bounds[doc:last] - lo, axis=0)
            doc = last
        return out


def _shingles(hashes: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Hash of every k-word window that lies inside one document, in document order."""
    total = len(hashes)
    keys = hashes[: total - k + 1].copy()
    for j in range(1, k):
        keys = keys * _MULT + hashes[j : total - k + 1 + j]
    # A window is valid when it starts at least k-1 words before its document's end.
    ends = np.cumsum(lengths)
    doc_of = np.repeat(np.arange(len(lengths)), lengths)[: total - k + 1]
    valid = np.arange(total - k + 1) + k <= ends[doc_of]
    return keys[valid]


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[np.ndarray]:
    """Per band, a (n,) void array of the band's raw bytes: equal keys <=> equal rows."""
    sig = np.ascontiguousarray(sig[:, : bands * rows]).reshape(len(sig), bands, rows)
    return [np.ascontiguousarray(sig[:, b]).view(f"V{4 * rows}").ravel() for b in range(bands)]


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
