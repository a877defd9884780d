"""Exact, MinHash and semantic deduplication on Ray: the driver never gathers the corpus.

The shuffles are Ray tasks over the dataset's blocks (object refs): each block's emit task
returns one piece per partition (num_returns), each partition's reduce task takes its piece of
every block. (Ray Data's groupby adds a sampling and aggregation stage whose fixed cost per call
outweighs the whole driver-side dedup it replaces on small inputs.)

Exact + MinHash: each block emits its documents' bucket keys (exact hash; one key per MinHash
band), hash-partitioned by key; per partition, the bucket edges and their connected components;
one task merges the partitions' (node, root) pairs -- O(duplicates), never O(corpus). The
decisions go to the workers as one object-store array (sorted seq, reason code).

SemDeDup: embed (actor), k-means fitted on at most `fit_sample` items gathered on the driver
(all of them when fewer, in seq order: then the clusters are exactly those of fitting on
everything), every item assigned to its nearest centre on the workers, partitioned by
cluster, and each cluster pruned on a worker.

The driver holds object refs, counts and the k-means sample.
"""

from __future__ import annotations

import numpy as np

from flows.data.config import DataConfig
from flows.data.dedup import DROP_REASONS, bucket_edges, bucket_rows, components, drop_decisions
from flows.data.stages import apply_drops

SEMDEDUP_REASONS = ("semdedup:semantic_duplicate",)
# Bucket-key rows per shuffle partition: a partition's keys (~74 bytes a row) are sorted in one task.
ROWS_PER_PARTITION = 1 << 20
# Embeddings per SemDeDup partition (1.5 KB each at 384 dims).
ITEMS_PER_PARTITION = 1 << 17


def _alive_count(ds) -> int:
    counts = ds.select_columns(["reason"]).map_batches(
        lambda b: {"n": np.array([sum(1 for r in b["reason"] if not r)], dtype=np.int64)}, batch_format="numpy"
    )
    return int(sum(int(b["n"].sum()) for b in counts.iter_batches(batch_format="numpy", batch_size=None)))


