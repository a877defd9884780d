"""`ray job submit` of the lifecycle on a `ray start --head` cluster with Ray 2.60's token
authentication, the way the README shows it: `ray get-auth-token --generate`,
`export RAY_AUTH_MODE=token`, `ray start --head`, `ray job submit --working-dir . -- python -m
flows.lifecycle --config ...` (the short configs/lifecycle/tiny.yaml). A submit without the token,
with a wrong one, or without RAY_AUTH_MODE=token on the submitting side, is refused.

The head runs under `ray start --block` in its own process group with its own HOME, temp dir
and ports, and is stopped through that process (not `ray stop`, which stops every Ray process
on the machine, other tests' included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(home: Path) -> dict:
    """This environment without any Ray address or auth setting, with its own HOME (~/.ray), and
    this venv first on PATH (as if activated: the job's `python` is the head's PATH's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO), "PATH": path}


def submit(env: dict, address: str, *entrypoint: str, runtime_env: dict | None = None, timeout: float = 600):
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", "."]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    return subprocess.run(cmd + ["--", *entrypoint], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def token_head(tmp_path):
    """A head node with token auth: the token made by `ray get-auth-token --generate` in its HOME."""
    import requests

    home = tmp_path / "home"
    home.mkdir()
    gen = subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=clean_env(home), capture_output=True, text=True, timeout=120
    )
    assert gen.returncode == 0, gen.stderr
    token = gen.stdout.strip()
    assert token and (home / ".ray" / "auth_token").read_text().strip() == token
    # Ray 2.60: `ray start` turns token mode on by itself when a token file exists, but the job
    # CLI sends the token only with RAY_AUTH_MODE=token (hence `export RAY_AUTH_MODE=token`)
    env = {**clean_env(home), "RAY_AUTH_MODE": "token"}
    # Ray's socket paths must stay short (AF_UNIX): a temp dir directly under /tmp
    temp = Path(tempfile.mkdtemp(prefix="herd-ray-", dir="/tmp"))
    gcs, dash, client, agent, agent_grpc, metrics, renv = free_ports(7)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={renv}",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                r = requests.get(f"{address}/api/version", timeout=5, headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "the head's dashboard did not come up in 180 s"
            time.sleep(2)
        yield {"address": address, "token": token, "env": env, "home": home}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of its own group is left
        except ProcessLookupError:
            pass
        _kill_leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_leftovers(temp: Path) -> None:
    """Processes of this head that left its process group (job drivers, workers): found by the
    session folder under our own temp dir in their command line, stopped by pid."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp) in a for a in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


def test_ray_job_submit_runs_the_lifecycle_with_token_auth(token_head, tmp_path):
    import requests
    from mlflow import MlflowClient

    address, env = token_head["address"], token_head["env"]
    db = tmp_path / "mlflow.db"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "HERD_RUN_DIR": str(tmp_path / "runs")}}

    # refused: no token anywhere (no ~/.ray/auth_token, no RAY_AUTH_TOKEN), then a wrong one
    nobody = tmp_path / "nobody"
    nobody.mkdir()
    anon = submit(clean_env(nobody), address, "python", "-c", "print('should not run')", timeout=120)
    assert anon.returncode != 0 and "should not run" not in anon.stdout
    assert "401" in anon.stdout + anon.stderr or "Authentication required" in anon.stdout + anon.stderr
    wrong = submit(
        {**clean_env(nobody), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
        address,
        "python",
        "-c",
        "print('should not run')",
        timeout=120,
    )
    assert wrong.returncode != 0 and "should not run" not in wrong.stdout
    assert "403" in wrong.stdout + wrong.stderr or "invalid" in (wrong.stdout + wrong.stderr).lower()
    # the right token file, but without RAY_AUTH_MODE=token the CLI does not send it
    unsent = submit(clean_env(token_head["home"]), address, "python", "-c", "print('should not run')", timeout=120)
    assert unsent.returncode != 0 and "Missing authentication token" in unsent.stdout + unsent.stderr
    headers = {"Authorization": f"Bearer {token_head['token']}"}
    assert requests.get(f"{address}/api/jobs/", timeout=10).status_code == 401
    assert requests.get(f"{address}/api/jobs/", timeout=10, headers=headers).json() == []  # nothing was submitted

    # the README's command, with the token from ~/.ray/auth_token
    t = time.perf_counter()
    job = submit(
        env,
        address,
        "python",
        "-m",
        "flows.lifecycle",
        "--config",
        "configs/lifecycle/tiny.yaml",
        runtime_env=runtime_env,
    )
    print(f"ray job submit (tiny lifecycle): {time.perf_counter() - t:.1f}s")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout
    jobs = requests.get(f"{address}/api/jobs/", timeout=10, headers=headers).json()
    assert [j["status"] for j in jobs] == ["SUCCEEDED"]
    assert jobs[0]["entrypoint"] == "python -m flows.lifecycle --config configs/lifecycle/tiny.yaml"

    # MLflow (the absolute sqlite path the job was given) has the parent run and a child per stage
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("herd-tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`herd.stage` = 'lifecycle'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")
    assert {r.data.tags["herd.stage"]: r.info.status for r in kids} == {
        "data": "FINISHED",
        "pretrain": "FINISHED",
        "eval": "FINISHED",
    }
    assert parents[0].data.metrics["steps_ran"] == 3
    # the step folders outlive the job's copy of the working directory
    out = json.loads(next(r for r in kids if r.data.tags["herd.stage"] == "pretrain").data.tags["herd.step.outputs"])
    assert Path(out["model_dir"]).is_relative_to(tmp_path / "runs") and (Path(out["model_dir"]) / "herd.json").is_file()
    # and so do the runs' artifacts (beside the database, not in the job's temporary copy)
    assert Path(exp.artifact_location).is_relative_to(tmp_path)
    assert any(Path(exp.artifact_location).rglob("lifecycle_config.yaml"))
