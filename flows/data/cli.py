"""`herd data prep`: run the data flow and record it in MLflow."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.errors import HerdError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="data preparation")
    sub = data.add_subparsers(dest="data_command", required=True)
    prep = sub.add_parser("prep", help="filter, deduplicate, score, tokenize and pack a corpus")
    prep.add_argument("--config", default="configs/data/default.yaml", help="YAML under configs/data/")
    prep.add_argument("--input", nargs="+", action="extend", default=None, metavar="PATH",
                      help="input files or directories (default: the config's, else the embedded corpus)")
    prep.add_argument("--output", required=True, help="output directory (must be empty or absent)")
    prep.add_argument("--no-mlflow", action="store_true", help="do not record the run in MLflow")
    prep.set_defaults(func=prep_command)


def prep_command(args: argparse.Namespace) -> int:
    from flows.data.config import load_config

    cfg = load_config(args.config)
    if args.input:
        cfg.input.paths = list(args.input)
    if args.no_mlflow:
        cfg.mlflow.enabled = False
    report = prep(cfg, args.output)
    print(json.dumps({k: report[k] for k in ("input_documents", "kept", "dropped", "dropped_by_stage", "shards")}, indent=2))
    return 0


def prep(cfg, output: str | Path) -> dict:
    """Run the flow inside an MLflow run (when enabled) and log params, metrics, artifacts."""
    from flows.data.pipeline import run_prep

    if not cfg.mlflow.enabled:
        return run_prep(cfg, output)[0]
    from flows.tracking import git_sha, setup_mlflow

    mlflow = setup_mlflow(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment or None)
    with mlflow.start_run(run_name=f"data-prep-{cfg.name}") as run:
        mlflow.set_tags({"herd.stage": "data", "herd.git_sha": git_sha()})
        mlflow.log_params(cfg.flat())
        try:
            report, quality = run_prep(cfg, output)
        except HerdError:
            mlflow.set_tag("herd.error", "failed")
            raise
        _log(mlflow, report, quality, Path(output))
        report["mlflow_run_id"] = run.info.run_id
    return report


def _log(mlflow, report: dict, quality, out: Path) -> None:
    from mlflow.data.meta_dataset import MetaDataset

    metrics = {"input_documents": report["input_documents"], "kept_documents": report["kept"],
               "dropped_documents": report["dropped"]}
    for stage, row in report["stages"].items():
        metrics[f"stage.{stage}.in"] = row["in"]
        metrics[f"stage.{stage}.dropped"] = row["dropped"]
    for phase, row in report["phases"].items():
        metrics[f"phase.{phase}.seconds"] = row["seconds"]
        metrics[f"phase.{phase}.docs_per_s"] = row["docs_per_s"]
    for split, row in report["shards"].items():
        metrics.update({f"{split}.{k}": v for k, v in row.items()})
    quota = report.get("quota") or {}
    for key in ("share_documents", "share_tokens") if quota.get("target_share") is not None else ():
        metrics[f"quota.{key}"] = quota[key]
    for domain, row in ((report.get("mix") or {}).get("domains") or {}).items():
        metrics[f"mix.{domain}.share"] = row["share"]
        metrics[f"mix.{domain}.tokens"] = row["tokens"]
    mlflow.log_metrics({k.replace(":", "."): float(v) for k, v in metrics.items()})

    source = report["input"]["sources"][0]
    if source.startswith("embedded:"):
        from mlflow.data.code_dataset_source import CodeDatasetSource

        ds_source = CodeDatasetSource({"corpus": "python-stdlib-docs"})
    else:
        from mlflow.data.sources import LocalArtifactDatasetSource

        ds_source = LocalArtifactDatasetSource(str(Path(source).resolve()))
    # MLflow keeps at most 36 characters of a dataset digest; the full sha256 is a tag.
    dataset = MetaDataset(ds_source, name=f"{report['config']}-input", digest=report["input"]["digest"][:32])
    mlflow.log_input(dataset, context="data-prep")
    mlflow.set_tag("herd.input_sha256", report["input"]["digest"])
    for name in ("report.json", "manifest.json", "rejects.jsonl", "dropped_samples.jsonl"):
        if (out / name).is_file():
            mlflow.log_artifact(str(out / name))
    if quality is not None:
        _log_quality(mlflow, quality)


def _log_quality(mlflow, q) -> None:
    """The quality stage's judge, prompt, rated set, classifier and held-out metrics."""
    import math

    mlflow.set_tags({"herd.quality.judge": q.judge, "herd.quality.judge_sha256": q.judge_sha256,
                     "herd.quality.prompt": q.prompt, "herd.quality.prompt_sha256": q.prompt_sha256})
    metrics = {"quality.rated": q.rated, "quality.label_seconds": q.label_seconds,
               **{f"quality.{k}": v for k, v in q.metrics.items()}}
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not math.isnan(float(v))})
    mlflow.log_artifact(q.labels_path, artifact_path="quality")
    mlflow.log_artifact(q.classifier_path, artifact_path="quality")
