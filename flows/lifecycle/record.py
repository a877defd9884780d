"""The lifecycle's MLflow records: the parent run (its identity is a LifecycleRun), one child run per
step tagged `herd.step.*`, and the cache lookup by key (an MLflow search: MLflow is the cache's only
store).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flows.lifecycle.config import canon
from flows.tracking import MAX_TAG_CHARS, ensure_experiment
from flows.tracking import client as mlflow_client

TAG = "herd.step."
LINEAGE = "herd.lineage."


@dataclass(frozen=True)
class LifecycleRun:
    """One lifecycle run as every step sees it: the config's identity and the parent MLflow run."""

    name: str
    seed: int
    config_hash: str
    git_sha: str
    workdir: str  # absolute; step folders go under it
    base_model: str
    experiment: str
    experiment_id: str
    tracking_uri: str  # absolute, so a Ray worker in another folder reaches the same store
    parent_run_id: str

    @property
    def lineage(self) -> dict[str, str]:
        """What every step's lineage carries from the run that made (or reused) it."""
        return {"config_hash": self.config_hash, "git_sha": self.git_sha, "parent_run_id": self.parent_run_id}


def open_lifecycle_run(
    cfg: dict, *, config_hash: str, git_sha: str, workdir: str, tracking_uri: str, tags: dict[str, str]
) -> LifecycleRun:
    """Create the parent run (the resolved config is its artifact) in the config's experiment."""
    experiment = cfg["mlflow"]["experiment"] or "herd"
    Path(workdir).mkdir(parents=True, exist_ok=True)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    client = mlflow_client(tracking_uri)
    parent = client.create_run(
        experiment_id,
        run_name=f"lifecycle-{cfg['name']}",
        tags={
            "herd.stage": "lifecycle",
            "herd.lifecycle": cfg["name"],
            "herd.config_hash": config_hash,
            "herd.git_sha": git_sha,
            **tags,
        },
    )
    client.log_dict(parent.info.run_id, cfg, "lifecycle_config.yaml")
    return LifecycleRun(
        name=cfg["name"],
        seed=cfg["seed"],
        config_hash=config_hash,
        git_sha=git_sha,
        workdir=workdir,
        base_model=cfg["base_model"],
        experiment=experiment,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        parent_run_id=parent.info.run_id,
    )


def close_lifecycle_run(run: LifecycleRun, results: dict[str, dict], status: str, seconds: float) -> None:
    """Tag the parent run with each step's status, key and run; on success log the counts."""
    client = mlflow_client(run.tracking_uri)
    for name, r in results.items():
        client.set_tag(run.parent_run_id, f"{TAG}{name}", f"{r['status']} {r['key'][:12]} {r.get('run_id') or ''}")
    if status == "FINISHED":
        ran = sum(r["status"] == "ran" for r in results.values())
        client.log_metric(run.parent_run_id, "steps_ran", ran)
        client.log_metric(run.parent_run_id, "steps_cached", len(results) - ran)
        client.log_metric(run.parent_run_id, "seconds", seconds)
    client.set_terminated(run.parent_run_id, status)


def find_cached(run: LifecycleRun, key: str) -> dict | None:
    """The result of the newest finished step run with this key (a run that ran, not a replay)."""
    client = mlflow_client(run.tracking_uri)
    runs = client.search_runs(
        [run.experiment_id],
        f"tags.`{TAG}key` = '{key}' and tags.`{TAG}status` = 'ran' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    result = json.loads(runs[0].data.tags.get(f"{TAG}result", "null") or "null")
    if result is None:
        # long results do not fit a tag; they are an artifact
        path = client.download_artifacts(runs[0].info.run_id, "step_result.json")
        result = json.loads(Path(path).read_text())
    return result


def child_run(run: LifecycleRun, stage: str, key: str, status: str, inputs: dict):
    """A step's child run of the lifecycle run; returns (client, its run id)."""
    client = mlflow_client(run.tracking_uri)
    child = client.create_run(
        run.experiment_id,
        run_name=f"{stage}{' (cached)' if status == 'cached' else ''}",
        tags={
            "mlflow.parentRunId": run.parent_run_id,
            "herd.stage": stage,
            "herd.lifecycle": run.name,
            f"{TAG}key": key,
            f"{TAG}status": status,
            "herd.git_sha": run.git_sha,
            f"{TAG}inputs": canon(
                {
                    s: (r and {"stage": r["stage"], "digest": r["digest"], "run_id": r["run_id"]})
                    for s, r in inputs.items()
                }
            )[:MAX_TAG_CHARS],
        },
    )
    return client, child.info.run_id


def finish_child_run(client, run_id: str, result: dict, status: str = "FINISHED") -> None:
    outputs = canon(result.get("outputs") or {})
    client.set_tag(run_id, f"{TAG}outputs", outputs[:MAX_TAG_CHARS])
    client.set_tag(run_id, f"{TAG}digest", result["digest"])
    client.set_tag(run_id, f"{TAG}seconds", f"{result['seconds']:.2f}")
    for k, v in (result.get("lineage") or {}).items():
        client.set_tag(run_id, LINEAGE + k, str(v)[:MAX_TAG_CHARS])
    text = canon(result)
    if len(text) < MAX_TAG_CHARS:
        client.set_tag(run_id, f"{TAG}result", text)
    else:
        client.log_text(run_id, json.dumps(result, indent=1, default=str), "step_result.json")
    client.set_terminated(run_id, status)


def record_cached(run: LifecycleRun, stage: str, inputs: dict, cached: dict) -> dict:
    """A cached step is still one child run of this lifecycle: status 'cached', pointing at the run
    that made the result."""
    result = {**cached, "status": "cached", "cached_from": cached.get("run_id"), "seconds": 0.0}
    client, run_id = child_run(run, stage, cached["key"], "cached", inputs)
    client.set_tag(run_id, f"{TAG}cached_from", cached.get("run_id") or "")
    for k, v in (cached.get("metrics") or {}).items():
        client.log_metric(run_id, k, float(v))
    result["run_id"] = run_id
    finish_child_run(client, run_id, {**result, "seconds": 0.0})
    result["run_id"] = cached.get("run_id")  # downstream sees the run that made it
    return result
