"""The model registry against a real local MLflow store (sqlite + local artifacts)."""

from __future__ import annotations

import pytest
import torch

from flows.eval.registry import register_model, resolve_model_uri
from model.checkpoint import load_model
from model.errors import HerdError
from tests.tiny import tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
SHARP = {"std": 0.2, "max_seq_len": 256}  # sharp logits: different seeds score differently


def test_same_version_number_in_two_stores_resolves_to_each_stores_model(store, tmp_path):
    """Version 1 of "herd" exists in every store: the download cache must not hand one store's
    model to another (it did, when the cache folder was named by name and version alone)."""
    import mlflow

    other = f"sqlite:///{tmp_path}/other.db"
    register_model(tiny_checkpoint(tmp_path / "a", seed=1, **SHARP), "herd", tracking_uri=store)
    mlflow.set_tracking_uri(other)
    mlflow.set_experiment("herd-test")
    register_model(tiny_checkpoint(tmp_path / "b", seed=2, **SHARP), "herd", tracking_uri=other)
    here = load_model(resolve_model_uri("models:/herd/1", tracking_uri=store))[0].state_dict()
    there = load_model(resolve_model_uri("models:/herd/1", tracking_uri=other))[0].state_dict()
    assert torch.equal(here["norm.weight"], there["norm.weight"])  # both ones: same architecture
    assert not torch.equal(here["tok_embeddings.weight"], there["tok_embeddings.weight"])
    assert torch.equal(
        here["tok_embeddings.weight"], load_model(tmp_path / "a")[0].state_dict()["tok_embeddings.weight"]
    )


def test_registry_errors_are_clear(store, tmp_path):
    with pytest.raises(HerdError, match="models:/herd@champion: not in the registry"):
        resolve_model_uri("models:/herd@champion", tracking_uri=store)
    with pytest.raises(HerdError, match="expected models:/NAME@ALIAS"):
        resolve_model_uri("models:/", tracking_uri=store)
    with pytest.raises(HerdError, match="not a herd checkpoint folder"):
        register_model(tmp_path, "herd", tracking_uri=store)
