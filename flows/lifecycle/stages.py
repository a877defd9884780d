"""The lifecycle's stages: thin adapters from a StepContext to each stage package's entry function.

Each adapter reads its resolved stage config (the stage's own YAML with the lifecycle's overrides),
its inputs, and its key-named folder; it returns outputs, metrics and lineage (see flows/lifecycle/__init__.py).
Stage packages log into the step's MLflow run (it is the active run while the adapter runs), or
into a run nested under it where they open their own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flows.lifecycle.lineage import lineage_tags, tag_model_version
from flows.lifecycle.plan import Stage, StepContext, tree_digest
from flows.lifecycle.serving import deploy_stage, endpoint_serves
from model.errors import HerdError
from model.sources import SMOLLM2

MODEL_FROM = ["ppo", "dpo", "rs", "sft", "pretrain"]


def _after(stage: str) -> list[str]:
    """Model stages upstream of `stage`, nearest first."""
    return MODEL_FROM[MODEL_FROM.index(stage) + 1 :] if stage in MODEL_FROM else MODEL_FROM


# --- data ---------------------------------------------------------------------------------------


def data_config(config: dict):
    from flows.data.config import config_from_dict

    raw = {**config, "mlflow": {"enabled": False}}  # the step run is the record
    if (raw.get("pack") or {}).get("tokenizer") == SMOLLM2:  # the base model's own tokenizer
        from model.sources import resolve_model

        raw["pack"] = {**raw["pack"], "tokenizer": str(resolve_model(SMOLLM2))}
    return config_from_dict(raw)


def data_stage(ctx: StepContext) -> dict:
    import mlflow

    from flows.data.pipeline import run_prep
    from flows.data.record import log_prep
    from flows.train.data import manifest_digest

    cfg = data_config(ctx.config)
    cfg.ray.progress_bars = False
    out = ctx.out_dir / "data"
    report, quality = run_prep(cfg, out, log=ctx.log)
    log_prep(mlflow, report, quality, out)
    digest = manifest_digest(out)
    ctx.log(f"{report['input_documents']} documents in, {report['kept']} kept; manifest sha256 {digest[:16]}")
    return {
        "outputs": {"data_dir": str(out)},
        "digest": digest,
        "metrics": {
            "kept_documents": report["kept"],
            "input_documents": report["input_documents"],
            "train_tokens": report["shards"].get("train", {}).get("tokens", 0),
        },
        "lineage": {"data.input_sha256": report["input"]["digest"], "data.manifest_digest": digest},
        "summary": f"{report['kept']}/{report['input_documents']} docs, manifest {digest[:12]}",
    }


# --- training -----------------------------------------------------------------------------------


def pretrain_config(config: dict, seed: int = 0):
    from flows.train.config import config_from_dict

    return config_from_dict({**config, "seed": seed})


def pretrain_stage(ctx: StepContext) -> dict:
    from flows.train import run_pretrain

    data = ctx.input("data")
    if data is None:
        raise HerdError("pretrain needs the data stage (stages.data.enabled)")
    cfg = pretrain_config(ctx.config, ctx.seed)
    init = cfg.model.init_from or (ctx.lifecycle.base_model if ctx.params.get("from_base", True) else "")
    storage = ctx.out_dir / "ray_train"
    name = f"lifecycle-{ctx.key[:16]}"
    resume = (storage / name).is_dir()  # a killed attempt left its run folder: Ray Train continues it
    # what a killed attempt persisted (Ray Train restores the newest valid one of them)
    left = sorted(p.name for p in (storage / name).glob("step-*") if p.is_dir()) if resume else []
    if resume:
        ctx.log(f"resuming {storage / name}: checkpoints on disk {', '.join(left) or 'none'}")
    res = run_pretrain(
        cfg,
        data_dir=data["outputs"]["data_dir"],
        init_from=init or None,
        name=name,
        storage_path=str(storage),
        resume=resume,
        mlflow=False,
        export_dir=ctx.out_dir / "model",
    )
    if not res.model_dir:
        raise HerdError("pretrain produced no model")
    metrics = _flat_metrics(res.metrics)
    return {
        "outputs": {"model_dir": res.model_dir, "checkpoint": res.checkpoint, "resumed_with": left},
        "metrics": metrics,
        "digest": tree_digest([Path(res.model_dir)]),
        "summary": f"loss {metrics.get('loss', float('nan')):.3f}"
        + (f" (resumed: {left[-1]})" if left else " (resumed)" if resume else ""),
    }


# flows.finetune's entry point per lifecycle stage (each returns StageResult(checkpoint, metrics, run_id))
FINETUNE_FNS = {"sft": "run_sft", "rs": "run_rejection_sampling", "dpo": "run_dpo", "ppo": "run_ppo"}


def _flat_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a stage's metrics (finetune's also hold dicts, strings and run ids, which stay
    in its own MLflow run); non-finite values are dropped so cached and fresh results compare equal."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def finetune_config(kind: str, config: dict, seed: int = 0, tracking_uri: str = "", experiment: str = ""):
    """The stage's FinetuneConfig: its YAML with the lifecycle's seed, and MLflow pointed at the
    lifecycle's store and experiment (so its run nests under the step run)."""
    from flows.finetune.config import config_from_dict

    stage = config.get("stage", kind)
    if stage != kind:
        raise HerdError(f"config: stage is {stage!r}, expected {kind!r}")
    sampling = {**(config.get("sampling") or {}), "seed": seed}
    mlflow = {"enabled": True, "tracking_uri": tracking_uri, "experiment": experiment}
    return config_from_dict({**config, "stage": kind, "seed": seed, "sampling": sampling, "mlflow": mlflow})