def _partitions(items: int, per_partition: int) -> int:
    """Enough partitions to bound each reduce task, and at least one per CPU."""
    import ray

    return max(int(ray.cluster_resources().get("CPU", 1)), -(-items // per_partition), 1)


def _shuffle(blocks, emit, reduce, parts: int, emit_kwargs: dict, reduce_kwargs: dict) -> list:
    """Hash shuffle on Ray tasks: emit(block) -> `parts` pieces; reduce(pieces of partition p).
    Only object refs pass through the driver."""
    import ray

    emit_task = ray.remote(emit).options(num_returns=parts)
    pieces = [emit_task.remote(b, parts, **emit_kwargs) for b in blocks]
    pieces = [p if parts > 1 else [p] for p in pieces]
    reduce_task = ray.remote(reduce)
    return [reduce_task.remote(*[p[k] for p in pieces], **reduce_kwargs) for k in range(parts)]


def _emit_buckets(batch: dict, parts: int, bands: int, rows: int, exact_on: bool, minhash_on: bool):
    alive = np.array([not r for r in batch["reason"]], dtype=bool)
    seq = np.asarray(batch["seq"], dtype=np.int64)[alive]
    kw: dict = {}
    if exact_on:
        kw.update(seq=seq, exact=np.asarray(batch["exact"], dtype=np.uint64)[alive])
    if minhash_on:
        sigs = [s for s, a in zip(batch["sig"], alive) if a]
        has = np.array([len(s) > 0 for s in sigs], dtype=bool)
        sig = np.frombuffer(b"".join(s for s in sigs if len(s)), dtype=np.uint64).reshape(-1, bands * rows)
        kw.update(sig_seq=seq[has] if len(has) else seq[:0], sig=sig, bands=bands)
    out = bucket_rows(parts, rows if minhash_on else 1, **kw)
    for p in out:
        p["alive"] = 0
    out[0]["alive"] = int(alive.sum())
    return tuple(out) if parts > 1 else out[0]


def _reduce_buckets(*pieces) -> dict:
    """One partition: exact drops, and the components of its MinHash bucket edges."""
    exact_drop, src, dst = bucket_edges(*(np.concatenate([p[k] for p in pieces]) for k in ("kind", "key", "seq")))
    node, root = components(src, dst)
    return {"exact_drop": exact_drop, "node": node, "root": root, "alive": sum(p["alive"] for p in pieces)}


def _merge_components(*parts) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    node, root = components(np.concatenate([p["node"] for p in parts]), np.concatenate([p["root"] for p in parts]))
    return drop_decisions(np.concatenate([p["exact_drop"] for p in parts]), node), sum(p["alive"] for p in parts)


def _sorted_drops(*arrays) -> tuple[np.ndarray, np.ndarray]:
    seq = np.sort(np.concatenate(arrays))
    return seq, np.zeros(len(seq), dtype=np.uint8)


def _apply(ds, drops_ref, reasons: tuple[str, ...], cfg: DataConfig):
    """Mark the rows whose seq is in the (sorted seq, reason code) object behind drops_ref."""
    import ray

    sample_chars = cfg.output.sample_chars
    names = np.array(reasons, dtype=object)

    def fn(batch):
        drop_seq, code = ray.get(drops_ref)
        seq = np.asarray(batch["seq"], dtype=np.int64)
        if not len(drop_seq):
            return batch
        pos = np.minimum(np.searchsorted(drop_seq, seq), len(drop_seq) - 1)
        pos = np.unique(pos[drop_seq[pos] == seq])
        return apply_drops(batch, drop_seq[pos], names[code[pos]], sample_chars)

    return ds.map_batches(fn, batch_size=cfg.ray.batch_size).materialize()


def exact_and_near_drops(ds, cfg: DataConfig) -> tuple[object, int]:
    """(ref to (sorted seq, code into DROP_REASONS), documents considered) for the
    materialised filter output (columns seq, reason, exact, sig)."""
    import ray

    m = cfg.minhash
    keys_per_doc = int(cfg.exact_dedup.enabled) + (m.bands if m.enabled else 0)
    parts = _partitions(ds.count() * keys_per_doc, ROWS_PER_PARTITION)
    blocks = ds.select_columns(["seq", "reason", "exact", "sig"]).to_numpy_refs()
    reduced = _shuffle(
        blocks,
        _emit_buckets,
        _reduce_buckets,
        parts,
        {"bands": m.bands, "rows": m.rows, "exact_on": cfg.exact_dedup.enabled, "minhash_on": m.enabled},
        {},
    )
    drops, n = ray.remote(_merge_components).options(num_returns=2).remote(*reduced)
    return drops, int(ray.get(n))


def dedup(ds, cfg: DataConfig):
    """Exact then MinHash dedup; returns (dataset with the drops applied, documents considered)."""
    n = None
    if cfg.exact_dedup.enabled or cfg.minhash.enabled:
        drops, n = exact_and_near_drops(ds, cfg)
        ds = _apply(ds.drop_columns(["exact", "sig"]), drops, DROP_REASONS, cfg)
    else:
        ds = ds.drop_columns(["exact", "sig"])
    return ds, _alive_count(ds) if n is None else n


class _Embed:
    def __init__(self, cfg: DataConfig):
        from flows.data.semdedup import make_embedder

        self.embed = make_embedder(cfg.semdedup)

    def __call__(self, batch: dict) -> dict:
        alive = [i for i, r in enumerate(batch["reason"]) if not r]
        emb = [b""] * len(batch["reason"])
        if alive:
            vectors = self.embed([batch["text"][i] for i in alive])
            for i, v in zip(alive, vectors):
                emb[i] = v.astype(np.float32).tobytes()
        return {**batch, "emb": emb}


def _mix(seq: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of seq: a stable pseudo-random rank per document."""
    with np.errstate(over="ignore"):
        z = seq.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _alive_emb(batch: dict) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    alive = [i for i, r in enumerate(batch["reason"]) if not r]
    seq = np.asarray(batch["seq"], dtype=np.int64)[alive]
    raw = [batch["emb"][i] for i in alive]
    emb = np.stack([np.frombuffer(e, dtype=np.float32) for e in raw]) if raw else np.zeros((0, 1), np.float32)
    return seq, emb, raw


def _fit_sample(ds, n: int, size: int, seed: int) -> np.ndarray:
    """At most `size` embeddings in seq order: all of them when n <= size, else the `size`
    documents of smallest hashed seq. Streamed through a hash threshold set for ~1.1 x size
    rows, so the driver never holds much more than the sample."""
    limit = min(2**64 - 1, int(1.1 * size / n * 2**64)) if n > size else 2**64 - 1

    def pick(batch):
        seq, _, raw = _alive_emb(batch)
        h = _mix(seq, seed)
        hit = np.flatnonzero(h <= np.uint64(limit))
        return {"seq": seq[hit], "h": h[hit], "emb": np.array([raw[i] for i in hit], dtype=object)}

    seqs, hs, embs = [], [], []
    picked = ds.select_columns(["seq", "reason", "emb"]).map_batches(pick, batch_format="numpy")
    for b in picked.iter_batches(batch_format="numpy", batch_size=4096):
        seqs.append(b["seq"]), hs.append(b["h"])
        embs += [np.frombuffer(e, dtype=np.float32) for e in b["emb"]]
    seq, h = np.concatenate(seqs), np.concatenate(hs)
    keep = np.sort(np.argsort(h, kind="stable")[:size]) if len(seq) > size else np.arange(len(seq))
    keep = keep[np.argsort(seq[keep], kind="stable")]
    return np.stack([embs[i] for i in keep])


def _assign(block: dict, parts: int, centers: np.ndarray):
    """Nearest centre of each alive item, partitioned by cluster."""
    from flows.data.semdedup import assign

    seq, emb, _ = _alive_emb(block)
    cluster = assign(emb, centers) if len(seq) else np.zeros(0, np.int64)
    part = cluster % parts
    out = tuple({"cluster": cluster[part == k], "seq": seq[part == k], "emb": emb[part == k]} for k in range(parts))
    return out if parts > 1 else out[0]


def _prune(*pieces, eps: float) -> np.ndarray:
    """One partition's clusters, each pruned on its own: the seqs to drop."""
    from flows.data.semdedup import prune_cluster

    cluster = np.concatenate([p["cluster"] for p in pieces])
    seq = np.concatenate([p["seq"] for p in pieces])
    emb = np.concatenate([p["emb"] for p in pieces if len(p["seq"])] or [np.zeros((0, 1), np.float32)])
    order = np.argsort(cluster, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    drops = [seq[m][prune_cluster(seq[m], emb[m], eps)] for m in np.split(order, bounds) if len(m)]
    return np.concatenate(drops) if drops else np.zeros(0, np.int64)


def semantic_drops(ds, cfg: DataConfig) -> tuple[object | None, int]:
    """(ref to (sorted seq, code), documents considered) for a materialised dataset with `emb`."""
    import ray

    from flows.data.semdedup import kmeans, n_clusters

    s = cfg.semdedup
    n = _alive_count(ds)
    if n < 2:
        return None, n
    sample = _fit_sample(ds, n, s.fit_sample, s.seed)
    _, centers = kmeans(sample, n_clusters(s, n), s.seed)
    del sample
    blocks = ds.select_columns(["seq", "reason", "emb"]).to_numpy_refs()
    pruned = _shuffle(
        blocks, _assign, _prune, _partitions(n, ITEMS_PER_PARTITION), {"centers": ray.put(centers)}, {"eps": s.eps}
    )
    return ray.remote(_sorted_drops).remote(*pruned), n


def prune_semantic(ds, cfg: DataConfig):
    """SemDeDup over a materialised dataset with `emb`; returns (dataset without `emb`, with the
    drops applied; documents considered)."""
    drops, n = semantic_drops(ds, cfg)
    ds = ds.drop_columns(["emb"])
    return (ds if drops is None else _apply(ds, drops, SEMDEDUP_REASONS, cfg)), n


def semdedup(ds, cfg: DataConfig):
    """Embed, then SemDeDup; returns (dataset with the drops applied, documents considered)."""
    import ray

    ds = ds.map_batches(
        _Embed,
        fn_constructor_args=(cfg,),
        batch_size=cfg.semdedup.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if cfg.semdedup.use_gpu else None,
    ).materialize()
    return prune_semantic(ds, cfg)
