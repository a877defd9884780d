"""Where the served model comes from: a folder, `smollm2`, or the MLflow model registry."""
from __future__ import annotations

from pathlib import Path

from model.errors import HerdError

MODEL_FILES = ("herd.json", "config.json")


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
    try:  # the evaluation stage's resolver, when present, knows how it logged the model
        from flows.eval.registry import resolve_model_uri
    except ImportError:
        resolve_model_uri = None
    if resolve_model_uri is not None:
        return Path(resolve_model_uri(uri))
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; one line for the user
        raise HerdError(f"{uri}: cannot download from the MLflow registry ({type(e).__name__}: {e})") from None
    return find_model_dir(local, uri)


def find_model_dir(root: Path, where: str) -> Path:
    """The folder under `root` holding a herd (herd.json) or HF (config.json) checkpoint, or a .gguf file."""
    if root.is_file():
        return root
    for name in MODEL_FILES:
        hits = sorted(root.rglob(name), key=lambda p: len(p.parts))
        if hits:
            return hits[0].parent
    ggufs = sorted(root.rglob("*.gguf"))
    if ggufs:
        return ggufs[0]
    raise HerdError(f"{where}: no herd.json, config.json or .gguf in the downloaded artifacts ({root})")
