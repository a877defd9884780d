"""herd's calls to a Kubernetes API server, through the official `kubernetes` client.

KubeRay objects go through CustomObjectsApi (ray.io/v1); `apply` uses server-side apply
(one PATCH per object, which creates or updates) so re-applying is safe.
"""

from __future__ import annotations

import copy
import datetime as dt
import shlex
from dataclasses import dataclass

import yaml

from model.errors import HerdError

GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
# Core kinds herd's manifests use: API prefix, plural, namespaced.
CORE = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Secret": ("/api/v1", "secrets", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Service": ("/api/v1", "services", True),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "StatefulSet": ("/apis/apps/v1", "statefulsets", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
}
FIELD_MANAGER = "herd"
APPLY_PATCH = "application/apply-patch+yaml"
LIFECYCLE_MODULE = "flows.lifecycle"
SUBMITTER_CONTAINER = "ray-job-submitter"
# RayJob status fields `status` reads; tests check each against the CRD's status schema.
STATUS_FIELDS = (
    "jobStatus",
    "jobDeploymentStatus",
    "rayClusterName",
    "dashboardURL",
    "startTime",
    "endTime",
    "message",
    "reason",
    "jobId",
)
FAILED_JOB = {"FAILED", "STOPPED"}
FAILED_DEPLOYMENT = {"Failed", "ValidationFailed"}


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A client for the kubeconfig's cluster, or the in-cluster service account."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (ConfigException, FileNotFoundError) as e:
        if kubeconfig or context:
            raise HerdError(f"kubeconfig: {e}") from None
        try:
            config.load_incluster_config()
        except ConfigException:
            raise HerdError(
                "no Kubernetes cluster configured: no ~/.kube/config, $KUBECONFIG "
                "or in-cluster service account (see docs/kubernetes.md)"
            ) from None
        return client.ApiClient()


def _api_error(e, what: str) -> HerdError:
    return HerdError(f"{what}: HTTP {e.status} {e.reason}: {(e.body or '').strip()[:300]}")


def apply(api, docs: list[dict]) -> list[str]:
    """Server-side apply each manifest, in order; returns `kind/name` of each."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    done = []
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        what = f"{kind.lower()}/{meta['name']}"
        if kind != "Namespace" and "namespace" not in meta:
            raise HerdError(f"{what}: no metadata.namespace; set `namespace:` in the kustomization")
        try:
            if kind in PLURALS:
                client.CustomObjectsApi(api).patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    meta["namespace"],
                    PLURALS[kind],
                    meta["name"],
                    doc,
                    field_manager=FIELD_MANAGER,
                    force=True,
                    _content_type=APPLY_PATCH,
                )
            elif kind in CORE:
                _apply_core(api, doc)
            else:
                raise HerdError(f"{what}: herd k8s apply does not know kind {kind}; use kubectl apply -k")
        except ApiException as e:
            raise _api_error(e, f"apply {what}") from None
        done.append(what)
    return done


def _apply_core(api, doc: dict) -> None:
    prefix, plural, namespaced = CORE[doc["kind"]]
    meta = doc["metadata"]
    ns = f"/namespaces/{meta['namespace']}" if namespaced else ""
    request = api.param_serialize(
        method="PATCH",
        resource_path=f"{prefix}{ns}/{plural}/{meta['name']}",
        query_params=[("fieldManager", FIELD_MANAGER), ("force", True)],
        header_params={"Content-Type": APPLY_PATCH, "Accept": "application/json"},
        body=doc,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*request)
    response.read()
    api.response_deserialize(response, {"200": "object", "201": "object"})


def rayjob_body(template: dict, config: str, name: str | None = None) -> dict:
    """A new RayJob from the rendered template: its cluster spec, a fresh name, and the
    lifecycle entrypoint on `config` (a path inside the image's project folder)."""
    body = copy.deepcopy(template)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    meta = body["metadata"]
    body["metadata"] = {k: meta[k] for k in ("namespace", "labels", "annotations") if k in meta}
    body["metadata"]["name"] = name or f"{meta['name']}-{stamp}"
    body.pop("status", None)
    # The template's own options (the gpu overlay's --overrides) stay; only the config changes.
    words = shlex.split(template["spec"]["entrypoint"])
    extra = words[words.index("--config") + 2 :] if "--config" in words else []
    body["spec"]["entrypoint"] = shlex.join(["python", "-m", LIFECYCLE_MODULE, "--config", config, *extra])
    return body


def promote_patch(rayservice: dict, model_uri: str, app: str = "herd", deployment: str = "HerdLLMServer") -> dict:
    """A JSON merge patch for `rayservice` whose serveConfigV2 pins the herd app's deployment to
    `model_uri` (its `user_config.model`). Only user_config changes, so Serve reconfigures the
    running replicas in place (services/rollout.py): no new cluster, no restarted replica."""
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    apps = [a for a in config.get("applications", []) if a.get("name") == app]
    if not apps:
        raise HerdError(f"rayservice/{rayservice['metadata']['name']}: no Serve application {app!r}")
    deps = [d for d in apps[0].setdefault("deployments", []) if d.get("name") == deployment]
    if not deps:
        deps = [{"name": deployment}]
        apps[0]["deployments"].append(deps[0])
    deps[0]["user_config"] = {**(deps[0].get("user_config") or {}), "model": model_uri}
    return {"spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)}}


def patch_rayservice(api, namespace: str, name: str, patch: dict) -> dict:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        return client.CustomObjectsApi(api).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURALS["RayService"],
            name,
            patch,
            field_manager=FIELD_MANAGER + "-promote",
            _content_type="application/merge-patch+json",
        )
    except ApiException as e:
        raise _api_error(e, f"patch rayservice/{name}") from None


def submit(api, body: dict) -> dict:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    meta = body["metadata"]
    try:
        return client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURALS["RayJob"], body
        )
    except ApiException as e:
        raise _api_error(e, f"submit rayjob/{meta['name']}") from None


