"""Faults on a real multi-node Ray cluster: a head and two worker nodes, each in its own network
namespace (tests/netns_cluster.py), token auth on, a shared folder for storage.

- A whole worker node is SIGKILLed during 2-worker DDP pretraining (one worker per worker node);
  a replacement node joins; the run finishes with the loss of an uninterrupted run.
- Data prep spread over the cluster writes the same manifest as on one node.
- `ray job submit` from a client namespace, with the token, runs the tiny lifecycle (acceptance tier).
- A node holding one of two Serve replicas is SIGKILLed under load (acceptance tier).

The cluster is started once for the module; drivers run inside the head's or the client's
namespace, since the cluster's addresses exist only there.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.netns_cluster import NetnsCluster, netns_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PY = sys.executable


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = netns_unavailable()
    if why:
        print(f"skipping: network namespaces unavailable: {why}")
        pytest.skip(f"network namespaces unavailable: {why}")
    c = NetnsCluster(tmp_path_factory.mktemp("cluster"))
    try:
        t = time.perf_counter()
        c.setup()
        c.start_node("head", num_cpus=0, head=True)  # the head runs drivers and controllers, no workers
        c.start_node("w1", num_cpus=1)
        c.start_node("w2", num_cpus=1)
        c.wait_for({n.ip for n in c.nodes.values()})
        print(f"3-node cluster (namespaces {c.prefix}-*) up in {time.perf_counter() - t:.1f}s")
        yield c
    finally:
        c.teardown()


def _embedded_texts(n: int) -> list[str]:
    from flows.data.embedded import embedded_documents

    return [text for _, text in embedded_documents(0, 8)][:n]


def _wait_for(pred, proc, log: Path, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{log.read_text()[-4000:]}")


def test_node_loss_during_ddp_pretraining(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.train.config import config_from_dict
    from flows.train.data import pack_documents
    from flows.train.launch import run_local
    from flows.train.ray_trainer import ATTEMPTS_FILE

    data = pack_documents(_embedded_texts(300), cluster.shared / "train-data", seq_len=64, validation_every=0)
    storage = cluster.shared / "ray_results"
    cfg = config_from_dict(
        {
            "name": "nodeloss",
            "data": {"dir": str(data)},
            "training": {"steps": 12, "micro_batch": 2, "grad_accum": 1},
            "optimizer": {"lr": 3e-3},
            "schedule": {"warmup_steps": 1},
            "checkpoint": {"every": 2, "keep": 3},
            "eval": {"every": 0},
            "logging": {"every": 1},
            "ray": {
                "workers": 2,
                "cpus_per_worker": 1,
                "storage_path": str(storage),
                "max_failures": 2,
                "name": "nodeloss",
            },
            "mlflow": {"tracking_uri": f"sqlite:///{cluster.shared / 'mlflow.db'}", "experiment": "multinode"},
        }
    )
    # the uninterrupted run: the same 2-rank gloo math, launched without Ray
    t = time.perf_counter()
    reference = run_local(cfg.replace(mlflow={"enabled": False}), 2, tmp_path / "reference", threads=1)
    print(f"uninterrupted reference run (2 local ranks): {time.perf_counter() - t:.1f}s")

    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    log = tmp_path / "driver.log"
    driver = cluster.popen(
        cluster.nodes["head"].ns,
        [PY, "-m", "tests.multinode_driver", "pretrain", str(tmp_path / "cfg.json"), str(tmp_path / "out.json")],
        log,
        RAY_ADDRESS=cluster.address,
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300",
    )
    run_dir = storage / "nodeloss"
    try:
        # both workers placed, one per worker node, and a first checkpoint on the shared storage
        attempts = run_dir / ATTEMPTS_FILE
        first = _wait_for(
            lambda: (
                attempts.is_file()
                and len(attempts.read_text().splitlines()) >= 2
                and [json.loads(x) for x in attempts.read_text().splitlines()]
            ),
            driver,
            log,
            300,
            "both workers to start",
        )
        assert {a["node_ip"] for a in first} == {cluster.nodes["w1"].ip, cluster.nodes["w2"].ip}
        # a checkpoint Ray Train's controller has registered (its snapshot names it): what a restart resumes from
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        _wait_for(
            lambda: snapshot.is_file() and "step-00000002-" in snapshot.read_text(),
            driver,
            log,
            300,
            "the first registered checkpoint",
        )
        t_kill = time.perf_counter()
        killed = cluster.kill_node("w2")  # every process of that node's namespace: raylet, workers, agents
        dead = cluster.wait_for({cluster.nodes[n].ip for n in ("head", "w1")}, timeout=60)
        cluster.start_node("w3", num_cpus=1)  # the replacement machine
        driver.wait(timeout=600)
        total = time.perf_counter() - t_kill
    finally:
        if driver.poll() is None:
            cluster.kill_namespace(cluster.nodes["head"].ns)
    text = log.read_text()
    assert driver.returncode == 0, text[-6000:]
    r = json.loads((tmp_path / "out.json").read_text())
    starts = [json.loads(x) for x in (run_dir / ATTEMPTS_FILE).read_text().splitlines()]
    restarted = [a for a in starts if a["resumed_from"]]
    diff = abs(r["metrics"]["loss"] - reference.final_loss)
    print(
        f"node loss: SIGKILLed {killed} processes of w2; declared dead {dead:.1f}s later; run finished "
        f"{total:.1f}s after the kill; restarted ranks on {sorted({a['node_ip'] for a in restarted})}; "
        f"final loss {r['metrics']['loss']:.7f} vs uninterrupted {reference.final_loss:.7f}, |diff| = {diff:.1e}"
    )
    assert r["metrics"]["step"] == 12
    assert diff < 1e-4
    # the restarted group ran on the surviving node and the replacement, from a persisted checkpoint
    assert {a["node_ip"] for a in restarted} == {cluster.nodes["w1"].ip, cluster.nodes["w3"].ip}
    assert all(Path(a["resumed_from"]).parent == run_dir for a in restarted)

    # MLflow: the failure and the restart are on the run
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(r["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "restarted after a failure" in run.data.tags["herd.restart.1"]
    assert "herd.restart.2" not in run.data.tags
    assert run.data.tags["herd.resumed_from"].startswith(str(run_dir))
    assert [m.value for m in client.get_metric_history(r["mlflow_run_id"], "restarts")] == [1.0]
    assert max(m.step for m in client.get_metric_history(r["mlflow_run_id"], "loss")) == 12


def test_data_prep_on_three_nodes_writes_the_one_node_manifest(cluster, tmp_path):
    """The same input and config give the same manifest digest on the cluster (workers on two
    nodes, the shards written by the driver to the shared folder) as on a one-node Ray."""
    cfg = {
        "name": "multinode",
        "input": {"paths": [], "max_docs": 200},
        "embedded": {"parts": 4},
        "semdedup": {"enabled": False},
        "quality": {"enabled": False},
        "pack": {"seq_len": 64, "sequences_per_shard": 64, "validation_fraction": 0.1},
        "ray": {"batch_size": 32, "progress_bars": False},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    got = {}
    for where in ("cluster", "local"):
        log, out = tmp_path / f"{where}.log", tmp_path / f"{where}.json"
        cmd = [
            PY,
            "-m",
            "tests.multinode_driver",
            "prep",
            str(tmp_path / "cfg.json"),
            str(cluster.shared / f"prep-{where}"),
            str(out),
        ]
        t = time.perf_counter()
        if where == "cluster":
            proc = cluster.popen(cluster.nodes["head"].ns, cmd, log, RAY_ADDRESS=cluster.address)
        else:  # a one-node Ray of its own, outside the namespaces
            import subprocess

            proc = subprocess.Popen(
                cmd + ["--local"],
                cwd=cluster.root,
                env={**cluster._base_env()},
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
            )
        assert proc.wait(timeout=600) == 0, log.read_text()[-6000:]
        got[where] = json.loads(out.read_text())
        print(
            f"data prep ({where}, nodes {got[where]['nodes']}): {time.perf_counter() - t:.1f}s, "
            f"{got[where]['kept']}/{got[where]['input_documents']} kept, manifest {got[where]['manifest_digest'][:16]}"
        )
    assert len(got["cluster"]["nodes"]) == 3 and len(got["local"]["nodes"]) == 1
    assert got["cluster"]["input_documents"] == 200 and got["cluster"]["kept"] > 0
    assert got["cluster"]["manifest_digest"] == got["local"]["manifest_digest"]


@pytest.mark.acceptance  # ~2 min; tests/test_lifecycle_job.py covers the submit path on one node in CI
def test_ray_job_submit_from_a_client_namespace_with_token(cluster, tmp_path):
    """The README's `ray job submit` of the tiny lifecycle, from a machine that is not a node,
    to the head's address; refused without the token."""
    import requests  # noqa: F401  (the job CLI's transport; fails early here if missing)

    runs = cluster.shared / "job-runs"
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{cluster.shared / 'job-mlflow.db'}", "HERD_RUN_DIR": str(runs)}
    }
    submit = [
        str(Path(PY).parent / "ray"),
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
    ]
    nobody = tmp_path / "nobody"  # a HOME without ~/.ray/auth_token
    nobody.mkdir()
    anon = cluster.run(
        cluster.client_ns,
        submit + ["python", "-c", "print('should not run')"],
        timeout=180,
        RAY_AUTH_TOKEN="",
        HOME=str(nobody),
    )
    assert anon.returncode != 0 and "should not run" not in anon.stdout
    t = time.perf_counter()
    job = cluster.run(
        cluster.client_ns,
        submit + ["python", "-m", "flows.lifecycle", "--config", "configs/lifecycle/tiny.yaml"],
        timeout=900,
    )
    print(
        f"ray job submit from {cluster.client_ip} to {cluster.dashboard} (tiny lifecycle): "
        f"{time.perf_counter() - t:.1f}s"
    )
    assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cluster.shared / 'job-mlflow.db'}")
    exp = client.get_experiment_by_name("herd-tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`herd.stage` = 'lifecycle'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {r.data.tags["herd.stage"]: r.info.status for r in kids} == {
        "data": "FINISHED",
        "pretrain": "FINISHED",
        "eval": "FINISHED",
    }


