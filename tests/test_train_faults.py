"""The loop handles its own errors (flows/train/guard.py), with faults injected into real runs of
the tiny model: inf gradients skip the step, a loss spike rolls back, a hang is caught by the
watchdog and Ray Train restarts the worker. Fine-tuning runs the same loop, so the same guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from flows.data.embedded import embedded_documents
    from flows.train.data import pack_documents

    texts = [text for _, text in embedded_documents(0, 8)][:200]
    return pack_documents(texts, tmp_path_factory.mktemp("data"), seq_len=64, validation_every=0)


def _cfg(data: Path, **over):
    from flows.train.config import config_from_dict

    cfg = config_from_dict(
        {
            "name": "faults",
            "data": {"dir": str(data)},
            "training": {"steps": 4, "micro_batch": 2},
            "optimizer": {"lr": 3e-3},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "checkpoint": {"every": 1, "keep": 2},
            "eval": {"every": 0},
            "logging": {"every": 1},
            "mlflow": {"enabled": False},
        }
    )
    return cfg.replace(**over)


def _mlflow_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("faults"))
    return uri, client, run.info.run_id


def test_inf_gradients_skip_the_step_and_leave_the_weights_bitwise_unchanged(data, tmp_path, one_thread):
    from flows.train.loop import Runtime, train
    from flows.train.metrics import MlflowLogger
    from model.checkpoint import read_weights

    uri, client, run_id = _mlflow_run(tmp_path)
    rt = Runtime(staging_dir=tmp_path / "ckpt", run_dir=tmp_path, logger=MlflowLogger(uri, run_id))
    r = train(_cfg(data, fault={"inf_grad_at_step": 3}), rt)
    weights = {int(p.name.split("-")[1]): read_weights(p / "model") for p in sorted((tmp_path / "ckpt").glob("step-*"))}
    assert sorted(weights) == [1, 2, 3, 4] and r.step == 4
    same = all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    moved = any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
    print(
        f"inf gradient at step 3: weights after step 3 bitwise equal to step 2: {same}; "
        f"step 4 trained again: {moved}; skipped_steps = {r.metrics['skipped_steps']}"
    )
    assert same and moved
    assert r.metrics["skipped_steps"] == 1 and r.metrics["rollbacks"] == 0
    assert all(math.isfinite(x) for x in r.losses)  # the loss was finite; the gradient norm was not
    history = client.get_metric_history(run_id, "skipped_steps")
    assert min(m.step for m in history if m.value == 1.0) == 3 and max(m.value for m in history) == 1.0
    assert "non-finite gradient norm" in client.get_run(run_id).data.tags["herd.skip.3"]


def test_a_loss_spike_rolls_back_and_the_run_finishes(data, tmp_path, one_thread):
    from flows.train.loop import Runtime, train
    from flows.train.metrics import MlflowLogger

    uri, client, run_id = _mlflow_run(tmp_path)
    rt = Runtime(staging_dir=tmp_path / "ckpt", run_dir=tmp_path, logger=MlflowLogger(uri, run_id))
    cfg = _cfg(
        data,
        training={"steps": 12},
        checkpoint={"every": 4, "keep": 2},
        guard={"spike_zscore": 6.0, "window": 5, "min_window": 4},
        fault={"spike_at_step": 10, "spike_factor": 50.0},
    )
    r = train(cfg, rt)
    tags = client.get_run(run_id).data.tags
    print(f"loss spike at step 10: {tags['herd.rollback.1']}; losses {[round(x, 3) for x in r.losses]}")
    assert r.step == 12 and r.metrics["rollbacks"] == 1 and r.metrics["skipped_batches"] == 1
    assert "loss spike" in tags["herd.rollback.1"] and "rolled back to step 8" in tags["herd.rollback.1"]
    assert "steps 10 will be skipped" in tags["herd.rollback.1"]
    # steps 1-9 trained; the spike at 10 rolls back to the step-8 state; 9 trained again, 10's batch
    # skipped, 11-12 trained: 11 losses, none of them the spike
    assert len(r.losses) == 11 and max(r.losses) < 20
    # the event at the spiking step (the counters then go with every logged step, replayed ones too)
    rollbacks = [(m.step, m.value) for m in client.get_metric_history(run_id, "rollbacks")]
    assert (10, 1.0) in rollbacks and max(v for _, v in rollbacks) == 1.0
    assert min(m.step for m in client.get_metric_history(run_id, "skipped_batches") if m.value == 1.0) == 10


def test_fine_tuning_runs_under_the_same_guard():
    from flows.finetune.config import config_from_dict
    from flows.finetune.trainer import loop_config

    cfg = loop_config(config_from_dict({"stage": "sft"}))
    assert cfg.guard.enabled and cfg.guard.spike_zscore > 0 and cfg.guard.hang_factor > 0


@pytest.mark.integration
def test_a_hang_fires_the_watchdog_and_ray_train_restarts_the_worker(data, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from flows.train.guard import read_events
    from flows.train.ray_trainer import init_ray, run_pretrain

    init_ray()
    try:
        cfg = _cfg(
            data,
            training={"steps": 8},
            checkpoint={"every": 2, "keep": 2},
            guard={"hang_factor": 5.0, "hang_min_s": 4.0, "hang_min_steps": 3},
            fault={"hang_at_step": 5, "hang_s": 300.0, "rank": 0},
            ray={"workers": 1, "storage_path": str(tmp_path / "ray"), "max_failures": 1, "name": "hang"},
            mlflow={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "hang"},
        )
        r = run_pretrain(cfg)
    finally:
        ray.shutdown()
    hangs = read_events(Path(r.run_dir), "hang")
    print(f"hang at step 5: {json.dumps(hangs)}; the run finished at step {r.metrics['step']:.0f}")
    assert len(hangs) == 1 and hangs[0]["step"] == 5
    assert hangs[0]["limit_s"] <= hangs[0]["seconds"] < hangs[0]["limit_s"] + 2  # fired within its timeout
    assert r.metrics["step"] == 8
    tags = MlflowClient(cfg.mlflow.tracking_uri).get_run(r.mlflow_run_id).data.tags
    assert json.loads(tags["herd.hang.1"])["step"] == 5 and "herd.restart.1" in tags