@dataclass
class RayJobStatus:
    name: str
    jobStatus: str = ""
    jobDeploymentStatus: str = ""
    rayClusterName: str = ""
    dashboardURL: str = ""
    startTime: str = ""
    endTime: str = ""
    message: str = ""
    reason: str = ""
    jobId: str = ""

    @classmethod
    def from_object(cls, obj: dict) -> RayJobStatus:
        status = obj.get("status") or {}
        return cls(name=obj["metadata"]["name"], **{f: str(status.get(f, "")) for f in STATUS_FIELDS})

    @property
    def failed(self) -> bool:
        return self.jobStatus in FAILED_JOB or self.jobDeploymentStatus in FAILED_DEPLOYMENT

    def line(self) -> str:
        parts = [self.name, self.jobDeploymentStatus or "Pending", self.jobStatus or "-"]
        parts += [
            f"{k}={v}"
            for k, v in (
                ("cluster", self.rayClusterName),
                ("started", self.startTime),
                ("ended", self.endTime),
                ("reason", self.reason),
                ("message", self.message),
            )
            if v
        ]
        return "  ".join(parts)


def rayjob_statuses(api, namespace: str, name: str | None = None) -> list[RayJobStatus]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api)
    try:
        if name:
            objs = [custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS["RayJob"], name)]
        else:
            objs = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS["RayJob"])["items"]
    except ApiException as e:
        raise _api_error(e, f"rayjob {name or '(all)'} in namespace {namespace}") from None
    return [RayJobStatus.from_object(o) for o in objs]


def rayjob_logs(api, namespace: str, name: str, head: bool = False, tail: int | None = None) -> str:
    """The job's output as its submitter Pod streamed it, or the Ray head Pod's log."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    if head:
        cluster = rayjob_statuses(api, namespace, name)[0].rayClusterName
        if not cluster:
            raise HerdError(f"rayjob/{name} has no Ray cluster yet (or it was shut down)")
        selector, container = f"ray.io/cluster={cluster},ray.io/node-type=head", "ray-head"
    else:
        # KubeRay runs `ray job submit` in a Kubernetes Job named after the RayJob.
        selector, container = f"batch.kubernetes.io/job-name={name}", SUBMITTER_CONTAINER
    core = client.CoreV1Api(api)
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        if not pods:
            raise HerdError(f"rayjob/{name}: no Pod matches {selector} in namespace {namespace}")
        pod = max(pods, key=lambda p: str(p.metadata.creation_timestamp or ""))
        return core.read_namespaced_pod_log(pod.metadata.name, namespace, container=container, tail_lines=tail)
    except ApiException as e:
        raise _api_error(e, f"logs of rayjob/{name}") from None
