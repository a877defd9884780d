"""`herd k8s render|apply|submit|promote|status|logs`: herd's lifecycle and endpoint on KubeRay.

render and apply build an overlay of infra/k8s with herd's own kustomize renderer and
refuse manifests that fail schema validation; submit, status and logs work on RayJobs;
promote points the RayService's endpoint at a model version without a new cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from model.errors import HerdError

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = REPO / "infra" / "k8s" / "overlays"
DEFAULT_OVERLAY = "cpu-dev"
DEFAULT_NAMESPACE = "herd"
# Apply order: what others refer to comes first.
KIND_ORDER = [
    "Namespace",
    "NetworkPolicy",
    "Secret",
    "ConfigMap",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "Service",
    "StatefulSet",
    "Deployment",
    "RayCluster",
    "RayJob",
    "RayService",
]


def register(subparsers) -> None:
    k8s = subparsers.add_parser("k8s", help="render, validate and run herd on a KubeRay cluster")
    sub = k8s.add_subparsers(dest="k8s_command", required=True)

    def overlay_args(p):
        p.add_argument(
            "--overlay",
            default=DEFAULT_OVERLAY,
            help=f"cpu-dev, gpu, or a kustomization folder (default {DEFAULT_OVERLAY})",
        )
        p.add_argument(
            "--crds",
            type=Path,
            help="folder of KubeRay CRD YAML to validate against "
            "(default $HERD_KUBERAY_CRDS or ../shared/k8s/kuberay-crds)",
        )

    def cluster_args(p, namespace=True):
        p.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
        p.add_argument("--context", help="kubeconfig context")
        if namespace:
            p.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)

    p = sub.add_parser("render", help="print the overlay's manifests, validated")
    overlay_args(p)
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("apply", help="validate, then server-side apply the overlay")
    overlay_args(p)
    cluster_args(p, namespace=False)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("submit", help="start a lifecycle run as a new RayJob")
    overlay_args(p)
    cluster_args(p, namespace=False)
    p.add_argument(
        "--config",
        default="configs/default.yaml",
        help="lifecycle config, relative to the project (it runs from the image's copy)",
    )
    p.add_argument("--name", help="RayJob name (default herd-lifecycle-<UTC time>)")
    p.add_argument("--dry-run", action="store_true", help="print the RayJob instead of creating it")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("promote", help="point the RayService's endpoint at a model version, in place")
    overlay_args(p)
    cluster_args(p, namespace=False)
    p.add_argument(
        "--model",
        default="models:/herd@champion",
        help="models:/NAME/VERSION, or an alias resolved in MLflow now (default models:/herd@champion)",
    )
    p.add_argument("--tracking-uri", help="MLflow, to resolve an alias (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--name", default="herd-serve", help="the RayService (default herd-serve)")
    p.add_argument("--dry-run", action="store_true", help="print the patch instead of sending it")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("status", help="RayJob status; exit 1 if a job failed")
    p.add_argument("name", nargs="?", help="a RayJob (default: all in the namespace)")
    cluster_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a RayJob's output (its submitter Pod) or its Ray head's log")
    p.add_argument("name")
    p.add_argument("--head", action="store_true", help="the Ray head Pod's log instead")
    p.add_argument("--tail", type=int, help="only the last N lines")
    cluster_args(p)
    p.set_defaults(func=cmd_logs)


def overlay_dir(overlay: str) -> Path:
    path = OVERLAYS / overlay if (OVERLAYS / overlay).is_dir() else Path(overlay)
    if not path.is_dir():
        raise HerdError(f"--overlay {overlay}: no such overlay or folder")
    return path


def rendered(args) -> list[dict]:
    """The overlay's manifests in apply order, after schema validation (errors abort)."""
    from infra import kustomize, validate

    docs = kustomize.build(overlay_dir(args.overlay))
    crd_dir = args.crds or validate.default_crd_dir()
    if args.crds and not (args.crds / validate.CRD_FILES["RayJob"]).is_file():
        raise HerdError(f"--crds {args.crds}: no {validate.CRD_FILES['RayJob']} there")
    if crd_dir is None:
        print(
            "herd: note: KubeRay CRD schemas not found; RayCluster/RayJob/RayService checked "
            "only for their Serve config (set $HERD_KUBERAY_CRDS or --crds)",
            file=sys.stderr,
        )
    errors = validate.validate_all(docs, crd_dir)
    if errors:
        raise HerdError(f"{len(errors)} schema error(s) in {args.overlay}:\n  " + "\n  ".join(errors))
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(docs, key=lambda d: order.get(d["kind"], len(order)))


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML) as readable `|` blocks."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def to_yaml(docs: list[dict]) -> str:
    return yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, explicit_start=True, allow_unicode=True)


