"""The real lifecycle end to end on a short config (configs/lifecycle/e2e.yaml): embedded corpus ->
SmolLM2 continued pretraining -> eval -> register -> promote -> local Serve, on real Ray and MLflow.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import lifecycle as lcm

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "configs" / "lifecycle" / "e2e.yaml"
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.acceptance]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    lcm.init_ray(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def test_e2e_parent_children_registry_endpoint_cache_lineage(ray_local, tmp_path, capsys):
    import requests
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = time.perf_counter()
    first = lcm.run_lifecycle(E2E, workdir=str(tmp_path / "runs"), tracking_uri=uri)
    first_s = time.perf_counter() - t
    print(f"e2e first run: {first_s:.1f}s")
    assert [r["status"] for r in first.steps.values()] == ["ran"] * 6
    client = MlflowClient(uri, uri)
    exp = client.get_run(first.parent_run_id).info.experiment_id
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{first.parent_run_id}'")
    assert {r.data.tags["herd.stage"] for r in kids} == {"data", "pretrain", "eval", "register", "promote", "deploy"}
    mv = client.get_model_version_by_alias("herd-e2e", "champion")
    assert mv.version == first.steps["register"]["outputs"]["version"]
    assert mv.tags["herd.lineage.data.input_sha256"] == first.steps["data"]["lineage"]["data.input_sha256"]
    assert mv.tags["herd.lineage.parent_run_id"] == first.parent_run_id
    url = first.steps["deploy"]["outputs"]["url"]
    r = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "herd", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None

    t = time.perf_counter()
    again = lcm.run_lifecycle(E2E, workdir=str(tmp_path / "runs"), tracking_uri=uri)
    again_s = time.perf_counter() - t
    print(f"e2e cached rerun: {again_s:.1f}s")
    assert [r["status"] for r in again.steps.values()] == ["cached"] * 6
    assert again_s < 30
    assert again.steps["eval"]["metrics"] == first.steps["eval"]["metrics"]

    from flows.cli import main

    capsys.readouterr()
    assert main(["lineage", "models:/herd-e2e@champion", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert first.steps["data"]["lineage"]["data.input_sha256"] in out
    assert first.steps["data"]["digest"] in out  # the manifest digest


def _step_status(uri: str, stage: str) -> list[str]:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("herd")
    if exp is None:
        return []
    return [r.info.status for r in c.search_runs([exp.experiment_id], f"tags.`herd.stage` = '{stage}' and tags.`herd.step.status` = 'ran'")]


def test_killed_during_pretraining_resumes_at_pretraining(tmp_path):
    """The whole driver is SIGKILLed while pretraining runs; the rerun finds data cached and
    starts at pretraining."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "flows.lifecycle", "--config", str(E2E), "--workdir", str(tmp_path / "runs"),
           "--tracking-uri", uri]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd + ["--force", "data"], cwd=REPO, env=env, start_new_session=True,
                         stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and "RUNNING" not in _step_status(uri, "pretrain"):
        assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(2)
    time.sleep(5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert _step_status(uri, "data") == ["FINISHED"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "data      cached" in out.stdout
    assert "pretrain  ran" in out.stdout or "pretrain  cached" not in out.stdout
