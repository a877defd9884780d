"""herd models in the MLflow model registry: log, register, resolve, and the eval-gated champion.

A registered version's source is a run artifact folder holding a herd checkpoint directory
(herd.json, model.safetensors, tokenizer.json), so `resolve_model_uri("models:/herd@champion")`
downloads exactly what `model.checkpoint.load_model` reads. Aliases: `candidate` (the latest
version put forward) and `champion` (the version that serves). Each version carries its eval
metrics as tags `metric.<task>/<name>` with the eval config's hash in `eval.config_hash`, and
the promotion gate's numbers (`gate.*`) and decision (`promotion.decision`, `promotion.reason`,
its description) from flows/eval/gate.py. Each version also records the sha256 of every file
(flows/eval/integrity.py); a load verifies them.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from flows.eval import integrity
from flows.tracking import client as _client
from model.errors import HerdError
from model.sources import resolve_model

DEFAULT_NAME = "herd"
CANDIDATE, CHAMPION = "candidate", "champion"
METRIC_TAG = "metric."
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def cache_root() -> Path:
    return Path(os.environ.get("HERD_MODEL_CACHE", Path.home() / ".cache" / "herd" / "models"))


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = _MODELS_URI.match(uri)
    if not m:
        raise HerdError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def get_version(uri: str, tracking_uri: str | None = None):
    """The ModelVersion a models:/ URI points to (an error naming the alias when unset)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(uri)
    client = _client(tracking_uri)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise HerdError(f"{uri}: not in the registry at {client.tracking_uri} ({e.message.splitlines()[0]})") from None


def _find_checkpoint(root: Path) -> Path:
    for d in [root, *sorted(p.parent for p in root.rglob("herd.json"))]:
        if (d / "herd.json").is_file():
            return d
    if (root / "config.json").is_file() or root.suffix == ".gguf":
        return root
    raise HerdError(f"{root}: no herd checkpoint (herd.json) in the downloaded model")


def resolve_model_uri(uri: str | Path, tracking_uri: str | None = None) -> Path:
    """Any model name (model.sources.resolve_model: a folder, a .gguf file, `smollm2`), with
    `models:/NAME@ALIAS`, `models:/NAME/VERSION` and `runs:/ID/PATH` downloaded from this registry."""
    return resolve_model(uri, registry=lambda text: download_model_uri(text, tracking_uri))


def download_model_uri(text: str, tracking_uri: str | None = None) -> Path:
    """A registry URI downloaded (once per version and store, under $HERD_MODEL_CACHE or
    ~/.cache/herd/models) to a local herd checkpoint directory.

    A registered version's files must match the sha256 recorded at registration, on every call (a
    cached copy included): a mismatch raises HerdError. Downloads land in a temporary folder that
    becomes the cache folder only once verified."""
    if text.startswith("runs:/"):
        return _find_checkpoint(_download_run(text, tracking_uri))
    mv = get_version(text, tracking_uri)
    # The version's own artifact location: a models:/ download would ask the process-wide registry.
    source = _client(tracking_uri).get_model_version_download_uri(mv.name, mv.version)
    # Version numbers repeat across MLflow stores: the cache folder also names the store and source.
    from flows.tracking import tracking_uri as resolve

    origin = hashlib.sha256(f"{resolve(tracking_uri)}|{mv.source}|{mv.creation_timestamp}".encode()).hexdigest()
    target = cache_root() / mv.name / f"v{mv.version}-{origin[:16]}"
    return _find_checkpoint(
        integrity.download_verified(
            _downloader(text, source, tracking_uri),
            target,
            integrity.recorded_digests(mv),
            f"{text} (version {mv.version})",
        )
    )


def _downloader(what: str, source: str, tracking_uri: str | None):
    """download(folder) -> the local copy of artifact `source` in `folder`."""

    def download(folder: Path) -> str:
        import mlflow

        from flows.tracking import tracking_uri as resolve

        try:
            return mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(folder), tracking_uri=resolve(tracking_uri)
            )
        except Exception as e:  # MlflowException, OSError from artifact stores
            raise HerdError(f"{what}: cannot download the model ({e})") from None

    return download


def _download_run(uri: str, tracking_uri: str | None) -> Path:
    """A runs:/ artifact folder, downloaded once (no registry record to verify it against, but still
    all-or-nothing)."""
    target = cache_root() / "runs" / uri[len("runs:/") :].strip("/").replace("/", "_")
    return integrity.download_verified(_downloader(uri, uri, tracking_uri), target, None, uri)


