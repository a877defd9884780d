"""The lifecycle driver: load and plan, answer what is cached from MLflow, run the rest as one ray.dag."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.lifecycle.config import REPO, check_configs, config_hash, load_config
from flows.lifecycle.plan import Stage, forced_stages, plan_step, wiring
from flows.lifecycle.record import LifecycleRun, close_lifecycle_run, open_lifecycle_run
from flows.lifecycle.step import execute_step
from flows.ray_runtime import init_ray
from flows.tracking import absolute_tracking_uri
from model.errors import HerdError

# --- the driver ---------------------------------------------------------------------------------


@dataclass
class LifecycleResult:
    parent_run_id: str
    config_hash: str
    steps: dict[str, dict]  # stage -> result
    seconds: float
    used_ray: bool
    tracking_uri: str = ""
    local_ray: bool = False  # this process started its own Ray (its endpoint ends with the process)

    def summary_rows(self) -> list[list[str]]:
        rows = []
        for name, r in self.steps.items():
            m = r.get("metrics") or {}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(m.items())[:3])
            rows.append(
                [
                    name,
                    r["status"],
                    f"{r.get('seconds', 0):.1f}",
                    r["key"][:12],
                    (r.get("run_id") or "")[:12],
                    r.get("summary") or shown,
                ]
            )
        return rows


def run_lifecycle(
    config: str | Path | dict,
    *,
    stages: dict[str, Stage] | None = None,
    force: list[str] = (),
    overrides: dict | None = None,
    workdir: str | None = None,
    tracking_uri: str | None = None,
    log=print,
) -> LifecycleResult:
    """Plan, then run what is not cached as one ray.dag; returns every step's result."""
    from flows.tracking import git_sha

    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    stages = stages if stages is not None else default_stages()
    wires = wiring(cfg, stages)
    check_configs(cfg, stages, wires)
    forced = forced_stages(list(force), stages, wires)
    run = open_lifecycle_run(
        cfg,
        config_hash=config_hash(cfg),
        git_sha=git_sha(),
        workdir=str(Path(workdir or os.environ.get("HERD_RUN_DIR") or cfg["workdir"]).resolve()),
        tracking_uri=absolute_tracking_uri(tracking_uri or cfg["mlflow"]["tracking_uri"]),
        tags={"herd.force": ",".join(force), "herd.stages": ",".join(wires)},
    )
    log(
        f"lifecycle {run.name}: run {run.parent_run_id} (config {run.config_hash[:12]}, git {run.git_sha[:12]}); "
        f"stages: {' -> '.join(wires)}" + (f"; forced: {', '.join(sorted(forced))}" if forced else "")
    )

    # Plan on the driver: every step whose inputs are known and whose key has a valid result is
    # cached; the first one that is not (and everything after it) goes to Ray.
    results: dict[str, dict] = {}
    for name, slots in wires.items():
        if name in forced or any(u and u not in results for u in slots.values()):
            continue
        plan = plan_step(run, stages[name], cfg["stages"][name], slots, results)
        if plan.cached is None:
            continue
        results[name] = plan.cached
        log(f"  {name:<9} cached  (key {plan.key[:12]}, made by run {plan.cached_from[:12]})")

    todo = [n for n in wires if n not in results]
    used_ray = bool(todo)
    local_ray = False
    status = "FINISHED"
    try:
        if todo:
            local_ray = _execute_dag(cfg, stages, wires, todo, results, forced, run, log)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        close_lifecycle_run(run, results, status, time.perf_counter() - t0)
    return LifecycleResult(
        run.parent_run_id,
        run.config_hash,
        {n: results[n] for n in wires},
        time.perf_counter() - t0,
        used_ray,
        run.tracking_uri,
        local_ray,
    )


def ray_runtime_env() -> dict:
    """The lifecycle's job-level runtime env: this checkout on the workers' path, and quiet_worker."""
    pypath = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {"env_vars": {"PYTHONPATH": pypath}, "worker_process_setup_hook": "flows.lifecycle.run.quiet_worker"}


def quiet_worker() -> None:
    """Ray worker setup hook. The local Ray runs without the dashboard (it starts faster on 2 cores),
    so Ray Train's PlacementGroupCleaner cannot reach the State API and logs a warning every second
    of pretraining; it keeps monitoring regardless, so the warning is only noise."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _execute_dag(cfg, stages, wires, todo, results, forced, run: LifecycleRun, log) -> bool:
    """Run the steps in `todo` as one ray.dag; True when it started a local Ray for them."""
    import ray
    from ray.dag import MultiOutputNode

    started = False
    if not ray.is_initialized():
        address = cfg["ray"]["address"] or os.environ.get("RAY_ADDRESS") or None
        kwargs = {} if address else {"num_cpus": cfg["ray"]["num_cpus"] or None, "include_dashboard": False}
        log(f"starting Ray ({address or 'local'}) for: {', '.join(todo)}")
        init_ray(address=address, runtime_env=ray_runtime_env(), **kwargs)
        started = not address
    remote = ray.remote(max_retries=0)(execute_step)
    nodes: dict[str, Any] = {}
    for name in todo:
        res = dict(cfg["stages"][name]["resources"])
        opts = {k: res.pop(k) for k in ("num_cpus", "num_gpus", "memory") if k in res}
        if res:
            opts["resources"] = res
        ups = [nodes[u] if u in nodes else results[u] for u in dict.fromkeys(u for u in wires[name].values() if u)]
        nodes[name] = remote.options(name=f"herd-{name}", **opts).bind(
            stages[name], cfg["stages"][name], run, wires[name], name in forced, *ups
        )
    import warnings

    with warnings.catch_warnings():  # Ray 2.60 marks classic DAG execute() deprecated in favour of compiled graphs
        warnings.filterwarnings("ignore", message=r"DAGNode.execute\(\) is deprecated")
        refs = MultiOutputNode([nodes[n] for n in todo]).execute()
    pending = dict(zip(refs, todo))
    t0 = time.perf_counter()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=30)
        if not done:
            names = list(pending.values())
            log(
                f"  ... {names[0]} running"
                + (f", then {', '.join(names[1:])}" if names[1:] else "")
                + f" ({time.perf_counter() - t0:.0f}s)"
            )
            continue
        name = pending.pop(done[0])
        try:
            r = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            for other in list(pending):
                ray.cancel(other)
            raise HerdError(
                f"stage {name} failed: {type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}"
                "; rerun the same command to resume from it"
            ) from None
        results[name] = r
        log(f"  {name:<9} {r['status']:<7} {r['seconds']:.1f}s")
    return started


def default_stages() -> dict[str, Stage]:
    from flows.lifecycle.stages import STAGES

    return STAGES
