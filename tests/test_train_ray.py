"""Pretraining on Ray Train (local cluster, 2 CPU workers) with MLflow: learning on the shared
corpus packed by data prep, a worker killed mid-run, a corrupted newest checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.acceptance]


def _need_shared():
    if not (SHARED / "corpus").is_dir():
        print(f"skipping: shared data not found at {SHARED}")
        pytest.skip(f"shared data not found at {SHARED}")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from flows.train.ray_trainer import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus64(tmp_path_factory) -> Path:
    _need_shared()
    from flows.train.data import pack_documents

    text = (SHARED / "corpus" / "austen_emma.txt").read_text()[:100_000]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]
    return pack_documents(paras, tmp_path_factory.mktemp("corpus64"), seq_len=64, validation_every=20)


def _cfg(data, tmp_path, name, **over):
    from flows.train.config import config_from_dict

    cfg = config_from_dict(
        {
            "name": name,
            "data": {"dir": str(data)},
            "training": {"steps": 6, "micro_batch": 1, "grad_accum": 1},
            "optimizer": {"lr": 3e-3},
            "schedule": {"warmup_steps": 1},
            "checkpoint": {"every": 2, "keep": 3},
            "eval": {"every": 3, "batches": 2},
            "logging": {"every": 1},
            "ray": {"workers": 2, "storage_path": str(tmp_path / "ray_results"), "max_failures": 1},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-train"},
        }
    )
    return cfg.replace(**over) if over else cfg


@pytest.fixture(scope="module")
def reference(corpus64, tmp_path_factory):
    """The uninterrupted run: the same 2-rank gloo math, launched without Ray."""
    from flows.train.launch import run_local

    tmp = tmp_path_factory.mktemp("reference")
    return run_local(_cfg(corpus64, tmp, "reference", mlflow={"enabled": False}), 2, tmp / "run")


def test_learning_on_corpus_packed_by_data_prep(ray_cluster, tmp_path):
    """2-worker DDP from scratch on the shared corpus, packed by `herd data prep`."""
    _need_shared()
    from mlflow.tracking import MlflowClient

    from flows.data.cli import prep
    from flows.data.config import load_config
    from flows.train.ray_trainer import run_pretrain
    from model.checkpoint import load_model

    repo = Path(__file__).resolve().parents[1]
    dcfg = load_config(repo / "configs" / "pretrain" / "data-corpus.yaml")
    dcfg.input.paths = [str(SHARED / "corpus")]
    dcfg.pack.seq_len = 128  # short rows: the tiny model's 128k-vocab head dominates on CPU
    dcfg.input.max_docs = 3000
    report = prep(dcfg, tmp_path / "data")
    assert report["shards"]["train"]["sequences"] > 100
    cfg = _cfg(
        tmp_path / "data",
        tmp_path,
        "learn",
        training={"steps": 24, "micro_batch": 2},
        optimizer={"lr": 3e-3},
        schedule={"warmup_steps": 3},
        checkpoint={"every": 12, "keep": 2},
        eval={"every": 12, "batches": 6},
        logging={"every": 4},
    )
    r = run_pretrain(cfg)
    start, end = r.metrics["initial_val_loss"], r.metrics["val_loss"]
    print(
        f"validation loss {start:.4f} -> {end:.4f} over {r.metrics['step']:.0f} steps "
        f"(2 workers, DDP, tiny, seq 128); train loss {r.metrics['loss']:.4f}; "
        f"{r.metrics['tokens_per_s']:.0f} tok/s, MFU {r.metrics['mfu']:.3f}"
    )
    assert r.metrics["step"] == 24
    assert end < start - 1.0
    model, mcfg = load_model(r.model_dir)  # exported in herd's native format
    assert mcfg.dim == 64 and (Path(r.model_dir) / "tokenizer.json").is_file()

    # MLflow: params, metric curves, validation loss, checkpoint references
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(r.mlflow_run_id)
    p = run.data.params
    assert p["seed"] == "0" and p["git_sha"] and len(p["data.manifest_sha256"]) == 64
    assert p["parallel.strategy"] == "ddp" and p["training.steps"] == "24"
    curves = {
        k: client.get_metric_history(r.mlflow_run_id, k)
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "val_loss", "val_perplexity")
    }
    assert [m.step for m in curves["loss"]] == [4, 8, 12, 16, 20, 24]
    assert [m.step for m in curves["val_loss"]] == [0, 12, 24]
    assert all(len(v) >= 3 for v in curves.values())
    assert run.data.tags["herd.checkpoint"] == r.checkpoint and run.data.tags["herd.model_dir"] == r.model_dir
    assert "checkpoints.json" in {a.path for a in client.list_artifacts(r.mlflow_run_id)}


def test_killed_worker_resumes_without_skipping_or_repeating(ray_cluster, corpus64, reference, tmp_path):
    from flows.train.ray_trainer import run_pretrain

    cfg = _cfg(corpus64, tmp_path, "kill", fault={"kill_at_step": 3, "rank": 1})
    r = run_pretrain(cfg)
    assert (Path(r.run_dir) / ".herd-fault-injected").is_file()  # the worker did die
    diff = abs(r.metrics["loss"] - reference.final_loss)
    print(
        f"kill test: final loss {r.metrics['loss']:.7f} vs uninterrupted {reference.final_loss:.7f}, |diff| = "
        f"{diff:.1e}"
    )
    assert r.metrics["step"] == 6
    assert diff < 1e-4


def test_corrupt_newest_checkpoint_falls_back(ray_cluster, corpus64, reference, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.train.ray_trainer import run_pretrain

    # After step 5, rank 1 damages the newest checkpoint (step 4) and dies: the restart must
    # detect it by checksum and go back to step 2.
    cfg = _cfg(corpus64, tmp_path, "corrupt", fault={"kill_at_step": 5, "rank": 1, "corrupt_latest": True})
    r = run_pretrain(cfg)
    assert len(r.warnings) == 1
    w = r.warnings[0]
    print("corruption warning:", w)
    assert re.search(
        r"step-00000004-\d+ is corrupt \(sha256 mismatch in model/__0_0\.distcp\); "
        r"falling back to the previous checkpoint step-00000002-\d+",
        w,
    )
    tags = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(r.mlflow_run_id).data.tags
    assert "step-00000002" in tags["herd.resumed_from"] and "is corrupt" in tags["herd.checkpoint_warning"]
    assert abs(r.metrics["loss"] - reference.final_loss) < 1e-4
