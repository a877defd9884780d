"""bench/dedup_scale: exact + MinHash dedup and SemDeDup (flows/data/dedup_ray.py) from 20k to 200k
documents: the driver's peak RSS and seconds per document at each size.

Documents are synthetic and made on the Ray workers (the driver never holds them): ~120 words
drawn from the shared books' vocabulary, 10% edited copies (5-15% of words replaced) and 3%
exact copies of earlier documents. The SemDeDup input is a synthetic 384-d embedding per
document (copies near their original), standing in for MiniLM, whose embedding cost is not
what this measures. The peer is the driver-side dedup herd ran before (every signature and
embedding gathered here); it runs at the smallest size only, and the kept sets are compared.
Results: printed, and bench/results/dedup-scale.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DIM = 384


def _vocab() -> list[str]:
    words = set()
    for f in sorted((SHARED / "corpus").glob("*.txt")):
        words.update(w.lower().strip(".,;:!?\"'()") for w in f.read_text(encoding="utf-8-sig").split())
    return sorted(w for w in words if w.isalpha())


def _origin(i: int) -> tuple[int, str]:
    """(document this one copies, 'edit' | 'exact' | 'new'), from i alone."""
    rng = np.random.default_rng(i)
    r = rng.random()
    if i > 10 and r < 0.13:
        return int(rng.integers(0, i)), "edit" if r < 0.10 else "exact"
    return i, "new"


def _text(i: int, vocab: list[str]) -> str:
    j, kind = _origin(i)
    if kind == "new":
        rng = np.random.default_rng(1_000_003 + i)
        return " ".join(vocab[k] for k in rng.integers(0, len(vocab), int(rng.integers(60, 180))))
    base = _text(j, vocab)
    if kind == "exact":
        return base
    rng = np.random.default_rng(2_000_003 + i)
    ws = base.split()
    for k in rng.choice(len(ws), max(1, int(rng.uniform(0.05, 0.15) * len(ws))), replace=False):
        ws[k] = vocab[int(rng.integers(len(vocab)))]
    return " ".join(ws)


def _emb(i: int) -> np.ndarray:
    j, kind = _origin(i)
    v = np.random.default_rng(3_000_017 + (i if kind == "new" else j)).normal(size=DIM)
    if kind == "edit":
        v = v + 0.05 * np.random.default_rng(4_000_037 + i).normal(size=DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def make_batch(batch: dict, vocab_ref, minhash) -> dict:
    """What FilterStage and the embedding actor hand on, for documents seq = id."""
    import ray

    from flows.data.dedup import MinHasher, exact_hash

    vocab = ray.get(vocab_ref)
    seq = np.asarray(batch["id"], dtype=np.int64)
    texts = [_text(int(i), vocab) for i in seq]
    sig, has = MinHasher(minhash).signatures(texts)
    return {
        "seq": seq,
        "id": [f"d{i}" for i in seq],
        "text": texts,
        "source": ["synthetic"] * len(seq),
        "reason": [""] * len(seq),
        "exact": np.array([exact_hash(t) for t in texts], dtype=np.uint64),
        "sig": [s.tobytes() if h else b"" for s, h in zip(sig, has)],
        "emb": [_emb(int(i)).tobytes() for i in seq],
    }


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process, MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drop_counts(ds) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in ds.select_columns(["reason"]).iter_batches(batch_format="numpy", batch_size=8192):
        for r in b["reason"]:
            if r:
                out[str(r)] = out.get(str(r), 0) + 1
    return out


def kept_seqs(ds) -> np.ndarray:
    return np.concatenate(
        [
            b["seq"][[not r for r in b["reason"]]]
            for b in ds.select_columns(["seq", "reason"]).iter_batches(batch_format="numpy", batch_size=8192)
        ]
    )


def driver_side_kept(docs, cfg) -> np.ndarray:
    """The previous path: every signature and embedding gathered on the driver."""
    from tests.dedup_reference import dedup_decisions, semantic_duplicates

    cols = {k: [] for k in ("seq", "exact", "sig", "emb")}
    for b in docs.select_columns(list(cols)).iter_batches(batch_format="numpy", batch_size=8192):
        for k in cols:
            cols[k] += list(b[k])
    seq = np.asarray(cols["seq"], dtype=np.int64)
    has = np.array([len(s) > 0 for s in cols["sig"]])
    sig = np.zeros((len(seq), cfg.minhash.bands * cfg.minhash.rows), dtype=np.uint64)
    sig[has] = np.stack([np.frombuffer(s, dtype=np.uint64) for s in cols["sig"] if len(s)])
    drops = dedup_decisions(seq, np.asarray(cols["exact"], dtype=np.uint64), sig, has, cfg.minhash, True)
    alive = np.array([int(s) not in drops for s in seq])
    emb = np.stack([np.frombuffer(e, dtype=np.float32) for e in cols["emb"]])
    sem = semantic_duplicates(seq[alive], emb[alive], cfg.semdedup)
    return np.sort(seq[alive][~sem])


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.dedup_scale")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000, 200_000])
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dedup-scale.json"))
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"bench/dedup_scale skipped: shared data not found at {SHARED}")
        return
    import ray

    from flows.data import dedup_ray
    from flows.data.config import DataConfig

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # as the data flow runs
    cfg = DataConfig()
    cfg.ray.batch_size = 512
    vocab_ref = ray.put(_vocab())
    base_now, base_peak = rss_mb()
    print(f"driver RSS before: {base_now:.0f} MB (peak {base_peak:.0f} MB)")

    def make_docs(size):
        return (
            ray.data.range(size, override_num_blocks=max(4, size // 5000))
            .map_batches(make_batch, fn_kwargs={"vocab_ref": vocab_ref, "minhash": cfg.minhash}, batch_size=512)
            .materialize()
        )

    def run(docs):
        start = time.perf_counter()
        ds, _ = dedup_ray.dedup(docs, cfg)
        t_dedup = time.perf_counter() - start
        return dedup_ray.prune_semantic(ds, cfg)[0], t_dedup

    rows = []
    for size in sorted(args.sizes):
        docs = make_docs(size)
        start = time.perf_counter()
        ds, t_dedup = run(docs)
        counts = drop_counts(ds)
        secs = time.perf_counter() - start
        now, peak = rss_mb()
        row = {
            "docs": size,
            "seconds": round(secs, 2),
            "dedup_seconds": round(t_dedup, 2),
            "us_per_doc": round(1e6 * secs / size, 1),
            "driver_rss_mb": round(now, 1),
            "driver_peak_rss_mb": round(peak, 1),
            "peak_growth_mb": round(peak - base_peak, 1),
            "dropped": counts,
        }
        rows.append(row)
        print(
            f"docs {size:>7}: {secs:7.1f} s ({row['us_per_doc']:7.1f} us/doc; dedup {t_dedup:.1f} s)  "
            f"driver RSS {now:6.0f} MB, peak {peak:6.0f} MB (+{peak - base_peak:.0f} MB)  dropped {counts}"
        )
        del docs, ds
    # The peer last: its gathering would raise this process' peak for every later size.
    size = min(args.sizes)
    docs = make_docs(size)
    sampled = np.sort(kept_seqs(run(docs)[0]))
    cfg.semdedup.fit_sample = size  # k-means on everything, as the peer fits it: the kept sets must be equal
    got = np.sort(kept_seqs(run(docs)[0]))
    peak_before = rss_mb()[1]
    ref = driver_side_kept(docs, cfg)
    same = bool(np.array_equal(ref, got))
    jaccard = len(np.intersect1d(ref, sampled)) / len(np.union1d(ref, sampled))
    rows[0]["kept_equals_driver_side"] = same
    rows[0]["kept_jaccard_sampled_kmeans"] = round(jaccard, 4)
    print(
        f"driver-side peer at {size}: kept sets equal (k-means fitted on all {size}): {same}; with k-means on "
        f"the default sample: kept-set Jaccard {jaccard:.4f} (driver peak RSS then {rss_mb()[1]:.0f} MB, from "
        f"{peak_before:.0f} MB)"
    )
    first, last = rows[0], rows[-1]
    print(
        f"peak RSS growth {first['docs']} -> {last['docs']}: "
        f"{last['driver_peak_rss_mb'] - first['driver_peak_rss_mb']:.0f} MB "
        f"(goal < 100 MB); us/doc {first['us_per_doc']} -> {last['us_per_doc']} (linear: about flat)"
    )
    Path(args.out).write_text(
        json.dumps({"bench": "dedup_scale", "num_cpus": args.num_cpus, "rows": rows}, indent=2) + "\n"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
