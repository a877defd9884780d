"""Exact and near-duplicate detection.

Exact: a 64-bit hash of the normalised text. Near: MinHash over word 5-grams as FineWeb
computes it (datatrove's scheme, so that the same documents get the same signatures):
simplified text (lower case, numbers -> 0, punctuation -> space, diacritics stripped),
xxh64 of each n-gram string, then num_perm hashes (a*x + b) mod (2^61 - 1) with a, b drawn
from RandomState(seed). The permutation step is one vectorised numpy pass per batch.
Duplicate clusters (distributed by dedup_ray.py): every (bucket key, seq) row is
hash-partitioned by key; per partition, sort the keys and join each bucket's members to its
smallest seq, then connected components of those edges; the partitions' (node, root) pairs
merged give the global components -- O(n log n), never pairwise. Each cluster keeps its first
document (smallest `seq`).
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
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "wont": ("wo", "nt"),
    "cant": ("ca", "nt"),
    "dont": ("do", "nt"),
    "aint": ("ai", "nt"),
    **{
        w + "nt": (w, "nt")
        for w in (
            "did",
            "does",
            "is",
            "was",
            "are",
            "were",
            "could",
            "should",
            "would",
            "has",
            "have",
            "had",
            "must",
            "need",
        )
    },
    "im": ("i", "m"),
    "ive": ("i", "ve"),
    "wed": ("we", "d"),
}
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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
EXACT = -1  # the bucket kind of exact-hash keys; MinHash bands are kinds 0..bands-1


def bucket_rows(
    parts: int,
    width: int,
    seq: np.ndarray | None = None,
    exact: np.ndarray | None = None,
    sig_seq: np.ndarray | None = None,
    sig: np.ndarray | None = None,
    bands: int = 0,
) -> list[dict[str, np.ndarray]]:
    """The bucket keys of some documents, hash-partitioned: one dict per partition with
    `kind` (EXACT, or the band), `key` (width uint64: the exact hash then zeros, or the band's
    rows) and `seq`. A key lands in the same partition whatever the batch, so all documents
    that share a bucket meet in one partition. `seq`/`exact` are the documents for exact dedup,
    `sig_seq`/`sig` those with a MinHash signature (width = rows)."""
    kinds, keys, seqs = [], [], []
    if exact is not None and len(exact):
        key = np.zeros((len(exact), width), dtype=np.uint64)
        key[:, 0] = exact
        kinds.append(np.full(len(exact), EXACT, dtype=np.int16))
        keys.append(key)
        seqs.append(np.asarray(seq, dtype=np.int64))
    if sig is not None and len(sig):
        kinds.append(np.tile(np.arange(bands, dtype=np.int16), len(sig)))
        keys.append(np.ascontiguousarray(sig[:, : bands * width]).reshape(-1, width))
        seqs.append(np.repeat(np.asarray(sig_seq, dtype=np.int64), bands))
    if not kinds:
        kind, key, s = np.zeros(0, np.int16), np.zeros((0, width), np.uint64), np.zeros(0, np.int64)
    else:
        kind, key, s = np.concatenate(kinds), np.concatenate(keys), np.concatenate(seqs)
    part = (key[:, 0] ^ (kind.astype(np.int64).astype(np.uint64) * _GOLDEN)) % np.uint64(parts)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1, dtype=np.uint64))
    return [
        {"kind": kind[order[a:b]], "key": key[order[a:b]], "seq": s[order[a:b]]}
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


def bucket_edges(kind: np.ndarray, key: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One partition's buckets: (exact duplicates to drop -- all but the smallest seq of each
    exact-hash bucket --, and MinHash edges (src, dst) from each band bucket's smallest seq to
    each other member). Sorting, not pairwise: k members give k - 1 edges."""
    order = np.lexsort((seq, *key.T[::-1], kind))
    kind, key, seq = kind[order], key[order], seq[order]
    same = np.zeros(len(seq), dtype=bool)
    if len(seq) > 1:
        same[1:] = (kind[1:] == kind[:-1]) & (key[1:] == key[:-1]).all(axis=1)
    run_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(seq))))
    exact_drop = seq[same & (kind == EXACT)]
    near = same & (kind != EXACT)
    return exact_drop, seq[run_start[near]], seq[near]


def components(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of an edge list over seq numbers: (node, root) for every node
    that is not its component's smallest seq (the root). Feeding such pairs from several
    partitions back in as edges gives the components of their union."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(src):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nodes, inv = np.unique(np.concatenate([src, dst]), return_inverse=True)  # sorted: first of a label is its min
    n, m = len(nodes), len(src)
    graph = coo_matrix((np.ones(m, dtype=np.int8), (inv[:m], inv[m:])), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    root = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(root, labels, np.arange(n))
    root_of = root[labels]
    keep = root_of != np.arange(n)
    return nodes[keep], nodes[root_of[keep]]


DROP_REASONS = ("exact_dedup:duplicate", "minhash:near_duplicate")


def drop_decisions(exact_drop: np.ndarray, near_nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted seq, reason index into DROP_REASONS). A document with an exact twin of smaller
    seq goes as an exact duplicate; every other non-root member of a MinHash component as a
    near duplicate. Exact twins share every band, so a component's smallest seq is never an
    exact duplicate: the result equals exact dedup first, then MinHash over the survivors."""
    exact_drop = np.unique(exact_drop)
    near = np.setdiff1d(near_nodes, exact_drop)
    seq = np.concatenate([exact_drop, near])
    code = np.concatenate([np.zeros(len(exact_drop), np.uint8), np.ones(len(near), np.uint8)])
    order = np.argsort(seq, kind="stable")
    return seq[order], code[order]
