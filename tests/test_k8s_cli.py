"""`herd k8s apply|submit|status|logs` against a local HTTP server (127.0.0.1 only) that
records the Kubernetes REST contract: paths, verbs, query, headers and bodies. No real
API server or KubeRay operator is involved: these tests prove what herd sends and how it
reads the answers, not how a cluster reacts."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from flows.cli import main
from infra import k8s_api, k8s_cli, kustomize, validate

CRD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "k8s" / "kuberay-crds"
RAYJOBS = "/apis/ray.io/v1/namespaces/herd/rayjobs"
PODS = "/api/v1/namespaces/herd/pods"


class FakeKubeAPI(ThreadingHTTPServer):
    """Answers from `routes` ((verb, path) -> (status, body)); echoes PATCH/POST bodies."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.routes: dict[tuple[str, str], tuple[int, object]] = {}


class _Handler(BaseHTTPRequestHandler):
    def _handle(self):
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else None
        self.server.requests.append(
            {
                "verb": self.command,
                "path": url.path,
                "query": parse_qs(url.query),
                "content_type": self.headers.get("Content-Type"),
                "authorization": self.headers.get("Authorization"),
                "body": body,
            }
        )
        status, answer = self.server.routes.get((self.command, url.path), (None, None))
        if status is None and self.command in ("PATCH", "POST"):
            status, answer = (201 if self.command == "POST" else 200), body
        if status is None:
            status, answer = (
                404,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                    "message": f"{url.path} not found",
                },
            )
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = FakeKubeAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def kubeconfig(tmp_path, api) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{api.server_address[1]}"}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
            }
        )
    )
    return str(path)


@pytest.fixture
def crd_dir(monkeypatch) -> Path:
    if not (CRD_DIR / "ray.io_rayjobs.yaml").is_file():
        reason = f"KubeRay CRD schemas not found at {CRD_DIR}"
        print(reason)
        pytest.skip(reason)
    monkeypatch.setenv("HERD_KUBERAY_CRDS", str(CRD_DIR))
    return CRD_DIR


def test_apply_server_side_applies_every_manifest_in_order(api, kubeconfig, crd_dir, capsys):
    assert main(["k8s", "apply", "--overlay", "cpu-dev", "--kubeconfig", kubeconfig]) == 0
    rendered = kustomize.build(k8s_cli.OVERLAYS / "cpu-dev")
    assert len(api.requests) == len(rendered) == 25
    paths = [r["path"] for r in api.requests]
    assert paths[0] == "/api/v1/namespaces/herd"
    assert paths[-2:] == [f"{RAYJOBS}/herd-lifecycle", "/apis/ray.io/v1/namespaces/herd/rayservices/herd-serve"]
    assert "/apis/apps/v1/namespaces/herd/deployments/herd-mlflow" in paths
    assert "/apis/networking.k8s.io/v1/namespaces/herd/networkpolicies/herd-postgres" in paths
    assert "/api/v1/namespaces/herd/secrets/herd-ray-auth" in paths
    # Secrets, volumes and the database exist before anything that mounts or calls them.
    assert paths.index("/api/v1/namespaces/herd/secrets/herd-db") < paths.index(
        "/apis/apps/v1/namespaces/herd/statefulsets/herd-postgres"
    )
    for r in api.requests:
        assert r["verb"] == "PATCH"
        assert r["query"] == {"fieldManager": ["herd"], "force": ["true"]}
        assert r["content_type"] == "application/apply-patch+yaml"
        assert r["authorization"] == "Bearer test-token"
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted((r["body"] for r in api.requests), key=key) == sorted(rendered, key=key)
    assert "rayservice/herd-serve applied" in capsys.readouterr().out


def test_submit_posts_a_rayjob_that_validates_against_the_crd(api, kubeconfig, crd_dir, tmp_path, monkeypatch):
    # The lifecycle's config arrives with flows/lifecycle/; submit only checks it exists.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("{}\n")
    monkeypatch.setattr(k8s_cli, "REPO", tmp_path)
    assert (
        main(
            [
                "k8s",
                "submit",
                "--overlay",
                "gpu",
                "--kubeconfig",
                kubeconfig,
                "--name",
                "herd-lifecycle-test",
                "--config",
                "configs/default.yaml",
            ]
        )
        == 0
    )
    [request] = api.requests
    assert (request["verb"], request["path"]) == ("POST", RAYJOBS)
    body = request["body"]
    assert validate.manifest_errors(body, crd_dir) == []
    assert body["metadata"] == {
        "namespace": "herd",
        "labels": {"app.kubernetes.io/part-of": "herd"},
        "name": "herd-lifecycle-test",
    }
    # the overlay's own options stay (the gpu overlay's GPU overrides); only --config is replaced
    assert body["spec"]["entrypoint"] == (
        "python -m flows.lifecycle --config configs/default.yaml --overrides configs/lifecycle/gpu.yaml"
    )
    template = next(d for d in kustomize.build(k8s_cli.OVERLAYS / "gpu") if d["kind"] == "RayJob")
    assert body["spec"]["rayClusterSpec"] == template["spec"]["rayClusterSpec"]


