"""Exact, near-duplicate (MinHash LSH) and semantic deduplication."""

from __future__ import annotations

import random
import re

import numpy as np

from flows.data.config import MinHashConfig, SemDedupConfig
from flows.data.dedup import (
    DROP_REASONS,
    MinHasher,
    bucket_edges,
    bucket_rows,
    components,
    drop_decisions,
    exact_hash,
    simplify,
)
from flows.data.semdedup import assign, kmeans
from tests.dedup_reference import cluster_duplicates, dedup_decisions, semantic_duplicates


def partitioned_dedup(seq, exact, sig, has, cfg: MinHashConfig, parts: int = 3, batch: int = 97):
    """The distributed path's cores without Ray: batches emit hash-partitioned bucket keys,
    each partition yields exact drops and its components, one merge joins them.
    Returns ({seq: reason}, {node: root} for every non-root MinHash component member)."""
    buckets = [[] for _ in range(parts)]
    for a in range(0, len(seq), batch):
        s, h = seq[a : a + batch], has[a : a + batch]
        rows = bucket_rows(
            parts,
            cfg.rows,
            seq=s,
            exact=None if exact is None else exact[a : a + batch],
            sig_seq=s[h],
            sig=sig[a : a + batch][h],
            bands=cfg.bands,
        )
        for p, r in enumerate(rows):
            buckets[p].append(r)
    exact_drop, nodes, roots = [], [], []
    for rows in buckets:
        e, src, dst = bucket_edges(*(np.concatenate([r[k] for r in rows]) for k in ("kind", "key", "seq")))
        n, r = components(src, dst)
        exact_drop.append(e), nodes.append(n), roots.append(r)
    node, root = components(np.concatenate(nodes), np.concatenate(roots))
    drop_seq, code = drop_decisions(np.concatenate(exact_drop), node)
    return ({int(s): DROP_REASONS[c] for s, c in zip(drop_seq, code)}, {int(n): int(r) for n, r in zip(node, root)})


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    ws = simplify(text)
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y) if x | y else 0.0


def corpus_paragraphs(shared_data, min_words=60):
    out = []
    for path in sorted((shared_data / "corpus").glob("*.txt")):
        text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        out += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= min_words]
    return out


def edit(text: str, frac: float, rng: random.Random, vocab: list[str], clustered: bool) -> str:
    """Change `frac` of the words: scattered substitutions, or one contiguous run."""
    ws = text.split()
    k = max(1, round(frac * len(ws)))
    if clustered:
        start = rng.randrange(len(ws) - k + 1)
        idx = range(start, start + k)
    else:
        idx = rng.sample(range(len(ws)), k)
    for i in idx:
        ws[i] = rng.choice(vocab)
    return " ".join(ws)


def test_near_duplicates_recall_precision(shared_data):
    rng = random.Random(0)
    paras = corpus_paragraphs(shared_data)
    rng.shuffle(paras)
    originals, unrelated = paras[:500], paras[500:1000]
    vocab = sorted({w for p in paras[1000:1500] for w in p.split()})
    docs, origin = [], []
    for i, p in enumerate(originals):
        docs.append(p)
        origin.append(i)
    for i, p in enumerate(originals):
        docs.append(edit(p, rng.uniform(0.05, 0.15), rng, vocab, clustered=i % 2 == 0))
        origin.append(i)
    for j, p in enumerate(unrelated):
        docs.append(p)
        origin.append(1000 + j)
    exact_copies = list(range(0, 500, 10))
    for i in exact_copies:
        docs.append(originals[i])
        origin.append(i)

    cfg = MinHashConfig()
    sig, has = MinHasher(cfg).signatures(docs)
    n = len(docs)
    seq = np.arange(n, dtype=np.int64)
    exact = np.array([exact_hash(d) for d in docs], dtype=np.uint64)
    reasons, root = partitioned_dedup(seq, None, sig, has, cfg)  # MinHash alone: its clusters
    labels = np.array([root.get(i, i) for i in range(n)])
    reference = cluster_duplicates(sig, cfg.bands, cfg.rows)
    assert all((labels[a] == labels[b]) == (reference[a] == reference[b]) for a in range(n) for b in range(a))
    # Candidate pairs: every pair in the same cluster is "detected".
    detected = {(a, b) for a in range(n) for b in range(a + 1, n) if labels[a] == labels[b]}
    true_pairs = {(a, b) for a in range(n) for b in range(a + 1, n) if origin[a] == origin[b]}
    high = {(a, b) for a, b in true_pairs if jaccard(docs[a], docs[b]) >= 0.8}
    recall_high = len(high & detected) / len(high)
    precision = len(detected & true_pairs) / len(detected)
    recall_all = len(true_pairs & detected) / len(true_pairs)
    print(
        f"near-dup: {len(high)} pairs with Jaccard >= 0.8, recall {recall_high:.3f}; "
        f"precision {precision:.3f} over {len(detected)} detected pairs; recall over all edited pairs {recall_all:.3f}"
    )
    assert len(high) >= 50
    assert recall_high >= 0.9
    assert precision >= 0.95

    # Every exact duplicate goes, whatever else happens; the first occurrence stays.
    reasons, _ = partitioned_dedup(seq, exact, sig, has, cfg)
    assert reasons == dedup_decisions(seq, exact, sig, has, cfg, True)
    for k, i in enumerate(exact_copies):
        assert reasons.get(1000 + 500 + k) == "exact_dedup:duplicate"
        assert i not in reasons


