"""bench/quality's second half: fit and measure the classifiers on the judge's cached ratings."""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _fit(kind: str, x, y, train: np.ndarray, meta: dict):
    """Ridge head with alpha chosen by 5-fold CV on the training part only (mean squared error)."""
    from sklearn.linear_model import RidgeCV

    from flows.data.quality import QualityHead

    reg = RidgeCV(alphas=ALPHAS).fit(x[train], y[train])
    return QualityHead(
        kind,
        np.asarray(reg.coef_, np.float32),
        float(reg.intercept_),
        128,
        1 << 16,
        {**meta, "ridge_alpha": float(reg.alpha_)},
    )


def evaluate(docs, model_dir: Path, digest: str, args, tag: str) -> dict:
    from bench.quality import rate_cached
    from flows.data.config import QualityConfig
    from flows.data.quality import Featurizer, heldout_metrics, heldout_split, spearman
    from flows.data.quality_judge import prompt_sha256

    co = args.cached_only
    ya = rate_cached(
        [d.text for d in docs], "fineweb_edu", args.judge_tokens, args.batch_size, model_dir, tag, cached_only=co
    )
    if co:  # the documents rated so far
        n_all = len(docs)
        docs, ya = [d for d, r in zip(docs, ya) if r == r], ya[ya == ya]
        print(f"--cached-only: {len(docs)} of {n_all} documents rated")
    texts = [d.text for d in docs]
    n_agree = min(args.agreement_docs, len(texts))
    yb = rate_cached(texts[:n_agree], "teacher", args.judge_tokens, args.batch_size, model_dir, tag, cached_only=co)
    both = yb == yb
    n_agree = int(both.sum())
    agreement = spearman(ya[: len(yb)][both], yb[both])
    threshold = args.threshold or QualityConfig().threshold
    held = heldout_split([d.id for d in docs], 0.2, 0)
    train = ~held
    by_source = defaultdict(list)
    for d, r in zip(docs, ya):
        by_source[d.source].append(r)
    print(
        f"\njudge ratings (fineweb_edu prompt, {args.judge_tokens} document tokens): mean {ya.mean():.3f} sd "
        f"{ya.std():.3f} "
        f"min {ya.min():.3f} max {ya.max():.3f}; >= {threshold}: {np.mean(ya >= threshold):.1%}"
    )
    for s, v in sorted(by_source.items(), key=lambda kv: -np.mean(kv[1])):
        print(f"  {s:12s} n={len(v):4d} mean {np.mean(v):.3f}")
    print(f"judge self-agreement (fineweb_edu vs teacher phrasing, {n_agree} docs): Spearman {agreement:.3f}")

    meta = {
        "judge": model_dir.name,
        "judge_sha256": digest,
        "prompt": "fineweb_edu",
        "prompt_sha256": prompt_sha256("fineweb_edu"),
        "judge_max_tokens": args.judge_tokens,
        "rated": int(len(texts)),
        "trained_on": int(train.sum()),
        "made_by": "python -m bench.quality (bench/quality_corpus.py documents)",
    }
    rows, heads = {}, {}
    for kind in ("minilm", "hashed"):
        feat = Featurizer(kind)
        feat(texts[:8])  # warm-up: first-call allocations are not throughput
        t = time.perf_counter()
        x = feat(texts)
        secs = time.perf_counter() - t
        head = _fit(kind, x, ya, train, meta)
        t = time.perf_counter()
        pred = np.asarray(x @ head.w).ravel() + head.b
        secs += time.perf_counter() - t
        m = heldout_metrics(ya[held], pred[held], threshold)
        heads[kind] = head
        rows[kind] = {
            **m,
            "docs_per_s": len(texts) / secs,
            "ridge_alpha": head.meta["ridge_alpha"],
            "of_agreement": m["spearman"] / agreement if agreement == agreement else float("nan"),
        }
        print(
            f"{kind:7s} held-out ({int(held.sum())} docs): Spearman {m['spearman']:.3f}  AUC@{threshold} "
            f"{m['auc']:.3f}  "
            f"({m['positive_fraction']:.1%} positive)  {rows[kind]['docs_per_s']:.0f} docs/s  alpha "
            f"{head.meta['ridge_alpha']}"
        )
    best = max(rows, key=lambda k: rows[k]["spearman"])
    print(f"minilm / hashed docs/s: {rows['minilm']['docs_per_s'] / rows['hashed']['docs_per_s']:.2f}")
    if args.save_head:  # the better head by held-out Spearman
        h = heads[best]
        path = type(h)(
            h.features,
            h.w,
            h.b,
            h.max_tokens,
            h.n_features,
            {
                **h.meta,
                "heldout_spearman": rows[best]["spearman"],
                "heldout_auc": rows[best]["auc"],
                "threshold": threshold,
            },
        ).save(args.save_head)
        print(f"saved the {best} head: {path} ({path.stat().st_size} bytes)")
    result = {
        "documents": len(texts),
        "heldout": int(held.sum()),
        "threshold": threshold,
        "judge": meta,
        "rating": {
            "mean": float(ya.mean()),
            "std": float(ya.std()),
            "min": float(ya.min()),
            "max": float(ya.max()),
            "by_source": {s: float(np.mean(v)) for s, v in by_source.items()},
        },
        "self_agreement": {"docs": n_agree, "spearman": agreement, "prompts": ["fineweb_edu", "teacher"]},
        "classifiers": rows,
        "best": best,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result
