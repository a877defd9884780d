"""Pretraining on Ray Train (V2): a thin TorchTrainer around the plain-torch loop.

Driver: resolves the config, opens (or reopens, on --resume) the MLflow run and logs the
params, starts `TorchTrainer` with `ScalingConfig`, `RunConfig(storage_path, FailureConfig,
CheckpointConfig)`, then exports the final weights and logs the checkpoint references.
Workers: `ray.train.get_context()` for ranks, `ray.train.get_checkpoint()` to restore,
`ray.train.report(metrics, checkpoint=...)` to persist. Ray Train V2 keeps only metrics that
come with a checkpoint, so every metric also goes to MLflow from rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows import progress
from flows.ray_runtime import init_ray
from flows.train.config import PretrainConfig, load_config
from model.errors import HerdError

RUN_FILE = "herd-run.json"  # in the run folder: MLflow run id, config, for --resume
WARNINGS_FILE = "herd-warnings.jsonl"
RESULT_FILE = "herd-result.json"  # a `build` run's summary from rank 0 (losses, data-source state)
ATTEMPTS_FILE = "herd-attempts.jsonl"  # one line per worker start: rank, node, the checkpoint it resumed from


@dataclass
class PretrainResult:
    model_dir: str | None  # the final weights in herd's native format
    checkpoint: str | None  # the last training checkpoint Ray persisted
    metrics: dict  # rank 0's metrics at the last checkpoint (loss, val_loss, tokens_per_s, mfu, ...)
    mlflow_run_id: str | None
    run_dir: str
    name: str
    warnings: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def _run_name(cfg: PretrainConfig, storage: Path, resume: bool) -> str:
    if cfg.ray.name:
        return cfg.ray.name
    prefix = f"pretrain-{cfg.name}-"
    if resume:
        runs = sorted(
            (p for p in storage.glob(prefix + "*") if (p / RUN_FILE).is_file()), key=lambda p: p.stat().st_mtime
        )
        if not runs:
            raise HerdError(f"--resume: no earlier run of {cfg.name!r} under {storage} (set ray.name)")
        return runs[-1].name
    return prefix + time.strftime("%Y%m%d-%H%M%S")


# --- worker ----------------------------------------------------------------------------------


def _ray_worker(config: dict) -> None:
    import ray.train
    import torch

    from flows.train.config import config_from_dict
    from flows.train.loop import Runtime, train
    from flows.train.metrics import MlflowLogger

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.ray.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, cfg.ray.cpus_per_worker))
    run_dir = Path(config["run_dir"])
    staging = Path(tempfile.mkdtemp(prefix="herd-ckpt-"))

    def persist(path, metrics, step):
        # Every worker uploads its shards under the same name; Ray Train merges them into one folder.
        clean = {k: float(v) for k, v in metrics.items()}
        ray.train.report(
            clean, checkpoint=ray.train.Checkpoint.from_directory(str(path)), checkpoint_dir_name=path.name
        )
        shutil.rmtree(path, ignore_errors=True)
        return str(run_dir / path.name)

    def latest():
        c = ray.train.get_checkpoint()
        if c is None:
            return None
        p = Path(c.path)
        if p.is_dir():  # local or mounted storage: siblings are there for a fallback
            return p, p.parent
        local = Path(c.to_directory(str(staging / "restore" / Path(c.path).name)))
        return local, local.parent

    logger = MlflowLogger(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    _record_attempt(run_dir, rank, world, logger)
    rt = Runtime(
        rank=rank,
        world_size=world,
        local_rank=ctx.get_local_rank(),
        device=device,
        persist=persist,
        latest=latest,
        staging_dir=staging,
        run_dir=run_dir,
        logger=logger,
        restartable=True,
    )
    build = config.get("build")  # post-training: (rank, world, logger) -> (model, tokenizer, Task)
    # The loop's progress ticks reach the lifecycle step this training runs for (if any).
    with progress.adopted(config.get("progress")):
        try:
            if build is None:
                result = train(cfg, rt)
            else:
                model, tokenizer, task = build(rank, world, logger)
                result = train(cfg, rt, task=task, model_builder=lambda _cfg: (model, tokenizer))
                if rank == 0:
                    summary = {
                        "step": result.step,
                        "losses": result.losses,
                        "metrics": result.metrics,
                        "data_state": task.train_data.state_dict(),
                    }
                    (run_dir / RESULT_FILE).write_text(json.dumps(summary, default=float))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if rank == 0 and result.warnings:
        with open(run_dir / WARNINGS_FILE, "a") as f:
            for w in result.warnings:
                f.write(json.dumps({"warning": w, "time": time.time()}) + "\n")


def _record_attempt(run_dir: Path, rank: int, world: int, logger) -> None:
    """Each worker start is a line in the run folder; a start with a checkpoint to resume from
    follows a failure (a worker or a whole node lost; or `--resume`), and rank 0 puts it on the
    MLflow run: metric `restarts` and tag `herd.restart.<n>` (where, and from which checkpoint)."""
    import ray
    import ray.train

    ckpt = ray.train.get_checkpoint()
    line = {
        "rank": rank,
        "world": world,
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "resumed_from": ckpt.path if ckpt is not None else None,
        "time": time.time(),
    }
    with open(run_dir / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")
    if rank != 0 or ckpt is None:
        return
    from flows.train.guard import read_events

    hangs = read_events(run_dir, "hang")  # a worker the watchdog ended could not log them itself
    for i, event in enumerate(hangs, 1):
        if logger:
            logger.tag(f"herd.hang.{i}", json.dumps(event))
    if hangs and logger:
        logger.metrics({"hangs": len(hangs)}, hangs[-1]["step"])
    starts = [json.loads(x) for x in (run_dir / ATTEMPTS_FILE).read_text().splitlines() if x.strip()]
    restarts = sum(1 for a in starts if a["rank"] == 0 and a["resumed_from"])
    print(
        f"herd pretrain: restart {restarts}: resuming from {ckpt.path} (rank 0 on {line['node_ip']})",
        file=sys.stderr,
        flush=True,
    )
    if logger:
        logger.tag(
            f"herd.restart.{restarts}",
            f"worker group restarted after a failure; rank 0 on {line['node_ip']}; resuming from {ckpt.path}",
        )
        from flows.train.checkpoint import step_of

        logger.metrics({"restarts": restarts}, step_of(ckpt.path) or 0)


# --- driver ----------------------------------------------------------------------------------


def run_pretrain(
    config: PretrainConfig | str | Path,
    *,
    data_dir: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    init_from: str | None = None,
    steps: int | None = None,
    name: str | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool | None = None,
    export_dir: str | Path | None = None,
) -> PretrainResult:
    """Run pretraining on Ray Train; returns the exported model folder, final metrics, MLflow run id."""
    cfg = config if isinstance(config, PretrainConfig) else load_config(config)
    over: dict = {}
    if data_dir:
        over["data"] = {"dir": str(data_dir)}
    if workers:
        over["ray"] = {"workers": int(workers)}
    if name:
        over.setdefault("ray", {})["name"] = name
    if storage_path:
        over.setdefault("ray", {})["storage_path"] = str(storage_path)
    if init_from:
        over["model"] = {"init_from": init_from}
    if steps:
        over["training"] = {"steps": int(steps)}
    if tracking_uri:
        over["mlflow"] = {"tracking_uri": tracking_uri}
    if mlflow is not None:
        over.setdefault("mlflow", {})["enabled"] = bool(mlflow)
    if over:
        cfg = cfg.replace(**over)

    from flows.data.shards import read_manifest, verify
    from flows.train.data import manifest_digest
    from model.sources import resolve_model

    if not cfg.data.dir:
        raise HerdError("pretrain: no data: set data.dir in the config or pass --data DIR (from `herd data prep`)")
    cfg = cfg.replace(data={"dir": str(Path(cfg.data.dir).resolve())})
    manifest = read_manifest(cfg.data.dir)
    verify(cfg.data.dir)  # a corrupted shard is refused here, before any worker reads it
    if cfg.model.init_from:
        # Import once here, so the workers do not race to convert the same weights.
        resolved = resolve_model(cfg.model.init_from)
        if not resolved.exists():
            raise HerdError(f"model.init_from: {resolved} not found")
        cfg = cfg.replace(model={"init_from": str(resolved.resolve())})

    storage = Path(os.path.expanduser(cfg.ray.storage_path or "~/ray_results")).resolve()
    run_name = _run_name(cfg, storage, resume)
    run_dir = storage / run_name
    if not resume and (run_dir / RUN_FILE).exists():
        raise HerdError(f"{run_dir}: a run of that name exists; pass --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    prior = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}

    run_id, uri, ml = None, None, None
    if cfg.mlflow.enabled:
        from flows.tracking import absolute_tracking_uri, git_sha, setup_mlflow

        uri = absolute_tracking_uri(cfg.mlflow.tracking_uri or None)
        ml = setup_mlflow(uri, cfg.mlflow.experiment or None)
        if prior.get("mlflow_run_id"):
            run = ml.start_run(run_id=prior["mlflow_run_id"])
        else:
            run = ml.start_run(run_name=run_name)
            ml.set_tags({"herd.stage": "pretrain", "herd.git_sha": git_sha(), "herd.run_dir": str(run_dir)})
            params = cfg.flat()
            params.update(
                {
                    "seed": str(cfg.seed),
                    "git_sha": git_sha(),
                    "data.manifest_sha256": manifest_digest(cfg.data.dir),
                    "data.seq_len": str(manifest["seq_len"]),
                    "data.tokenizer": str(manifest.get("tokenizer", {}).get("name")),
                    "data.train_sequences": str(manifest["splits"]["train"]["sequences"]),
                }
            )
            ml.log_params({k: v[:6000] for k, v in params.items()})
        run_id = run.info.run_id
    (run_dir / RUN_FILE).write_text(
        json.dumps({"mlflow_run_id": run_id, "name": run_name, "config": cfg.to_dict()}, indent=2)
    )

    try:
        result = _fit(cfg, run_name, storage, run_dir, uri, run_id)
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        metrics = dict(result.metrics or {})
        model_dir = None
        if checkpoint is not None:
            model_dir = Path(export_dir) if export_dir else run_dir / "model"
            if model_dir.exists():
                shutil.rmtree(model_dir)
            from model.checkpoint import consolidate

            with result.checkpoint.as_directory() as d:  # the folder itself on local or mounted storage
                consolidate(Path(d) / "model", model_dir)  # the sharded weights as one native folder
            model_dir = str(model_dir)
        kept = [c.path for c, _ in (result.best_checkpoints or [])]
        warns = []
        if (run_dir / WARNINGS_FILE).is_file():
            warns = [
                json.loads(line)["warning"]
                for line in (run_dir / WARNINGS_FILE).read_text().splitlines()
                if line.strip()
            ]
        if ml is not None:
            ml.set_tags(
                {
                    "herd.checkpoint": str(checkpoint),
                    "herd.model_dir": str(model_dir),
                    "herd.checkpoints": json.dumps(kept)[:5000],
                }
            )
            with tempfile.TemporaryDirectory() as tmp:
                refs = {
                    "run_dir": str(run_dir),
                    "final_checkpoint": checkpoint,
                    "kept_checkpoints": kept,
                    "model_dir": model_dir,
                    "warnings": warns,
                }
                Path(tmp, "checkpoints.json").write_text(json.dumps(refs, indent=2) + "\n")
                ml.log_artifact(str(Path(tmp, "checkpoints.json")))
                if model_dir:
                    ml.log_artifact(str(Path(model_dir) / "herd.json"), artifact_path="model")
            final = {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            ml.log_metrics(final)
        return PretrainResult(model_dir, checkpoint, metrics, run_id, str(run_dir), run_name, warns, kept)
    except BaseException:
        if ml is not None:
            ml.set_tag("herd.error", "failed")
            ml.end_run(status="FAILED")
            ml = None
        raise
    finally:
        if ml is not None:
            ml.end_run()


def fit_task(
    cfg: PretrainConfig, build, run_dir: str | Path, tracking_uri: str | None = None, run_id: str | None = None
):
    """Run the loop on Ray Train with a model and Task that `build(rank, world, logger)` makes in each
    worker (post-training). `cfg` gives the loop settings and `ray` scaling; the run folder is
    `run_dir`. Returns (Ray's Result, rank 0's summary: step, losses, metrics, data_state)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    from flows.tracking import absolute_tracking_uri

    uri = absolute_tracking_uri(tracking_uri) if tracking_uri else None
    result = _fit(cfg, run_dir.name, run_dir.parent, run_dir, uri, run_id, build=build)
    summary = json.loads((run_dir / RESULT_FILE).read_text())
    return result, summary


def _fit(
    cfg: PretrainConfig, run_name: str, storage: Path, run_dir: Path, uri: str | None, run_id: str | None, build=None
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    loop_config = {
        "cfg": cfg.to_dict(),
        "run_dir": str(run_dir),
        "tracking_uri": uri,
        "run_id": run_id,
        "progress": progress.handoff(),
    }
    if build is not None:
        loop_config["build"] = build
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
    )
    try:
        return trainer.fit()
    except HerdError:
        raise
    except Exception as e:  # TrainingFailedError: the workers' error, once retries are spent
        cause = e
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        if isinstance(cause, HerdError):
            raise HerdError(str(cause)) from None
        print(f"herd pretrain: training failed: {e}", file=sys.stderr)
        raise
