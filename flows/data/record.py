"""What a data-prep run records in MLflow."""

from __future__ import annotations

from pathlib import Path


def log_prep(mlflow, report: dict, quality, out: Path) -> None:
    """A data-prep report into the active MLflow run: metrics, the input dataset, the report files and
    the quality stage's record (used by `herd data prep` and the lifecycle's data step)."""
    from mlflow.data.meta_dataset import MetaDataset

    metrics = {
        "input_documents": report["input_documents"],
        "kept_documents": report["kept"],
        "dropped_documents": report["dropped"],
    }
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
        log_quality(mlflow, quality)


def log_quality(mlflow, q) -> None:
    """The quality stage's judge, prompt, rated set, classifier and held-out metrics."""
    import math

    mlflow.set_tags(
        {
            "herd.quality.judge": q.judge,
            "herd.quality.judge_sha256": q.judge_sha256,
            "herd.quality.prompt": q.prompt,
            "herd.quality.prompt_sha256": q.prompt_sha256,
        }
    )
    metrics = {
        "quality.rated": q.rated,
        "quality.label_seconds": q.label_seconds,
        **{f"quality.{k}": v for k, v in q.metrics.items()},
    }
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not math.isnan(float(v))})
    mlflow.log_artifact(q.labels_path, artifact_path="quality")
    mlflow.log_artifact(q.classifier_path, artifact_path="quality")
