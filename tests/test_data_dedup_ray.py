"""Deduplication on a real local Ray (flows/data/dedup_ray.py) against the one-process reference
(tests/dedup_reference.py) on the shared corpus: the same documents are dropped, for the same reasons."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from flows.data import dedup_ray
from flows.data.config import DataConfig
from flows.data.dedup import MinHasher, exact_hash
from tests.dedup_reference import dedup_decisions, semantic_duplicates

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def filtered_rows(docs: list[str], cfg: DataConfig) -> list[dict]:
    """What FilterStage hands on: every 13th document already dropped by a filter."""
    sig, has = MinHasher(cfg.minhash).signatures(docs)
    return [
        {
            "seq": 3 * i + 1,
            "id": f"d{i}",
            "text": t,
            "source": "s",
            "reason": "c4:x" if i % 13 == 5 else "",
            "exact": np.uint64(exact_hash(t)),
            "sig": sig[i].tobytes() if has[i] else b"",
        }
        for i, t in enumerate(docs)
    ]


def reasons_of(ds) -> dict[int, str]:
    out = {}
    for b in ds.iter_batches(batch_format="numpy", batch_size=4096):
        out.update((int(s), str(r)) for s, r in zip(b["seq"], b["reason"]) if r)
    return out


def test_exact_and_minhash_match_the_reference_on_shared_corpus(ray_local, shared_data, monkeypatch):
    from bench.data import make_corpus

    docs = [d["text"] for d in make_corpus(shared_data, 2000)]  # exact copies and 5-15% edited copies
    cfg = DataConfig()
    cfg.ray.batch_size = 256
    rows = filtered_rows(docs, cfg)
    monkeypatch.setattr(dedup_ray, "ROWS_PER_PARTITION", 5000)  # several partitions (one at the default)
    ds, n = dedup_ray.dedup(ray_local.data.from_items(rows, override_num_blocks=6), cfg)
    alive = [r for r in rows if not r["reason"]]
    assert n == len(alive)

    seq = np.array([r["seq"] for r in alive], dtype=np.int64)
    has = np.array([len(r["sig"]) > 0 for r in alive])
    sig = np.zeros((len(alive), cfg.minhash.bands * cfg.minhash.rows), dtype=np.uint64)
    sig[has] = np.stack([np.frombuffer(r["sig"], dtype=np.uint64) for r in alive if r["sig"]])
    expected = dedup_decisions(seq, np.array([r["exact"] for r in alive], dtype=np.uint64), sig, has, cfg.minhash, True)
    expected.update((r["seq"], r["reason"]) for r in rows if r["reason"])
    got = reasons_of(ds)
    assert sum(v == "exact_dedup:duplicate" for v in expected.values()) > 30
    assert sum(v == "minhash:near_duplicate" for v in expected.values()) >= 10
    assert got == expected
    assert "exact" not in ds.schema().names and "sig" not in ds.schema().names


def hashed_bow(texts: list[str], dim: int = 384) -> np.ndarray:
    """A cheap, deterministic embedding (hashed bag of words, normalised) for the clustering test."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, exact_hash(w) % dim] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def test_semdedup_matches_the_reference_on_shared_corpus(ray_local, shared_data):
    rng = random.Random(0)
    paras = []
    for path in sorted((shared_data / "corpus").glob("*.txt")):
        text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        paras += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 40]
    paras = paras[:800]
    copies = []
    for p in rng.sample(paras, 80):  # light edits: a few words swapped
        ws = p.split()
        for j in rng.sample(range(len(ws)), 2):
            ws[j] = rng.choice(ws)
        copies.append(" ".join(ws))
    texts = paras + copies
    emb = hashed_bow(texts)
    cfg = DataConfig()
    cfg.semdedup.eps = 0.05
    cfg.ray.batch_size = 200
    rows = [
        {
            "seq": i,
            "id": f"d{i}",
            "text": t,
            "source": "s",
            "reason": "c4:x" if i % 11 == 3 else "",
            "emb": emb[i].tobytes(),
        }
        for i, t in enumerate(texts)
    ]
    alive = np.array([not r["reason"] for r in rows])
    seq = np.arange(len(rows), dtype=np.int64)[alive]

    expected = {int(s): "semdedup:semantic_duplicate" for s in seq[semantic_duplicates(seq, emb[alive], cfg.semdedup)]}
    assert len(expected) > 50
    drops, n = dedup_ray.semantic_drops(ray_local.data.from_items(rows, override_num_blocks=5).materialize(), cfg)
    assert n == alive.sum()
    drop_seq, code = ray_local.get(drops)
    assert {int(s) for s in drop_seq} == set(expected) and not code.any()

    # k-means on a sample of 300 (of ~800): not the reference's clusters; about the same duplicates found.
    cfg.semdedup.fit_sample = 300
    drops, _ = dedup_ray.semantic_drops(ray_local.data.from_items(rows, override_num_blocks=5).materialize(), cfg)
    sampled = {int(s) for s in ray_local.get(drops)[0]}
    planted = {len(paras) + k for k in range(len(copies))} & set(seq.tolist())
    found = len(planted & set(expected))
    print(
        f"sampled k-means: {len(sampled)} drops, reference {len(expected)}; planted copies found "
        f"{len(planted & sampled)}, by the reference {found} of {len(planted)}"
    )
    assert len(planted & sampled) >= 0.9 * found
    assert len(sampled ^ set(expected)) <= 0.15 * len(expected)
