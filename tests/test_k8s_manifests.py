"""infra/k8s validated offline: every rendered manifest against the KubeRay CRD schemas and
the core Kubernetes schemas, serveConfigV2 against Ray Serve's, plus the invariants the
schemas cannot express (no drift, security, GPU groups, the image)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra import kustomize, validate
from infra.k8s_cli import OVERLAYS
from model.errors import HerdError

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "k8s" / "kuberay-crds"
SERVE_CONFIG = REPO / "configs" / "serve" / "default.yaml"
OVERLAY_NAMES = ["cpu-dev", "gpu"]
# Each overlay's RayService deploys one of these files as its serveConfigV2.
SERVE_CONFIGS = {"cpu-dev": SERVE_CONFIG, "gpu": REPO / "configs" / "serve" / "gpu.yaml"}
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    if not (CRD_DIR / "ray.io_rayjobs.yaml").is_file():
        reason = f"KubeRay CRD schemas not found at {CRD_DIR}"
        print(reason)
        pytest.skip(reason)
    return CRD_DIR


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize.build(OVERLAYS / name) for name in OVERLAY_NAMES}


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def cluster_spec(doc):
    return {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayService": lambda s: s["rayClusterConfig"],
    }[doc["kind"]](doc["spec"])


def pod_specs(doc):
    """(where, pod spec) for every Pod template in a manifest."""
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet"):
        yield doc["metadata"]["name"], spec["template"]["spec"]
    if doc["kind"] in RAY_KINDS:
        cluster = cluster_spec(doc)
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]["spec"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_manifest_validates(rendered, crd_dir, overlay):
    docs = rendered[overlay]
    errors = validate.validate_all(docs, crd_dir)
    kinds = sorted({d["kind"] for d in docs})
    print(f"{overlay}: {len(docs)} manifests ({', '.join(kinds)}), {len(errors)} schema errors")
    assert errors == []
    assert {
        "RayJob",
        "RayService",
        "Deployment",
        "StatefulSet",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Service",
    } <= set(kinds)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_everything_lands_in_the_herd_namespace(rendered, overlay):
    for doc in rendered[overlay]:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "herd", f"{doc['kind']}/{doc['metadata']['name']}"


def test_broken_manifests_fail_with_the_offending_field_path(rendered, crd_dir):
    docs = copy.deepcopy(rendered["gpu"])
    cluster = one(docs, "RayCluster")
    cluster["spec"]["workerGroupSpecs"][1]["minReplicas"] = "zero"
    job = one(docs, "RayJob")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    service = one(docs, "RayService")
    service["spec"]["serveConfigV2"] = service["spec"]["serveConfigV2"].replace("max_replicas: 4", "max_replicas: many")
    mlflow = one(docs, "Deployment", "herd-mlflow")
    mlflow["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000/tcp"

    errors = validate.validate_all(docs, crd_dir)
    print("\n".join(errors))
    assert sorted(errors) == [
        "Deployment/herd-mlflow: spec.template.spec.containers[0].ports[0].containerPort: "
        "'5000/tcp' is not of type 'integer'",
        "RayCluster/herd: spec.workerGroupSpecs[1].minReplicas: 'zero' is not of type 'integer'",
        "RayJob/herd-lifecycle: spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]: "
        "Additional properties are not allowed ('imagePullPolcy' was unexpected)",
        "RayService/herd-serve: spec.serveConfigV2: applications[0].deployments[0].autoscaling_config."
        "max_replicas: Input should be a valid integer, unable to parse string as an integer",
    ]


def test_serve_config_is_a_valid_ray_serve_config():
    assert validate.serve_config_errors(SERVE_CONFIG.read_text()) == []
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    app = config["applications"][0]
    assert app["import_path"] == "services.deployment:build_app"
    assert app["deployments"][0]["name"] == "HerdLLMServer"
    typo = SERVE_CONFIG.read_text().replace("upscale_delay_s", "upscale_delay")
    assert validate.serve_config_errors(typo) == [
        "applications[0].deployments[0].autoscaling_config.upscale_delay: unknown field for AutoscalingConfig"
    ]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_serve_config_v2_is_the_local_serve_config_file(rendered, overlay):
    """No drift: the RayService deploys its configs/serve file byte for byte."""
    served = one(rendered[overlay], "RayService")["spec"]["serveConfigV2"]
    assert served == SERVE_CONFIGS[overlay].read_text()
    assert yaml.safe_load(served) == yaml.safe_load(SERVE_CONFIGS[overlay].read_text())
    # The carrier ConfigMap is build-time only and must not reach the cluster.
    assert [d["metadata"]["name"] for d in rendered[overlay] if d["kind"] == "ConfigMap"] == ["herd-mlflow-auth"]


def ray_cpus(group) -> float:
    params = group.get("rayStartParams") or {}
    if "num-cpus" in params:
        return float(params["num-cpus"])
    cpu = str(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_serve_replicas_fit_the_rayservice_workers(rendered, overlay):
    deployment = yaml.safe_load(SERVE_CONFIGS[overlay].read_text())["applications"][0]["deployments"][0]
    replica_cpus = deployment["ray_actor_options"]["num_cpus"]
    cluster = cluster_spec(one(rendered[overlay], "RayService"))
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert ray_cpus(group) >= replica_cpus, group["groupName"]
        if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]:
            # One replica per GPU Pod (see overlays/gpu/rayservice-gpu.yaml).
            assert ray_cpus(group) == replica_cpus


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_pods_run_as_non_root_with_requests_and_limits(rendered, overlay):
    checked = 0
    for doc in rendered[overlay]:
        for where, pod in pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, (where, c["name"])
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][bound]), (where, c["name"], bound)
                checked += 1
        if doc["kind"] in RAY_KINDS:
            autoscaler = cluster_spec(doc)["autoscalerOptions"]
            assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"requests", "limits"} <= set(autoscaler["resources"])
    assert checked >= 6


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_ray_clusters_autoscale_with_v2_and_token_auth(rendered, overlay):
    for doc in (d for d in rendered[overlay] if d["kind"] in RAY_KINDS):
        cluster = cluster_spec(doc)
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["autoscalerOptions"]["version"] == "v2"
        assert cluster["authOptions"] == {"mode": "token", "secretName": "herd-ray-auth"}
        assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])


def test_gpu_overlay_adds_gpu_groups_that_scale_from_zero(rendered):
    docs = rendered["gpu"]
    for kind in RAY_KINDS:
        groups = [g for g in cluster_spec(one(docs, kind))["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert len(groups) == 1, kind
        pod = groups[0]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert groups[0]["minReplicas"] == 0
    images = {c["image"] for d in docs for _, pod in pod_specs(d) for c in pod["containers"]}
    assert images == {"herd:0.1.0-cuda", "postgres:16", "redis:7.4"}
    assert not [d for d in rendered["cpu-dev"] if "nvidia.com/gpu" in str(d)]


def test_rayjob_runs_the_lifecycle_and_cleans_up(rendered):
    for overlay in OVERLAY_NAMES:
        spec = one(rendered[overlay], "RayJob")["spec"]
        assert spec["entrypoint"].startswith("python -m flows.lifecycle --config configs/default.yaml")
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/herd"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_entrypoint_module_and_config_exist(rendered):
    entrypoint = one(rendered["gpu"], "RayJob")["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["python", "-m"]
    path = REPO / entrypoint[2].replace(".", "/")
    assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), path  # a module or a package
    assert (REPO / entrypoint[entrypoint.index("--config") + 1]).is_file()


def test_secrets_referenced_are_the_dev_secrets_and_gpu_ships_none(rendered):
    docs = rendered["cpu-dev"]
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in docs if d["kind"] == "Secret"}
    refs = set(re.findall(r"'secretKeyRef': \{'name': '([^']+)', 'key': '([^']+)'", str(docs)))
    refs |= {(cluster_spec(d)["authOptions"]["secretName"], "auth_token") for d in docs if d["kind"] in RAY_KINDS}
    refs |= {
        (
            d["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"][
                "name"
            ],
            "password",
        )
        for d in docs
        if d["kind"] == "RayService"
    }
    assert {name for name, _ in refs} == {"herd-db", "herd-api-key", "herd-ray-auth", "herd-mlflow-auth", "herd-redis"}
    for name, key in refs:
        assert key in secrets.get(name, set()), f"{name}/{key}"
    assert not [d for d in rendered["gpu"] if d["kind"] == "Secret"]


def test_network_policies_deny_ingress_by_default(rendered):
    policies = {d["metadata"]["name"]: d["spec"] for d in rendered["gpu"] if d["kind"] == "NetworkPolicy"}
    assert policies["herd-default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    postgres = policies["herd-postgres"]["ingress"]
    assert postgres == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "herd-mlflow"}}}],
            "ports": [{"port": 5432, "protocol": "TCP"}],
        }
    ]


def test_rwx_train_storage_mounted_at_ray_trains_default_path(rendered):
    gpu_pvc = one(rendered["gpu"], "PersistentVolumeClaim", "herd-train-storage")
    assert gpu_pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    job = one(rendered["gpu"], "RayJob")
    for where, pod in pod_specs(job):
        if where != "submitter":
            assert {"name": "train-storage", "mountPath": "/home/ray/ray_results"} in pod["containers"][0][
                "volumeMounts"
            ]


def test_dockerfile_matches_ray_pin_and_manifests(rendered):
    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    pin = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<', (REPO / "pyproject.toml").read_text()).group(1)
    version = re.search(r"ARG RAY_VERSION=([\d.]+)", text).group(1)
    assert version.startswith(pin + ".") or version == pin
    assert "rayproject/ray:${RAY_VERSION}-py311-cpu AS base-cpu" in text
    assert "rayproject/ray:${RAY_VERSION}-py311-gpu AS base-cuda" in text
    assert re.search(r"^USER 1000:100$", text, re.M)
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    assert workdir == yaml.safe_load(one(rendered["gpu"], "RayJob")["spec"]["runtimeEnvYAML"])["working_dir"]
    assert re.search(r'^RUN sh infra/install.sh python project "\.\[cluster\]"$', text, re.M)
    for doc in rendered["gpu"]:
        for where, pod in pod_specs(doc):
            if pod["containers"][0]["image"].startswith("herd:"):
                assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (1000, 100), where


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_renderer_matches_kubectl_kustomize(rendered, overlay):
    """`kubectl apply -k` is the user's command: herd's renderer must agree with it."""
    if shutil.which("kubectl") is None:
        reason = "kubectl not installed (Debian: kubernetes-client); herd's renderer checked alone"
        print(reason)
        pytest.skip(reason)
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    theirs = [d for d in yaml.safe_load_all(out) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered[overlay], key=key) == sorted(theirs, key=key)


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\nresources: []\n")
    with pytest.raises(HerdError, match="commonLabels"):
        kustomize.build(tmp_path)
    # kustomize's load restriction: generator files must be at or below the kustomization.
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret.txt").write_text("x")
    (inner / "kustomization.yaml").write_text(
        "configMapGenerator:\n- name: c\n  files: [../secret.txt]\n  options: {disableNameSuffixHash: true}\n"
    )
    with pytest.raises(HerdError, match="is not in or below"):
        kustomize.build(inner)


def test_herd_k8s_render_writes_validated_manifests(tmp_path, crd_dir, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("HERD_KUBERAY_CRDS", str(crd_dir))
    out = tmp_path / "gpu.yaml"
    assert main(["k8s", "render", "--overlay", "gpu", "-o", str(out)]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert [d["kind"] for d in docs][:1] == ["Namespace"]
    assert one(docs, "RayService")["spec"]["serveConfigV2"] == SERVE_CONFIGS["gpu"].read_text()
    assert "21 manifests from gpu, 0 schema errors" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(OVERLAYS.parent, broken / "infra" / "k8s")
    shutil.copytree(REPO / "configs" / "serve", broken / "configs" / "serve")
    path = broken / "infra" / "k8s" / "base" / "postgres.yaml"
    path.write_text(path.read_text().replace("replicas: 1", "replicas: one"))
    assert main(["k8s", "render", "--overlay", str(broken / "infra" / "k8s" / "overlays" / "gpu")]) == 2
    assert "StatefulSet/herd-postgres: spec.replicas: 'one' is not of type 'integer'" in capsys.readouterr().err


def containers_with_pods(docs):
    for doc in docs:
        for where, pod in pod_specs(doc):
            for c in pod["containers"]:
                yield f"{doc['kind']}/{doc['metadata']['name']} {where}", pod, c


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_root_filesystems_are_read_only_with_writable_volumes(rendered, overlay):
    checked = 0
    for where, pod, c in containers_with_pods(rendered[overlay]):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}, where
        if c["name"] in ("ray-head", "ray-worker"):  # downloads go to the writable volume
            assert {"name": "HERD_MODEL_CACHE", "value": "/tmp/herd/models"} in c["env"], where
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_only_ray_heads_mount_a_service_account_token(rendered, overlay):
    """The head's autoscaler sidecar calls the Kubernetes API; nothing else does."""
    for doc in rendered[overlay]:
        for where, pod in pod_specs(doc):
            if where == "head":
                assert "automountServiceAccountToken" not in pod
            else:
                assert pod["automountServiceAccountToken"] is False, (doc["metadata"]["name"], where)


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_mlflow_runs_basic_auth_and_only_ray_pods_reach_it(rendered, overlay):
    docs = rendered[overlay]
    mlflow = one(docs, "Deployment", "herd-mlflow")["spec"]["template"]["spec"]
    [server] = mlflow["containers"]
    assert "--app-name=basic-auth" in server["args"]
    env = {e["name"]: e for e in server["env"]}
    for var, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "herd-mlflow-auth", "key": key}
    # The database password reaches libpq through the environment, never the command line.
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "herd-db", "key": "password"}
    assert not [a for a in server["command"] + server["args"] if "PASSWORD" in a or "password" in a]
    ini = one(docs, "ConfigMap", "herd-mlflow-auth")["data"]["basic_auth.ini"]
    config_dir = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rsplit("/", 1)[0]
    assert {"name": "auth-config", "mountPath": config_dir, "readOnly": True} in server["volumeMounts"]
    store = re.search(r"database_uri = sqlite:///(\S+)", ini).group(1)
    assert any(store.startswith(m["mountPath"] + "/") and m.get("subPath") for m in server["volumeMounts"])
    policy = one(docs, "NetworkPolicy", "herd-mlflow")["spec"]
    assert policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}],
            "ports": [{"port": 5000, "protocol": "TCP"}],
        }
    ]
    for doc in (d for d in docs if d["kind"] in RAY_KINDS):
        for where, pod in pod_specs(doc):
            if where == "submitter":
                continue
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == {
                "name": "herd-mlflow-auth",
                "key": "username",
            }
            assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "herd-mlflow-auth",
                "key": "password",
            }


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_rayservice_is_highly_available(rendered, overlay):
    docs = rendered[overlay]
    service = one(docs, "RayService")
    ft = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    redis = one(docs, "Service", "herd-redis")
    assert ft["redisAddress"] == f"herd-redis:{redis['spec']['ports'][0]['port']}"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "herd-redis", "key": "password"}
    [container] = one(docs, "StatefulSet", "herd-redis")["spec"]["template"]["spec"]["containers"]
    assert {
        "name": "REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "herd-redis", "key": "password"}},
    } in container["env"]
    assert "$REDIS_PASSWORD" in container["args"][0] and "requirepass" in container["args"][0]
    redis_policy = one(docs, "NetworkPolicy", "herd-redis")["spec"]
    assert redis_policy["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]
    # Each budget selects Pods that exist: template labels plus KubeRay's node-type label.
    pdbs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"herd-serve-head", "herd-serve-workers", "herd-lifecycle-head"}
    for name, spec in pdbs.items():
        owner = one(docs, "RayService" if name.startswith("herd-serve") else "RayJob")
        cluster = cluster_spec(owner)
        want = spec["selector"]["matchLabels"]
        groups = [cluster["headGroupSpec"]] if want["ray.io/node-type"] == "head" else cluster["workerGroupSpecs"]
        for group in groups:
            labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": want["ray.io/node-type"]}
            assert want.items() <= labels.items(), (name, group.get("groupName", "head"))
    assert pdbs["herd-serve-workers"]["maxUnavailable"] == 1
    assert pdbs["herd-serve-head"]["minAvailable"] == pdbs["herd-lifecycle-head"]["minAvailable"] == 1


