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
from flows.progress import Follower, link_ray_logs, ray_log_options, run_captured, run_logs, step_log
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
    events=None,
    stream_logs: bool = False,
) -> LifecycleResult:
    """Plan, then run what is not cached as one ray.dag; returns every step's result.

    `log(text)` gets the run's own messages; `events(dict)` the steps' progress (see `text_events`,
    the default, for the events); each step's output goes to its log file under
    `flows.progress.run_logs`, unless `stream_logs` leaves it to Ray to forward to this console."""
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
    events = events or text_events(log)
    log(
        f"lifecycle {run.name}: run {run.parent_run_id} (config {run.config_hash[:12]}, git {run.git_sha[:12]}); "
        f"stages: {' -> '.join(wires)}" + (f"; forced: {', '.join(sorted(forced))}" if forced else "")
    )
    events({"event": "plan", "stages": list(wires)})

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
        events({"event": "cached", "step": name, "key": plan.key, "from": plan.cached_from})

    todo = [n for n in wires if n not in results]
    used_ray = bool(todo)
    local_ray = False
    status = "FINISHED"
    try:
        if todo:
            logs = run_logs(run.workdir, run.parent_run_id)
            local_ray = _execute_dag(cfg, stages, wires, todo, results, forced, run, log, events, logs, stream_logs)
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


def _execute_dag(cfg, stages, wires, todo, results, forced, run: LifecycleRun, log, events, logs, stream) -> bool:
    """Run the steps in `todo` as one ray.dag; True when it started a local Ray for them."""
    import ray
    from ray.dag import MultiOutputNode

    started = False
    if not ray.is_initialized():
        address = cfg["ray"]["address"] or os.environ.get("RAY_ADDRESS") or None
        kwargs = {} if address else {"num_cpus": cfg["ray"]["num_cpus"] or None, "include_dashboard": False}
        log(f"starting Ray ({address or 'local'}) for: {', '.join(todo)}; logs: {_shown(logs)}")
        init_ray(address=address, runtime_env=ray_runtime_env(), **kwargs, **ray_log_options(stream))
        started = not address
    link_ray_logs(logs)
    remote = ray.remote(max_retries=0)(run_captured)
    nodes: dict[str, Any] = {}
    for name in todo:
        res = dict(cfg["stages"][name]["resources"])
        opts = {k: res.pop(k) for k in ("num_cpus", "num_gpus", "memory") if k in res}
        if res:
            opts["resources"] = res
        ups = [nodes[u] if u in nodes else results[u] for u in dict.fromkeys(u for u in wires[name].values() if u)]
        nodes[name] = remote.options(name=f"herd-{name}", **opts).bind(
            execute_step,
            name,
            str(logs),
            not stream,
            stages[name],
            cfg["stages"][name],
            run,
            wires[name],
            name in forced,
            *ups,
        )
    import warnings

    with warnings.catch_warnings():  # Ray 2.60 marks classic DAG execute() deprecated in favour of compiled graphs
        warnings.filterwarnings("ignore", message=r"DAGNode.execute\(\) is deprecated")
        refs = MultiOutputNode([nodes[n] for n in todo]).execute()
    pending = dict(zip(refs, todo))
    follower = Follower(logs)
    t0 = time.perf_counter()
    while pending:
        # A short wait: the steps' progress events are relayed between waits.
        done, _ = ray.wait(list(pending), num_returns=1, timeout=1)
        for event in follower.poll():
            events(event)
        if not done:
            events({"event": "running", "steps": list(pending.values()), "seconds": time.perf_counter() - t0})
            continue
        name = pending.pop(done[0])
        try:
            r = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            for other in list(pending):
                ray.cancel(other)
            error = f"{type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}"
            where = _shown(step_log(logs, name))
            events({"event": "failed", "step": name, "error": error, "log": where})
            raise HerdError(
                f"stage {name} failed: {error}"
                + ("" if stream else f"; its log: {where}")
                + "; rerun the same command to resume from it"
            ) from None
        results[name] = r
        events({"event": "done", "step": name, "status": r["status"], "seconds": r["seconds"]})
    return started


def text_events(log, heartbeat_s: float = 30):
    """The events as text lines for `log`: each step's end, and while steps run, a line every
    `heartbeat_s`. The events: plan (stages), cached (step, key, from), start (step), progress
    (step, kind, done, total, and numbers), running (steps, seconds), done (step, status,
    seconds), failed (step, error, log)."""
    last = [0.0]

    def show(e: dict) -> None:
        if e["event"] == "cached":
            log(f"  {e['step']:<9} cached  (key {e['key'][:12]}, made by run {e['from'][:12]})")
        elif e["event"] == "done":
            log(f"  {e['step']:<9} {e['status']:<7} {e['seconds']:.1f}s")
        elif e["event"] == "running" and e["seconds"] - last[0] >= heartbeat_s:
            last[0] = e["seconds"]
            names = e["steps"]
            log(
                f"  ... {names[0]} running"
                + (f", then {', '.join(names[1:])}" if names[1:] else "")
                + f" ({e['seconds']:.0f}s)"
            )

    return show


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is inside it (shorter on a console)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def default_stages() -> dict[str, Stage]:
    from flows.lifecycle.stages import STAGES

    return STAGES
