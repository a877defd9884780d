"""The data flow on Ray Data: thin wrappers around the pure stage cores.

Streaming phases separated by the global decisions that need every document at once:
  1. read -> normalise -> langid -> heuristics -> NSFW -> PII -> hashes   (map_batches)
  2. exact + MinHash dedup decided on the driver (sort/group over signatures)
  3. SemDeDup: embed (map_batches) -> k-means and in-cluster pruning (driver)
  4. quality: label a sample with SmolLM2, train, score (map_batches)
  5. tokenize (map_batches) -> language quota and domain mix decided on the driver (mixing.py)
  6. pack and write shards while streaming to the driver
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from model.errors import HerdError

from flows.data.accounting import Accounting
from flows.data.config import DataConfig
from flows.data.readers import ReadTask, input_digest, plan_tasks, read_task
from flows.data.recipe import hold_from_quality, release_held, tokenize_and_balance
from flows.data.shards import FORMAT, POSITION_DTYPE, TOKEN_DTYPE, PAD_POSITION, ShardWriter
from flows.data.stages import FilterStage, apply_drops, decisions_to_arrays


def _read_batch(batch: dict, cfg: DataConfig) -> dict:
    rows = []
    for fields in zip(*(batch[k] for k in ("index", "path", "format", "start", "end"))):
        task = ReadTask(int(fields[0]), str(fields[1]), str(fields[2]), int(fields[3]), int(fields[4]))
        rows += read_task(task, cfg.input, cfg.embedded)
    cols = ("seq", "id", "text", "source", "reason")
    return {k: [r[k] for r in rows] for k in cols}


def _columns(ds, names: list[str], alive_only: bool = True) -> dict[str, list]:
    """Selected columns of the (materialised) dataset, gathered on the driver."""
    out: dict[str, list] = {n: [] for n in names}
    for batch in ds.select_columns(names + (["reason"] if "reason" not in names else [])).iter_batches(batch_format="numpy", batch_size=4096):
        keep = [not r for r in batch["reason"]] if alive_only else [True] * len(batch["reason"])
        for n in names:
            out[n] += [v for v, k in zip(batch[n], keep) if k]
    return out


class Phases:
    """Wall time and documents in per phase, for the report and MLflow."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def record(self, name: str, docs: int, start: float) -> None:
        secs = time.perf_counter() - start
        self.rows[name] = {"docs": docs, "seconds": round(secs, 3), "docs_per_s": round(docs / secs, 1) if secs > 0 else 0.0}


