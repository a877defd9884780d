"""`kustomize build` in pure Python, for the subset of kustomize herd's manifests use.

Tests and `herd k8s render` then need no kubectl. A kustomization field outside the
subset is an error rather than being ignored, so this can never quietly render something
other than what `kubectl apply -k` would; tests compare both where kubectl is installed.
Subset: resources (files, folders), namespace, labels (metadata only), images,
configMapGenerator (files, no name hash), patches (JSON 6902), replacements (plain paths).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from model.errors import HerdError

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "configMapGenerator",
    "patches",
    "replacements",
}
# Resources used only while building (e.g. the Serve config's carrier); kustomize drops them.
LOCAL_CONFIG = "config.kubernetes.io/local-config"
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}


def build(path: str | Path) -> list[dict]:
    """Render the kustomization in `path` like `kubectl kustomize path`."""
    docs = _build(Path(path).resolve())
    return [d for d in docs if _meta(d).get("annotations", {}).get(LOCAL_CONFIG) != "true"]


def _build(root: Path) -> list[dict]:
    kfile = next((root / n for n in KUSTOMIZATION_NAMES if (root / n).is_file()), None)
    if kfile is None:
        raise HerdError(f"{root}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = sorted(set(k) - SUPPORTED)
    if unknown:
        raise HerdError(f"{kfile}: kustomize field(s) {', '.join(unknown)} not supported by herd's renderer")
    docs: list[dict] = []
    for entry in k.get("resources", []):
        target = root / entry
        if target.is_dir():
            docs += _build(target.resolve())
        else:
            docs += _load_docs(_inside(root, target, kfile))
    for gen in k.get("configMapGenerator", []):
        docs.append(_config_map(root, gen, kfile))
    for patch in k.get("patches", []):
        _apply_patch(root, docs, patch, kfile)
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                _meta(d)["namespace"] = k["namespace"]
    for label in k.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise HerdError(f"{kfile}: labels with includeSelectors/includeTemplates are not supported")
        for d in docs:
            _meta(d).setdefault("labels", {}).update(label["pairs"])
    for image in k.get("images", []):
        for d in docs:
            _set_images(d, image)
    for rep in k.get("replacements", []):
        _replace(docs, rep, kfile)
    return docs


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _inside(root: Path, path: Path, kfile: Path) -> Path:
    # kustomize's default load restriction: files only at or below the kustomization.
    real = path.resolve()
    if not real.is_relative_to(root):
        raise HerdError(f"{kfile}: {path} is not in or below {root}")
    return real


def _meta(doc: dict) -> dict:
    return doc.setdefault("metadata", {})


def _config_map(root: Path, gen: dict, kfile: Path) -> dict:
    opts = gen.get("options", {})
    if not opts.get("disableNameSuffixHash") or set(gen) - {"name", "files", "options"}:
        raise HerdError(
            f"{kfile}: configMapGenerator {gen.get('name')}: only files with "
            "options.disableNameSuffixHash: true are supported"
        )
    data = {}
    for spec in gen["files"]:
        key, _, rel = spec.rpartition("=")
        path = _inside(root, root / rel, kfile)
        data[key or path.name] = path.read_text()
    meta = {"name": gen["name"]}
    for field in ("annotations", "labels"):
        if field in opts:
            meta[field] = dict(opts[field])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _matches(doc: dict, select: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"kind": doc["kind"], "name": _meta(doc).get("name"), "group": group, "version": version}
    return all(have.get(key) == want for key, want in select.items())


def _apply_patch(root: Path, docs: list[dict], patch: dict, kfile: Path) -> None:
    text = _inside(root, root / patch["path"], kfile).read_text() if "path" in patch else patch["patch"]
    ops = yaml.safe_load(text)
    if not isinstance(ops, list) or "target" not in patch:
        raise HerdError(f"{kfile}: only JSON 6902 patches (an op list with a target) are supported")
    targets = [d for d in docs if _matches(d, patch["target"])]
    if not targets:
        raise HerdError(f"{kfile}: patch target {patch['target']} matches no resource")
    for doc in targets:
        for op in ops:
            _json_patch_op(doc, op, kfile)


def _json_patch_op(doc: dict, op: dict, kfile: Path) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif op["op"] not in ("add", "replace"):
            raise HerdError(f"{kfile}: JSON patch op {op['op']!r} is not supported")
        elif isinstance(node, list):
            value = copy.deepcopy(op["value"])
            if last == "-":
                node.append(value)
            elif op["op"] == "add":
                node.insert(int(last), value)
            else:
                node[int(last)] = value
        else:
            if op["op"] == "replace" and last not in node:
                raise KeyError(last)
            node[last] = copy.deepcopy(op["value"])
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise HerdError(
            f"{kfile}: JSON patch {op['op']} {op['path']} on {doc['kind']}/{_meta(doc).get('name')}: no such path ({e})"
        ) from None


def _set_images(node, image: dict) -> None:
    # Like kustomize: any `containers`/`initContainers` list, also inside custom resources.
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for c in value:
                if isinstance(c, dict) and "image" in c:
                    c["image"] = _new_image(c["image"], image)
        _set_images(value, image)


def _new_image(ref: str, image: dict) -> str:
    name, tag = ref.split("@")[0], ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return ref
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    tag = image.get("newTag", tag)
    return f"{name}:{tag}" if tag else name


def _field_path(path: str, kfile: Path) -> list[str]:
    if any(c in path for c in "[]\\"):
        raise HerdError(f"{kfile}: replacement fieldPath {path!r}: only plain dotted paths are supported")
    return path.split(".")


def _replace(docs: list[dict], rep: dict, kfile: Path) -> None:
    src = rep["source"]
    sources = [d for d in docs if _matches(d, {k: v for k, v in src.items() if k in ("kind", "name")})]
    if len(sources) != 1:
        raise HerdError(f"{kfile}: replacement source {src} matches {len(sources)} resources, not 1")
    value = sources[0]
    for part in _field_path(src["fieldPath"], kfile):
        value = value[part]
    for target in rep["targets"]:
        create = target.get("options", {}).get("create", False)
        for doc in (d for d in docs if _matches(d, target["select"])):
            for path in target["fieldPaths"]:
                *parents, last = _field_path(path, kfile)
                node = doc
                for part in parents:
                    if part not in node and not create:
                        raise HerdError(f"{kfile}: replacement target {path} not found in {doc['kind']}")
                    node = node.setdefault(part, {})
                if last not in node and not create:
                    raise HerdError(f"{kfile}: replacement target {path} not found in {doc['kind']}")
                node[last] = copy.deepcopy(value)
