"""Driver programs that tests/test_multinode.py runs inside a node's network namespace (the
cluster's addresses are reachable only there). Each connects to the cluster at $RAY_ADDRESS (or,
with --local, starts a one-node Ray) and writes what it found as JSON to the given file.

  python -m tests.multinode_driver pretrain CONFIG.json OUT.json
  python -m tests.multinode_driver prep CONFIG.json DATA_DIR OUT.json [--local]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _connect(local: bool) -> None:
    import ray

    if local:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    print(f"driver: connected to {len(alive)} node(s): {', '.join(sorted(alive))}", flush=True)


def pretrain(config: Path, out: Path) -> None:
    from flows.train.config import config_from_dict
    from flows.train.ray_trainer import run_pretrain

    _connect(local=False)
    r = run_pretrain(config_from_dict(json.loads(config.read_text())))
    out.write_text(json.dumps({"metrics": r.metrics, "run_dir": r.run_dir, "mlflow_run_id": r.mlflow_run_id,
                               "checkpoint": r.checkpoint, "warnings": r.warnings}, default=float))


def prep(config: Path, data_dir: Path, out: Path, local: bool) -> None:
    import ray

    from flows.data.config import config_from_dict
    from flows.data.pipeline import run_prep
    from flows.train.data import manifest_digest

    _connect(local)
    nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    report, _ = run_prep(config_from_dict(json.loads(config.read_text())), data_dir)
    out.write_text(json.dumps({"manifest_digest": manifest_digest(data_dir), "nodes": nodes,
                               "kept": report["kept"], "input_documents": report["input_documents"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("config", type=Path)
    p.add_argument("out", type=Path)
    d = sub.add_parser("prep")
    d.add_argument("config", type=Path)
    d.add_argument("data_dir", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--local", action="store_true")
    a = ap.parse_args()
    if a.cmd == "pretrain":
        pretrain(a.config, a.out)
    else:
        prep(a.config, a.data_dir, a.out, a.local)


if __name__ == "__main__":
    main()
