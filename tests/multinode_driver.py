"""Driver programs that tests/test_multinode.py runs inside a node's network namespace (the
cluster's addresses are reachable only there). Each connects to the cluster at $RAY_ADDRESS (or,
with --local, starts a one-node Ray) and writes what it found as JSON to the given file.

  python -m tests.multinode_driver pretrain CONFIG.json OUT.json
  python -m tests.multinode_driver prep CONFIG.json DATA_DIR OUT.json [--local]
  python -m tests.multinode_driver serve MODEL_DIR OUT.json      # 2 replicas, one per worker node
  python -m tests.multinode_driver replicas OUT.json             # wait for 2 running replicas
  python -m tests.multinode_driver load URL SECONDS CLIENTS OUT.json
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
    out.write_text(
        json.dumps(
            {
                "metrics": r.metrics,
                "run_dir": r.run_dir,
                "mlflow_run_id": r.mlflow_run_id,
                "checkpoint": r.checkpoint,
                "warnings": r.warnings,
            },
            default=float,
        )
    )


def prep(config: Path, data_dir: Path, out: Path, local: bool) -> None:
    import ray

    from flows.data.config import config_from_dict
    from flows.data.pipeline import run_prep
    from flows.train.data import manifest_digest

    _connect(local)
    nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    report, _ = run_prep(config_from_dict(json.loads(config.read_text())), data_dir)
    out.write_text(
        json.dumps(
            {
                "manifest_digest": manifest_digest(data_dir),
                "nodes": nodes,
                "kept": report["kept"],
                "input_documents": report["input_documents"],
            }
        )
    )


REPLICA_CLASS = "ServeReplica:herd:HerdLLMServer"


def _replica_nodes(want: int, timeout: float) -> list[str]:
    """Addresses of the nodes running the herd replicas, once `want` of them are RUNNING."""
    import time

    import ray
    from ray import serve
    from ray.util.state import list_actors

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    deadline = time.time() + timeout
    while True:
        dep = serve.status().applications["herd"].deployments["HerdLLMServer"]
        alive = [a for a in list_actors(filters=[("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")])]
        if dep.replica_states.get("RUNNING", 0) == want and len(alive) == want:
            ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
            return sorted(ips.get(a.node_id, a.node_id) for a in alive)
        if time.time() > deadline:
            raise TimeoutError(f"{dict(dep.replica_states)} replicas after {timeout:.0f}s")
        time.sleep(1)


def serve_app(model_dir: str, out: Path) -> None:
    from services.deployment import deploy

    _connect(local=False)
    url = deploy(
        model_dir,
        Path(__file__).resolve().parents[1] / "configs" / "serve" / "local.yaml",
        host="0.0.0.0",
        port=8000,
        args={"num_threads": 1, "auth": "none", "engine": {"max_num_seqs": 16, "max_model_len": 256}},
        deployment={
            "num_replicas": 2,
            "autoscaling_config": None,
            "max_replicas_per_node": 1,
            "ray_actor_options": {"num_cpus": 1},
        },
    )
    out.write_text(json.dumps({"url": url, "nodes": _replica_nodes(2, 300)}))


def replicas(out: Path) -> None:
    _connect(local=False)
    out.write_text(json.dumps({"nodes": _replica_nodes(2, 300)}))


def load(url: str, seconds: float, clients: int, out: Path) -> None:
    """`clients` threads send short completions back to back for `seconds`; every request's
    start, end and outcome is recorded."""
    import threading
    import time

    import requests

    records, lock = [], threading.Lock()
    stop = time.time() + seconds

    def user(i: int) -> None:
        s = requests.Session()
        while time.time() < stop:
            t0 = time.time()
            try:
                r = s.post(
                    f"{url}/v1/completions",
                    json={"model": "herd", "prompt": f"client {i}", "max_tokens": 4},
                    timeout=60,
                )
                ok, what = r.status_code == 200, str(r.status_code)
            except requests.RequestException as e:
                ok, what = False, type(e).__name__
            with lock:
                records.append({"client": i, "t0": t0, "t1": time.time(), "ok": ok, "status": what})

    threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.write_text(json.dumps(records))


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
    sv = sub.add_parser("serve")
    sv.add_argument("model_dir")
    sv.add_argument("out", type=Path)
    rp = sub.add_parser("replicas")
    rp.add_argument("out", type=Path)
    ld = sub.add_parser("load")
    ld.add_argument("url")
    ld.add_argument("seconds", type=float)
    ld.add_argument("clients", type=int)
    ld.add_argument("out", type=Path)
    a = ap.parse_args()
    if a.cmd == "pretrain":
        pretrain(a.config, a.out)
    elif a.cmd == "prep":
        prep(a.config, a.data_dir, a.out, a.local)
    elif a.cmd == "serve":
        serve_app(a.model_dir, a.out)
    elif a.cmd == "replicas":
        replicas(a.out)
    else:
        load(a.url, a.seconds, a.clients, a.out)


if __name__ == "__main__":
    main()
