"""Where the served model comes from: a folder, `smollm2`, or the MLflow model registry."""
from __future__ import annotations

from pathlib import Path

from model.errors import HerdError


def resolve_model(spec: str) -> Path:
    """A local path for `spec`: a herd/HF folder or .gguf file, `smollm2`, or `models:/name@alias`
    (`models:/name/version`), downloaded from the MLflow registry (MLFLOW_TRACKING_URI)."""
    if spec.startswith(("models:/", "runs:/")):
        return resolve_registry_uri(spec)
    from model.cli import resolve_model_path

    path = resolve_model_path(spec)
    if not path.exists():
        raise HerdError(f"{path}: model not found (a model folder, a .gguf file, `smollm2` or models:/name@alias)")
    return path


def resolve_registry_uri(uri: str) -> Path:
    """The registry's one resolver: it verifies every file's sha256 against the version's record."""
    from flows.eval.registry import resolve_model_uri

    return Path(resolve_model_uri(uri))