def _init_ray(cfg: DataConfig):
    import ray

    from flows.ray_runtime import init_ray

    kwargs = {"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}
    init_ray(include_dashboard=False, log_to_driver=False, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input, same shards
    ctx.enable_progress_bars = cfg.ray.progress_bars
    return ray


def run_prep(cfg: DataConfig, output: str | Path, log=print) -> tuple[dict, object | None]:
    """Run the flow; returns the report (also written to output/report.json) and the
    trained quality classifier (None when the stage is off)."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise HerdError(f"{out}: output directory is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan_tasks(cfg.input, cfg.embedded)
    digest = input_digest(tasks, cfg.embedded)
    ray = _init_ray(cfg)
    phases = Phases()
    bs = cfg.ray.batch_size
    t0 = time.perf_counter()

    ds = ray.data.from_items([asdict(t) for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(_read_batch, fn_kwargs={"cfg": cfg}, batch_size=1)
    if cfg.input.max_docs:
        ds = ds.limit(cfg.input.max_docs)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    ds = ds.map_batches(FilterStage, fn_constructor_args=(cfg,), batch_size=bs,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus))
    ds = ds.materialize()
    n_input = ds.count()
    phases.record("filter", n_input, t0)

    # Exact and near-duplicate decisions over every surviving document.
    t = time.perf_counter()
    cols = _columns(ds, ["seq", "exact", "sig"])
    seq = np.asarray(cols["seq"], dtype=np.int64)
    decisions: dict[int, str] = {}
    if cfg.exact_dedup.enabled or cfg.minhash.enabled:
        from flows.data.dedup import SIG_DTYPE, dedup_decisions

        num_perm = cfg.minhash.bands * cfg.minhash.rows
        has = np.array([len(s) > 0 for s in cols["sig"]], dtype=bool)
        sig = np.zeros((len(seq), num_perm), dtype=SIG_DTYPE)
        if has.any():
            sig[has] = np.frombuffer(b"".join(s for s in cols["sig"] if len(s)), dtype=SIG_DTYPE).reshape(-1, num_perm)
        decisions = dedup_decisions(seq, np.asarray(cols["exact"], dtype=np.uint64), sig, has,
                                    cfg.minhash if cfg.minhash.enabled else None, cfg.exact_dedup.enabled)
    ds = ds.drop_columns(["exact", "sig"])
    ds = _apply(ds, decisions, cfg)
    phases.record("dedup", len(seq), t)

    if cfg.semdedup.enabled:
        t = time.perf_counter()
        ds, n = _semdedup(ds, cfg)
        phases.record("semdedup", n, t)

    # The quality model and its labeller read English prose: other languages and code pass by.
    ds = hold_from_quality(ds, cfg)
    classifier = None
    if cfg.quality.enabled:
        t = time.perf_counter()
        ds, classifier, n, qinfo = _quality(ds, cfg, out, log)
        phases.record("quality", n, t)
    else:
        qinfo = {}
    ds = release_held(ds, cfg)

    t = time.perf_counter()
    ds, recipe, n = tokenize_and_balance(ds, cfg)
    phases.record("tokenize_balance", n, t)

    t = time.perf_counter()
    acct = Accounting(cfg.output.samples_per_reason)
    manifest = _pack_and_account(ds, cfg, out, acct, digest, tasks, recipe)
    phases.record("pack", acct.total, t)
    phases.record("total", acct.total, t0)
    if acct.total != n_input:
        raise HerdError(f"accounting error: {n_input} documents read, {acct.total} accounted for; "
                        f"{out}: no manifest written")
    if manifest:  # only now: a manifest names a finished, fully accounted data directory
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    acct.write(out)
    report = {
        "config": cfg.name,
        "input": {"digest": digest, "sources": sorted({t.path or "embedded:stdlib" for t in tasks})},
        **acct.summary(),
        "phases": phases.rows,
        "quality": qinfo,
        **recipe,
        "shards": {k: {f: v[f] for f in ("documents", "tokens", "sequences")} for k, v in manifest.get("splits", {}).items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, classifier


def _apply(ds, decisions: dict[int, str], cfg: DataConfig):
    if not decisions:
        return ds
    import ray

    drop_seq, drop_reason = decisions_to_arrays(decisions)
    ref_seq, ref_reason = ray.put(drop_seq), ray.put(drop_reason)

    sample_chars = cfg.output.sample_chars

    def fn(batch):
        return apply_drops(batch, ray.get(ref_seq), ray.get(ref_reason), sample_chars)

    return ds.map_batches(fn, batch_size=cfg.ray.batch_size).materialize()


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


def _semdedup(ds, cfg: DataConfig):
    from flows.data.semdedup import semantic_duplicates

    import ray

    ds = ds.map_batches(_Embed, fn_constructor_args=(cfg,), batch_size=cfg.semdedup.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=1),
                        num_gpus=1 if cfg.semdedup.use_gpu else None).materialize()
    cols = _columns(ds, ["seq", "emb"])
    ds = ds.drop_columns(["emb"])
    seq = np.asarray(cols["seq"], dtype=np.int64)
    if len(seq) < 2:
        return ds, len(seq)
    emb = np.stack([np.frombuffer(e, dtype=np.float32) for e in cols["emb"]])
    drop = semantic_duplicates(seq, emb, cfg.semdedup)
    return _apply(ds, {int(s): "semdedup:semantic_duplicate" for s in seq[drop]}, cfg), len(seq)


def _quality(ds, cfg: DataConfig, out: Path, log):
    import ray

    from flows.data import quality
    from flows.data.dedup import exact_hash

    q = cfg.quality
    cols = _columns(ds, ["seq", "id"])
    n = len(cols["seq"])
    if n < 4:
        log(f"quality: {n} documents left, too few to label; stage skipped")
        return ds, None, n, {"skipped": "too few documents"}
    # A stable sample: the documents whose hashed id is smallest.
    order = sorted(range(n), key=lambda i: exact_hash(f"{q.seed}:{cols['id'][i]}"))
    pick = np.array(sorted(int(cols["seq"][i]) for i in order[: q.sample_size]), dtype=np.int64)
    texts = _texts_for(ds, pick)
    t = time.perf_counter()
    scores = quality.perplexity_scores(texts, quality.labeller_dir(q), q.max_tokens)
    labels = quality.label(scores, q.label_quantile)
    label_s = time.perf_counter() - t
    clf = quality.train_classifier(texts, labels, q)
    import mlflow.sklearn

    mlflow.sklearn.save_model(clf, out / "quality_classifier")
    info = {"labelled": len(texts), "label_seconds": round(label_s, 2), "mean_nll": round(float(scores.mean()), 4),
            "good_fraction": round(float(labels.mean()), 3), "train_accuracy": round(float(clf.score(texts, labels)), 3)}
    log(f"quality: labelled {len(texts)} documents with SmolLM2 in {label_s:.1f}s")
    ref = ray.put(clf)
    threshold, sample_chars = q.threshold, cfg.output.sample_chars

    def score(batch):
        clf_ = ray.get(ref)
        alive = [i for i, r in enumerate(batch["reason"]) if not r]
        reasons, texts_ = list(batch["reason"]), list(batch["text"])
        p = np.full(len(reasons), np.nan)
        if alive:
            p[alive] = quality.score(clf_, [texts_[i] for i in alive])
            for i in alive:
                if p[i] < threshold:
                    reasons[i] = "quality:low_score"
                    texts_[i] = texts_[i][:sample_chars]
        return {**batch, "reason": reasons, "text": texts_, "quality": p}

    return ds.map_batches(score, batch_size=cfg.ray.batch_size), clf, n, info


def _texts_for(ds, pick: np.ndarray) -> list[str]:
    texts = {}
    for batch in ds.select_columns(["seq", "text", "reason"]).iter_batches(batch_format="numpy", batch_size=4096):
        hit = np.isin(batch["seq"], pick)
        for s, text in zip(batch["seq"][hit], batch["text"][hit]):
            texts[int(s)] = str(text)
    return [texts[int(s)] for s in pick]


def _pack_and_account(ds, cfg: DataConfig, out: Path, acct: Accounting, digest: str, tasks, recipe: dict) -> dict:
    """Count every row and write the shards; returns the manifest, which the caller writes once
    the accounting adds up."""
    p = cfg.pack
    docs_file = open(out / "documents.jsonl", "w") if cfg.output.write_documents else None
    writers = {}
    tok = None
    if p.enabled:
        from model.tokenizer import load_tokenizer

        tok = load_tokenizer(p.tokenizer)
        writers = {s: ShardWriter(out, s, p.seq_len, p.sequences_per_shard, tok.eos_id, p.pad_last)
                   for s in ("train", "validation")}
    try:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=cfg.ray.batch_size):
            acct.add(batch["id"], batch["text"], batch["source"], batch["reason"])
            kept = [i for i, r in enumerate(batch["reason"]) if not r]
            if docs_file:
                for i in kept:
                    docs_file.write(json.dumps({"id": str(batch["id"][i]), "text": str(batch["text"][i]), "lang": str(batch["lang"][i]),
                                                "domain": str(batch["domain"][i])}, ensure_ascii=False) + "\n")
            for i in kept if writers else ():
                writers[str(batch["split"][i])].add(np.frombuffer(batch["tokens"][i], dtype=np.uint32))
    finally:
        if docs_file:
            docs_file.close()
    if not writers:
        return {}
    manifest = {
        "format": FORMAT,
        "seq_len": p.seq_len,
        "token_dtype": np.dtype(TOKEN_DTYPE).name,
        "position_dtype": np.dtype(POSITION_DTYPE).name,
        "pad_position": PAD_POSITION,
        "pad_token": tok.eos_id,
        "tokenizer": {"name": tok.name, "spec": p.tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id},
        "split": {"by": "document", "validation_fraction": p.validation_fraction, "seed": p.seed},
        "splits": {s: w.close() for s, w in writers.items()},
        "input": {"digest": digest, "sources": sorted({t.path or "embedded:stdlib" for t in tasks}), "documents": acct.total,
                  "kept_documents": acct.kept},
        "languages": recipe["languages"],
        "quota": recipe["quota"],
        "mix": recipe["mix"],
        "config": cfg.to_dict(),
    }
    return manifest
