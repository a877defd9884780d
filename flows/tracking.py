"""MLflow set-up shared by every stage: the tracking URI rule, the client, the experiment rules and
MLflow's limits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "herd"
# MLflow 3's UI opens an experiment in the view this tag names; without it, it may guess the GenAI
# (traces) view. herd's experiments are model training: the runs table and metric charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Longest tag value herd writes: MLflow refuses values past 8000 characters; longer records are
# cut to this or written as an artifact instead.
MAX_TAG_CHARS = 7900


def tracking_uri(uri: str | None = None) -> str:
    """Explicit argument, then $MLFLOW_TRACKING_URI, then ./mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_tracking_uri(uri: str | None = None) -> str:
    """tracking_uri(uri) with a relative sqlite file or folder pinned to this working directory:
    Ray workers and `ray job submit` may run in another folder."""
    uri = tracking_uri(uri or None)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri:
        uri = str(Path(uri).resolve())
    return uri


def client(uri: str | None = None):
    """An MlflowClient whose tracking and model-registry stores are both tracking_uri(uri)."""
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, created if missing. On a sqlite store its artifacts go beside the
    database: MLflow's default (./mlruns) follows the working directory, which under
    `ray job submit` is a temporary copy of the project."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = (
            str(Path(uri[len("sqlite:///") :]).parent / "mlruns" / name) if uri.startswith("sqlite:////") else None
        )
        try:
            c.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it meanwhile
            pass
        exp = c.get_experiment_by_name(name)
    mark_model_training(c, exp)
    return exp.experiment_id


def setup_mlflow(uri: str | None = None, experiment: str | None = None):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    exp = mlflow.set_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    mark_model_training(mlflow.MlflowClient(), exp)
    return mlflow


def mark_model_training(client, experiment) -> None:
    """Tag the experiment so MLflow's UI opens it as model training (once; a kind set by hand stays)."""
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def dashboard_url(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link into MLflow's UI that opens as model training. MLflow 3.17's UI picks its view from
    the `workflowType` query (else the browser's last choice, GenAI by default), not from the
    experiment's kind tag."""
    page = f"/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{server.rstrip('/')}/#{page}?workflowType=machine_learning"


def git_sha(repo: str | Path | None = None) -> str:
    """The code version recorded with every run; 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo or Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