def test_submit_dry_run_prints_the_body_and_calls_nothing(api, kubeconfig, crd_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.yaml").write_text("{}\n")
    monkeypatch.setattr(k8s_cli, "REPO", tmp_path)
    assert main(["k8s", "submit", "--dry-run", "--config", "configs/small.yaml", "--kubeconfig", kubeconfig]) == 0
    assert api.requests == []
    [body] = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert body["metadata"]["name"].startswith("herd-lifecycle-")
    assert body["spec"]["entrypoint"].endswith("--config configs/small.yaml")
    assert main(["k8s", "submit", "--dry-run", "--config", "configs/missing.yaml"]) == 2


def rayjob_with_status(name: str, job_status: str, deployment_status: str) -> dict:
    """A RayJob as KubeRay reports it; every status field is one the CRD defines."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": "herd"},
        "status": {
            "jobId": f"{name}-x7k2p",
            "jobStatus": job_status,
            "jobDeploymentStatus": deployment_status,
            "rayClusterName": f"{name}-raycluster-abcde",
            "dashboardURL": f"{name}-head-svc.herd.svc:8265",
            "startTime": "2026-11-02T10:00:00Z",
            "endTime": "2026-11-02T11:30:00Z",
            "message": "Job finished",
            "reason": "",
            "succeeded": 1,
            "failed": 0,
            "observedGeneration": 1,
            "rayJobInfo": {"startTime": "2026-11-02T10:01:00Z", "endTime": "2026-11-02T11:29:00Z"},
            "rayClusterStatus": {"state": "ready", "desiredWorkerReplicas": 2, "readyWorkerReplicas": 2},
        },
    }


def test_status_parses_a_rayjob_status_made_of_the_crds_own_fields(api, kubeconfig, crd_dir, capsys):
    status_schema = validate.crd_schema(crd_dir, "RayJob")["properties"]["status"]
    assert set(k8s_api.STATUS_FIELDS) <= set(status_schema["properties"])
    done = rayjob_with_status("herd-lifecycle-a", "SUCCEEDED", "Complete")
    failed = rayjob_with_status("herd-lifecycle-b", "FAILED", "Failed")
    for obj in (done, failed):
        jsonschema.Draft7Validator(status_schema).validate(obj["status"])
    api.routes[("GET", f"{RAYJOBS}/herd-lifecycle-a")] = (200, done)
    api.routes[("GET", RAYJOBS)] = (200, {"apiVersion": "ray.io/v1", "kind": "RayJobList", "items": [done, failed]})

    assert main(["k8s", "status", "herd-lifecycle-a", "--kubeconfig", kubeconfig]) == 0
    out = capsys.readouterr().out
    assert out.startswith("herd-lifecycle-a  Complete  SUCCEEDED  cluster=herd-lifecycle-a-raycluster-abcde")
    assert "started=2026-11-02T10:00:00Z" in out
    assert main(["k8s", "status", "--kubeconfig", kubeconfig]) == 1  # one of them failed
    assert "herd-lifecycle-b  Failed  FAILED" in capsys.readouterr().out
    assert [(r["verb"], r["path"]) for r in api.requests] == [("GET", f"{RAYJOBS}/herd-lifecycle-a"), ("GET", RAYJOBS)]
    assert k8s_api.RayJobStatus.from_object({"metadata": {"name": "new"}}).line() == "new  Pending  -"


def test_logs_read_the_submitter_pod_or_the_head_pod(api, kubeconfig, capsys):
    def pod(name):
        return {"metadata": {"name": name, "namespace": "herd", "creationTimestamp": "2026-11-02T10:00:00Z"}}

    api.routes[("GET", PODS)] = (200, {"apiVersion": "v1", "kind": "PodList", "items": [pod("p1")]})
    api.routes[("GET", f"{PODS}/p1/log")] = (200, "epoch 1 loss 2.1\nepoch 2 loss 1.7")
    api.routes[("GET", f"{RAYJOBS}/herd-lifecycle-a")] = (
        200,
        rayjob_with_status("herd-lifecycle-a", "RUNNING", "Running"),
    )

    assert main(["k8s", "logs", "herd-lifecycle-a", "--tail", "5", "--kubeconfig", kubeconfig]) == 0
    assert capsys.readouterr().out == "epoch 1 loss 2.1\nepoch 2 loss 1.7\n"
    assert main(["k8s", "logs", "herd-lifecycle-a", "--head", "--kubeconfig", kubeconfig]) == 0
    pods, log, rayjob, head_pods, head_log = api.requests
    assert pods["query"] == {"labelSelector": ["batch.kubernetes.io/job-name=herd-lifecycle-a"]}
    assert log["query"] == {"container": ["ray-job-submitter"], "tailLines": ["5"]}
    assert rayjob["path"] == f"{RAYJOBS}/herd-lifecycle-a"
    assert head_pods["query"] == {
        "labelSelector": ["ray.io/cluster=herd-lifecycle-a-raycluster-abcde,ray.io/node-type=head"]
    }
    assert head_log["query"] == {"container": ["ray-head"]}


def test_api_and_config_errors_are_one_line(api, kubeconfig, tmp_path, monkeypatch, capsys):
    assert main(["k8s", "status", "nope", "--kubeconfig", kubeconfig]) == 2
    assert "rayjob nope in namespace herd: HTTP 404" in capsys.readouterr().err
    api.routes[("GET", PODS)] = (200, {"apiVersion": "v1", "kind": "PodList", "items": []})
    assert main(["k8s", "logs", "nope", "--kubeconfig", kubeconfig]) == 2
    assert "no Pod matches batch.kubernetes.io/job-name=nope" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["k8s", "status"]) == 2
    assert "no Kubernetes cluster configured" in capsys.readouterr().err


def without_required(schema):
    """The strict CRD schema for a partial object (a merge patch): unknown fields still fail."""
    if isinstance(schema, dict):
        return {k: without_required(v) for k, v in schema.items() if k != "required"}
    if isinstance(schema, list):
        return [without_required(v) for v in schema]
    return schema


@pytest.mark.integration
def test_promote_patches_the_rayservice_serve_config_in_place(api, kubeconfig, crd_dir, tmp_path, monkeypatch, capsys):
    """`herd k8s promote` resolves the alias in MLflow, then sends one merge patch whose
    serveConfigV2 pins the version in the deployment's user_config (KubeRay then updates Serve in
    place: a user_config change reconfigures the running replicas)."""
    import mlflow
    from mlflow import MlflowClient

    from flows.eval.registry import register_model
    from tests.tiny import tiny_checkpoint

    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("promote-test")
    for seed in (1, 2):
        mv = register_model(tiny_checkpoint(tmp_path / f"m{seed}", seed=seed), "herd", tracking_uri=store)
    MlflowClient(store, registry_uri=store).set_registered_model_alias("herd", "champion", mv.version)

    assert main(["k8s", "promote", "--overlay", "cpu-dev", "--kubeconfig", kubeconfig, "--tracking-uri", store]) == 0
    [request] = api.requests
    assert (request["verb"], request["path"]) == ("PATCH", "/apis/ray.io/v1/namespaces/herd/rayservices/herd-serve")
    assert request["content_type"] == "application/merge-patch+json"
    assert request["query"] == {"fieldManager": ["herd-promote"]}
    patch = request["body"]
    assert list(patch) == ["spec"] and list(patch["spec"]) == ["serveConfigV2"]
    jsonschema.Draft7Validator(without_required(validate.crd_schema(crd_dir, "RayService"))).validate(
        {"apiVersion": "ray.io/v1", "kind": "RayService", **patch}
    )
    service = next(d for d in kustomize.build(k8s_cli.OVERLAYS / "cpu-dev") if d["kind"] == "RayService")
    assert validate.manifest_errors({**service, "spec": {**service["spec"], **patch["spec"]}}, crd_dir) == []
    served, before = yaml.safe_load(patch["spec"]["serveConfigV2"]), yaml.safe_load(service["spec"]["serveConfigV2"])
    deployment = served["applications"][0]["deployments"][0]
    assert deployment["user_config"] == {"watch_s": 30, "model": f"models:/herd/{mv.version}"}
    before["applications"][0]["deployments"][0]["user_config"] = deployment["user_config"]
    assert served == before  # nothing else changes: args stay, so Serve updates in place
    assert f"now serves models:/herd/{mv.version} (herd/{mv.version})" in capsys.readouterr().out

    assert main(["k8s", "promote", "--dry-run", "--model", "models:/herd/1", "--kubeconfig", kubeconfig]) == 0
    assert len(api.requests) == 1
    assert "model: models:/herd/1" in yaml.safe_load(capsys.readouterr().out)["spec"]["serveConfigV2"]
    assert main(["k8s", "promote", "--model", "herd", "--kubeconfig", kubeconfig]) == 2
    assert "expected models:/NAME/VERSION or models:/NAME@ALIAS" in capsys.readouterr().err
