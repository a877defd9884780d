"""The real lifecycle end to end on a short config (configs/lifecycle/e2e.yaml): embedded corpus ->
SmolLM2 continued pretraining -> SFT -> DPO -> eval -> register -> promote -> local Serve, on real
Ray and MLflow; then a driver SIGKILLed during pretraining resumes there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.lifecycle.run import ray_runtime_env, run_lifecycle
from flows.ray_runtime import init_ray

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "configs" / "lifecycle" / "e2e.yaml"
STAGES = ["data", "pretrain", "sft", "dpo", "eval", "register", "promote", "deploy"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_port(port: int) -> dict:
    """The e2e config with its endpoint on `port` (other tests may serve on Serve's 8000)."""
    return {"stages": {"deploy": {"params": {"port": port}}}}


def test_e2e_parent_children_registry_endpoint_cache_lineage(tmp_path, capsys):
    import ray
    import requests
    from mlflow import MlflowClient
    from ray import serve

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    over = on_port(free_port())
    # Ray is started here and stopped at the end, so the kill test below has the machine to itself.
    init_ray(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env())
    try:
        t = time.perf_counter()
        first = run_lifecycle(E2E, overrides=over, workdir=str(tmp_path / "runs"), tracking_uri=uri)
        first_s = time.perf_counter() - t
        assert list(first.steps) == STAGES and [r["status"] for r in first.steps.values()] == ["ran"] * len(STAGES)

        client = MlflowClient(uri, uri)
        parent = client.get_run(first.parent_run_id)
        assert parent.info.status == "FINISHED" and parent.data.metrics["steps_ran"] == len(STAGES)
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{first.parent_run_id}'")
        assert sorted(r.data.tags["herd.stage"] for r in kids) == sorted(STAGES)
        assert all(r.info.status == "FINISHED" for r in kids)
        # the chain: SFT starts from the pretrained model, DPO from SFT's, eval scores DPO's
        by = {r.data.tags["herd.stage"]: r for r in kids}
        for stage, upstream in (("sft", "pretrain"), ("dpo", "sft"), ("eval", "dpo")):
            inputs = json.loads(by[stage].data.tags["herd.step.inputs"])
            assert inputs["model"]["stage"] == upstream and inputs["model"]["digest"] == first.steps[upstream]["digest"]
        assert first.steps["eval"]["outputs"]["model_dir"] == first.steps["dpo"]["outputs"]["model_dir"]
        for stage in ("sft", "dpo"):  # each finetune run nests under its step run
            ft = client.get_run(first.steps[stage]["outputs"]["finetune_run_id"])
            assert ft.data.tags["mlflow.parentRunId"] == first.steps[stage]["run_id"]
        assert (
            first.steps["sft"]["metrics"]["train_loss_last"] > 0
            and "heldout_margin_after" in first.steps["dpo"]["metrics"]
        )

        mv = client.get_model_version_by_alias("herd-e2e", "champion")
        assert str(mv.version) == first.steps["register"]["outputs"]["version"]
        assert mv.tags["herd.lineage.data.input_sha256"] == first.steps["data"]["lineage"]["data.input_sha256"]
        assert mv.tags["herd.lineage.data.manifest_digest"] == first.steps["data"]["digest"]
        assert mv.tags["herd.lineage.parent_run_id"] == first.parent_run_id
        url = first.steps["deploy"]["outputs"]["url"]
        assert mv.tags["herd.deployment.url"] == url
        r = requests.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            json={"model": "herd", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

        t = time.perf_counter()
        again = run_lifecycle(E2E, overrides=over, workdir=str(tmp_path / "runs"), tracking_uri=uri)
        again_s = time.perf_counter() - t
        assert [r["status"] for r in again.steps.values()] == ["cached"] * len(STAGES)
        assert again_s < 30
        assert again.steps["eval"]["metrics"] == first.steps["eval"]["metrics"]
        assert again.steps["deploy"]["outputs"]["url"] == url  # the endpoint still answers, so it counts

        from flows.cli import main

        capsys.readouterr()
        assert main(["lineage", "models:/herd-e2e@champion", "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        assert first.steps["data"]["lineage"]["data.input_sha256"] in out
        assert first.steps["data"]["digest"] in out  # the manifest digest recorded at data prep
        assert "dpo step (ran)" in out and "sft step (ran)" in out
        with capsys.disabled():  # the figures, shown without -s (readouterr above consumed the captured output)
            print(
                f"\ne2e first run {first_s:.1f}s ("
                + ", ".join(f"{n} {r['seconds']:.0f}s" for n, r in first.steps.items())
                + f"); cached rerun {again_s:.1f}s"
            )
    finally:
        serve.shutdown()
        ray.shutdown()


def _step_runs(uri: str, stage: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("herd")
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], f"tags.`herd.stage` = '{stage}' and tags.`herd.step.status` = 'ran'")


def _persisted_checkpoints(workdir: Path) -> list[str]:
    """Checkpoints Ray Train has registered (listed in its snapshot only once fully persisted)."""
    names = []
    for snap in workdir.glob("steps/pretrain-*/ray_train/*/checkpoint_manager_snapshot.json"):
        try:
            names += [c["checkpoint_dir_name"] for c in json.loads(snap.read_text())["checkpoint_results"]]
        except (ValueError, KeyError):  # being rewritten right now
            pass
    return names


def test_killed_during_pretraining_resumes_at_pretraining(tmp_path, capsys):
    """The whole driver (and its local Ray) is SIGKILLed once pretraining has persisted a checkpoint;
    the rerun finds data cached, starts at pretraining and Ray Train continues from that checkpoint."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = yaml.safe_load(E2E.read_text())
    cfg["stages"]["deploy"]["params"]["port"] = free_port()
    config = tmp_path / "e2e.yaml"  # stage config paths stay relative to the repo
    config.write_text(yaml.safe_dump(cfg))
    workdir = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "flows.lifecycle",
        "--config",
        str(config),
        "--workdir",
        str(workdir),
        "--tracking-uri",
        uri,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "first.log"
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not _persisted_checkpoints(workdir):
            assert p.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        before_kill = _persisted_checkpoints(workdir)
        assert before_kill, "no pretraining checkpoint within 10 minutes"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert [r.info.status for r in _step_runs(uri, "data")] == ["FINISHED"]
    assert [r.info.status for r in _step_runs(uri, "pretrain")] == ["RUNNING"]  # killed: never finished

    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # A quiet console: the stages and the summary; the steps' and workers' output is in the run's logs.
    shown = (out.stdout + out.stderr).splitlines()
    assert len(shown) <= 40, "\n".join(shown)
    rows = {
        line.split()[0]: line.split()[1]
        for line in out.stdout.splitlines()
        if line.split() and line.split()[0] in STAGES and len(line.split()) > 2
    }
    assert rows == {"data": "cached", **{s: "ran" for s in STAGES[1:]}}
    runs = _step_runs(uri, "pretrain")
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len(runs) == 2 and len(done) == 1
    resumed_with = json.loads(done[0].data.tags["herd.step.outputs"])["resumed_with"]
    assert set(before_kill) <= set(resumed_with)  # the killed attempt's checkpoints were there to continue from
    assert f"(resumed: {resumed_with[-1]})" in out.stdout
    assert set(before_kill) <= set(_persisted_checkpoints(workdir))  # Ray Train kept them registered
    with capsys.disabled():
        print(
            f"\nkilled with {before_kill} persisted; the rerun resumed pretraining with {resumed_with}, "
            f"weights digest {done[0].data.tags['herd.step.digest'][:16]}; its console: {len(shown)} lines"
        )