@pytest.mark.acceptance  # a minute of load plus replica start-ups: several minutes on 2 cores
def test_node_loss_while_serving(cluster, tmp_path):
    """Two Serve replicas, one per worker node, behind the head's proxy; 16 clients for 60 s; one
    replica's node is SIGKILLed 20 s in and a replacement node joins. At most the requests in
    flight fail; every request sent later succeeds; the replica count returns to 2."""
    from services.testing import tiny_model_dir

    model = tiny_model_dir(cluster.shared / "tiny-model")
    head = cluster.nodes["head"]

    def driver(*args: str, ns: str = head.ns, timeout: float = 600) -> dict:
        out = tmp_path / f"{args[0]}-{time.monotonic_ns()}.json"
        log = out.with_suffix(".log")
        proc = cluster.popen(
            ns, [PY, "-m", "tests.multinode_driver", *args, str(out)], log, RAY_ADDRESS=cluster.address
        )
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-5000:]
        return json.loads(out.read_text())

    t = time.perf_counter()
    info = driver("serve", str(model))
    print(f"2 replicas on {info['nodes']} in {time.perf_counter() - t:.1f}s")
    workers = {n.ip: name for name, n in cluster.nodes.items() if name != "head"}
    assert len(set(info["nodes"])) == 2 and set(info["nodes"]) <= set(workers)
    victim = workers[info["nodes"][0]]
    url = f"http://{head.ip}:8000"
    out = tmp_path / "load.json"
    load = cluster.popen(
        cluster.client_ns,
        [PY, "-m", "tests.multinode_driver", "load", url, "60", "16", str(out)],
        tmp_path / "load.log",
    )
    time.sleep(20)
    t_kill = time.time()
    cluster.kill_node(victim)
    replacement = cluster.add_worker()
    assert load.wait(timeout=300) == 0, (tmp_path / "load.log").read_text()[-4000:]
    records = json.loads(out.read_text())
    failed = [r for r in records if not r["ok"]]
    in_flight = [r for r in records if r["t0"] <= t_kill <= r["t1"]]
    later = [r for r in records if r["t0"] > t_kill]
    print(
        f"serving through node loss: {len(records)} requests, {len(in_flight)} in flight at the kill, "
        f"{len(failed)} failed ({sorted({r['status'] for r in failed})}), {len(later)} sent later "
        f"({sum(not r['ok'] for r in later)} failed)"
    )
    assert all(r["t0"] <= t_kill for r in failed), [r for r in failed if r["t0"] > t_kill][:5]
    assert len(failed) <= len(in_flight)
    assert later and all(r["ok"] for r in later)
    t = time.perf_counter()
    back = driver("replicas")
    print(f"replicas back to 2 on {back['nodes']} ({time.perf_counter() - t:.1f}s after the load ended)")
    assert len(back["nodes"]) == 2 and replacement.ip in back["nodes"]
