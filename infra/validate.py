"""Offline validation of rendered manifests, as strict as the API server's.

- KubeRay kinds: the CRDs' own OpenAPI v3 schemas (ray.io/v1). The API server rejects
  unknown fields under `kubectl apply --validate=strict`, so unknown fields fail here too.
- Core kinds: `kubernetes-validate`'s strict schemas for KUBERNETES_VERSION.
- RayService serveConfigV2: Ray Serve's ServeDeploySchema, plus the checks Ray only
  makes at deploy time (autoscaling_config's types, unknown keys).
Each error reads `Kind/name: field.path[0].leaf: message`.
"""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path

import jsonschema
import yaml

# The oldest Kubernetes herd supports; newer API servers accept these manifests too.
KUBERNETES_VERSION = "1.30"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
REPO = Path(__file__).resolve().parents[1]


def default_crd_dir() -> Path | None:
    """$HERD_KUBERAY_CRDS, else the project's shared/k8s/kuberay-crds beside the repo."""
    env = os.environ.get("HERD_KUBERAY_CRDS")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "k8s" / "kuberay-crds"]
    return next((p for p in candidates if (p / CRD_FILES["RayJob"]).is_file()), None)


def field_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def strict(schema: dict) -> dict:
    """A copy that rejects fields the schema does not list, like server-side field validation."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key in ("properties", "patternProperties"):
                stack.extend(value.values())
            elif isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, list):
                stack.extend(value)
    return schema


@cache
def crd_schema(crd_dir: Path, kind: str) -> dict:
    """The ray.io/v1 openAPIV3Schema of `kind`, strict."""
    # The C loader where PyYAML has it: the CRDs are megabytes of YAML.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((crd_dir / CRD_FILES[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


def crd_errors(doc: dict, crd_dir: Path) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(crd_dir, doc["kind"]))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{field_path(e.absolute_path)}: {e.message}" for e in errors]


def core_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{field_path(e.path)}: {e.message}"]
    except kubernetes_validate.utils.SchemaNotFoundError as e:
        return [e.message]
    return []


def serve_config_errors(text: str) -> list[str]:
    """Errors in a Ray Serve config (the file `serve deploy` takes), as `path: message`."""
    import pydantic
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"(root): not YAML: {e}"]
    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as e:
        return [f"{field_path(err['loc'])}: {err['msg']}" for err in e.errors()]
    # Serve ignores unknown keys and checks autoscaling_config only when deploying.
    errors = []

    def unknown(node, model, loc):
        names = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        errors.extend(f"{field_path(loc + [k])}: unknown field for {model.__name__}" for k in node if k not in names)

    unknown(config, ServeDeploySchema, [])
    for i, app in enumerate(config["applications"]):
        unknown(app, ServeApplicationSchema, ["applications", i])
        for j, dep in enumerate(app.get("deployments", [])):
            loc = ["applications", i, "deployments", j]
            unknown(dep, DeploymentSchema, loc)
            unknown(dep.get("ray_actor_options") or {}, RayActorOptionsSchema, loc + ["ray_actor_options"])
            if dep.get("autoscaling_config"):
                unknown(dep["autoscaling_config"], AutoscalingConfig, loc + ["autoscaling_config"])
                try:
                    AutoscalingConfig.model_validate(dep["autoscaling_config"])
                except pydantic.ValidationError as e:
                    errors += [
                        f"{field_path(loc + ['autoscaling_config', *err['loc']])}: {err['msg']}" for err in e.errors()
                    ]
    return errors


def is_kuberay(doc: dict) -> bool:
    return doc.get("kind") in CRD_FILES and doc.get("apiVersion") == "ray.io/v1"


def manifest_errors(doc: dict, crd_dir: Path | None) -> list[str]:
    """Every schema error in one manifest, each prefixed with Kind/name.
    With no crd_dir, KubeRay kinds get only the Serve config check (callers say so)."""
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    if is_kuberay(doc):
        errors = crd_errors(doc, crd_dir) if crd_dir else []
        if doc["kind"] == "RayService" and "serveConfigV2" in doc.get("spec", {}):
            errors += [f"spec.serveConfigV2: {e}" for e in serve_config_errors(doc["spec"]["serveConfigV2"])]
    else:
        errors = core_errors(doc)
    return [f"{name}: {e}" for e in errors]


def validate_all(docs: list[dict], crd_dir: Path | None) -> list[str]:
    return [e for doc in docs for e in manifest_errors(doc, crd_dir)]
