"""The lifecycle: one Ray DAG from raw text to a live endpoint, cached, resumable, with lineage.

    herd run --config configs/default.yaml [--force STAGE ...]
    python -m flows.lifecycle --config configs/default.yaml      # what the KubeRay RayJob runs
    herd lineage models:/herd@champion

Stages (in order): data, pretrain, sft, rs, dpo, ppo, eval, register, promote, deploy. Each is
switched on or off in the config (`stages.<name>.enabled`) and runs as a Ray task with the
resources of `stages.<name>.resources`; the graph is built with `ray.dag` (`.bind()` and one
`.execute()`). A stage's inputs are named slots, each filled by the first enabled stage of a
preference list (SFT takes its model from pretrain, or the base model when pretraining is off).

Step caching. A step's key is sha256 of its stage name, its resolved stage config, the digests of
its input artifacts and its code version (sha256 of the source files the stage names). Every step
is an MLflow child run of one parent lifecycle run, tagged with `herd.step.key`, its inputs and
outputs. A finished step is found again by its key (an MLflow search, no other database); it is a
hit when its outputs are still valid (files there, model version there, endpoint answering). The
driver plans the hits before starting Ray: a rerun of the same config is answered from MLflow
without starting Ray at all. A failed or killed step has no finished run, so the next run resumes
at that step (pretraining also resumes from its last checkpoint: a step's folder is named by its
key). `--force STAGE` reruns that stage and every stage downstream of it.

Lineage. Each step's result carries the lineage of its inputs plus what it adds (data prep: the
raw-input sha256 and the packed-data manifest digest); the register and deploy steps write it as
tags `herd.lineage.*` with the lifecycle's config hash, git sha and parent run id.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.lifecycle_core import (
    REPO,
    Stage,
    check_configs,
    code_version,
    config_hash,
    downstream,
    load_config,
    step_key,
    wiring,
)
from flows.lifecycle_steps import execute_step, find_cached, record_cached, still_valid
from flows.ray_runtime import init_ray
from flows.tracking import absolute_tracking_uri, ensure_experiment
from flows.tracking import client as mlflow_client
from model.errors import HerdError

__all__ = [
    "REPO",
    "LifecycleResult",
    "Stage",
    "check_configs",
    "code_version",
    "config_hash",
    "default_stages",
    "downstream",
    "execute_step",
    "find_cached",
    "init_ray",
    "load_config",
    "quiet_worker",
    "ray_runtime_env",
    "record_cached",
    "run_lifecycle",
    "step_key",
    "still_valid",
    "wiring",
]


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
    unknown = [f for f in force if f not in stages]
    if unknown:
        raise HerdError(f"--force {', '.join(unknown)}: no such stage (known: {', '.join(stages)})")
    not_on = [f for f in force if f not in wires]
    if not_on:
        raise HerdError(f"--force {', '.join(not_on)}: stage is not enabled in this config")
    forced = downstream(wires, set(force))
    chash = config_hash(cfg)
    lc = {
        "name": cfg["name"],
        "seed": cfg["seed"],
        "config_hash": chash,
        "git_sha": git_sha(),
        "workdir": str(Path(workdir or os.environ.get("HERD_RUN_DIR") or cfg["workdir"]).resolve()),
        "base_model": cfg["base_model"],
        "experiment": cfg["mlflow"]["experiment"] or "herd",
        "tracking_uri": absolute_tracking_uri(tracking_uri or cfg["mlflow"]["tracking_uri"]),
    }
    Path(lc["workdir"]).mkdir(parents=True, exist_ok=True)
    lc["experiment_id"] = ensure_experiment(lc["tracking_uri"], lc["experiment"])
    client = mlflow_client(lc["tracking_uri"])
    parent = client.create_run(
        lc["experiment_id"],
        run_name=f"lifecycle-{cfg['name']}",
        tags={
            "herd.stage": "lifecycle",
            "herd.lifecycle": cfg["name"],
            "herd.config_hash": chash,
            "herd.git_sha": lc["git_sha"],
            "herd.force": ",".join(force),
            "herd.stages": ",".join(wires),
        },
    )
    lc["parent_run_id"] = parent.info.run_id
    client.log_dict(lc["parent_run_id"], cfg, "lifecycle_config.yaml")
    base_lineage = {"config_hash": chash, "git_sha": lc["git_sha"], "parent_run_id": lc["parent_run_id"]}
    log(
        f"lifecycle {cfg['name']}: run {lc['parent_run_id']} (config {chash[:12]}, git {lc['git_sha'][:12]}); "
        f"stages: {' -> '.join(wires)}" + (f"; forced: {', '.join(sorted(forced))}" if forced else "")
    )

    # Plan on the driver: every step whose inputs are known and whose key has a valid result is
    # cached; the first one that is not (and everything after it) goes to Ray.
    results: dict[str, dict] = {}
    for name, slots in wires.items():
        if name in forced or any(u and u not in results for u in slots.values()):
            continue
        inputs = {s: (results[u] if u else None) for s, u in slots.items()}
        st = stages[name]
        key = step_key(
            name,
            cfg["stages"][name]["config"],
            cfg["stages"][name]["params"],
            inputs,
            code_version(st.code),
            cfg["seed"],
        )
        cached = find_cached(lc, key)
        if cached is None or not still_valid(st, cached):
            continue
        results[name] = record_cached(lc, name, inputs, cached)
        log(f"  {name:<9} cached  (key {key[:12]}, made by run {cached['run_id'][:12]})")
    for r in results.values():
        r["lineage"] = {**r.get("lineage", {}), **base_lineage}

    todo = [n for n in wires if n not in results]
    used_ray = bool(todo)
    local_ray = False
    status = "FINISHED"
    try:
        if todo:
            local_ray = _execute_dag(cfg, stages, wires, todo, results, forced, lc, log)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        for name, r in results.items():
            client.set_tag(
                lc["parent_run_id"], f"herd.step.{name}", f"{r['status']} {r['key'][:12]} {r.get('run_id') or ''}"
            )
        if status == "FINISHED":
            ran = sum(r["status"] == "ran" for r in results.values())
            client.log_metric(lc["parent_run_id"], "steps_ran", ran)
            client.log_metric(lc["parent_run_id"], "steps_cached", len(results) - ran)
            client.log_metric(lc["parent_run_id"], "seconds", time.perf_counter() - t0)
        client.set_terminated(lc["parent_run_id"], status)
    return LifecycleResult(
        lc["parent_run_id"],
        chash,
        {n: results[n] for n in wires},
        time.perf_counter() - t0,
        used_ray,
        lc["tracking_uri"],
        local_ray,
    )


def ray_runtime_env() -> dict:
    """The lifecycle's job-level runtime env: this checkout on the workers' path, and quiet_worker."""
    pypath = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {"env_vars": {"PYTHONPATH": pypath}, "worker_process_setup_hook": "flows.lifecycle.quiet_worker"}


def quiet_worker() -> None:
    """Ray worker setup hook. The local Ray runs without the dashboard (it starts faster on 2 cores),
    so Ray Train's PlacementGroupCleaner cannot reach the State API and logs a warning every second
    of pretraining; it keeps monitoring regardless, so the warning is only noise."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _execute_dag(cfg, stages, wires, todo, results, forced, lc, log) -> bool:
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
    base_lineage = {"config_hash": lc["config_hash"], "git_sha": lc["git_sha"], "parent_run_id": lc["parent_run_id"]}
    remote = ray.remote(max_retries=0)(execute_step)
    nodes: dict[str, Any] = {}
    for name in todo:
        res = dict(cfg["stages"][name]["resources"])
        opts = {k: res.pop(k) for k in ("num_cpus", "num_gpus", "memory") if k in res}
        if res:
            opts["resources"] = res
        ups = [nodes[u] if u in nodes else results[u] for u in dict.fromkeys(u for u in wires[name].values() if u)]
        nodes[name] = remote.options(name=f"herd-{name}", **opts).bind(
            stages[name], cfg["stages"][name], lc, wires[name], name in forced, *ups
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
        r["lineage"] = {**r.get("lineage", {}), **base_lineage}
        results[name] = r
        log(f"  {name:<9} {r['status']:<7} {r['seconds']:.1f}s")
    return started


def default_stages() -> dict[str, Stage]:
    from flows import lifecycle_stages

    return lifecycle_stages.STAGES
