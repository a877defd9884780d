"""Registry integrity against a real local MLflow store: every registered file's sha256 is recorded
and checked on every load (serve, eval, lifecycle all resolve through resolve_model_uri), and a
download only becomes the cached copy once verified."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.eval import integrity
from flows.eval.registry import get_version, register_model, resolve_model_uri
from model.errors import HerdError
from tests.tiny import tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]


def stored_folder(name: str, version, store_uri: str) -> Path:
    """Where the registry's artifact store keeps a version's files (a local folder here)."""
    from mlflow import MlflowClient

    client = MlflowClient(store_uri, registry_uri=store_uri)
    uri = client.get_model_version_download_uri(name, str(version))
    if uri.startswith("runs:/"):
        run_id, _, rel = uri[len("runs:/") :].partition("/")
        uri = f"{client.get_run(run_id).info.artifact_uri}/{rel}"
    path = Path(uri.removeprefix("file://"))
    assert (path / "model.safetensors").is_file(), uri
    return path


def flip_a_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_registration_records_every_files_sha256(store, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m", seed=1)
    mv = register_model(ckpt, "herd", tracking_uri=store)
    recorded = integrity.recorded_digests(mv)
    assert sorted(recorded) == ["herd.json", "model.safetensors", "tokenizer.json"]
    assert recorded == integrity.file_digests(ckpt)
    assert recorded == integrity.file_digests(stored_folder("herd", mv.version, store))


def test_a_flipped_byte_in_a_registered_model_fails_every_load(store, tmp_path, monkeypatch):
    mv = register_model(tiny_checkpoint(tmp_path / "m", seed=1), "herd", tracking_uri=store)
    assert (resolve_model_uri("models:/herd@candidate", tracking_uri=store) / "model.safetensors").is_file()
    flip_a_byte(stored_folder("herd", mv.version, store) / "model.safetensors")
    cache = tmp_path / "cache"
    with pytest.raises(HerdError) as err:  # a fresh cache: the download itself is refused
        monkeypatch.setenv("HERD_MODEL_CACHE", str(tmp_path / "cache2"))
        resolve_model_uri(f"models:/herd/{mv.version}", tracking_uri=store)
    message = str(err.value)
    print(message)
    assert f"models:/herd/{mv.version} (version {mv.version}): sha256 check failed, refusing to load it" in message
    assert "model.safetensors: sha256 " in message and "does not match the registered" in message
    assert not list((tmp_path / "cache2" / "herd").iterdir())  # nothing left that a later load could use
    # Serve resolves through the same check (services.api.app.build_state: resolve_model_uri with no
    # tracking URI, so MLFLOW_TRACKING_URI, what replicas read).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with pytest.raises(HerdError, match="sha256 check failed"):
        resolve_model_uri("models:/herd@candidate")
    # The copy cached before the flip was verified at each load and is still intact.
    monkeypatch.setenv("HERD_MODEL_CACHE", str(cache))
    assert resolve_model_uri("models:/herd@candidate", tracking_uri=store).is_dir()


def test_a_damaged_cached_copy_is_fetched_again(store, tmp_path):
    mv = register_model(tiny_checkpoint(tmp_path / "m", seed=1), "herd", tracking_uri=store)
    local = resolve_model_uri("models:/herd@candidate", tracking_uri=store)
    flip_a_byte(local / "model.safetensors")
    again = resolve_model_uri("models:/herd@candidate", tracking_uri=store)
    assert again == local
    assert integrity.file_digests(again) == integrity.recorded_digests(mv)


def test_a_version_without_recorded_digests_is_refused(store, tmp_path):
    from mlflow import MlflowClient

    mv = register_model(tiny_checkpoint(tmp_path / "m", seed=1), "herd", tracking_uri=store)
    client = MlflowClient(store, registry_uri=store)
    for key in integrity.recorded_digests(mv):
        client.delete_model_version_tag("herd", mv.version, integrity.TAG + key)
    assert integrity.recorded_digests(get_version("models:/herd/1", store)) == {}
    with pytest.raises(HerdError, match="no sha256 recorded for its files"):
        resolve_model_uri("models:/herd/1", tracking_uri=store)


KILLED_DOWNLOAD = textwrap.dedent("""
    import os, signal, sys
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from flows.eval.registry import resolve_model_uri

    copy = LocalArtifactRepository._download_file

    def copy_then_die(self, remote_file_path, local_path):
        copy(self, remote_file_path, local_path)
        print("killed after", remote_file_path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # halfway: one file of the model is on disk

    LocalArtifactRepository._download_file = copy_then_die
    resolve_model_uri(sys.argv[1], tracking_uri=sys.argv[2])
""")


def test_a_download_killed_halfway_is_downloaded_again(store, tmp_path):
    mv = register_model(tiny_checkpoint(tmp_path / "m", seed=1), "herd", tracking_uri=store)
    cache = tmp_path / "cache" / "herd"
    out = subprocess.run(
        [sys.executable, "-c", KILLED_DOWNLOAD, "models:/herd@candidate", store],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), "HERD_MODEL_CACHE": str(tmp_path / "cache")},
    )
    print(out.stdout, out.stderr[-2000:])
    assert out.returncode == -9 and "killed after" in out.stdout
    left = list(cache.iterdir())
    assert len(left) == 1 and ".partial-" in left[0].name  # only the temporary folder, never the cache folder
    partial_files = [p for p in left[0].rglob("*") if p.is_file()]
    assert partial_files  # what was copied before the kill (MLflow's parallel downloads may have copied more)

    local = resolve_model_uri("models:/herd@candidate", tracking_uri=store)
    assert ".partial-" not in str(local)
    assert integrity.file_digests(local) == integrity.recorded_digests(mv)
    assert json.loads((local / "herd.json").read_text())


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
