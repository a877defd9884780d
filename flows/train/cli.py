"""`herd pretrain`: pretraining on Ray Train (or local processes with --local)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain or continue pretraining on Ray Train")
    p.add_argument("--config", default="configs/pretrain/default.yaml", help="YAML under configs/pretrain/")
    p.add_argument("--workers", type=int, default=None, help="training workers (default: the config's ray.workers)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest run of this config (or ray.name / --name) from its last good checkpoint",
    )
    p.add_argument("--data", default=None, metavar="DIR", help="packed data from `herd data prep` (default: data.dir)")
    p.add_argument("--steps", type=int, default=None, help="override training.steps")
    p.add_argument("--name", default=None, help="run name (folder under the Ray storage path)")
    p.add_argument(
        "--init-from", default=None, metavar="PATH", help="continue from a checkpoint (herd/HF dir, .gguf, smollm2)"
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not record the run in MLflow")
    p.add_argument(
        "--local",
        metavar="DIR",
        default=None,
        help="run without Ray: local processes, checkpoints and the export under DIR",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="build the model on the meta device with the config's parallel layout over --workers "
        "ranks and print parameters and estimated GPU memory per rank (no allocation, no training)",
    )
    p.add_argument("--seq", type=int, default=8192, help="--plan: tokens per sequence")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="--plan: memory of one GPU, GB")
    p.set_defaults(func=pretrain_command)


def pretrain_command(args: argparse.Namespace) -> int:
    from flows.train.config import load_config

    cfg = load_config(args.config)
    if args.plan:
        from flows.train.plan import plan_memory

        plan = plan_memory(cfg, args.workers or cfg.ray.workers, args.seq, args.gpu_gb)
        print(plan.report())
        return 0 if plan.fits else 1
    if args.local:
        return _local(cfg, args)
    from flows.train.ray_trainer import run_pretrain

    r = run_pretrain(
        cfg,
        data_dir=args.data,
        workers=args.workers,
        resume=args.resume,
        steps=args.steps,
        name=args.name,
        init_from=args.init_from,
        mlflow=False if args.no_mlflow else None,
    )
    keys = ("loss", "val_loss", "val_perplexity", "initial_val_loss", "tokens_per_s", "mfu", "step")
    print(
        json.dumps(
            {
                "model_dir": r.model_dir,
                "checkpoint": r.checkpoint,
                "mlflow_run_id": r.mlflow_run_id,
                "run_dir": r.run_dir,
                "metrics": {k: r.metrics[k] for k in keys if k in r.metrics},
                "warnings": r.warnings,
            },
            indent=2,
        )
    )
    return 0


def _local(cfg, args) -> int:
    import shutil
    from pathlib import Path

    from flows.train.launch import run_local
    from model.checkpoint import consolidate
    from model.sources import resolve_model

    over = {}
    if args.data:
        over["data"] = {"dir": args.data}
    if args.steps:
        over["training"] = {"steps": args.steps}
    if args.init_from or cfg.model.init_from:
        over["model"] = {"init_from": str(resolve_model(args.init_from or cfg.model.init_from))}
    cfg = cfg.replace(**over) if over else cfg
    out = Path(args.local)
    if not args.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        from model.errors import HerdError

        raise HerdError(f"{out}: holds checkpoints of an earlier run; pass --resume or another folder")
    r = run_local(cfg, args.workers or cfg.ray.workers, out)
    model_dir = None
    if r.checkpoint:
        model_dir = out / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        consolidate(Path(r.checkpoint) / "model", model_dir)
    print(
        json.dumps(
            {"model_dir": str(model_dir), "checkpoint": r.checkpoint, "metrics": r.metrics, "warnings": r.warnings},
            indent=2,
        )
    )
    return 0