def test_gpu_serve_config_is_default_plus_one_gpu_on_auto_device_and_dtype():
    default = yaml.safe_load(SERVE_CONFIG.read_text())
    gpu = yaml.safe_load(SERVE_CONFIGS["gpu"].read_text())
    app = gpu["applications"][0]
    assert app["args"].pop("device") == "auto" and app["args"].pop("dtype") == "auto"
    assert app["deployments"][0]["ray_actor_options"].pop("num_gpus") == 1
    assert gpu == default
    assert validate.serve_config_errors(SERVE_CONFIGS["gpu"].read_text()) == []


def test_gpu_lifecycle_asks_for_gpus_where_it_trains_and_embeds(rendered):
    """The gpu overlay's entrypoint, as the lifecycle reads it: pretraining, post-training and the
    embedding actor ask Ray for GPUs; the cpu-dev one asks for none."""
    import shlex

    from flows.lifecycle.cli import read_overrides
    from flows.lifecycle.config import load_config

    def stages(overlay):
        words = shlex.split(one(rendered[overlay], "RayJob")["spec"]["entrypoint"])
        config = str(REPO / words[words.index("--config") + 1])
        files = [str(REPO / w) for w in words[words.index("--overrides") + 1 :]] if "--overrides" in words else []
        return load_config(config, read_overrides(files, config))["stages"]

    gpu, cpu = stages("gpu"), stages("cpu-dev")
    for name in ("pretrain", "sft", "dpo"):
        assert gpu[name]["enabled"] and gpu[name]["config"]["ray"]["use_gpu"] is True, name
        assert gpu[name]["config"]["ray"].get("workers", 1) >= 1
        assert not cpu[name]["config"].get("ray", {}).get("use_gpu", False)
    assert gpu["data"]["config"]["semdedup"]["use_gpu"] is True
    assert "use_gpu" not in cpu["data"]["config"]["semdedup"]
