"""One lifecycle step as a Ray task: reuse its cached result, else run the stage inside its child run."""

from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path

from flows.lifecycle.config import canon, sha256_text
from flows.lifecycle.lineage import step_lineage
from flows.lifecycle.plan import Stage, StepContext, output_files, plan_step, tree_digest
from flows.lifecycle.record import TAG, LifecycleRun, child_run, finish_child_run
from flows.tracking import MAX_TAG_CHARS


def execute_step(
    stage: Stage, st_cfg: dict, run: LifecycleRun, slots: dict[str, str | None], force: bool, *upstream: dict
) -> dict:
    """Run one step: look its key up (unless forced), else run the stage inside its child run."""
    plan = plan_step(run, stage, st_cfg, slots, {r["stage"]: r for r in upstream}, force=force)
    key = plan.key
    if plan.cached is not None:
        print(f"[{stage.name}] cached (key {key[:12]}, from run {plan.cached_from})", flush=True)
        return plan.cached
    lineage = step_lineage(run, list(upstream))
    out_dir = Path(run.workdir) / "steps" / f"{stage.name}-{key[:16]}"
    if out_dir.exists() and not stage.resumable:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client, run_id = child_run(run, stage.name, key, "ran", plan.inputs)
    client.set_tag(run_id, f"{TAG}code_version", plan.code)
    client.set_tag(run_id, f"{TAG}out_dir", str(out_dir))
    client.log_dict(run_id, st_cfg["config"], "stage_config.yaml")
    ctx = StepContext(
        stage.name, key, st_cfg["config"], st_cfg["params"], plan.inputs, out_dir, run.seed, dict(lineage), run, run_id
    )
    print(f"[{stage.name}] running (key {key[:12]}, run {run_id})", flush=True)
    t0 = time.perf_counter()
    import mlflow

    from flows.tracking import setup_mlflow

    setup_mlflow(run.tracking_uri, run.experiment)
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
        canon(outputs) + (tree_digest([out_dir]) if any(out_dir.iterdir()) else "")
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
    finish_child_run(client, run_id, result)
    print(f"[{stage.name}] done in {result['seconds']:.1f}s (digest {digest[:12]})", flush=True)
    return result


def _metric(k, v):
    from mlflow.entities import Metric

    return Metric(k.replace(":", "."), float(v), int(time.time() * 1000), 0)
