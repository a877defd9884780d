"""The stages' bridge to the pretraining loop (flows/train/loop.py): in this process (`ray.workers: 0`),
or on Ray Train (flows/train/ray_trainer.fit_task: TorchTrainer, checkpoints via ray.train.report)
with `ray.workers` >= 1.

A stage describes what it trains as a `TrainSpec` of picklable parts, so that each Ray worker can
rebuild it: the model directory, `prepare` (LoRA, a value head, a reward head) and `make_task` (the
batch source, sharded by data-parallel rank, and the loss). After a Ray run the driver loads the
final checkpoint's weights into its own copy of the module, so either way the stage evaluates and
exports the trained module in this process.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flows.finetune.common import RunLog, load_policy
from flows.finetune.config import FinetuneConfig


@dataclass
class TrainSpec:
    base: str  # the model directory the policy is loaded from
    prepare: Callable  # (policy, tokenizer) -> the module the loop trains
    make_task: Callable  # (module, tokenizer, dp_rank, dp_size, log: RunLog) -> flows.train.loop.Task


@dataclass
class LoopOutcome:
    step: int
    losses: list[float]  # per-step training loss
    metrics: dict  # the loop's last reported metrics
    data_state: dict  # the batch source's final state_dict() (PPO: its rollout history)
    trainer: str  # "in-process" | "ray-train:<workers>"


def loop_config(fc: FinetuneConfig, steps: int | None = None, eval_every: int = 0):
    from flows.train.config import config_from_dict

    t, r = fc.train, fc.ray
    steps = steps or t.steps
    return config_from_dict(
        {
            "name": fc.name,
            "seed": fc.seed,
            "training": {"steps": steps, "micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "precision": "fp32"},
            "optimizer": {
                "lr": t.lr,
                "weight_decay": t.weight_decay,
                "grad_clip": t.grad_clip,
                "no_decay": ["norm", "embedding"],
            },
            "schedule": {"kind": t.schedule, "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio},
            "checkpoint": {"every": steps, "keep": 2},
            "eval": {"every": eval_every, "batches": 4},
            "logging": {"every": 1},
            "ray": {
                "workers": max(1, r.workers),
                "cpus_per_worker": r.cpus_per_worker,
                "use_gpu": r.use_gpu,
                "max_failures": r.max_failures,
            },
        }
    )


def prepare_module(fc: FinetuneConfig, spec: TrainSpec, policy, tokenizer):
    torch.manual_seed(fc.seed)  # LoRA / head init: the same in the driver and in every worker
    return spec.prepare(policy, tokenizer)


def _worker_build(spec: TrainSpec, fc_dict: dict, rank: int, world: int, logger):
    """Runs in each Ray Train worker: the stage's module and Task, rebuilt from the spec."""
    from flows.finetune.config import config_from_dict

    fc = config_from_dict(fc_dict)
    policy, tok = load_policy(spec.base)
    module = prepare_module(fc, spec, policy, tok)
    return module, tok, spec.make_task(module, tok, rank, world, RunLog.for_logger(logger))


def run_loop(
    fc: FinetuneConfig,
    spec: TrainSpec,
    module,
    tokenizer,
    out_dir: Path,
    log: RunLog,
    steps: int | None = None,
    eval_every: int = 0,
) -> LoopOutcome:
    """Train `module` (made by `prepare_module`) with the loop; on return it holds the trained weights.
    The loop's resumable checkpoint (weights + optimizer) is deleted once loaded: the stage's product
    is its export."""
    cfg = loop_config(fc, steps, eval_every)
    if fc.ray.workers:
        return _run_on_ray(fc, cfg, spec, module, Path(out_dir), log)
    from flows.train.loop import Runtime, train

    staging = Path(out_dir) / "train_checkpoints"
    rt = Runtime(
        rank=0,
        world_size=1,
        local_rank=0,
        device=torch.device("cpu"),
        persist=None,
        latest=None,
        staging_dir=staging,
        run_dir=Path(out_dir),
        logger=log.loop_logger,
    )
    log.tag("herd.trainer", "in-process")
    task = spec.make_task(module, tokenizer, 0, 1, log)
    module.train()
    result = train(cfg, rt, task=task, model_builder=lambda _cfg: (module, tokenizer))
    shutil.rmtree(staging, ignore_errors=True)
    return LoopOutcome(result.step, result.losses, result.metrics, task.train_data.state_dict(), "in-process")


def _run_on_ray(fc: FinetuneConfig, cfg, spec: TrainSpec, module, out: Path, log: RunLog) -> LoopOutcome:
    from flows.train.ray_trainer import fit_task
    from model.checkpoint import read_weights

    storage = Path(fc.ray.storage_path or out / "ray").resolve()
    run_dir = storage / f"finetune-{fc.stage}-{fc.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = f"ray-train:{fc.ray.workers}"
    log.tag("herd.trainer", trainer)
    build = functools.partial(_worker_build, spec, fc.to_dict())
    try:
        result, summary = fit_task(cfg, build, run_dir, log.tracking_uri, log.run_id)
        with result.checkpoint.as_directory() as d:
            state = read_weights(Path(d) / "model")
        module.load_state_dict(state, strict=True)
    finally:
        shutil.rmtree(run_dir if fc.ray.storage_path else storage, ignore_errors=True)
    return LoopOutcome(
        int(summary["step"]), list(summary["losses"]), dict(summary["metrics"]), dict(summary["data_state"]), trainer
    )
