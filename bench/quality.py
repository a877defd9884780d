"""bench/quality: the model-labelled quality classifier measured against its judge.

    python -m bench.quality [--shared ../shared/data] [--max-docs N] [--agreement-docs N]

1. ~2,400 varied documents (bench/quality_corpus.py) are rated 0-5 by the judge (SmolLM2-135M-Instruct,
   FineWeb-Edu's prompt; flows/data/quality_judge.py). Ratings are cached per document under
   /tmp/issue-25-quality/ (or $HERD_QUALITY_CACHE), appended batch by batch, so a rerun -- or a run
   stopped half-way -- re-rates nothing.
2. A second phrasing of the prompt rates a subset: Spearman between the two is the judge's agreement
   with itself, the ceiling of what any classifier can learn from it.
3. Two classifiers (flows/data/quality.py) train on four fifths and are scored on the held-out fifth:
   MiniLM embedding + ridge head and hashed word 1-2-grams + ridge head (alpha by 5-fold CV on the
   training part). Printed: Spearman with the judge, AUC at the keep threshold, each one's docs/s.
   --cached-only measures on the documents rated so far (the rating resumes on the next plain run).
Results: bench/results/quality-smollm2-judge.json; the better head: flows/data/assets/quality_head.npz.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    return Path(os.environ.get("HERD_QUALITY_CACHE") or "/tmp/issue-25-quality")


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def rate_cached(
    texts: list[str],
    prompt: str,
    max_tokens: int,
    batch_size: int,
    model_dir: Path,
    tag: str,
    chunk: int = 64,
    log=print,
    cached_only: bool = False,
) -> np.ndarray:
    """Judge ratings, read from / appended to a JSONL cache keyed by (prompt, judge, max_tokens, text).
    cached_only: rate nothing; a text not in the cache gets nan."""
    from flows.data.quality_judge import EduJudge, JudgeConfig, prompt_sha256

    path = cache_root() / f"ratings-{prompt}-{prompt_sha256(prompt)[:12]}-{tag}-t{max_tokens}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    have: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
                continue
            have[row["k"]] = row["r"]
    todo = [i for i, t in enumerate(texts) if _key(t) not in have]
    if todo and not cached_only:
        judge = EduJudge(model_dir, JudgeConfig(prompt=prompt, max_tokens=max_tokens, batch_size=batch_size))
        t0 = time.perf_counter()
        with path.open("a") as f:
            for c in range(0, len(todo), chunk):
                idx = todo[c : c + chunk]
                for i, r in zip(idx, judge([texts[i] for i in idx])):
                    have[_key(texts[i])] = float(r)
                    f.write(json.dumps({"k": _key(texts[i]), "r": float(r)}) + "\n")
                f.flush()
                done = c + len(idx)
                log(f"  {prompt}: rated {done}/{len(todo)} ({done / (time.perf_counter() - t0):.2f} docs/s)")
    return np.array([have.get(_key(t), np.nan) for t in texts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--max-docs", type=int, default=0, help="0: every built document")
    ap.add_argument("--agreement-docs", type=int, default=300, help="documents rated under the second phrasing too")
    ap.add_argument("--judge-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.0, help="keep threshold; 0: the data config's default")
    ap.add_argument("--rate-only", action="store_true")
    ap.add_argument("--cached-only", action="store_true", help="measure on the documents already rated; rate nothing")
    ap.add_argument(
        "--shard",
        default="0/1",
        help="k/n: rate only every n-th document from the k-th (run n processes "
        "of one thread each side by side: on a busy machine that beats one process of n threads)",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quality-smollm2-judge.json"))
    ap.add_argument("--save-head", default=str(REPO / "flows" / "data" / "assets" / "quality_head.npz"))
    args = ap.parse_args()

    from bench.quality_corpus import build_documents
    from flows.data.config import QualityConfig
    from flows.data.quality import labeller_dir
    from flows.data.quality_judge import judge_digest

    docs = build_documents(Path(args.shared))
    if args.max_docs:
        docs = docs[: args.max_docs]
    texts = [d.text for d in docs]
    model_dir = labeller_dir(QualityConfig())
    digest = judge_digest(model_dir)
    tag = digest[:12]
    print(f"{len(docs)} documents; judge {model_dir.name} sha256 {digest[:16]}", flush=True)
    n_agree = min(args.agreement_docs, len(texts))
    # Interleaved, so that a run stopped early still has both phrasings on a prefix.
    k, n = (int(v) for v in args.shard.split("/"))
    step = 256
    for a in range(0, 0 if args.cached_only else len(texts), step):
        part = list(range(a, min(a + step, len(texts))))[k::n]
        rate_cached([texts[i] for i in part], "fineweb_edu", args.judge_tokens, args.batch_size, model_dir, tag)
        if a < n_agree:
            rate_cached(
                [texts[i] for i in part if i < n_agree], "teacher", args.judge_tokens, args.batch_size, model_dir, tag
            )
    if args.rate_only:
        return
    from bench.quality_eval import evaluate

    evaluate(docs, model_dir, digest, args, tag)


if __name__ == "__main__":
    main()
