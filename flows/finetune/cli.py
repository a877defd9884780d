"""`herd finetune sft|rs|dpo|ppo|rm --config configs/finetune/<name>.yaml [--model DIR] [--out DIR]`."""

from __future__ import annotations

import json


def _cmd(args) -> int:
    from flows.finetune import STAGES
    from flows.finetune.config import load_config

    fc = load_config(args.config, args.stage)
    if args.tracking_uri:
        fc = fc.replace(mlflow={"tracking_uri": args.tracking_uri})
    if args.no_mlflow:
        fc = fc.replace(mlflow={"enabled": False})
    if args.steps:
        fc = fc.replace(train={"steps": args.steps})
    res = STAGES[args.stage](fc, args.model, args.out)
    summary = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}
    print(
        json.dumps(
            {"stage": args.stage, "checkpoint": res.checkpoint, "run_id": res.run_id, "metrics": summary},
            indent=2,
            default=str,
        )
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="post-training: sft, rs (rejection sampling), dpo, ppo, rm")
    sub = p.add_subparsers(dest="stage", required=True)
    helps = {
        "sft": "supervised fine-tuning (full or LoRA)",
        "rs": "rejection sampling, then SFT on the kept samples",
        "dpo": "direct preference optimisation",
        "ppo": "PPO (or GRPO: ppo.algorithm: grpo)",
        "rm": "Bradley-Terry reward model",
    }
    for stage, text in helps.items():
        s = sub.add_parser(stage, help=text)
        s.add_argument("--config", default=None, help="configs/finetune/<name>.yaml (default: built-in defaults)")
        s.add_argument("--model", default=None, help="input model directory (default: the config's model.base)")
        s.add_argument("--out", default=None, help="output directory (default: outputs/finetune/<name>-<stage>-<time>)")
        s.add_argument("--steps", type=int, default=0, help="override train.steps")
        s.add_argument("--tracking-uri", default=None)
        s.add_argument("--no-mlflow", action="store_true")
        s.set_defaults(func=_cmd)