def _finetune_check(kind: str):
    def check(config: dict) -> None:
        finetune_config(kind, config)

    return check


def _finetune(kind: str):
    def stage(ctx: StepContext) -> dict:
        import flows.finetune as ft

        fc = finetune_config(kind, ctx.config, ctx.seed, ctx.lifecycle.tracking_uri, ctx.lifecycle.experiment)
        fn = getattr(ft, FINETUNE_FNS[kind])
        base = ctx.model_dir()
        ctx.log(f"{FINETUNE_FNS[kind]} on {base}: {fc.train.steps} steps, seed {fc.seed}")
        res = fn(fc, base, ctx.out_dir, run_name=f"{kind}-{ctx.lifecycle.name}")
        metrics = _flat_metrics(res.metrics)
        ctx.log(f"done: {_finetune_summary(metrics)}; MLflow run {res.run_id}")
        return {
            "outputs": {"model_dir": str(res.checkpoint), "finetune_run_id": res.run_id or ""},
            "metrics": metrics,
            "digest": tree_digest([Path(res.checkpoint)]),
            "summary": _finetune_summary(metrics),
        }

    stage.__name__ = f"{kind}_stage"
    return stage


def _finetune_summary(m: dict) -> str:
    parts = []
    for name, before, after in (
        ("exact", "exact_match_before", "exact_match_after"),
        ("reward", "reward_before", "reward_after"),
        ("margin", "heldout_margin_before", "heldout_margin_after"),
    ):
        if before in m and after in m:
            parts.append(f"{name} {m[before]:.3g}->{m[after]:.3g}")
    if "train_loss_first" in m:
        parts.append(f"loss {m['train_loss_first']:.3g}->{m['train_loss_last']:.3g}")
    if "kept" in m:
        parts.append(f"kept {m['kept']:.0f}/{m.get('prompts', 0):.0f}")
    return ", ".join(parts[:3])


# --- evaluation and registry -------------------------------------------------------------------


def eval_stage(ctx: StepContext) -> dict:
    from flows.eval.stage import run_eval

    cfg = {
        **ctx.config,
        "mlflow": {
            **(ctx.config.get("mlflow") or {}),
            "enabled": True,
            "tracking_uri": ctx.lifecycle.tracking_uri,
            "experiment": ctx.lifecycle.experiment,
        },
    }
    res = run_eval(
        cfg,
        ctx.model_dir(),
        run_name=f"eval-{ctx.lifecycle.name}",
        tags={"herd.lifecycle": ctx.lifecycle.name, "herd.step.key": ctx.key},
    )
    main = res.summary()["metrics"]
    (ctx.out_dir / "metrics.json").write_text(json.dumps(res.metrics, indent=2, sort_keys=True) + "\n")
    return {
        "outputs": {
            "eval_run_id": res.run_id,
            "config_hash": res.config_hash,
            "model_dir": ctx.model_dir(),
            "config": ctx.config,
        },  # promote re-evaluates a stale champion under it
        "metrics": _flat_metrics(res.metrics),
        "digest": None,
        "summary": ", ".join(f"{k}={v:.4g}" for k, v in list(main.items())[:3]),
    }


