"""The lifecycle's pure core: stages and their context, step keys and digests, the config, the plan.

No MLflow and no Ray here (flows/lifecycle_steps.py records and runs one step, flows/lifecycle/
drives the DAG, flows/lifecycle_lineage.py reads the chain back, flows/lifecycle_cli.py is
`herd run` / `herd lineage`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flows.digest import sha256_file
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
    """What a stage function gets: its resolved config, its inputs (slot -> the upstream step's result dict, or
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
    # check(stage config) raises HerdError on a bad config: run before any step (and Ray) starts
    check: Callable[[dict], object] | None = None


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
        _canon({"stage": stage, "config": config, "params": params, "inputs": digests, "code": code, "seed": seed})
    )


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
    cfg = {
        "name": str(raw.get("name", "default")),
        "seed": int(raw.get("seed", 0)),
        "workdir": str(raw.get("workdir", "runs/lifecycle")),
        "base_model": str(raw.get("base_model", "smollm2")),
        "mlflow": {"tracking_uri": "", "experiment": "herd", **(raw.get("mlflow") or {})},
        "ray": {"address": "", "num_cpus": 0, **(raw.get("ray") or {})},
        "stages": {},
    }
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
        cfg["stages"][name] = {
            "enabled": bool(st.get("enabled", True)),
            "resources": {"num_cpus": 1, **(st.get("resources") or {})},
            "config_file": str(st.get("config") or ""),
            "config": deep_merge(stage_cfg, st.get("overrides") or {}),
            "params": dict(st.get("params") or {}),
        }
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


def check_configs(cfg: dict, stages: dict[str, Stage], wires: dict) -> None:
    """Each enabled stage's config through its own typed loader, so a bad field is a one-line
    error naming it before anything runs (not minutes in, when the stage's turn comes)."""
    for name in wires:
        if stages[name].check is None:
            continue
        try:
            stages[name].check(cfg["stages"][name]["config"])
        except HerdError as e:
            raise HerdError(f"lifecycle config: stages.{name}: {e}") from None


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
