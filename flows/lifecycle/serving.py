"""The lifecycle's serving stage: deploy the champion (or the newest model) on Ray Serve, wait until
the endpoint serves that version, record the endpoint in MLflow, and send one smoke request."""

from __future__ import annotations

import json
import os
import time

from flows.lifecycle.lineage import lineage_tags
from flows.lifecycle.plan import StepContext
from model.errors import HerdError


def deploy_stage(ctx: StepContext) -> dict:
    """Serve the champion. After a promotion the endpoint serves the alias (models:/NAME@champion)
    and follows it (user_config.watch_s), so an endpoint already running from an earlier run is
    left up and moves to the new champion in place; the step waits until it answers with it."""
    from services.deployment import deploy
    from services.rollout import pin, wait_for_version

    src = ctx.input("model_version")
    model = src["outputs"]["uri"] if src else ctx.model_dir()
    if src and src["stage"] == "promote":
        model = f"models:/{src['outputs']['name']}@champion"
    label = pin(model, ctx.lifecycle.tracking_uri).label
    # the replica resolves models:/ against this lifecycle's MLflow, wherever it runs
    dep = dict(ctx.params.get("deployment") or {})
    opts = dict(dep.get("ray_actor_options") or {})
    env = (opts.get("runtime_env") or {}).get("env_vars") or {}
    opts["runtime_env"] = {
        **(opts.get("runtime_env") or {}),
        "env_vars": {**env, "MLFLOW_TRACKING_URI": ctx.lifecycle.tracking_uri},
    }
    dep["ray_actor_options"] = opts
    port = ctx.params.get("port")  # default: the serve config's http_options.port, else 8000
    url = deploy(
        model,
        ctx.config or None,
        deployment=dep,
        args=ctx.params.get("args"),
        port=int(port) if port else None,
        keep_running=True,
    )
    if label:
        waited = wait_for_version(url, label, timeout_s=float(ctx.params.get("rollout_timeout_s", 600)))
        ctx.log(f"{url} serves {label} (waited {waited:.1f}s)")
    ctx.log(f"deployed {model} at {url}")
    lineage = lineage_tags(ctx)
    (ctx.out_dir / "lineage.json").write_text(json.dumps({"url": url, "model": model, **lineage}, indent=2) + "\n")
    import mlflow

    mlflow.set_tags(
        {**lineage, "herd.deployment.url": url, "herd.deployment.model": model, "herd.deployment.version": label}
    )
    if src:
        from flows.tracking import client as mlflow_client

        client = mlflow_client(ctx.lifecycle.tracking_uri)
        client.set_model_version_tag(
            src["outputs"]["name"],
            src["outputs"].get("champion") or src["outputs"]["version"],
            "herd.deployment.url",
            url,
        )
    answer, secs = smoke(
        url,
        ctx.params.get("smoke_prompt", "What is the capital of France?"),
        int(ctx.params.get("smoke_max_tokens", 16)),
    )
    ctx.log(f"smoke request answered in {secs:.1f}s: {answer!r}")
    return {
        "outputs": {"url": url, "model": model, "version": label, "smoke_answer": answer},
        "digest": f"{url}|{model}|{label}",
        "metrics": {"smoke_seconds": secs},
        "summary": f"{url} ({label or model})",
    }


def smoke(url: str, prompt: str, max_tokens: int = 16, timeout: float = 300) -> tuple[str, float]:
    import requests

    t = time.perf_counter()
    key = os.environ.get("HERD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    r = requests.post(
        f"{url}/v1/chat/completions",
        timeout=timeout,
        headers=headers,
        json={
            "model": "herd",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    if r.status_code != 200:
        raise HerdError(f"smoke request to {url}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - t


def endpoint_serves(result: dict) -> bool:
    """A cached deployment counts only while its endpoint still answers."""
    import requests

    return requests.get(result["outputs"]["url"] + "/health", timeout=5).status_code == 200
