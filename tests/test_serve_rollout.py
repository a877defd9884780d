"""Champion rollout on local Ray Serve under load: the endpoint serves `models:/herd@champion`
and follows the alias (user_config.watch_s). v1 is promoted to v2 in the middle of the load: no
request fails, every response names the version that produced it (header and body `model`), and
every response that starts after the swap names v2. Real Ray Serve, a real MLflow store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from services.testing import free_port, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


def registry_with_v1(tmp_path):
    import mlflow

    from flows.eval.registry import register_model

    store = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("herd-rollout")
    register_model(tiny_model_dir(tmp_path / "v1", seed=1), "herd", alias="champion", tracking_uri=store)
    return store


def promote_v2(tmp_path, store) -> float:
    """Register v2 and move @champion to it, as the lifecycle's promote step does; returns when."""
    from mlflow import MlflowClient

    from flows.eval.registry import register_model

    mv = register_model(tiny_model_dir(tmp_path / "v2", seed=2), "herd", alias=None, tracking_uri=store)
    MlflowClient(store, registry_uri=store).set_registered_model_alias("herd", "champion", mv.version)
    return time.time()


async def load(url: str, clients: int, seconds: float, promote_at: float, promote) -> tuple[list[dict], float]:
    """`clients` users sending chat requests back to back for `seconds`; `promote()` runs at `promote_at`."""
    t0 = time.monotonic()
    records: list[dict] = []
    promoted = {}

    async def user(client: httpx.AsyncClient, i: int):
        n = 0
        while time.monotonic() - t0 < seconds:
            start = time.time()
            try:
                r = await client.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": "herd",
                        "messages": [{"role": "user", "content": f"user {i} request {n}"}],
                        "max_tokens": 8,
                    },
                )
                body = r.json()
                records.append(
                    {
                        "start": start,
                        "end": time.time(),
                        "status": r.status_code,
                        "version": r.headers.get("x-herd-model-version"),
                        "since": float(r.headers.get("x-herd-model-since", "nan")),
                        "model": body.get("model"),
                    }
                )
            except (httpx.HTTPError, ValueError) as e:
                records.append(
                    {
                        "start": start,
                        "end": time.time(),
                        "status": repr(e),
                        "version": None,
                        "since": float("nan"),
                        "model": None,
                    }
                )
            n += 1

    async def promoter():
        await asyncio.sleep(promote_at)
        promoted["at"] = await asyncio.to_thread(promote)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(promoter(), *(user(client, i) for i in range(clients)))
    return records, promoted["at"]


def run_rollout_under_load(tmp_path, clients: int, seconds: float) -> None:
    import ray
    from ray import serve

    from services.deployment import deploy
    from services.rollout import wait_for_version

    store = registry_with_v1(tmp_path)
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env={
            "env_vars": {"HERD_API_KEY": "", "MLFLOW_TRACKING_URI": store, "HERD_MODEL_CACHE": str(tmp_path / "cache")}
        },
    )
    try:
        url = deploy(
            "models:/herd@champion",
            REPO / "configs" / "serve" / "local.yaml",
            port=free_port(),
            args={"num_threads": 1, "auth": "none", "engine": {"max_num_seqs": 16, "max_model_len": 256}},
            deployment={
                "user_config": {"watch_s": 1},
                "max_ongoing_requests": 64,
                "num_replicas": 1,
                "autoscaling_config": None,
                "ray_actor_options": {"num_cpus": 1},
            },
        )
        wait_for_version(url, "herd/1", timeout_s=300)
        records, promoted_at = asyncio.run(
            load(url, clients, seconds, seconds / 2, lambda: promote_v2(tmp_path, store))
        )
    finally:
        serve.shutdown()
        ray.shutdown()

    failed = [r for r in records if r["status"] != 200]
    v2 = [r for r in records if r["version"] == "herd/2"]
    assert v2, "the endpoint never moved to v2"
    swapped_at = min(r["since"] for r in v2)
    after = [r for r in records if r["start"] > swapped_at]
    on_old = [r for r in records if r["version"] == "herd/1" and r["end"] > swapped_at]
    print(
        f"{len(records)} requests from {clients} clients in {seconds:.0f}s, {len(failed)} failed; "
        f"v1 {sum(r['version'] == 'herd/1' for r in records)}, v2 {len(v2)}; promoted at +{seconds / 2:.0f}s, "
        f"swap {swapped_at - promoted_at:.2f}s after the promotion (alias watch every 1s + loading v2 beside v1); "
        f"{len(on_old)} requests in flight at the swap finished on v1"
    )
    assert failed == []
    assert all(r["version"] == r["model"] for r in records)  # header and body name the same version
    assert {r["version"] for r in records} == {"herd/1", "herd/2"}
    assert after and all(r["version"] == "herd/2" for r in after)
    assert swapped_at > promoted_at


