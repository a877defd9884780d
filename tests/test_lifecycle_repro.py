"""Reproducibility: the same lifecycle config and seed, run twice from scratch (a fresh Ray, step
folder and MLflow store each time), gives the same data manifest digest and the same evaluation
metrics on CPU (configs/lifecycle/tiny.yaml: embedded corpus -> tiny model -> eval)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.lifecycle.run import ray_runtime_env, run_lifecycle
from flows.ray_runtime import init_ray

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "lifecycle" / "tiny.yaml"


def _timings_dropped(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("seconds")}


@pytest.mark.integration
@pytest.mark.slow
def test_same_config_twice_from_scratch_gives_the_same_digests_and_metrics(tmp_path):
    import ray
    from mlflow import MlflowClient

    runs = []
    for name in ("a", "b"):
        init_ray(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env())
        try:
            uri = f"sqlite:///{tmp_path / name}/mlflow.db"
            (tmp_path / name).mkdir()
            res = run_lifecycle(TINY, workdir=str(tmp_path / name / "runs"), tracking_uri=uri)
        finally:
            ray.shutdown()
        assert [r["status"] for r in res.steps.values()] == ["ran", "ran", "ran"]  # nothing came from a cache
        runs.append((res, uri))
    (a, uri_a), (b, uri_b) = runs
    print(f"data manifest sha256: {a.steps['data']['digest']} / {b.steps['data']['digest']}")
    print(f"eval: {_timings_dropped(a.steps['eval']['metrics'])}")

    assert a.config_hash == b.config_hash
    assert a.steps["data"]["digest"] == b.steps["data"]["digest"]
    assert a.steps["data"]["lineage"]["data.input_sha256"] == b.steps["data"]["lineage"]["data.input_sha256"]
    assert a.steps["pretrain"]["digest"] == b.steps["pretrain"]["digest"]  # bit-identical weights
    ma, mb = _timings_dropped(a.steps["eval"]["metrics"]), _timings_dropped(b.steps["eval"]["metrics"])
    assert {"herd_mc/acc", "herd_ppl/bits_per_byte"} <= set(ma)
    assert ma == mb
    # and MLflow recorded the same: the data step's digest tag and the eval step's metrics
    for res, uri in runs:
        c = MlflowClient(uri)
        assert c.get_run(res.steps["data"]["run_id"]).data.tags["herd.step.digest"] == a.steps["data"]["digest"]
        assert _timings_dropped(c.get_run(res.steps["eval"]["run_id"]).data.metrics) == ma
