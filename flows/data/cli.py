"""`herd data prep`: run the data flow and record it in MLflow."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.data.record import log_prep
from model.errors import HerdError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="data preparation")
    sub = data.add_subparsers(dest="data_command", required=True)
    prep = sub.add_parser("prep", help="filter, deduplicate, score, tokenize and pack a corpus")
    prep.add_argument("--config", default="configs/data/default.yaml", help="YAML under configs/data/")
    prep.add_argument(
        "--input",
        nargs="+",
        action="extend",
        default=None,
        metavar="PATH",
        help="input files or directories (default: the config's, else the embedded corpus)",
    )
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
    print(
        json.dumps(
            {k: report[k] for k in ("input_documents", "kept", "dropped", "dropped_by_stage", "shards")}, indent=2
        )
    )
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
        log_prep(mlflow, report, quality, Path(output))
        report["mlflow_run_id"] = run.info.run_id
    return report
