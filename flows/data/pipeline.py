"""The data flow on Ray Data: thin wrappers around the pure stage cores.

Streaming phases separated by the global decisions that need every document at once:
  1. read -> normalise -> document filters (flows/data/filters) -> hashes   (map_batches)
  2. exact + MinHash dedup: bucket keys shuffled by partition, components merged on a worker
  3. SemDeDup: embed (map_batches) -> k-means on a sample -> assign and prune per cluster (workers)
  4. quality: a judge (SmolLM2) rates a sample on Ray actors, a head learns it, actors score (map_batches)
  5. tokenize (map_batches) -> language quota and domain mix decided on the driver (mixing.py)
  6. pack and write shards while streaming to the driver
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from flows import progress
from flows.data import dedup_ray, filters
from flows.data.accounting import Accounting
from flows.data.config import DataConfig
from flows.data.readers import ReadTask, input_digest, plan_tasks, read_task
from flows.data.recipe import tokenize_and_balance
from flows.data.shards import FORMAT, PAD_POSITION, POSITION_DTYPE, TOKEN_DTYPE, ShardWriter
from flows.data.stages import FilterStage
from model.errors import HerdError


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
    for batch in ds.select_columns(names + (["reason"] if "reason" not in names else [])).iter_batches(
        batch_format="numpy", batch_size=4096
    ):
        keep = [not r for r in batch["reason"]] if alive_only else [True] * len(batch["reason"])
        for n in names:
            out[n] += [v for v, k in zip(batch[n], keep) if k]
    return out


class Phases:
    """Wall time and documents in per phase, for the report and MLflow; each of the `planned`
    phases, once recorded, is a progress tick."""

    def __init__(self, planned: list[str]):
        self.rows: dict[str, dict] = {}
        self.planned = planned

    def record(self, name: str, docs: int, start: float) -> None:
        secs = time.perf_counter() - start
        self.rows[name] = {
            "docs": docs,
            "seconds": round(secs, 3),
            "docs_per_s": round(docs / secs, 1) if secs > 0 else 0.0,
        }
        if name in self.planned:
            progress.tick("phases", self.planned.index(name) + 1, len(self.planned), phase=name, documents=docs)


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
    """Run the flow; returns the report (also written to output/report.json) and the quality
    stage's record (flows.data.quality.QualityRecord: judge, prompt, rated set, classifier and its
    held-out metrics; None when the stage is off or skipped), for the caller to log."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise HerdError(f"{out}: output directory is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan_tasks(cfg.input, cfg.embedded)
    digest = input_digest(tasks, cfg.embedded)
    ray = _init_ray(cfg)
    # The filter list, read once here: the filter actors build from it and the accounting names
    # their stages after it.
    doc_filters = list(filters.DEFAULT)
    phases = Phases(
        ["filter", "dedup"]
        + ["semdedup"] * cfg.semdedup.enabled
        + ["quality"] * cfg.quality.enabled
        + ["tokenize_balance", "pack"]
    )
    bs = cfg.ray.batch_size
    t0 = time.perf_counter()

    ds = ray.data.from_items([asdict(t) for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(_read_batch, fn_kwargs={"cfg": cfg}, batch_size=1)
    if cfg.input.max_docs:
        ds = ds.limit(cfg.input.max_docs)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    ds = ds.map_batches(
        FilterStage,
        fn_constructor_args=(cfg, doc_filters),
        batch_size=bs,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus),
    )
    ds = ds.materialize()
    n_input = ds.count()
    phases.record("filter", n_input, t0)

    # Exact and near-duplicate decisions, then SemDeDup: shuffled on Ray, never gathered here.
    t = time.perf_counter()
    ds, n = dedup_ray.dedup(ds, cfg)
    phases.record("dedup", n, t)

    if cfg.semdedup.enabled:
        t = time.perf_counter()
        ds, n = dedup_ray.semdedup(ds, cfg)
        phases.record("semdedup", n, t)

    classifier = None  # the quality stage's QualityRecord
    if cfg.quality.enabled:
        t = time.perf_counter()
        ds, classifier, n, qinfo = _quality(ds, cfg, out, log)
        phases.record("quality", n, t)
    else:
        qinfo = {}

    t = time.perf_counter()
    ds, recipe, n = tokenize_and_balance(ds, cfg)
    phases.record("tokenize_balance", n, t)

    t = time.perf_counter()
    acct = Accounting(cfg.output.samples_per_reason, doc_filters)
    manifest = _pack_and_account(ds, cfg, out, acct, digest, tasks, recipe)
    phases.record("pack", acct.total, t)
    phases.record("total", acct.total, t0)
    if acct.total != n_input:
        raise HerdError(
            f"accounting error: {n_input} documents read, {acct.total} accounted for; {out}: no manifest written"
        )
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
        "shards": {
            k: {f: v[f] for f in ("documents", "tokens", "sequences")} for k, v in manifest.get("splits", {}).items()
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, classifier


class _Judge:
    """A Ray Data actor holding the judge: rates a batch of texts."""

    def __init__(self, model_dir: str, jcfg):
        from flows.data.quality_judge import EduJudge

        self.judge = EduJudge(model_dir, jcfg)

    def __call__(self, batch: dict) -> dict:
        return {**batch, "rating": self.judge([str(t) for t in batch["text"]])}


class _QualityScore:
    """A Ray Data actor holding the classifier: scores the living documents in the stage's scope
    (quality.quality_scope), drops the low ones; the others pass untouched."""

    def __init__(self, head_path: str, cfg: DataConfig):
        from flows.data.quality import QualityClassifier, QualityHead

        self.clf = QualityClassifier(QualityHead.load(head_path), cfg.ray.batch_size)
        self.threshold, self.sample_chars, self.cfg = cfg.quality.threshold, cfg.output.sample_chars, cfg

    def __call__(self, batch: dict) -> dict:
        from flows.data.quality import quality_scope

        scope = quality_scope(batch["lang"], batch["domain"], self.cfg)
        alive = [i for i, (r, s) in enumerate(zip(batch["reason"], scope)) if not r and s]
        reasons, texts = list(batch["reason"]), list(batch["text"])
        p = np.full(len(reasons), np.nan)
        if alive:
            p[alive] = self.clf([str(texts[i]) for i in alive])
            for i in alive:
                if p[i] < self.threshold:
                    reasons[i] = "quality:low_score"
                    texts[i] = texts[i][: self.sample_chars]
        return {**batch, "reason": reasons, "text": texts, "quality": p}


def _quality(ds, cfg: DataConfig, out: Path, log):
    """Rate a sample with the judge (Ray actors), fit the head on four fifths, measure it on the
    rest, then score every document (Ray actors). Returns (ds, QualityRecord | None, n, info)."""
    import ray

    from flows.data import quality
    from flows.data.dedup import exact_hash
    from flows.data.quality_judge import JudgeConfig, judge_digest, prompt_sha256

    q = cfg.quality
    # The judge and the head read English prose: code and (with `quality` in langid.primary_only)
    # other languages are out of the stage's scope and pass untouched.
    cols = _columns(ds, ["seq", "id", "lang", "domain"])
    scope = quality.quality_scope(cols["lang"], cols["domain"], cfg)
    cols = {k: [v for v, s in zip(vals, scope) if s] for k, vals in cols.items()}
    n = len(cols["seq"])
    if n < 4:
        log(f"quality: {n} documents left, too few to rate; stage skipped")
        return ds, None, n, {"skipped": "too few documents"}
    # A stable sample: the documents whose hashed id is smallest.
    order = sorted(range(n), key=lambda i: exact_hash(f"{q.seed}:{cols['id'][i]}"))
    chosen = sorted(order[: q.sample_size], key=lambda i: int(cols["seq"][i]))
    pick = np.array([int(cols["seq"][i]) for i in chosen], dtype=np.int64)
    ids = [str(cols["id"][i]) for i in chosen]
    texts = _texts_for(ds, pick)
    model_dir = quality.labeller_dir(q)
    jcfg = JudgeConfig(prompt=q.prompt, max_tokens=q.max_tokens, batch_size=q.judge_batch_size)
    t = time.perf_counter()
    rated = ray.data.from_items([{"i": i, "text": x} for i, x in enumerate(texts)]).map_batches(
        _Judge,
        fn_constructor_args=(str(model_dir), jcfg),
        batch_size=q.judge_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=q.judge_actors),
    )
    ratings = np.zeros(len(texts))
    for batch in rated.iter_batches(batch_format="numpy", batch_size=None):
        ratings[batch["i"]] = batch["rating"]
    label_s = time.perf_counter() - t
    log(f"quality: {len(texts)} documents rated by {model_dir.name} in {label_s:.1f}s")

    held = quality.heldout_split(ids, q.heldout_fraction, q.seed)
    if held.all() or (~held).sum() < 2:
        held = np.zeros(len(ids), dtype=bool)
    feat = quality.Featurizer(q.features, q.embed_max_tokens, q.n_features)
    x = feat(texts)
    digest = judge_digest(model_dir)
    record_meta = {
        "judge": model_dir.name,
        "judge_sha256": digest,
        "prompt": q.prompt,
        "prompt_sha256": prompt_sha256(q.prompt),
        "rated": len(texts),
        "judge_max_tokens": q.max_tokens,
    }
    head = quality.fit_head(
        x[~held], ratings[~held], q.features, q.ridge_alpha, q.embed_max_tokens, q.n_features, record_meta
    )
    pred = np.asarray(x[held] @ head.w).ravel() + head.b if held.any() else np.zeros(0)
    metrics = quality.heldout_metrics(ratings[held], pred, q.threshold)
    qdir = out / "quality"
    head_path = head.save(qdir / "classifier.npz")
    labels_path = qdir / "labels.jsonl"
    with labels_path.open("w") as f:
        for i, s, r, h in zip(ids, pick, ratings, held):
            f.write(json.dumps({"id": i, "seq": int(s), "rating": round(float(r), 4), "heldout": bool(h)}) + "\n")
    record = quality.QualityRecord(
        judge=model_dir.name,
        judge_sha256=digest,
        prompt=q.prompt,
        prompt_sha256=record_meta["prompt_sha256"],
        rated=len(texts),
        label_seconds=round(label_s, 2),
        threshold=q.threshold,
        features=q.features,
        labels_path=str(labels_path),
        classifier_path=str(head_path),
        metrics={
            "rating_mean": float(ratings.mean()),
            "rating_std": float(ratings.std()),
            **{f"heldout_{k}": v for k, v in metrics.items()},
        },
    )
    info = {k: v for k, v in asdict(record).items() if not k.endswith("_path")}
    info["metrics"] = {k: (None if np.isnan(v) else round(v, 4)) for k, v in record.metrics.items()}  # JSON has no NaN
    ds = ds.map_batches(
        _QualityScore,
        fn_constructor_args=(str(head_path), cfg),
        batch_size=cfg.ray.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    return ds, record, n, info


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
        writers = {
            s: ShardWriter(out, s, p.seq_len, p.sequences_per_shard, tok.eos_id, p.pad_last)
            for s in ("train", "validation")
        }
    try:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=cfg.ray.batch_size):
            acct.add(batch["id"], batch["text"], batch["source"], batch["reason"])
            kept = [i for i, r in enumerate(batch["reason"]) if not r]
            if docs_file:
                for i in kept:
                    docs_file.write(
                        json.dumps(
                            {
                                "id": str(batch["id"][i]),
                                "text": str(batch["text"][i]),
                                "lang": str(batch["lang"][i]),
                                "domain": str(batch["domain"][i]),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
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
        "tokenizer": {
            "name": tok.name,
            "spec": p.tokenizer,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
        },
        "split": {"by": "document", "validation_fraction": p.validation_fraction, "seed": p.seed},
        "splits": {s: w.close() for s, w in writers.items()},
        "input": {
            "digest": digest,
            "sources": sorted({t.path or "embedded:stdlib" for t in tasks}),
            "documents": acct.total,
            "kept_documents": acct.kept,
        },
        "languages": recipe["languages"],
        "quota": recipe["quota"],
        "mix": recipe["mix"],
        "config": cfg.to_dict(),
    }
    return manifest
