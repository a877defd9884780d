"""The evaluation stage: load a model (folder, .gguf, or models:/NAME@ALIAS), run the configured
tasks, and record one MLflow run (metrics per task, a predictions table per task, transcripts,
the config, the model URI). The lifecycle calls `run_eval`; `herd eval` is its CLI.

Config (YAML, configs/eval/*.yaml; every key optional):

  name: default
  tasks: [herd_mc, {task: mmlu, num_fewshot: 5, limit: 10}, path/to/spec.yaml]
  data_dir: null          # where relative data paths of specs resolve (besides the spec's folder)
  limit: null             # questions per subset (MMLU: per subject), prompts per task
  batch_size: 16
  dtype: float32
  device: auto
  max_length: null        # scoring window; default the model's max_seq_len
  mlflow: {enabled: true, tracking_uri: null, experiment: null, log_predictions: true}
  registry: {name: herd}
  gate: {benchmarks: [herd_mc/acc], win_rate: {metric: humaneval/win_rate, floor: 0.5},
         attack_success: herd_redteam/unsafe_compliance_rate, floors: [{metric: herd_mc/acc, min: 0.3}]}
                          # the promotion gate (flows/eval/gate.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import progress
from model.errors import HerdError

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
CONFIG_KEYS = {
    "name",
    "tasks",
    "data_dir",
    "limit",
    "batch_size",
    "dtype",
    "device",
    "max_length",
    "share_prefix",
    "mlflow",
    "registry",
    "gate",
}
TASK_KEYS = {"task", "limit", "num_fewshot", "overrides"}


@dataclass
class EvalResult:
    metrics: dict[str, float]
    run_id: str | None
    model_uri: str
    tasks: dict[str, Any] = field(default_factory=dict)  # name -> runners.TaskResult
    config_hash: str = ""
    model_version: str | None = None

    def summary(self) -> dict:
        main = {k: v for k, v in self.metrics.items() if k.count("/") == 1 and not k.endswith(("/seconds", "/n"))}
        return {"run_id": self.run_id, "model_uri": self.model_uri, "metrics": main}


def load_config(config: str | Path | dict | None) -> dict:
    """A dict, a YAML path, or a name under configs/eval/ (default: configs/eval/default.yaml)."""
    import yaml

    if isinstance(config, dict):
        cfg = dict(config)
    else:
        path = Path(config) if config else CONFIG_DIR / "default.yaml"
        if not path.is_file() and not path.suffix:
            path = CONFIG_DIR / f"{config}.yaml"
        if not path.is_file():
            raise HerdError(f"{path}: eval config not found")
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise HerdError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(cfg, dict):
            raise HerdError(f"{path}: an eval config must be a mapping")
    unknown = set(cfg) - CONFIG_KEYS
    if unknown:
        raise HerdError(
            f"eval config: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(CONFIG_KEYS))}"
        )
    cfg.setdefault("name", "eval")
    cfg.setdefault("tasks", [])
    cfg.setdefault("batch_size", 16)
    cfg.setdefault("dtype", "float32")
    cfg.setdefault("device", "auto")
    cfg.setdefault("share_prefix", True)
    cfg["mlflow"] = {
        "enabled": True,
        "tracking_uri": None,
        "experiment": None,
        "log_predictions": True,
        **(cfg.get("mlflow") or {}),
    }
    cfg["registry"] = {"name": "herd", **(cfg.get("registry") or {})}
    cfg["gate"] = cfg.get("gate") or {}
    return cfg


def task_entries(cfg: dict, tasks: list | str | None = None) -> list[dict]:
    """Normalise task entries to {task, limit, num_fewshot, overrides}; `tasks` replaces the config's."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    raw = tasks if tasks else cfg["tasks"]
    if not raw:
        raise HerdError("no tasks: pass --tasks or list them under 'tasks' in the eval config")
    out = []
    for t in raw:
        entry = {"task": t} if isinstance(t, str) else dict(t)
        unknown = set(entry) - TASK_KEYS
        if unknown or "task" not in entry:
            raise HerdError(f"task entry {t!r}: needs 'task' (known keys: {', '.join(sorted(TASK_KEYS))})")
        out.append(entry)
    return out