def test_lsh_collision_probability_matches_theory():
    # P(candidate | J) = 1 - (1 - J^r)^b: about 0.92 at J = 0.8 with 14 x 8
    cfg = MinHashConfig()
    assert abs(1 - (1 - 0.8**cfg.rows) ** cfg.bands - 0.924) < 0.01


def test_cluster_is_transitive_and_keeps_first():
    import itertools

    letters = ["".join(p) for p in itertools.product("bcdfghjk", repeat=4)]  # digits would all read as 0
    base = " ".join(letters[:200])
    a = base
    b = base.replace(letters[50] + " ", "other ")
    c = b.replace(letters[150] + " ", "another ")
    d = " ".join(letters[200:400])
    short = "too short"
    cfg = MinHashConfig()
    sig, has = MinHasher(cfg).signatures([a, b, c, d, short])
    assert has.tolist() == [True, True, True, True, False]
    seq = np.array([10, 11, 12, 13, 14], dtype=np.int64)
    for parts in (1, 2, 5):
        reasons, _ = partitioned_dedup(seq, np.array([1, 2, 3, 4, 5], dtype=np.uint64), sig, has, cfg, parts, batch=2)
        assert reasons == {11: "minhash:near_duplicate", 12: "minhash:near_duplicate"}


def test_exact_first_then_near_matches_the_reference_on_chains():
    """Exact twins, near-duplicate chains that span partitions and batches, documents without
    a signature: the partitioned path decides exactly what the one-process reference does."""
    rng = np.random.default_rng(3)
    cfg = MinHashConfig()
    n = 600
    sig = rng.integers(0, 1 << 61, size=(n, cfg.bands * cfg.rows), dtype=np.uint64)
    for i in range(1, n, 3):  # chains: each shares one band with its predecessor
        b = int(rng.integers(cfg.bands))
        sig[i, b * cfg.rows : (b + 1) * cfg.rows] = sig[i - 1, b * cfg.rows : (b + 1) * cfg.rows]
    exact = rng.integers(0, 1 << 63, size=n, dtype=np.uint64)
    for i in rng.choice(n, 80, replace=False):  # exact twins share the signature too
        j = int(rng.integers(n))
        exact[i], sig[i] = exact[j], sig[j]
    has = rng.random(n) > 0.05
    for i in range(n):  # a twin of a document without a signature has none either
        has[i] = has[np.flatnonzero(exact == exact[i])[0]]
    seq = np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)
    for exact_on in (True, False):
        for parts in (1, 4):
            got, _ = partitioned_dedup(seq, exact if exact_on else None, sig, has, cfg, parts, batch=50)
            assert got == dedup_decisions(seq, exact, sig, has, cfg, exact_on)


def test_signatures_do_not_depend_on_the_batch():
    texts = [" ".join(f"w{i} x{j}" for j in range(30)) for i in range(20)]
    m = MinHasher(MinHashConfig())
    whole, _ = m.signatures(texts)
    parts = np.concatenate([m.signatures(texts[i : i + 3])[0] for i in range(0, 20, 3)])
    assert np.array_equal(whole, parts)


def test_semdedup_drops_near_identical_embeddings():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noisy = base[:10] + 0.01 * rng.normal(size=(10, 16)).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    emb = np.concatenate([base, noisy])
    seq = np.arange(50, dtype=np.int64)
    drop = semantic_duplicates(seq, emb, SemDedupConfig(eps=0.01, n_clusters=4))
    assert drop[40:].all()  # the later near-copies go
    assert not drop[:40].any()  # the originals stay
    assert not semantic_duplicates(seq, emb, SemDedupConfig(eps=0.0, n_clusters=4)).any()  # only identical items


def test_kmeans_centres_reproduce_its_labels():
    """Workers assign with the returned centres: they must give k-means' own labels."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for iters in (1, 3, 20):
        labels, centres = kmeans(x, 12, 0, iters)
        assert np.array_equal(assign(x, centres), labels)
