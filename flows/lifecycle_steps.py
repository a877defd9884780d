"""One lifecycle step: its MLflow child run, the cache lookup by key, and running it (the Ray task).

A step's record is an MLflow child run of the lifecycle run, tagged `herd.step.*`; a finished one is
found again by its key (an MLflow search: MLflow is the cache's only store).
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

from flows.lifecycle_core import (
    LINEAGE,
    TAG,
    Stage,
    StepContext,
    _canon,
    code_version,
    sha256_text,
    step_key,
    tree_digest,
)
from flows.tracking import MAX_TAG_CHARS
from flows.tracking import client as mlflow_client

# --- MLflow records -----------------------------------------------------------------------------


def find_cached(lc: dict, key: str) -> dict | None:
    """The result of the newest finished step run with this key (a run that ran, not a replay)."""
    client = mlflow_client(lc["tracking_uri"])
    runs = client.search_runs(
        [lc["experiment_id"]],
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


def output_files(outputs: dict) -> dict[str, str]:
    """output name -> tree digest of the file or folder it names (outputs that are absolute
    paths): recorded with the step, checked again before its result is reused."""
    return {
        k: tree_digest([Path(v)])
        for k, v in outputs.items()
        if isinstance(v, str) and v.startswith("/") and Path(v).exists()
    }


def _outputs_intact(result: dict, log=print) -> bool:
    outputs = result.get("outputs") or {}
    for k, v in outputs.items():
        if isinstance(v, str) and (v.startswith("/") and not Path(v).exists()):
            log(f"[{result.get('stage')}] cached output {k} is gone ({v}): running it again")
            return False
    for k, digest in (result.get("files") or {}).items():
        if tree_digest([Path(outputs[k])]) != digest:
            log(
                f"[{result.get('stage')}] cached output {k} ({outputs[k]}) no longer matches its recorded "
                f"digest: running it again"
            )
            return False
    return True


def still_valid(stage: Stage, result: dict) -> bool:
    try:
        return _outputs_intact(result) and (stage.valid(result) if stage.valid else True)
    except Exception:  # a validity probe that fails means "run it again"
        return False


def _child_run(lc: dict, stage: str, key: str, status: str, inputs: dict):
    client = mlflow_client(lc["tracking_uri"])
    run = client.create_run(
        lc["experiment_id"],
        run_name=f"{stage}{' (cached)' if status == 'cached' else ''}",
        tags={
            "mlflow.parentRunId": lc["parent_run_id"],
            "herd.stage": stage,
            "herd.lifecycle": lc["name"],
            f"{TAG}key": key,
            f"{TAG}status": status,
            "herd.git_sha": lc["git_sha"],
            f"{TAG}inputs": _canon(
                {
                    s: (r and {"stage": r["stage"], "digest": r["digest"], "run_id": r["run_id"]})
                    for s, r in inputs.items()
                }
            )[:MAX_TAG_CHARS],
        },
    )
    return client, run.info.run_id


def _finish(client, run_id: str, result: dict, status: str = "FINISHED") -> None:
    outputs = _canon(result.get("outputs") or {})
    client.set_tag(run_id, f"{TAG}outputs", outputs[:MAX_TAG_CHARS])
    client.set_tag(run_id, f"{TAG}digest", result["digest"])
    client.set_tag(run_id, f"{TAG}seconds", f"{result['seconds']:.2f}")
    for k, v in (result.get("lineage") or {}).items():
        client.set_tag(run_id, LINEAGE + k, str(v)[:MAX_TAG_CHARS])
    text = _canon(result)
    if len(text) < MAX_TAG_CHARS:
        client.set_tag(run_id, f"{TAG}result", text)
    else:
        client.log_text(run_id, json.dumps(result, indent=1, default=str), "step_result.json")
    client.set_terminated(run_id, status)


def record_cached(lc: dict, stage: str, inputs: dict, cached: dict) -> dict:
    """A cached step is still one child run of this lifecycle: status 'cached', pointing at the run
    that made the result."""
    result = {**cached, "status": "cached", "cached_from": cached.get("run_id"), "seconds": 0.0}
    client, run_id = _child_run(lc, stage, cached["key"], "cached", inputs)
    client.set_tag(run_id, f"{TAG}cached_from", cached.get("run_id") or "")
    for k, v in (cached.get("metrics") or {}).items():
        client.log_metric(run_id, k, float(v))
    result["run_id"] = run_id
    _finish(client, run_id, {**result, "seconds": 0.0})
    result["run_id"] = cached.get("run_id")  # downstream sees the run that made it
    return result


# --- one step (a Ray task) ----------------------------------------------------------------------


def execute_step(
    stage: Stage, st_cfg: dict, lc: dict, slots: dict[str, str | None], force: bool, *upstream: dict
) -> dict:
    """Run one step: look its key up (unless forced), else run the stage inside its child run."""
    by_stage = {r["stage"]: r for r in upstream}
    inputs = {slot: by_stage.get(u) if u else None for slot, u in slots.items()}
    lineage = {}
    for r in upstream:
        lineage.update(r.get("lineage") or {})
    lineage.update({"config_hash": lc["config_hash"], "git_sha": lc["git_sha"], "parent_run_id": lc["parent_run_id"]})
    code = code_version(stage.code)
    key = step_key(stage.name, st_cfg["config"], st_cfg["params"], inputs, code, lc["seed"])
    if not force:
        cached = find_cached(lc, key)
        if cached is not None and still_valid(stage, cached):
            print(f"[{stage.name}] cached (key {key[:12]}, from run {cached.get('run_id')})", flush=True)
            return record_cached(lc, stage.name, inputs, cached)
    out_dir = Path(lc["workdir"]) / "steps" / f"{stage.name}-{key[:16]}"
    if out_dir.exists() and not stage.resumable:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client, run_id = _child_run(lc, stage.name, key, "ran", inputs)
    client.set_tag(run_id, f"{TAG}code_version", code)
    client.set_tag(run_id, f"{TAG}out_dir", str(out_dir))
    client.log_dict(run_id, st_cfg["config"], "stage_config.yaml")
    ctx = StepContext(
        stage.name, key, st_cfg["config"], st_cfg["params"], inputs, out_dir, lc["seed"], dict(lineage), {**lc}
    )
    ctx.lifecycle["step_run_id"] = run_id
    print(f"[{stage.name}] running (key {key[:12]}, run {run_id})", flush=True)
    t0 = time.perf_counter()
    import mlflow

    from flows.tracking import setup_mlflow

    setup_mlflow(lc["tracking_uri"], lc["experiment"])
    try:
        with mlflow.start_run(run_id=run_id):  # the stage's own logging lands in its step run
            got = stage.fn(ctx) or {}
    except BaseException as e:
        client.set_tag(run_id, "herd.error", f"{type(e).__name__}: {e}"[:5000])
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise
    outputs = got.get("outputs") or {}
    digest = got.get("digest") or sha256_text(
        _canon(outputs) + (tree_digest([out_dir]) if any(out_dir.iterdir()) else "")
    )
    lineage.update(got.get("lineage") or {})
    lineage[f"{stage.name}.run_id"] = run_id
    lineage[f"{stage.name}.digest"] = digest
    metrics = {k: float(v) for k, v in (got.get("metrics") or {}).items()}
    result = {
        "stage": stage.name,
        "key": key,
        "status": "ran",
        "run_id": run_id,
        "digest": digest,
        "outputs": outputs,
        "files": output_files(outputs),
        "metrics": metrics,
        "lineage": lineage,
        "seconds": round(time.perf_counter() - t0, 2),
        "summary": got.get("summary", ""),
    }
    if metrics:
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
    for k, v in (got.get("tags") or {}).items():
        client.set_tag(run_id, k, str(v)[:MAX_TAG_CHARS])
    _finish(client, run_id, result)
    print(f"[{stage.name}] done in {result['seconds']:.1f}s (digest {digest[:12]})", flush=True)
    return result


def _metric(k, v):
    from mlflow.entities import Metric

    return Metric(k.replace(":", "."), float(v), int(time.time() * 1000), 0)
