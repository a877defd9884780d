"""`herd eval`: evaluate a model, record the run in MLflow, optionally register and promote it."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from model.errors import HerdError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (MMLU, CommonsenseQA, spec-file tasks, perplexity, red-team) into MLflow",
        description="Evaluate a model and record one MLflow run. With --promote, register it as the "
        "'candidate' version and move 'champion' only if it passes the config's noise-aware "
        "gate (flows/eval/gate.py).",
    )
    p.add_argument("--model", required=True, help="herd/HF folder, .gguf file, smollm2, or models:/NAME@ALIAS")
    p.add_argument("--config", default=None, help="eval config (YAML; default configs/eval/default.yaml)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated built-in task names (configs/eval/tasks) or spec files; replaces the config's",
    )
    p.add_argument(
        "--data-dir", default=None, help="folder that relative data paths resolve against (e.g. ../shared/data)"
    )
    p.add_argument("--limit", type=int, default=None, help="at most N questions per subset (MMLU: per subject)")
    p.add_argument("--num-fewshot", type=int, default=None, help="override every multiple-choice task's k")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None)
    p.add_argument("--no-mlflow", action="store_true", help="print the metrics; record nothing")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=None)
    p.add_argument("--register", action="store_true", help="register the model folder as a new 'candidate' version")
    p.add_argument(
        "--promote",
        action="store_true",
        help="register (folder) or take (models:/) the candidate, then run the champion gate",
    )
    p.add_argument("--output", default=None, help="also write the metrics as JSON here")
    p.add_argument(
        "--reference", default=None, help="the model rated tasks compare against (default: the registry's champion)"
    )
    p.set_defaults(func=eval_command)

    s = subparsers.add_parser(
        "evalset",
        help="the sealed human-evaluation prompt set: make a key, build it, check it",
        description="The 1,800-prompt held-out set in 12 use cases (flows/eval/promptset.py), stored "
        "encrypted; the key comes from $HERD_EVAL_KEY or $HERD_EVAL_KEY_FILE. Prints aggregates only.",
    )
    s.add_argument("action", choices=["keygen", "build", "check"])
    s.add_argument("--data-dir", default=None, help="the shared data (sft/, preference/, corpus/), e.g. ../shared/data")
    s.add_argument("--set", default="runs/evalset/humaneval.sealed", help="the sealed file (build writes it)")
    s.add_argument("--per-use-case", type=int, default=None, help="prompts per use case (default 150)")
    s.set_defaults(func=evalset_command)


def evalset_command(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from flows.eval import promptset as P
    from flows.eval.sealed import load_key, new_key, seal, unseal

    if args.action == "keygen":
        print(new_key())
        return 0
    if not args.data_dir:
        raise HerdError(f"herd evalset {args.action} needs --data-dir (the shared prompt data)")
    data_dir = Path(args.data_dir)
    if args.action == "build":
        key = load_key()
        listed = P.write_digests(data_dir)
        built = P.build(data_dir, args.per_use_case or P.PER_USE_CASE)
        seal(P.to_records(built.prompts), args.set, key)
        print(
            f"{len(built.sources)} held-out sources (listed in {listed}); {built.dropped_contaminated} candidates "
            f"dropped for sharing a {P.NGRAM}-gram with a training set; {len(built.prompts)} prompts sealed in "
            f"{args.set}"
        )
    prompts = P.from_records(unseal(args.set))
    counts = Counter(p.use_case for p in prompts)
    print(
        f"{len(prompts)} prompts, {len(counts)} use cases: " + ", ".join(f"{uc} {counts[uc]}" for uc in sorted(counts))
    )
    shared = P.contamination([p.prompt for p in prompts], P.training_grams(P.training_sets(data_dir)))
    for name, n in shared.items():
        print(f"contamination ({P.NGRAM}-gram) with {name}: {n} prompts shared")
    print(f"contamination total: {sum(shared.values())} prompts shared with any training set")
    return 0 if sum(shared.values()) == 0 else 1


def eval_command(args: argparse.Namespace) -> int:
    from flows.eval.stage import load_config, run_eval, task_entries

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = load_config(args.config)
    for key in ("batch_size", "dtype", "device"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.num_fewshot is not None:
        cfg["tasks"] = [{**e, "num_fewshot": args.num_fewshot} for e in task_entries(cfg, args.tasks)]
        args.tasks = None
    if args.no_mlflow:
        if args.promote or args.register:
            raise HerdError("--promote/--register need MLflow: drop --no-mlflow")
        cfg["mlflow"]["enabled"] = False
    model_uri = args.model
    is_registry = model_uri.startswith("models:/")
    result = run_eval(
        cfg,
        model_uri,
        tasks=args.tasks,
        data_dir=args.data_dir,
        limit=args.limit,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        register=(args.register or args.promote) and not is_registry,
        reference=args.reference,
    )
    out = result.summary()
    if args.promote:
        d = promote_after_eval(cfg, result, args)
        out["promotion"] = {
            "promoted": d.promoted,
            "reason": d.reason,
            "candidate_version": d.candidate_version,
            "champion_version": d.champion_version,
            "champion_reevaluated": d.champion_reevaluated,
        }
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def promote_after_eval(cfg: dict, result, args):
    """The gate: candidate = the version just evaluated; the champion is re-evaluated when its eval
    config differs from this one."""
    from flows.eval.gate import GateConfig, promote
    from flows.eval.registry import CANDIDATE, get_version, record_metrics
    from flows.eval.stage import run_eval
    from flows.tracking import client as mlflow_client

    name = cfg["registry"]["name"]
    gate_cfg = GateConfig.parse(cfg["gate"])
    tracking = args.tracking_uri or cfg["mlflow"]["tracking_uri"]
    if result.model_version is None:
        raise HerdError(f"{result.model_uri}: no registry version to promote")
    if args.model.startswith("models:/"):
        mv = get_version(args.model, tracking)
        if mv.name != name:
            raise HerdError(f"{args.model}: registered model {mv.name!r}, the config's registry.name is {name!r}")
        record_metrics(name, mv.version, result.metrics, result.config_hash, tracking)
        mlflow_client(tracking).set_registered_model_alias(name, CANDIDATE, mv.version)

    def evaluate_champion(uri: str):
        print(f"{uri}: evaluated under another eval config; evaluating it under this one", file=sys.stderr)
        r = run_eval(
            cfg,
            uri,
            tasks=args.tasks,
            data_dir=args.data_dir,
            limit=args.limit,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            run_name=f"eval-{cfg['name']}-champion",
        )
        return r.metrics, r.config_hash

    return promote(
        name,
        gate_cfg,
        candidate_metrics=result.metrics,
        config_hash=result.config_hash,
        evaluate_champion=evaluate_champion,
        tracking_uri=tracking,
    )