def register_stage(ctx: StepContext) -> dict:
    from flows.eval.registry import register_model

    ev = ctx.input("eval")
    name = ctx.config.get("name", "herd")
    mv = register_model(
        ctx.model_dir(),
        name,
        run_id=ctx.run_id,
        metrics=(ev or {}).get("metrics") or {},
        config_hash=(ev or {}).get("outputs", {}).get("config_hash"),
        tracking_uri=ctx.lifecycle.tracking_uri,
        tags=lineage_tags(ctx),
    )
    tag_model_version(ctx, name, mv.version)
    return {
        "outputs": {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}"},
        "digest": f"{name}/{mv.version}",
        "summary": f"models:/{name}/{mv.version} @candidate",
    }


def _version_exists(result: dict) -> bool:
    """The version is still registered, with its files' sha256 (a version registered before herd
    recorded them cannot be loaded, so its step runs again)."""
    from flows.eval.integrity import recorded_digests
    from flows.eval.registry import get_version

    return bool(recorded_digests(get_version(result["outputs"]["uri"])))


def promote_stage(ctx: StepContext) -> dict:
    from flows.eval.gate import GateConfig, promote

    reg = ctx.input("register")
    ev = ctx.input("eval")
    name = reg["outputs"]["name"]

    def evaluate_champion(uri: str):  # under the candidate's eval config, nested in the step's run
        from flows.eval.stage import run_eval

        ecfg = (ev or {}).get("outputs", {}).get("config") or ctx.config
        cfg = {
            **ecfg,
            "mlflow": {
                **(ecfg.get("mlflow") or {}),
                "enabled": True,
                "tracking_uri": ctx.lifecycle.tracking_uri,
                "experiment": ctx.lifecycle.experiment,
            },
        }
        r = run_eval(cfg, uri, run_name=f"eval-{ctx.lifecycle.name}-champion")
        return r.metrics, r.config_hash

    d = promote(
        name,
        GateConfig.parse(ctx.config.get("gate")),
        candidate_metrics=(ev or {}).get("metrics"),
        config_hash=(ev or {}).get("outputs", {}).get("config_hash"),
        evaluate_champion=evaluate_champion,
        tracking_uri=ctx.lifecycle.tracking_uri,
    )
    champion = d.candidate_version if d.promoted else (d.champion_version or d.candidate_version)
    ctx.log(d.reason)
    return {
        "outputs": {
            "name": name,
            "promoted": d.promoted,
            "champion": champion,
            "uri": f"models:/{name}/{champion}",
            "reason": d.reason[:2000],
        },
        "digest": f"{name}/{champion}/{d.promoted}",
        "summary": f"{'promoted' if d.promoted else 'kept'}: champion v{champion}",
    }


MODEL = {"model": MODEL_FROM}
STAGES: dict[str, Stage] = {
    "data": Stage("data", data_stage, code=["flows/data", "model/tokenizer.py"], check=data_config),
    "pretrain": Stage(
        "pretrain",
        pretrain_stage,
        {"data": ["data"]},
        code=["flows/train", "model"],
        resumable=True,
        check=pretrain_config,
    ),
    # the held-out list decides which shared records training drops, so it is part of their code
    **{
        kind: Stage(
            kind,
            _finetune(kind),
            {"model": _after(kind)},
            resumable=True,
            code=["flows/finetune", "model", "flows/heldout.py", "configs/eval/heldout_sources.sha256"],
            check=_finetune_check(kind),
        )
        for kind in ("sft", "rs", "dpo", "ppo")
    },
    "eval": Stage("eval", eval_stage, MODEL, code=["flows/eval", "model"]),
    "register": Stage(
        "register",
        register_stage,
        {**MODEL, "eval": ["eval"], "data": ["data"]},
        code=["flows/eval/registry.py"],
        valid=_version_exists,
    ),
    "promote": Stage(
        "promote",
        promote_stage,
        {"register": ["register"], "eval": ["eval"]},
        code=["flows/eval/registry.py", "flows/eval/gate.py"],
        valid=_version_exists,
    ),
    "deploy": Stage(
        "deploy",
        deploy_stage,
        {"model_version": ["promote", "register"], **MODEL},
        code=["services", "model"],
        valid=endpoint_serves,
    ),
}
