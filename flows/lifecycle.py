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

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from model.errors import HerdError

REPO = Path(__file__).resolve().parents[1]
STAGE_ORDER = ["data", "pretrain", "sft", "rs", "dpo", "ppo", "eval", "register", "promote", "deploy"]
MODEL_STAGES = ["ppo", "dpo", "rs", "sft", "pretrain"]  # newest first: where "the model" comes from
STEP_KEYS = {"enabled", "resources", "config", "overrides", "params"}
TOP_KEYS = {"name", "seed", "workdir", "base_model", "mlflow", "ray", "stages"}
TAG = "herd.step."
LINEAGE = "herd.lineage."


# --- stages -------------------------------------------------------------------------------------

@dataclass
class StepContext:
    """What a stage function gets: its resolved config, its inputs (slot -> StepResult dict, or
    None), a folder named by its key, the seed, the lineage so far and the lifecycle's identity."""

    stage: str
    key: str
    config: dict
    params: dict
    inputs: dict
    out_dir: Path
    seed: int
    lineage: dict
    lifecycle: dict  # name, config_hash, git_sha, parent_run_id, tracking_uri, experiment, workdir, base_model

    def log(self, msg: str) -> None:
        print(f"[{self.stage}] {msg}", flush=True)

    def input(self, slot: str) -> dict | None:
        return self.inputs.get(slot)

    def model_dir(self) -> str:
        """The model the upstream model stage made, else the configured base model."""
        m = self.inputs.get("model")
        return m["outputs"]["model_dir"] if m else self.lifecycle["base_model"]


