"""The `herd` console script: one entry point, one module per subcommand group.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its
subcommand(s) with `set_defaults(func=...)`; `func(args)` returns an exit code.
Modules are imported only when listed, so a broken optional stage cannot break the rest.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from model.errors import HerdError

COMMAND_MODULES = [
    "services.cli",
    "model.cli",
    "infra.k8s_cli",
    "flows.data.cli",
    "flows.train.cli",
    "flows.eval.cli",
    "flows.finetune.cli",
    "flows.lifecycle.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="herd: data -> training -> evaluation -> serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed subcommand's `func`, its errors as one line and an exit code."""
    try:
        return int(args.func(args) or 0)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"herd: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("herd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
