"""The plan: stages and their wiring, `--force` closure, step keys, and the cache lookup.

`plan_step` is the one place a step's inputs, key and cached result are worked out: the driver
calls it to answer steps from MLflow before starting Ray, the Ray task calls it for the steps the
driver could not plan (their inputs were not known yet).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flows.digest import sha256_file
from flows.lifecycle.config import REPO, canon, sha256_text
from flows.lifecycle.record import LifecycleRun, find_cached, record_cached
from model.errors import HerdError


@dataclass
class StepContext:
    """What a stage function gets: its resolved config, its inputs (slot -> the upstream step's result dict, or
    None), a folder named by its key, the seed, the lineage so far, the lifecycle run and its own step run."""

    stage: str
    key: str
    config: dict
    params: dict
    inputs: dict
    out_dir: Path
    seed: int
    lineage: dict
    lifecycle: LifecycleRun
    run_id: str = ""  # the step's MLflow child run

    def log(self, msg: str) -> None:
        print(f"[{self.stage}] {msg}", flush=True)

    def input(self, slot: str) -> dict | None:
        return self.inputs.get(slot)

    def model_dir(self) -> str:
        """The model the upstream model stage made, else the configured base model."""
        m = self.inputs.get("model")
        return m["outputs"]["model_dir"] if m else self.lifecycle.base_model


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
    # check(stage config) raises HerdError on a bad config: run before any step (and Ray) starts
    check: Callable[[dict], object] | None = None


# --- wiring -------------------------------------------------------------------------------------


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


def forced_stages(force: list[str], stages: dict[str, Stage], wires: dict) -> set[str]:
    """The stages `--force` reruns: those named and everything downstream of them."""
    unknown = [f for f in force if f not in stages]
    if unknown:
        raise HerdError(f"--force {', '.join(unknown)}: no such stage (known: {', '.join(stages)})")
    not_on = [f for f in force if f not in wires]
    if not_on:
        raise HerdError(f"--force {', '.join(not_on)}: stage is not enabled in this config")
    return downstream(wires, set(force))


# --- keys and digests ---------------------------------------------------------------------------


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
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
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
            files = (
                [p]
                if p.is_file()
                else sorted(
                    f
                    for f in p.rglob("*")
                    if f.suffix in (".py", ".yaml", ".json", ".jinja") and "__pycache__" not in f.parts
                )
                if p.is_dir()
                else []
            )
            for f in files:
                h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
        _CODE_CACHE[key] = h.hexdigest()
    return _CODE_CACHE[key]


def step_key(stage: str, config: dict, params: dict, inputs: dict, code: str, seed: int) -> str:
    digests = {slot: (r["digest"] if r else None) for slot, r in inputs.items()}
    return sha256_text(
        canon({"stage": stage, "config": config, "params": params, "inputs": digests, "code": code, "seed": seed})
    )


# --- cache validity -----------------------------------------------------------------------------


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


# --- one step's plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """A step's inputs (slot -> upstream result, or None), code version and key; `cached` is the
    reused result (already recorded as this run's child run) when the key has a valid one."""

    stage: str
    inputs: dict
    code: str
    key: str
    cached: dict | None = None
    cached_from: str = ""  # the run that made the cached result


def plan_step(
    run: LifecycleRun,
    stage: Stage,
    st_cfg: dict,
    slots: dict[str, str | None],
    done: dict[str, dict],
    *,
    force: bool = False,
) -> StepPlan:
    """The step's key from its config, params, code and the results of the stages that fill its
    slots (`done`: stage -> result); unless forced, its cached result when one is still valid."""
    inputs = {slot: done.get(u) if u else None for slot, u in slots.items()}
    code = code_version(stage.code)
    key = step_key(stage.name, st_cfg["config"], st_cfg["params"], inputs, code, run.seed)
    if force:
        return StepPlan(stage.name, inputs, code, key)
    cached = find_cached(run, key)
    if cached is None or not still_valid(stage, cached):
        return StepPlan(stage.name, inputs, code, key)
    result = record_cached(run, stage.name, inputs, cached)
    result["lineage"] = {**result.get("lineage", {}), **run.lineage}
    return StepPlan(stage.name, inputs, code, key, result, cached.get("run_id") or "")
