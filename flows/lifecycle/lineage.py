"""Lineage: the tags a registered version and a deployment carry, and the chain read back from a model
version to the raw data (`herd lineage` prints it: flows/lifecycle/cli.py).

What a step's lineage holds is built in one place each: the lifecycle run's part is
LifecycleRun.lineage, a step's is `step_lineage` (its inputs' lineage plus the run's)."""

from __future__ import annotations

from flows.lifecycle.config import STAGE_ORDER, canon
from flows.lifecycle.plan import StepContext
from flows.lifecycle.record import LINEAGE, TAG, LifecycleRun
from flows.tracking import MAX_TAG_CHARS, absolute_tracking_uri
from flows.tracking import client as mlflow_client
from model.errors import HerdError

LINEAGE_KEYS = ("data.input_sha256", "data.manifest_digest", "config_hash", "git_sha", "parent_run_id")


def step_lineage(run: LifecycleRun, upstream: list[dict]) -> dict:
    """A step's lineage before it runs: what its inputs carry, then the lifecycle run's."""
    lineage = {}
    for r in upstream:
        lineage.update(r.get("lineage") or {})
    lineage.update(run.lineage)
    return lineage


def lineage_tags(ctx: StepContext) -> dict[str, str]:
    """The tags a registered model version or a deployment carries: the raw-data and manifest
    digests from data prep, the lifecycle's config hash, git sha and parent run id, and the run of
    every step that led here."""
    tags = {LINEAGE + k: str(ctx.lineage[k]) for k in LINEAGE_KEYS if ctx.lineage.get(k)}
    tags[LINEAGE + "steps"] = canon({k[: -len(".run_id")]: v for k, v in ctx.lineage.items() if k.endswith(".run_id")})[
        :MAX_TAG_CHARS
    ]
    tags[LINEAGE + "step_run_id"] = ctx.run_id
    return tags


def tag_model_version(ctx: StepContext, name: str, version) -> None:
    client = mlflow_client(ctx.lifecycle.tracking_uri)
    for k, v in lineage_tags(ctx).items():
        client.set_model_version_tag(name, str(version), k, v)


def lineage_chain(uri: str, tracking_uri: str | None = None) -> list[dict]:
    """From a models:/ URI (or a run id) back to the raw data: the registered version, then every
    step of the lifecycle run that made it, newest first."""
    uri_t = absolute_tracking_uri(tracking_uri)
    client = mlflow_client(uri_t)
    chain = []
    if uri.startswith("models:/"):
        from flows.eval.registry import get_version

        mv = get_version(uri, uri_t)
        tags = mv.tags or {}
        parent = tags.get(LINEAGE + "parent_run_id")
        chain.append(
            {
                "what": f"{uri} = version {mv.version}",
                "run_id": mv.run_id,
                "tags": {k: v for k, v in tags.items() if k.startswith(LINEAGE) and k != LINEAGE + "steps"},
            }
        )
        if not parent:
            raise HerdError(f"{uri}: version {mv.version} has no {LINEAGE}parent_run_id (not made by herd run)")
    else:
        run = client.get_run(uri)
        parent = run.data.tags.get("mlflow.parentRunId") or uri
    prun = client.get_run(parent)
    chain.append(
        {
            "what": f"lifecycle run {parent}",
            "run_id": parent,
            "tags": {
                k: v for k, v in prun.data.tags.items() if k in ("herd.config_hash", "herd.git_sha", "herd.lifecycle")
            },
        }
    )
    children = client.search_runs([prun.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_stage = {r.data.tags.get("herd.stage"): r for r in children}
    for name in reversed(STAGE_ORDER + sorted(set(by_stage) - set(STAGE_ORDER) - {None})):
        r = by_stage.get(name)
        if r is None:
            continue
        t = r.data.tags
        entry = {
            "what": f"{name} step ({t.get(TAG + 'status')})",
            "run_id": r.info.run_id,
            "tags": {"key": t.get(TAG + "key", "")[:16], "digest": t.get(TAG + "digest", "")[:16]},
        }
        if t.get(TAG + "cached_from"):
            entry["tags"]["made_by_run"] = t[TAG + "cached_from"]
        for k in ("data.input_sha256", "data.manifest_digest"):
            if name == "data" and t.get(LINEAGE + k):
                entry["tags"][k] = t[LINEAGE + k]
        chain.append(entry)
    return chain
