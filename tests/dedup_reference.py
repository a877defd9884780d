"""The driver-side deduplication herd ran before it moved to Ray (flows/data/dedup_ray.py),
kept only as the reference the distributed path must agree with: every signature and
embedding in one process."""

from __future__ import annotations

import numpy as np

from flows.data.config import MinHashConfig, SemDedupConfig
from flows.data.semdedup import kmeans, n_clusters, prune_cluster


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[np.ndarray]:
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
    order = np.lexsort((seq, labels))
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order[1:]] != labels[order[:-1]]
    drop = np.zeros(len(seq), dtype=bool)
    drop[order[~first]] = True
    return drop


def dedup_decisions(seq, exact, sig, has_sig, cfg: MinHashConfig | None, exact_on: bool) -> dict[int, str]:
    """seq -> drop reason: exact dedup first, then MinHash over the survivors."""
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


def semantic_duplicates(seq: np.ndarray, emb: np.ndarray, cfg: SemDedupConfig) -> np.ndarray:
    """Boolean drop mask: k-means over every embedding, then each cluster pruned."""
    drop = np.zeros(len(seq), dtype=bool)
    if len(seq) < 2:
        return drop
    labels, _ = kmeans(emb, n_clusters(cfg, len(seq)), cfg.seed)
    for j in np.unique(labels):
        members = np.flatnonzero(labels == j)
        drop[members] = prune_cluster(seq[members], emb[members], cfg.eps)
    return drop