def config_hash(cfg: dict, entries: list[dict], specs: list) -> str:
    """What makes two evaluations comparable: the task specs, few-shot counts, limits, window."""
    doc = {
        "tasks": [
            {**e, "spec": {k: v for k, v in dataclasses.asdict(s).items() if k != "source"}}
            for e, s in zip(entries, specs)
        ],
        "limit": cfg.get("limit"),
        "max_length": cfg.get("max_length"),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_eval(
    config: str | Path | dict | None,
    model_path_or_uri: str | Path,
    *,
    tasks=None,
    data_dir=None,
    limit: int | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    log_mlflow: bool | None = None,
    run_name: str | None = None,
    model=None,
    register: bool = False,
    tags: dict | None = None,
    reference: str | None = None,
) -> EvalResult:
    """Evaluate a model on the configured tasks and record one MLflow run.

    model_path_or_uri: a herd/HF folder, a .gguf file, `smollm2`, or models:/NAME@ALIAS.
    model: an already loaded (model, tokenizer) pair to use instead of loading (the URI is recorded).
    register: also register the evaluated folder as a new version with alias `candidate`
      (logged into this run), with the metrics as version tags.
    reference: the model rated tasks (the sealed prompt set's win rate) compare against; default
      the registry's champion (models:/NAME@champion) when there is one, else no win rate.
    Returns metrics (`<task>/<metric>`), the run id (None when MLflow is off) and the model URI.
    """
    from flows.eval.registry import resolve_model_uri
    from flows.eval.runners import run_task
    from flows.eval.scoring import Scorer
    from flows.eval.task_spec import load_spec

    cfg = load_config(config)
    entries = task_entries(cfg, tasks)
    data_dir = data_dir if data_dir is not None else cfg.get("data_dir")
    limit = limit if limit is not None else cfg.get("limit")
    specs = [load_spec(e["task"], e.get("overrides")) for e in entries]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise HerdError(f"task names repeat: {', '.join(names)}")
    chash = config_hash({**cfg, "limit": limit}, entries, specs)  # the limit in effect (--limit included)
    uri = str(model_path_or_uri)
    rated = any(s.type == "rated" for s in specs)
    if rated:  # before any model loads: without the key the stage stops here, in one line
        from flows.eval.sealed import load_key

        load_key()

    version = None
    if uri.startswith("models:/"):
        from flows.eval.registry import get_version

        version = str(get_version(uri, tracking_uri or cfg["mlflow"]["tracking_uri"]).version)
    if model is None:
        from model.sources import load_for_inference

        path = resolve_model_uri(uri, tracking_uri or cfg["mlflow"]["tracking_uri"])
        model, tokenizer = load_for_inference(str(path), cfg["dtype"], cfg["device"], pack=True)
    else:
        model, tokenizer = model
        path = Path(uri) if not uri.startswith(("models:/", "runs:/")) else None
    scorer = Scorer(
        model,
        tokenizer,
        batch_size=cfg["batch_size"],
        max_length=cfg.get("max_length"),
        share_prefix=cfg["share_prefix"],
    )
    ref = _reference(reference, cfg, tracking_uri or cfg["mlflow"]["tracking_uri"]) if rated else None

    enabled = cfg["mlflow"]["enabled"] if log_mlflow is None else log_mlflow
    if not enabled:
        if register:
            raise HerdError("register needs MLflow (mlflow.enabled)")
        results = _run_tasks(entries, specs, model, tokenizer, scorer, data_dir, limit, cfg, run_task, ref)
        return EvalResult(_flatten(results), None, uri, results, chash, version)

    import mlflow

    from flows.tracking import git_sha, setup_mlflow

    nested = mlflow.active_run() is not None
    exp = experiment or cfg["mlflow"]["experiment"]
    if not nested or exp:  # a nested run (inside the lifecycle's step) keeps its parent's store and experiment
        setup_mlflow(tracking_uri or cfg["mlflow"]["tracking_uri"], exp)
    with mlflow.start_run(run_name=run_name or f"eval-{cfg['name']}", nested=nested) as run:
        mlflow.set_tags(
            {
                "herd.stage": "eval",
                "herd.git_sha": git_sha(),
                "herd.model_uri": uri,
                "eval.config_hash": chash,
                **({"herd.model_version": version} if version else {}),
                **(tags or {}),
            }
        )
        mlflow.log_params(
            {
                "tasks": ",".join(names),
                "limit": limit,
                "data_dir": data_dir,
                "batch_size": cfg["batch_size"],
                "dtype": cfg["dtype"],
                "model": uri,
                "max_length": scorer.max_length,
                **{
                    f"{s.name}.num_fewshot": e.get("num_fewshot", s.num_fewshot)
                    for e, s in zip(entries, specs)
                    if s.type == "multiple_choice"
                },
            }
        )
        mlflow.log_dict({**cfg, "resolved_tasks": entries}, "eval_config.yaml")
        for s in specs:
            mlflow.log_dict(
                {k: v for k, v in dataclasses.asdict(s).items() if k != "source"} | {"source": str(s.source)},
                f"tasks/{s.name}.yaml",
            )
        try:
            results = _run_tasks(entries, specs, model, tokenizer, scorer, data_dir, limit, cfg, run_task, ref)
        except HerdError as e:
            mlflow.set_tag("herd.error", str(e)[:500])
            raise
        metrics = _flatten(results)
        mlflow.log_metrics(metrics)
        mlflow.log_metrics({f"scorer/{k}": float(v) for k, v in scorer.stats.items()})
        for r in results.values():
            _log_task(mlflow, r, cfg["mlflow"]["log_predictions"])
        registered = None
        if register:
            if path is None or not path.is_dir():
                raise HerdError(f"{uri}: only a local herd checkpoint folder can be registered")
            from flows.eval.registry import register_model

            registered = register_model(
                path,
                cfg["registry"]["name"],
                run_id=run.info.run_id,
                metrics=metrics,
                config_hash=chash,
                tracking_uri=tracking_uri or cfg["mlflow"]["tracking_uri"],
                tags={"herd.eval_run_id": run.info.run_id},
            )
            version = str(registered.version)
            mlflow.set_tag("herd.model_version", version)
        run_id = run.info.run_id
    return EvalResult(metrics, run_id, uri, results, chash, version)


def _reference(reference: str | None, cfg: dict, tracking_uri: str | None):
    """(model, tokenizer) for rated tasks: the given model, else the registry's champion, else None."""
    from model.sources import load_for_inference

    if reference is None:
        if not cfg["mlflow"]["enabled"]:
            return None
        from flows.eval.registry import CHAMPION, get_version

        reference = f"models:/{cfg['registry']['name']}@{CHAMPION}"
        try:
            get_version(reference, tracking_uri)
        except HerdError:
            log.warning("no %s in the registry: rated tasks measure no win rate", reference)
            return None
    from flows.eval.registry import resolve_model_uri

    return load_for_inference(str(resolve_model_uri(reference, tracking_uri)), cfg["dtype"], cfg["device"])


def _run_tasks(entries, specs, model, tokenizer, scorer, data_dir, limit, cfg, run_task, reference=None) -> dict:
    results = {}
    for done, (e, s) in enumerate(zip(entries, specs)):
        progress.tick("tasks", done, len(specs), task=s.name)
        t0 = time.perf_counter()
        r = run_task(
            s,
            model,
            tokenizer,
            scorer,
            data_dir=data_dir,
            limit=e.get("limit", limit),
            num_fewshot=e.get("num_fewshot"),
            batch_size=cfg["batch_size"],
            reference=reference,
        )
        for sk in r.skipped:
            log.warning("task %s: skipped %s", s.name, sk)
        log.info(
            "task %s: %s in %.1f s",
            s.name,
            {k: v for k, v in r.metrics.items() if "/" not in k},
            time.perf_counter() - t0,
        )
        results[s.name] = r
    progress.tick("tasks", len(specs), len(specs))
    return results


def _flatten(results: dict) -> dict[str, float]:
    return {f"{name}/{k}": float(v) for name, r in results.items() for k, v in r.metrics.items()}


def _log_task(mlflow, r, log_predictions: bool) -> None:
    if log_predictions and r.predictions:
        columns = list(dict.fromkeys(k for p in r.predictions for k in p))
        table = {c: [_cell(p.get(c)) for p in r.predictions] for c in columns}
        mlflow.log_table(data=table, artifact_file=f"predictions/{r.name}.json")
    if r.skipped:
        mlflow.log_text("\n".join(str(s) for s in r.skipped) + "\n", f"skipped/{r.name}.txt")
    for fname, text in r.artifacts.items():
        mlflow.log_text(text, f"transcripts/{fname}")
    if r.type in ("redteam", "transcripts"):
        mlflow.log_text(
            "\n".join(json.dumps(p, ensure_ascii=False) for p in r.predictions) + "\n", f"transcripts/{r.name}.jsonl"
        )


def _cell(v):
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return v
