"""Shared fixtures: the real SmolLM2 (imported once per run), the transformers peer, shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs pytest-xdist workers side by side: each takes its share of the cores, and so do the
# processes it starts (Ray workers, herd serve). OpenMP threads beyond the cores spin at every op's
# barrier, and a SmolLM2 forward then runs several times slower than on one thread.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite tracking/registry store; artifacts under tmp_path (the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HERD_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("herd-test")
    return uri


@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only adds OpenMP synchronisation (30x slower on a busy 2-core box)."""
    import torch  # not at the top: torch must start after OMP_NUM_THREADS is set above

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from model.assets import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2 imported to herd's native format once, shared across xdist workers."""
    from filelock import FileLock

    from model.checkpoint import import_gguf

    root = tmp_path_factory.getbasetemp().parent
    out = root / "smollm2-native"
    with FileLock(str(root / "smollm2-native.lock")):
        if not (out / "model.safetensors").is_file():
            import_gguf(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer), fp32 on CPU."""
    from model.sources import load_for_inference

    return load_for_inference(str(smollm2_dir), "float32", "cpu")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """The peer: transformers' LlamaForCausalLM and tokenizer, loaded from the same GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model, tok
