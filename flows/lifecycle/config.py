"""The lifecycle config: the YAML read, each stage's own config file merged in, validated; its hash.

Pure: no MLflow and no Ray. flows/lifecycle/plan.py turns a config into the steps' wiring and keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from model.errors import HerdError

REPO = Path(__file__).resolve().parents[2]
STAGE_ORDER = ["data", "pretrain", "sft", "rs", "dpo", "ppo", "eval", "register", "promote", "deploy"]
STEP_KEYS = {"enabled", "resources", "config", "overrides", "params"}
TOP_KEYS = {"name", "seed", "workdir", "base_model", "mlflow", "ray", "stages"}


def canon(obj) -> str:
    """The canonical JSON text of obj: what config hashes and step keys are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
    return sha256_text(canon({k: v for k, v in cfg.items() if k not in ("workdir", "ray", "mlflow")}))


def check_configs(cfg: dict, stages: dict, wires: dict) -> None:
    """Each enabled stage's config through its own typed loader, so a bad field is a one-line
    error naming it before anything runs (not minutes in, when the stage's turn comes)."""
    for name in wires:
        if stages[name].check is None:
            continue
        try:
            stages[name].check(cfg["stages"][name]["config"])
        except HerdError as e:
            raise HerdError(f"lifecycle config: stages.{name}: {e}") from None
