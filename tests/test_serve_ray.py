"""herd serve on Ray Serve: the official openai client against SmolLM2, the Serve config, and
autoscaling under a bounded load on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from services.testing import free_port, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
KEY = "ray-test-key"


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 240, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else open(log.name).read()
            raise RuntimeError(f"herd serve exited with {proc.returncode}:\n{output}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def test_serve_configs_are_valid_ray_serve_configs():
    from infra import validate

    for path in sorted((REPO / "configs" / "serve").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if "applications" not in doc:
            continue
        assert validate.serve_config_errors(path.read_text()) == [], path
        app = doc["applications"][0]
        assert app["import_path"] == "services.deployment:build_app"
        assert app["deployments"][0]["name"] == "HerdLLMServer"
        from services.config import load_server_config

        config = load_server_config(app["args"])  # every arg is a known setting
        # backpressure: a bounded queue answered with Retry-After, and a timeout at the proxy that
        # outlasts the app's own (so the client gets the app's OpenAI error first)
        deployment = app["deployments"][0]
        assert deployment["max_queued_requests"] > 0 and deployment["backpressure_config"]["retry_after_s"] > 0
        assert doc["http_options"]["request_timeout_s"] > config.request_timeout_s, path


def test_build_app_is_a_serve_application():
    from ray.serve.deployment import Application

    from services.deployment import build_app

    app = build_app({"model": "smollm2", "engine": {"max_num_seqs": 4}})
    assert isinstance(app, Application)
    from model.errors import HerdError

    with pytest.raises(HerdError, match="max_num_seq"):
        build_app({"model": "smollm2", "engine": {"max_num_seq": 4}})


def test_herd_serve_without_a_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if k not in ("HERD_API_KEY", "RAY_ADDRESS")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--model",
            "smollm2",
            "--config",
            "configs/serve/local.yaml",
            "--port",
            str(free_port()),
        ],
        cwd=REPO,
        env={**env, "HERD_API_KEY": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "herd: error: no API key: HERD_API_KEY is empty or unset; set it, or set `auth: none` in the serve args "
        "to serve without authentication"
    ], r.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_openai_client_against_herd_serve(smollm2_dir, tmp_path):
    """`herd serve --model <SmolLM2> --config configs/serve/local.yaml` in a subprocess."""
    from openai import AuthenticationError, OpenAI

    port = free_port()
    env = {**os.environ, "HERD_API_KEY": KEY, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS")
    # The server's output goes to a file: an unread pipe fills up and blocks the server's prints.
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--model",
            str(smollm2_dir),
            "--config",
            "configs/serve/local.yaml",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log=log)
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        auth = {"Authorization": f"Bearer {KEY}"}
        question = [{"role": "user", "content": "What is the capital of France?"}]

        chat = client.chat.completions.create(model="herd", messages=question, temperature=0, max_tokens=24)
        answer = chat.choices[0].message.content
        print(f"chat: {answer!r} ({chat.usage.completion_tokens} tokens, {chat.choices[0].finish_reason})")
        assert "Paris" in answer

        stream = client.chat.completions.create(
            model="herd",
            messages=question,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        print(f"chat stream: {''.join(pieces)!r} in {len(pieces)} chunks")
        assert "".join(pieces) == answer and usage.completion_tokens == chat.usage.completion_tokens

        prompt = "The capital of France is"
        comp = client.completions.create(model="herd", prompt=prompt, temperature=0, max_tokens=8)
        print(f"completion: {comp.choices[0].text!r}")
        assert "Paris" in comp.choices[0].text
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model="herd", prompt=prompt, temperature=0, max_tokens=8, stream=True)
            if c.choices
        )
        assert streamed == comp.choices[0].text

        # Ray's proxy obeys a client's x-request-timeout-seconds; the ingress drops it
        r = httpx.post(
            f"{url}/v1/completions",
            headers={**auth, "x-request-timeout-seconds": "0.001"},
            json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == comp.choices[0].text, r.text

        assert [m.id for m in client.models.list().data] == ["herd"]
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401

        # A client that disconnects mid-stream frees its slot (through the Serve proxy too), even one
        # asking the proxy to ignore its disconnect.
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            headers={**auth, "x-request-disconnect-disabled": "?1"},
            json={
                "prompt": "Write a long story.",
                "max_tokens": 1000,
                "stream": True,
                "ignore_eos": True,
            },  # a sampled EOS would end it before the disconnect
            timeout=120,
        ) as s:
            lines = s.iter_lines()
            for _ in range(4):
                next(lines)
        deadline = time.monotonic() + 30
        while True:
            text = httpx.get(f"{url}/metrics", headers=auth).text
            running = float(re.search(r"^herd_num_requests_running\{.*\} (\S+)$", text, re.M).group(1))
            aborted = float(re.search(r"^herd_request_aborted_total\{.*\} (\S+)$", text, re.M).group(1))
            if running == 0 and aborted >= 1:
                break
            assert time.monotonic() < deadline, f"{text}\nserver log:\n{open(log.name).read()[-3000:]}"
            time.sleep(0.5)
        print("disconnect: slot freed, herd_request_aborted_total", aborted)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.integration
@pytest.mark.acceptance
def test_autoscaling_up_under_load_and_back_down(tmp_path):
    """64 concurrent streaming clients on 127.0.0.1 until a second replica runs (at most 150 s: a
    replica starts slowly on a busy 2-core machine): 1 -> 2 replicas, then back to 1 without load."""
    import ray
    from ray import serve

    from services.deployment import deploy, shutdown

    model_dir = tiny_model_dir(tmp_path / "tiny")
    dash_port = free_port()
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=True,
        dashboard_port=dash_port,
        runtime_env={"env_vars": {"HERD_API_KEY": ""}},
    )
    try:
        url = deploy(
            model_dir,
            REPO / "configs" / "serve" / "local.yaml",
            port=free_port(),
            args={"num_threads": 1, "auth": "none", "engine": {"max_num_seqs": 16, "max_model_len": 256}},
            deployment={
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 4,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 4,
                    "look_back_period_s": 2,
                    "metrics_interval_s": 1,
                },
                "max_ongoing_requests": 64,
                "ray_actor_options": {"num_cpus": 1},
            },
        )
        wait_healthy(url)
        timeline: list[tuple[float, int]] = []
        t0 = time.monotonic()

        def replicas() -> int:
            dep = serve.status().applications["herd"].deployments["HerdLLMServer"]
            return dep.replica_states.get("RUNNING", 0)

        async def load(seconds: float):
            stop = time.monotonic() + seconds
            sent = {"requests": 0, "errors": 0}

            async def user(client):
                while time.monotonic() < stop:
                    try:
                        async with client.stream(
                            "POST",
                            f"{url}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True},
                        ) as r:
                            async for _ in r.aiter_lines():
                                pass
                        sent["requests"] += 1
                    except httpx.HTTPError:
                        sent["errors"] += 1

            async def watch():
                scaled_at = None
                while time.monotonic() < stop:
                    n = await asyncio.to_thread(replicas)
                    timeline.append((round(time.monotonic() - t0, 1), n))
                    if n >= 2 and scaled_at is None:
                        scaled_at = time.monotonic()
                    if scaled_at and time.monotonic() - scaled_at > 5:
                        return  # seen at 2 for a while: stop the load early
                    await asyncio.sleep(1)

            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                users = [asyncio.create_task(user(client)) for _ in range(64)]
                await watch()
                stop = time.monotonic()  # noqa: F841 - the users read it
                for u in users:
                    u.cancel()
                await asyncio.gather(*users, return_exceptions=True)
            return sent

        sent = asyncio.run(load(150))
        peak = max(n for _, n in timeline)
        status_text = subprocess.run(
            ["serve", "status", "-a", f"http://127.0.0.1:{dash_port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        )
        print(status_text.stdout)
        deadline = time.monotonic() + 90
        while replicas() > 1 or serve.status().applications["herd"].deployments["HerdLLMServer"].status != "HEALTHY":
            timeline.append((round(time.monotonic() - t0, 1), replicas()))
            assert time.monotonic() < deadline, timeline
            time.sleep(1)
        timeline.append((round(time.monotonic() - t0, 1), replicas()))
        print(f"load: {sent}; replicas over time (s, RUNNING): {timeline}")
        assert peak >= 2 and timeline[-1][1] == 1
        shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