@pytest.mark.integration
@pytest.mark.slow
def test_promotion_reaches_the_live_endpoint_without_a_failed_request(tmp_path):
    run_rollout_under_load(tmp_path, clients=4, seconds=16)


@pytest.mark.acceptance
def test_rollout_under_load_16_clients_60s(tmp_path):
    run_rollout_under_load(tmp_path, clients=16, seconds=60)


def test_user_config_is_checked():
    from model.errors import HerdError
    from services.rollout import check_user_config

    assert check_user_config({"model": "models:/herd/2", "watch_s": 5}) == {"model": "models:/herd/2", "watch_s": 5}
    with pytest.raises(HerdError, match="unknown key"):
        check_user_config({"modle": "models:/herd/2"})
    with pytest.raises(HerdError, match="watch_s must be"):
        check_user_config({"watch_s": -1})


@pytest.mark.integration
def test_roll_to_loads_beside_the_old_version_which_finishes_its_requests(tmp_path):
    """What Serve's reconfigure (user_config.model) runs: the new version loads while the old one
    generates; a request started on the old one finishes there, with every token; the old engine
    stops once it is idle; a failed load keeps the current version serving."""
    from model.generate import SamplingParams
    from services.api.app import build_state
    from services.rollout import Pinned, Rollout

    args = {"num_threads": 1, "auth": "none", "engine": {"max_num_seqs": 4, "max_model_len": 256}}
    v1, v2 = tiny_model_dir(tmp_path / "v1", seed=1), tiny_model_dir(tmp_path / "v2", seed=2)
    published = []
    rollout = Rollout(lambda p: build_state({**args, "model": p.uri}), published.append)

    async def scenario():
        rollout.start(Pinned(str(v1), ""))
        old = rollout.state
        done: list[dict] = []
        swapped_at = {}

        async def user():  # back-to-back 96-token requests on whatever version serves when each starts
            while "t" not in swapped_at:
                state, start, n = rollout.state, time.monotonic(), 0
                async for out in state.engine.generate(
                    state.tokenizer.encode("hello"), SamplingParams(max_tokens=96, ignore_eos=True)
                ):
                    n += len(out.token_ids)
                done.append({"state": state, "start": start, "end": time.monotonic(), "tokens": n})

        users = [asyncio.create_task(user()) for _ in range(2)]
        swapped = await rollout.roll_to(str(v2))
        swapped_at["t"] = time.monotonic()
        new = rollout.state
        await asyncio.gather(*users)
        deadline = time.monotonic() + 30
        while old.engine.healthy and time.monotonic() < deadline:  # retired once idle
            await asyncio.sleep(0.1)
        again = await rollout.roll_to(str(v2))
        failed = await rollout.roll_to(str(tmp_path / "missing"))
        return old, new, done, swapped_at["t"], swapped, again, failed

    old, new, done, swapped_at, swapped, again, failed = asyncio.run(scenario())
    try:
        assert swapped and published == [old, new] and new is not old
        on_old = [d for d in done if d["state"] is old]
        straddling = [d for d in on_old if d["end"] > swapped_at]
        print(f"{len(on_old)} requests answered by v1 while v2 loaded; {len(straddling)} in flight at the swap")
        assert len(on_old) >= 2  # the old version kept answering while the new one loaded
        assert straddling and all(d["tokens"] == 96 for d in on_old)  # ... and finished what it had begun
        assert not old.engine.healthy and new.engine.healthy
        assert again is False  # the version already served: nothing loaded
        assert failed is False and rollout.state is new and "model not found" in rollout.error
    finally:
        new.engine.shutdown()
