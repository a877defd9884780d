"""MLflow's basic-auth app, as the manifests run it: without credentials nobody can register a
model version or move an alias; herd's client, given the credentials through the environment
(MLFLOW_TRACKING_USERNAME/PASSWORD, from the herd-mlflow-auth Secret on the cluster), can."""

from __future__ import annotations

import pytest

from flows.eval.registry import register_model, resolve_model_uri
from tests.mlflow_server import ADMIN, mlflow_server
from tests.tiny import tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def status_of(call) -> int:
    from mlflow.exceptions import MlflowException, RestException

    try:
        call()
    except (RestException, MlflowException) as e:
        return e.get_http_status_code()
    return 200


def test_only_herds_configured_client_changes_the_registry(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    monkeypatch.setenv("HERD_MODEL_CACHE", str(tmp_path / "cache"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    ckpt = tiny_checkpoint(tmp_path / "m", seed=1)
    with mlflow_server(tmp_path, basic_auth=True) as url:
        # herd's client: the credentials the Ray pods get from the Secret.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        import mlflow

        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("herd-auth")
        v1 = register_model(ckpt, "herd", tracking_uri=url)
        herd = MlflowClient(url, registry_uri=url)
        herd.set_registered_model_alias("herd", "champion", v1.version)
        assert (resolve_model_uri("models:/herd@champion", tracking_uri=url) / "model.safetensors").is_file()
        source, run_id = v1.source, v1.run_id
        # A reader: an account with the default (READ) permission.
        get_app_client("basic-auth", tracking_uri=url).create_user("reader", "reader-password-1")

        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        anyone = MlflowClient(url, registry_uri=url)
        codes = {
            "register": status_of(lambda: anyone.create_model_version("herd", source, run_id)),
            "alias": status_of(lambda: anyone.set_registered_model_alias("herd", "champion", v1.version)),
            "read": status_of(lambda: anyone.get_model_version_by_alias("herd", "champion")),
        }
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-password-1")
        reader = MlflowClient(url, registry_uri=url)
        codes |= {
            "reader register": status_of(lambda: reader.create_model_version("herd", source, run_id)),
            "reader alias": status_of(lambda: reader.set_registered_model_alias("herd", "x", v1.version)),
            "reader read": status_of(lambda: reader.get_model_version_by_alias("herd", "champion")),
        }
        print(codes)
        assert codes == {
            "register": 401,
            "alias": 401,
            "read": 401,
            "reader register": 403,
            "reader alias": 403,
            "reader read": 200,
        }

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        assert [str(v.version) for v in herd.search_model_versions("name='herd'")] == [str(v1.version)]
        assert str(herd.get_model_version_by_alias("herd", "champion").version) == str(v1.version)
        v2 = register_model(ckpt, "herd", tracking_uri=url)
        herd.set_registered_model_alias("herd", "champion", v2.version)
        assert str(herd.get_model_version_by_alias("herd", "champion").version) == str(v2.version)
