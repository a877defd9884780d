"""Post-training stages on Ray Train (a real local Ray, TorchTrainer workers, gloo DDP) with a tiny
random model and a real MLflow sqlite store: the stage's loop runs in the workers, its checkpoint
comes back through ray.train.report, and the stage's MLflow child run carries the curves."""

from __future__ import annotations

import pytest

from tests.test_finetune_stages import cfg, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from flows.train.ray_trainer import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("herd-test")
    return uri, {"enabled": True, "tracking_uri": uri, "experiment": "herd-test"}


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_sft_on_two_ray_workers_matches_one_process(ray_cluster, tiny_dir, store, tmp_path):  # noqa: F811 (the fixture is imported)
    """2 DDP workers x 2 rows take the same step as one process accumulating 2 x 2 rows: the losses
    agree, and the child run has the loop's per-step curves logged from rank 0."""
    import mlflow

    from flows.finetune import run_sft
    from model.checkpoint import load_model

    uri, ml = store
    train = {"steps": 3, "micro_batch": 2}
    local = run_sft(cfg(tiny_dir, "sft", train={**train, "grad_accum": 2}), None, tmp_path / "local")
    with mlflow.start_run(run_name="lifecycle") as parent:
        res = run_sft(cfg(tiny_dir, "sft", train=train, ray={"workers": 2}, mlflow=ml), None, tmp_path / "ray")
    assert local.metrics["trainer"] == "in-process" and res.metrics["trainer"] == "ray-train:2"
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(res.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["herd.trainer"] == "ray-train:2"
    losses = [v for _, v in _history(client, res.run_id, "loss")]
    assert len(losses) == 3 and [s for s, _ in _history(client, res.run_id, "lr")] == [1, 2, 3]
    assert losses[0] == pytest.approx(local.metrics["train_loss_first"], rel=1e-4)
    assert losses[-1] == pytest.approx(local.metrics["train_loss_last"], rel=1e-3)
    assert res.metrics["train_loss_last"] == pytest.approx(losses[-1], rel=1e-6)
    for key in ("exact_match_after", "reward_after", "win_rate"):
        assert key in run.data.metrics, key
    model, _ = load_model(res.checkpoint)  # the export is a plain native checkpoint
    assert model.config.dim == 64
    assert not (tmp_path / "ray" / "ray").exists()  # Ray's run folder (checkpoints) removed after the export


def test_dpo_and_grpo_on_ray_train(ray_cluster, tiny_dir, store, tmp_path):  # noqa: F811 (the fixture is imported)
    """DPO's per-step curves (the loss function's metrics) and GRPO's rollout curves are logged from
    inside the Ray worker; GRPO's rollout history comes back to the driver."""
    import mlflow

    from flows.finetune import run_dpo, run_ppo

    uri, ml = store
    client = mlflow.tracking.MlflowClient(uri)
    dpo = run_dpo(cfg(tiny_dir, "dpo", ray={"workers": 1}, mlflow=ml), None, tmp_path / "dpo")
    assert dpo.metrics["trainer"] == "ray-train:1"
    assert abs(dpo.metrics["train_loss_first"] - 0.693147) < 1e-4  # policy == reference at step 1
    for key in ("margin", "reward_margin", "reward_accuracy", "dpo_loss", "loss"):
        assert [s for s, _ in _history(client, dpo.run_id, key)] == [1, 2], key
    assert "heldout_margin_after" in client.get_run(dpo.run_id).data.metrics

    grpo = run_ppo(
        cfg(tiny_dir, "ppo", ppo={"algorithm": "grpo"}, ray={"workers": 1}, mlflow=ml), None, tmp_path / "grpo"
    )
    assert grpo.metrics["trainer"] == "ray-train:1" and grpo.metrics["iterations"] == 2
    assert [s for s, _ in _history(client, grpo.run_id, "rollout_reward")] == [0, 1]
    assert [s for s, _ in _history(client, grpo.run_id, "kl_k3")] == [1, 2]
    assert grpo.metrics["rollout_reward_first"] == _history(client, grpo.run_id, "rollout_reward")[0][1]