def log_model_dir(model_dir: str | Path, artifact_path: str = "model") -> str:
    """Log a herd checkpoint folder into the active run; returns its runs:/ URI."""
    import mlflow

    model_dir = Path(model_dir)
    if model_dir.is_file() or not (model_dir / "herd.json").is_file():
        raise HerdError(f"{model_dir}: not a herd checkpoint folder (herd.json); import it first (herd model import)")
    run = mlflow.active_run()
    if run is None:
        raise HerdError("log_model_dir needs an active MLflow run")
    mlflow.log_artifacts(str(model_dir), artifact_path)
    return f"runs:/{run.info.run_id}/{artifact_path}"


def register_model(
    model: str | Path,
    name: str = DEFAULT_NAME,
    *,
    run_id: str | None = None,
    alias: str | None = CANDIDATE,
    metrics: dict[str, float] | None = None,
    config_hash: str | None = None,
    tags: dict[str, str] | None = None,
    description: str | None = None,
    tracking_uri: str | None = None,
):
    """Register a herd checkpoint folder (logged into `run_id`, or a new run) or a runs:/ URI as a
    new version of `name`; a models:/ URI is taken as the existing version it points to. Sets
    `alias` and records the eval metrics as tags. Returns the ModelVersion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from flows.tracking import setup_mlflow

    client = _client(tracking_uri)
    text = str(model)
    if text.startswith("models:/"):
        mv = get_version(text, tracking_uri)
    else:
        if text.startswith("runs:/"):
            source, src_run = text, text[len("runs:/") :].split("/", 1)[0]
            digests = integrity.file_digests(_download_run(text, tracking_uri))
        else:
            digests = integrity.file_digests(model)
            active = mlflow.active_run()
            if active is None:  # inside a run (the lifecycle's step) its URI and experiment stay
                setup_mlflow(tracking_uri)
            if run_id is None and active is not None:
                run_id = active.info.run_id
            if active is not None and active.info.run_id == run_id:
                source = log_model_dir(model)
            else:
                with mlflow.start_run(
                    run_id=run_id, run_name=None if run_id else "register-model", nested=active is not None
                ):
                    if run_id is None:
                        mlflow.set_tag("herd.stage", "register")
                    source = log_model_dir(model)
            src_run = source[len("runs:/") :].split("/", 1)[0]
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(
                name, description="herd models (Llama-3 architecture); aliases: candidate, champion"
            )
        mv = client.create_model_version(
            name, source=source, run_id=src_run, description=description, tags=integrity.digest_tags(digests)
        )
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    record_metrics(name, mv.version, metrics or {}, config_hash, tracking_uri)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, mv.version, k, str(v))
    return client.get_model_version(name, mv.version)


def record_metrics(
    name: str, version, metrics: dict[str, float], config_hash: str | None = None, tracking_uri: str | None = None
) -> None:
    client = _client(tracking_uri)
    for k, v in metrics.items():
        client.set_model_version_tag(name, str(version), METRIC_TAG + k, repr(float(v)))
    if config_hash:
        client.set_model_version_tag(name, str(version), "eval.config_hash", config_hash)


def version_metrics(mv) -> dict[str, float]:
    return {k[len(METRIC_TAG) :]: float(v) for k, v in (mv.tags or {}).items() if k.startswith(METRIC_TAG)}


# --- the promotion gate's record (the gate itself: flows/eval/gate.py) -----------------------------


def record_decision(
    name: str,
    version,
    promoted: bool,
    reason: str,
    numbers: dict[str, str],
    champion_version=None,
    tracking_uri: str | None = None,
) -> None:
    """Record the gate's numbers and decision on the candidate version (tags + a description line);
    when promoted, move `champion` to it and keep the old one as `previous_champion`."""
    client = _client(tracking_uri)
    version = str(version)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for k, v in {
        **numbers,
        "promotion.decision": "promoted" if promoted else "rejected",
        "promotion.reason": reason[:5000],
        "promotion.time": stamp,
    }.items():
        client.set_model_version_tag(name, version, k, v[:5000])
    if champion_version is not None:
        client.set_model_version_tag(name, version, "promotion.compared_to", str(champion_version))
    mv = client.get_model_version(name, version)
    description = ((mv.description or "") + f"\n[{stamp}] promotion gate: {reason}").strip()
    client.update_model_version(name, version, description=description[:5000])
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        if champion_version is not None:
            client.set_model_version_tag(name, str(champion_version), "promotion.superseded_by", version)
            client.set_registered_model_alias(name, f"previous_{CHAMPION}", str(champion_version))
