"""`herd run` and `herd lineage`: parse the arguments, call the lifecycle, print what it returns.

flows/cli.py registers both; `python -m flows.lifecycle` (flows/lifecycle/__main__.py) parses the
same arguments as `herd run` here, without loading the other command groups.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from flows.console import Console
from flows.lifecycle.config import deep_merge
from flows.lifecycle.lineage import lineage_chain
from flows.lifecycle.run import run_lifecycle
from model.errors import HerdError

# A RayJob's entrypoint is fixed in its manifest; this variable adds overrides without editing it.
OVERRIDES_ENV = "HERD_LIFECYCLE_OVERRIDES"


def _add_run_args(p) -> None:
    p.add_argument(
        "--config",
        default="configs/default.yaml",
        help="lifecycle YAML (configs/default.yaml, configs/lifecycle/*.yaml)",
    )
    p.add_argument(
        "--force",
        nargs="+",
        action="extend",
        default=[],
        metavar="STAGE",
        help="rerun STAGE and everything downstream of it, cached or not",
    )
    p.add_argument(
        "--workdir", default=None, help="where step folders go (default: the config's workdir, or $HERD_RUN_DIR)"
    )
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    p.add_argument(
        "--overrides",
        nargs="+",
        action="extend",
        default=None,
        metavar="YAML",
        help=f"YAML files merged over the config, in order, then those in ${OVERRIDES_ENV} "
        "(os.pathsep-separated), e.g. configs/lifecycle/shrink.yaml",
    )
    p.add_argument("--serve", action="store_true", help="keep the endpoint up after the run (Ctrl-C stops it)")
    p.add_argument(
        "--stream-logs",
        action="store_true",
        help="stream the stages' and Ray workers' output here instead of only into the run's logs folder",
    )


def register(subparsers) -> None:
    run = subparsers.add_parser("run", help="the lifecycle: data -> train -> eval -> register -> serve, cached")
    _add_run_args(run)
    run.set_defaults(func=run_command)
    lin = subparsers.add_parser("lineage", help="print the chain from a model back to its raw data")
    lin.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a run id")
    lin.add_argument("--tracking-uri", default=None)
    lin.set_defaults(func=lineage_command)


def main(argv: list[str]) -> int:
    """`python -m flows.lifecycle ARGS` = `herd run ARGS`."""
    import argparse

    from flows.cli import dispatch

    p = argparse.ArgumentParser(prog="python -m flows.lifecycle", description="the lifecycle (= herd run)")
    _add_run_args(p)
    p.set_defaults(func=run_command)
    return dispatch(p.parse_args(argv))


def override_files(flag: list[str] | None) -> list[str]:
    """--overrides files, then those of $HERD_LIFECYCLE_OVERRIDES (os.pathsep-separated)."""
    return list(flag or []) + [p for p in os.environ.get(OVERRIDES_ENV, "").split(os.pathsep) if p]


def read_overrides(paths: list[str], config: str) -> dict:
    """The override files merged in order. They adjust the stages `config` has and never add
    one: a stage merely named in an override would run."""
    merged: dict = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise HerdError(f"lifecycle overrides {p}: no such file")
        doc = yaml.safe_load(p.read_text()) or {}
        if not isinstance(doc, dict):
            raise HerdError(f"lifecycle overrides {p}: expected a mapping like the lifecycle config")
        merged = deep_merge(merged, doc)
    if "stages" in merged and Path(config).is_file():
        have = (yaml.safe_load(Path(config).read_text()) or {}).get("stages") or {}
        merged["stages"] = {k: v for k, v in merged["stages"].items() if k in have}
    return merged


def run_command(args) -> int:
    files = override_files(args.overrides)
    overrides = read_overrides(files, args.config)
    if files:
        print(f"lifecycle overrides: {', '.join(files)}")
    with Console(stream_logs=args.stream_logs) as console:
        res = run_lifecycle(
            args.config,
            force=args.force,
            overrides=overrides,
            workdir=args.workdir,
            tracking_uri=args.tracking_uri,
            log=console,
            events=console.event,
            stream_logs=args.stream_logs,
        )
    print()
    print(_table(res.summary_rows(), ["stage", "status", "seconds", "key", "run", "result"]))
    ran = sum(r["status"] == "ran" for r in res.steps.values())
    print(
        f"\n{len(res.steps)} steps: {ran} ran, {len(res.steps) - ran} cached, {res.seconds:.1f}s "
        f"(parent run {res.parent_run_id})"
    )
    from flows.tracking import client, dashboard_url

    exp = client(res.tracking_uri).get_run(res.parent_run_id).info.experiment_id
    print(
        f"MLflow: mlflow server --backend-store-uri {res.tracking_uri} --port 5000   ->  "
        f"{dashboard_url('http://127.0.0.1:5000', exp, res.parent_run_id)}"
    )
    dep = res.steps.get("deploy")
    if dep:
        answer = dep["outputs"].get("smoke_answer")
        lives = "; it stops when this command ends (--serve keeps it up)" if res.local_ray and not args.serve else ""
        print(f"endpoint: {dep['outputs'].get('url')}" + (f"  (smoke answer {answer!r})" if answer else "") + lives)
        if args.serve:
            print("serving; Ctrl-C stops", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def lineage_command(args) -> int:
    for i, e in enumerate(lineage_chain(args.uri, args.tracking_uri)):
        print(
            ("  " * min(i, 1))
            + ("<- " if i else "")
            + e["what"]
            + (f"  [run {e['run_id']}]" if e.get("run_id") else "")
        )
        for k, v in e["tags"].items():
            print(("  " * min(i, 1)) + f"     {k}: {v}")
    return 0


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