@dataclass
class Stage:
    """A stage function and its wiring. `fn(ctx) -> dict` may return outputs (JSON values, paths
    as strings), metrics, lineage (added to what flows downstream), tags, and digest (default:
    sha256 of the outputs, plus the files of ctx.out_dir when it holds any)."""

    name: str
    fn: Callable[[StepContext], dict]
    needs: dict[str, list[str]] = field(default_factory=dict)  # slot -> candidate stages, first enabled wins
    code: list[str] = field(default_factory=list)  # files/folders (repo-relative) hashed as the code version
    resumable: bool = False  # keep a failed attempt's folder (the stage resumes from it)
    valid: Callable[[dict], bool] | None = None  # is a cached result still usable? (default: its paths exist)


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tree_digest(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over (relative path, file sha256) of every file under the paths, sorted."""
    h = hashlib.sha256()
    files = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            files.append((p.name if root is None else str(p.relative_to(root)), p))
        elif p.is_dir():
            files += [(str(f.relative_to(root or p)), f) for f in p.rglob("*") if f.is_file()]
    for rel, f in sorted(files):
        fh = hashlib.sha256()
        with open(f, "rb") as fd:
            for chunk in iter(lambda: fd.read(1 << 20), b""):
                fh.update(chunk)
        h.update(f"{rel}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


_CODE_CACHE: dict[tuple, str] = {}


def code_version(paths: list[str]) -> str:
    """sha256 of the stage's source files (*.py, *.yaml under the named paths): a change to the
    serving code does not rerun pretraining, a change to the training loop does."""
    key = tuple(paths)
    if key not in _CODE_CACHE:
        h = hashlib.sha256()
        for rel in sorted(paths):
            p = REPO / rel
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in (".py", ".yaml", ".json", ".jinja")
                                                   and "__pycache__" not in f.parts) if p.is_dir() else []
            for f in files:
                h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
        _CODE_CACHE[key] = h.hexdigest()
    return _CODE_CACHE[key]


def step_key(stage: str, config: dict, params: dict, inputs: dict, code: str, seed: int) -> str:
    digests = {slot: (r["digest"] if r else None) for slot, r in inputs.items()}
    return sha256_text(_canon({"stage": stage, "config": config, "params": params, "inputs": digests,
                               "code": code, "seed": seed}))


# --- config -------------------------------------------------------------------------------------

def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: str | Path | dict, overrides: dict | None = None) -> dict:
    """The lifecycle YAML, with each stage's `config:` file read and its `overrides:` merged in
    (so the config hash and step keys cover what actually runs, not a file name)."""
    if isinstance(path, dict):
        raw, base = copy.deepcopy(path), REPO
    else:
        p = Path(path)
        if not p.is_file():
            raise HerdError(f"{p}: lifecycle config not found")
        raw = yaml.safe_load(p.read_text()) or {}
        base = REPO
        if not isinstance(raw, dict):
            raise HerdError(f"{p}: a lifecycle config is a mapping")
    raw = deep_merge(raw, overrides or {})
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise HerdError(f"lifecycle config: unknown key(s) {', '.join(sorted(unknown))}")
    cfg = {"name": str(raw.get("name", "default")), "seed": int(raw.get("seed", 0)),
           "workdir": str(raw.get("workdir", "runs/lifecycle")), "base_model": str(raw.get("base_model", "smollm2")),
           "mlflow": {"tracking_uri": "", "experiment": "herd", **(raw.get("mlflow") or {})},
           "ray": {"address": "", "num_cpus": 0, **(raw.get("ray") or {})}, "stages": {}}
    for name, st in (raw.get("stages") or {}).items():
        st = st or {}
        bad = set(st) - STEP_KEYS
        if bad:
            raise HerdError(f"lifecycle config: stages.{name}: unknown key(s) {', '.join(sorted(bad))}")
        stage_cfg = {}
        if st.get("config"):
            f = Path(st["config"])
            f = f if f.is_absolute() else base / f
            if not f.is_file():
                raise HerdError(f"lifecycle config: stages.{name}.config: {f} not found")
            stage_cfg = yaml.safe_load(f.read_text()) or {}
        cfg["stages"][name] = {"enabled": bool(st.get("enabled", True)),
                               "resources": {"num_cpus": 1, **(st.get("resources") or {})},
                               "config_file": str(st.get("config") or ""),
                               "config": deep_merge(stage_cfg, st.get("overrides") or {}),
                               "params": dict(st.get("params") or {})}
    return cfg


def config_hash(cfg: dict) -> str:
    return sha256_text(_canon({k: v for k, v in cfg.items() if k not in ("workdir", "ray", "mlflow")}))


# --- the plan -----------------------------------------------------------------------------------

def wiring(cfg: dict, stages: dict[str, Stage]) -> dict[str, dict[str, str | None]]:
    """enabled stage -> slot -> the upstream stage that fills it (None: no enabled candidate)."""
    enabled = [n for n in stages if cfg["stages"].get(n, {}).get("enabled")]
    missing = [n for n in cfg["stages"] if cfg["stages"][n]["enabled"] and n not in stages]
    if missing:
        raise HerdError(f"lifecycle config: unknown stage(s) {', '.join(missing)} (known: {', '.join(stages)})")
    out = {}
    for n in enabled:
        out[n] = {slot: next((c for c in cands if c in out), None) for slot, cands in stages[n].needs.items()}
    return out


def downstream(wires: dict, roots: set[str]) -> set[str]:
    """roots and every stage that reads from them, transitively."""
    out = set(roots)
    changed = True
    while changed:
        changed = False
        for n, slots in wires.items():
            if n not in out and any(u in out for u in slots.values() if u):
                out.add(n)
                changed = True
    return out


# --- MLflow records -----------------------------------------------------------------------------

def _client(lc: dict):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=lc["tracking_uri"], registry_uri=lc["tracking_uri"])


def _experiment_id(lc: dict) -> str:
    from flows.tracking import setup_mlflow

    mlflow = setup_mlflow(lc["tracking_uri"], lc["experiment"])
    return mlflow.get_experiment_by_name(lc["experiment"]).experiment_id


def find_cached(lc: dict, key: str) -> dict | None:
    """The result of the newest finished step run with this key (a run that ran, not a replay)."""
    client = _client(lc)
    runs = client.search_runs([lc["experiment_id"]], f"tags.`{TAG}key` = '{key}' and tags.`{TAG}status` = 'ran' "
                              "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    result = json.loads(runs[0].data.tags.get(f"{TAG}result", "null") or "null")
    if result is None:
        # long results do not fit a tag; they are an artifact
        path = client.download_artifacts(runs[0].info.run_id, "step_result.json")
        result = json.loads(Path(path).read_text())
    return result


def _paths_exist(result: dict) -> bool:
    for v in (result.get("outputs") or {}).values():
        if isinstance(v, str) and (v.startswith("/") and not Path(v).exists()):
            return False
    return True


def still_valid(stage: Stage, result: dict) -> bool:
    try:
        return _paths_exist(result) and (stage.valid(result) if stage.valid else True)
    except Exception:  # a validity probe that fails means "run it again"
        return False


def _child_run(lc: dict, stage: str, key: str, status: str, inputs: dict):
    client = _client(lc)
    run = client.create_run(lc["experiment_id"], run_name=f"{stage}{' (cached)' if status == 'cached' else ''}", tags={
        "mlflow.parentRunId": lc["parent_run_id"], "herd.stage": stage, "herd.lifecycle": lc["name"],
        f"{TAG}key": key, f"{TAG}status": status, "herd.git_sha": lc["git_sha"],
        f"{TAG}inputs": _canon({s: (r and {"stage": r["stage"], "digest": r["digest"], "run_id": r["run_id"]})
                                for s, r in inputs.items()})[:7900]})
    return client, run.info.run_id


def _finish(client, run_id: str, result: dict, status: str = "FINISHED") -> None:
    outputs = _canon(result.get("outputs") or {})
    client.set_tag(run_id, f"{TAG}outputs", outputs[:7900])
    client.set_tag(run_id, f"{TAG}digest", result["digest"])
    client.set_tag(run_id, f"{TAG}seconds", f"{result['seconds']:.2f}")
    for k, v in (result.get("lineage") or {}).items():
        client.set_tag(run_id, LINEAGE + k, str(v)[:7900])
    text = _canon(result)
    if len(text) < 7900:
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

def execute_step(stage: Stage, st_cfg: dict, lc: dict, slots: dict[str, str | None], force: bool,
                 *upstream: dict) -> dict:
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
    ctx = StepContext(stage.name, key, st_cfg["config"], st_cfg["params"], inputs, out_dir, lc["seed"],
                      dict(lineage), {**lc})
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
    digest = got.get("digest") or sha256_text(_canon(outputs) + (tree_digest([out_dir]) if any(out_dir.iterdir()) else ""))
    lineage.update(got.get("lineage") or {})
    lineage[f"{stage.name}.run_id"] = run_id
    lineage[f"{stage.name}.digest"] = digest
    metrics = {k: float(v) for k, v in (got.get("metrics") or {}).items()}
    result = {"stage": stage.name, "key": key, "status": "ran", "run_id": run_id, "digest": digest,
              "outputs": outputs, "metrics": metrics, "lineage": lineage,
              "seconds": round(time.perf_counter() - t0, 2), "summary": got.get("summary", "")}
    if metrics:
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items()])
    for k, v in (got.get("tags") or {}).items():
        client.set_tag(run_id, k, str(v)[:7900])
    _finish(client, run_id, result)
    print(f"[{stage.name}] done in {result['seconds']:.1f}s (digest {digest[:12]})", flush=True)
    return result


def _metric(k, v):
    from mlflow.entities import Metric

    return Metric(k.replace(":", "."), float(v), int(time.time() * 1000), 0)


# --- the driver ---------------------------------------------------------------------------------

@dataclass
class LifecycleResult:
    parent_run_id: str
    config_hash: str
    steps: dict[str, dict]  # stage -> result
    seconds: float
    used_ray: bool

    def summary_rows(self) -> list[list[str]]:
        rows = []
        for name, r in self.steps.items():
            m = r.get("metrics") or {}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(m.items())[:3])
            rows.append([name, r["status"], f"{r.get('seconds', 0):.1f}", r["key"][:12], (r.get("run_id") or "")[:12],
                         r.get("summary") or shown])
        return rows


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _absolute_tracking_uri(uri: str) -> str:
    from flows.tracking import tracking_uri

    uri = tracking_uri(uri or None)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:
        uri = str(Path(uri).resolve())
    return uri


def run_lifecycle(config: str | Path | dict, *, stages: dict[str, Stage] | None = None, force: list[str] = (),
                  overrides: dict | None = None, workdir: str | None = None, tracking_uri: str | None = None,
                  log=print) -> LifecycleResult:
    """Plan, then run what is not cached as one ray.dag; returns every step's result."""
    from flows.tracking import git_sha, setup_mlflow

    t0 = time.perf_counter()
    cfg = load_config(config, overrides)
    stages = stages if stages is not None else default_stages()
    wires = wiring(cfg, stages)
    unknown = [f for f in force if f not in stages]
    if unknown:
        raise HerdError(f"--force {', '.join(unknown)}: no such stage (known: {', '.join(stages)})")
    not_on = [f for f in force if f not in wires]
    if not_on:
        raise HerdError(f"--force {', '.join(not_on)}: stage is not enabled in this config")
    forced = downstream(wires, set(force))
    chash = config_hash(cfg)
    lc = {"name": cfg["name"], "seed": cfg["seed"], "config_hash": chash, "git_sha": git_sha(),
          "workdir": str(Path(workdir or os.environ.get("HERD_RUN_DIR") or cfg["workdir"]).resolve()),
          "base_model": cfg["base_model"], "experiment": cfg["mlflow"]["experiment"] or "herd",
          "tracking_uri": _absolute_tracking_uri(tracking_uri or cfg["mlflow"]["tracking_uri"])}
    Path(lc["workdir"]).mkdir(parents=True, exist_ok=True)
    mlflow = setup_mlflow(lc["tracking_uri"], lc["experiment"])
    lc["experiment_id"] = mlflow.get_experiment_by_name(lc["experiment"]).experiment_id
    client = _client(lc)
    parent = client.create_run(lc["experiment_id"], run_name=f"lifecycle-{cfg['name']}", tags={
        "herd.stage": "lifecycle", "herd.lifecycle": cfg["name"], "herd.config_hash": chash,
        "herd.git_sha": lc["git_sha"], "herd.force": ",".join(force), "herd.stages": ",".join(wires)})
    lc["parent_run_id"] = parent.info.run_id
    client.log_dict(lc["parent_run_id"], cfg, "lifecycle_config.yaml")
    base_lineage = {"config_hash": chash, "git_sha": lc["git_sha"], "parent_run_id": lc["parent_run_id"]}
    log(f"lifecycle {cfg['name']}: run {lc['parent_run_id']} (config {chash[:12]}, git {lc['git_sha'][:12]}); "
        f"stages: {' -> '.join(wires)}" + (f"; forced: {', '.join(sorted(forced))}" if forced else ""))

    # Plan on the driver: every step whose inputs are known and whose key has a valid result is
    # cached; the first one that is not (and everything after it) goes to Ray.
    results: dict[str, dict] = {}
    for name, slots in wires.items():
        if name in forced or any(u and u not in results for u in slots.values()):
            continue
        inputs = {s: (results[u] if u else None) for s, u in slots.items()}
        st = stages[name]
        key = step_key(name, cfg["stages"][name]["config"], cfg["stages"][name]["params"], inputs,
                       code_version(st.code), cfg["seed"])
        cached = find_cached(lc, key)
        if cached is None or not still_valid(st, cached):
            continue
        results[name] = record_cached(lc, name, inputs, cached)
        log(f"  {name:<9} cached  (key {key[:12]}, made by run {cached['run_id'][:12]})")
    for r in results.values():
        r["lineage"] = {**r.get("lineage", {}), **base_lineage}

    todo = [n for n in wires if n not in results]
    used_ray = bool(todo)
    status = "FINISHED"
    try:
        if todo:
            _execute_dag(cfg, stages, wires, todo, results, forced, lc, log)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        for name, r in results.items():
            client.set_tag(lc["parent_run_id"], f"herd.step.{name}", f"{r['status']} {r['key'][:12]} {r.get('run_id') or ''}")
        if status == "FINISHED":
            ran = sum(r["status"] == "ran" for r in results.values())
            client.log_metric(lc["parent_run_id"], "steps_ran", ran)
            client.log_metric(lc["parent_run_id"], "steps_cached", len(results) - ran)
            client.log_metric(lc["parent_run_id"], "seconds", time.perf_counter() - t0)
        client.set_terminated(lc["parent_run_id"], status)
    return LifecycleResult(lc["parent_run_id"], chash, {n: results[n] for n in wires}, time.perf_counter() - t0, used_ray)


def init_ray(attempts: int = 3, **kwargs):
    """ray.init, retried: on a busy machine the raylet can miss Ray's fixed 30 s start window."""
    import ray

    for i in range(attempts):
        try:
            return ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or i == attempts - 1:
                raise
            print(f"Ray did not start in time (attempt {i + 1}/{attempts}); retrying", flush=True)
            ray.shutdown()


def _execute_dag(cfg, stages, wires, todo, results, forced, lc, log) -> None:
    import ray
    from ray.dag import MultiOutputNode

    started = False
    if not ray.is_initialized():
        address = cfg["ray"]["address"] or os.environ.get("RAY_ADDRESS") or None
        kwargs = {} if address else {"num_cpus": cfg["ray"]["num_cpus"] or None, "include_dashboard": False}
        pypath = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        log(f"starting Ray ({address or 'local'}) for: {', '.join(todo)}")
        init_ray(address=address, runtime_env={"env_vars": {"PYTHONPATH": pypath}}, **kwargs)
        started = True
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
            stages[name], cfg["stages"][name], lc, wires[name], name in forced, *ups)
    import warnings

    with warnings.catch_warnings():  # Ray 2.60 marks classic DAG execute() deprecated in favour of compiled graphs
        warnings.filterwarnings("ignore", message=r"DAGNode.execute\(\) is deprecated")
        refs = MultiOutputNode([nodes[n] for n in todo]).execute()
    pending = dict(zip(refs, todo))
    t0 = time.perf_counter()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=30)
            if not done:
                names = list(pending.values())
                log(f"  ... {names[0]} running" + (f", then {', '.join(names[1:])}" if names[1:] else "")
                    + f" ({time.perf_counter() - t0:.0f}s)")
                continue
            name = pending.pop(done[0])
            try:
                r = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                for other in list(pending):
                    ray.cancel(other)
                raise HerdError(f"stage {name} failed: {type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}"
                                "; rerun the same command to resume from it") from None
            r["lineage"] = {**r.get("lineage", {}), **base_lineage}
            results[name] = r
            log(f"  {name:<9} {r['status']:<7} {r['seconds']:.1f}s")
    finally:
        if started and not any(cfg["stages"].get(n, {}).get("params", {}).get("keep_ray") for n in todo):
            pass  # Ray stops with this process (a served endpoint lives as long as the driver)