def cmd_render(args) -> int:
    docs = rendered(args)
    text = to_yaml(docs)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    print(f"herd: {len(docs)} manifests from {args.overlay}, 0 schema errors", file=sys.stderr)
    return 0


def cmd_apply(args) -> int:
    from infra import k8s_api

    docs = rendered(args)
    for what in k8s_api.apply(k8s_api.api_client(args.kubeconfig, args.context), docs):
        print(f"{what} applied")
    return 0


def cmd_submit(args) -> int:
    from infra import k8s_api, validate

    if not (REPO / args.config).is_file():
        raise HerdError(f"--config {args.config}: no such file in the project (the image runs its copy)")
    template = next((d for d in rendered(args) if d["kind"] == "RayJob"), None)
    if template is None:
        raise HerdError(f"--overlay {args.overlay}: renders no RayJob to submit")
    body = k8s_api.rayjob_body(template, args.config, args.name)
    errors = validate.manifest_errors(body, args.crds or validate.default_crd_dir())
    if errors:
        raise HerdError("RayJob does not validate:\n  " + "\n  ".join(errors))
    if args.dry_run:
        sys.stdout.write(to_yaml([body]))
        return 0
    created = k8s_api.submit(k8s_api.api_client(args.kubeconfig, args.context), body)
    meta = created["metadata"]
    print(
        f"rayjob/{meta['name']} created in namespace {meta['namespace']}; "
        f"follow it with: herd k8s status {meta['name']} -n {meta['namespace']}"
    )
    return 0


def cmd_promote(args) -> int:
    """Patch the RayService's serveConfigV2 so its replicas serve one pinned version. The patched
    object is validated as strictly as `apply` validates the overlay, before anything is sent."""
    from infra import k8s_api, kustomize, validate
    from services.rollout import pin

    if not args.model.startswith("models:/"):
        raise HerdError(f"--model {args.model}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    pinned = pin(args.model, args.tracking_uri)
    services = [
        d
        for d in kustomize.build(overlay_dir(args.overlay))
        if d["kind"] == "RayService" and d["metadata"]["name"] == args.name
    ]
    if not services:
        raise HerdError(f"--overlay {args.overlay}: renders no RayService {args.name}")
    service = services[0]
    patch = k8s_api.promote_patch(service, pinned.uri)
    patched = {**service, "spec": {**service["spec"], **patch["spec"]}}
    errors = validate.manifest_errors(patched, args.crds or validate.default_crd_dir())
    if errors:
        raise HerdError("the patched RayService does not validate:\n  " + "\n  ".join(errors))
    if args.dry_run:
        sys.stdout.write(to_yaml([patch]))
        return 0
    namespace = service["metadata"]["namespace"]
    k8s_api.patch_rayservice(k8s_api.api_client(args.kubeconfig, args.context), namespace, args.name, patch)
    print(
        f"rayservice/{args.name} in namespace {namespace} now serves {pinned.uri} ({pinned.label}); "
        "KubeRay reconfigures its replicas in place"
    )
    return 0


def cmd_status(args) -> int:
    from infra import k8s_api

    statuses = k8s_api.rayjob_statuses(k8s_api.api_client(args.kubeconfig, args.context), args.namespace, args.name)
    if not statuses:
        print(f"no RayJobs in namespace {args.namespace}")
    for s in statuses:
        print(s.line())
    return 1 if any(s.failed for s in statuses) else 0


def cmd_logs(args) -> int:
    from infra import k8s_api

    text = k8s_api.rayjob_logs(
        k8s_api.api_client(args.kubeconfig, args.context), args.namespace, args.name, head=args.head, tail=args.tail
    )
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0