# --- lineage ------------------------------------------------------------------------------------

LINEAGE_KEYS = ("data.input_sha256", "data.manifest_digest", "config_hash", "git_sha", "parent_run_id")


def lineage_tags(ctx: StepContext) -> dict[str, str]:
    """The tags a registered model version or a deployment carries: the raw-data and manifest
    digests from data prep, the lifecycle's config hash, git sha and parent run id, and the run of
    every step that led here."""
    tags = {LINEAGE + k: str(ctx.lineage[k]) for k in LINEAGE_KEYS if ctx.lineage.get(k)}
    tags[LINEAGE + "steps"] = _canon({k[:-len(".run_id")]: v for k, v in ctx.lineage.items() if k.endswith(".run_id")})[:7900]
    tags[LINEAGE + "step_run_id"] = ctx.lifecycle.get("step_run_id", "")
    return tags


def tag_model_version(ctx: StepContext, name: str, version) -> None:
    client = _client(ctx.lifecycle)
    for k, v in lineage_tags(ctx).items():
        client.set_model_version_tag(name, str(version), k, v)

def lineage_chain(uri: str, tracking_uri: str | None = None) -> list[dict]:
    """From a models:/ URI (or a run id) back to the raw data: the registered version, then every
    step of the lifecycle run that made it, newest first."""
    from mlflow import MlflowClient

    uri_t = _absolute_tracking_uri(tracking_uri or "")
    client = MlflowClient(tracking_uri=uri_t, registry_uri=uri_t)
    chain = []
    if uri.startswith("models:/"):
        from flows.eval.registry import get_version

        mv = get_version(uri, uri_t)
        tags = mv.tags or {}
        parent = tags.get(LINEAGE + "parent_run_id")
        chain.append({"what": f"{uri} = version {mv.version}", "run_id": mv.run_id,
                      "tags": {k: v for k, v in tags.items() if k.startswith(LINEAGE) and k != LINEAGE + "steps"}})
        if not parent:
            raise HerdError(f"{uri}: version {mv.version} has no {LINEAGE}parent_run_id (not made by herd run)")
    else:
        run = client.get_run(uri)
        parent = run.data.tags.get("mlflow.parentRunId") or uri
    prun = client.get_run(parent)
    chain.append({"what": f"lifecycle run {parent}", "run_id": parent,
                  "tags": {k: v for k, v in prun.data.tags.items() if k in ("herd.config_hash", "herd.git_sha", "herd.lifecycle")}})
    children = client.search_runs([prun.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_stage = {r.data.tags.get("herd.stage"): r for r in children}
    for name in reversed(STAGE_ORDER + sorted(set(by_stage) - set(STAGE_ORDER) - {None})):
        r = by_stage.get(name)
        if r is None:
            continue
        t = r.data.tags
        entry = {"what": f"{name} step ({t.get(TAG + 'status')})", "run_id": r.info.run_id,
                 "tags": {"key": t.get(TAG + "key", "")[:16], "digest": t.get(TAG + "digest", "")[:16]}}
        if t.get(TAG + "cached_from"):
            entry["tags"]["made_by_run"] = t[TAG + "cached_from"]
        for k in ("data.input_sha256", "data.manifest_digest"):
            if name == "data" and t.get(LINEAGE + k):
                entry["tags"][k] = t[LINEAGE + k]
        chain.append(entry)
    return chain


def lineage_command(args) -> int:
    for i, e in enumerate(lineage_chain(args.uri, args.tracking_uri)):
        print(("  " * min(i, 1)) + ("<- " if i else "") + e["what"] + (f"  [run {e['run_id']}]" if e.get("run_id") else ""))
        for k, v in e["tags"].items():
            print(("  " * min(i, 1)) + f"     {k}: {v}")
    return 0


# --- CLI ----------------------------------------------------------------------------------------

def _add_run_args(p) -> None:
    p.add_argument("--config", default="configs/default.yaml", help="lifecycle YAML (configs/default.yaml, configs/lifecycle/*.yaml)")
    p.add_argument("--force", nargs="+", action="extend", default=[], metavar="STAGE",
                   help="rerun STAGE and everything downstream of it, cached or not")
    p.add_argument("--workdir", default=None, help="where step folders go (default: the config's workdir, or $HERD_RUN_DIR)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--serve", action="store_true", help="keep the endpoint up after the run (Ctrl-C stops it)")


def register(subparsers) -> None:
    run = subparsers.add_parser("run", help="the lifecycle: data -> train -> eval -> register -> serve, cached")
    _add_run_args(run)
    run.set_defaults(func=run_command)
    lin = subparsers.add_parser("lineage", help="print the chain from a model back to its raw data")
    lin.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a run id")
    lin.add_argument("--tracking-uri", default=None)
    lin.set_defaults(func=lineage_command)


def run_command(args) -> int:
    res = run_lifecycle(args.config, force=args.force, workdir=args.workdir, tracking_uri=args.tracking_uri)
    print()
    print(_table(res.summary_rows(), ["stage", "status", "seconds", "key", "run", "result"]))
    ran = sum(r["status"] == "ran" for r in res.steps.values())
    print(f"\n{len(res.steps)} steps: {ran} ran, {len(res.steps) - ran} cached, {res.seconds:.1f}s "
          f"(parent run {res.parent_run_id})")
    uri = _absolute_tracking_uri(args.tracking_uri or "")
    print(f"MLflow: mlflow server --backend-store-uri {uri} --port 5000   ->  http://127.0.0.1:5000")
    dep = res.steps.get("deploy")
    if dep:
        print(f"endpoint: {dep['outputs'].get('url')}")
        if args.serve:
            print("serving; Ctrl-C stops", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def main(argv: list[str] | None = None) -> int:
    from flows.cli import main as herd_main

    return herd_main(["run", *(sys.argv[1:] if argv is None else argv)])


def default_stages() -> dict[str, Stage]:
    from flows import lifecycle_stages

    return lifecycle_stages.STAGES


if __name__ == "__main__":
    sys.exit(main())
