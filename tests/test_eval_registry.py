"""Registry and promotion gate against a real local MLflow store (sqlite + local artifacts)."""
from __future__ import annotations

import json

import pytest
import torch

from flows.eval.registry import GateRule, gate, promote, register_model, resolve_model_uri, version_metrics
from model.checkpoint import load_model, save_checkpoint
from model.errors import HerdError
from model.tokenizer import load_tokenizer
from tests.tiny import tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
SHARP = {"std": 0.2, "max_seq_len": 256}  # sharp logits: different seeds score differently


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


def test_gate_rules_are_pure():
    rules = [GateRule("mc/acc"), GateRule("ppl/bits_per_byte", higher_is_better=False, min_delta=-0.05)]
    ok, reason, _ = gate({"mc/acc": 0.6, "ppl/bits_per_byte": 1.02}, {"mc/acc": 0.5, "ppl/bits_per_byte": 1.0}, rules)
    assert ok and reason.startswith("promoted")
    ok, reason, checks = gate({"mc/acc": 0.6, "ppl/bits_per_byte": 1.2}, {"mc/acc": 0.5, "ppl/bits_per_byte": 1.0}, rules)
    assert not ok and [c["passed"] for c in checks] == [True, False] and "ppl/bits_per_byte 1.2000 vs 1.0000" in reason
    ok, _, _ = gate({"mc/acc": 0.5}, {"mc/acc": 0.5}, [GateRule("mc/acc")])
    assert not ok  # a tie does not move the champion
    ok, reason, _ = gate({"other": 1.0}, None, [GateRule("mc/acc")])
    assert not ok and "candidate has no mc/acc" in reason
    assert gate({"mc/acc": 0.1}, None, [GateRule("mc/acc")])[0]  # the first version becomes champion
    with pytest.raises(HerdError, match="no metrics configured"):
        gate({}, None, [])


def test_promotion_moves_champion_only_when_candidate_is_better(store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    rules = [{"metric": "herd_mc/acc"}]
    dirs = [tiny_checkpoint(tmp_path / f"m{i}", seed=i, **SHARP) for i in range(3)]

    v1 = register_model(dirs[0], "herd", metrics={"herd_mc/acc": 0.50}, tracking_uri=store)
    d1 = promote("herd", rules, tracking_uri=store)
    assert d1.promoted and d1.candidate_version == str(v1.version) and d1.champion_version is None
    assert str(client.get_model_version_by_alias("herd", "champion").version) == str(v1.version)

    v2 = register_model(dirs[1], "herd", metrics={"herd_mc/acc": 0.40}, tracking_uri=store)
    assert str(client.get_model_version_by_alias("herd", "candidate").version) == str(v2.version)
    d2 = promote("herd", rules, tracking_uri=store)
    assert not d2.promoted
    assert str(client.get_model_version_by_alias("herd", "champion").version) == str(v1.version)  # unchanged
    rec = client.get_model_version("herd", v2.version)
    assert rec.tags["promotion.decision"] == "rejected"
    assert "herd_mc/acc 0.4000 vs 0.5000" in rec.tags["promotion.reason"] and "not promoted" in rec.tags["promotion.reason"]
    assert "promotion gate" in rec.description and rec.tags["promotion.compared_to"] == str(v1.version)

    v3 = register_model(dirs[2], "herd", metrics={"herd_mc/acc": 0.55}, tracking_uri=store)
    d3 = promote("herd", rules, tracking_uri=store)
    assert d3.promoted and d3.champion_version == str(v1.version)
    assert str(client.get_model_version_by_alias("herd", "champion").version) == str(v3.version)
    assert str(client.get_model_version_by_alias("herd", "previous_champion").version) == str(v1.version)
    assert client.get_model_version("herd", v1.version).tags["promotion.superseded_by"] == str(v3.version)
    assert client.get_model_version("herd", v3.version).tags["promotion.decision"] == "promoted"
    assert version_metrics(client.get_model_version("herd", v3.version)) == {"herd_mc/acc": 0.55}

    # serving loads the champion back: a local herd checkpoint with the champion's weights
    local = resolve_model_uri("models:/herd@champion", tracking_uri=store)
    assert sorted(p.name for p in local.iterdir()) == ["herd.json", "model.safetensors", "tokenizer.json"]
    got, _ = load_model(local)
    want, _ = load_model(dirs[2])
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert resolve_model_uri(f"models:/herd/{v1.version}", tracking_uri=store).is_dir()
    assert promote("herd", rules, tracking_uri=store).reason.endswith("is already champion")


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
    assert torch.equal(here["tok_embeddings.weight"], load_model(tmp_path / "a")[0].state_dict()["tok_embeddings.weight"])


def test_registry_errors_are_clear(store, tmp_path):
    with pytest.raises(HerdError, match="models:/herd@champion: not in the registry"):
        resolve_model_uri("models:/herd@champion", tracking_uri=store)
    with pytest.raises(HerdError, match="expected models:/NAME@ALIAS"):
        resolve_model_uri("models:/", tracking_uri=store)
    with pytest.raises(HerdError, match="not a herd checkpoint folder"):
        register_model(tmp_path, "herd", tracking_uri=store)
    with pytest.raises(HerdError, match="no such version to promote"):
        promote("herd", ["x"], tracking_uri=store)


def test_herd_eval_cli_promote_flow(store, tmp_path, capsys):
    """`herd eval --promote` twice: the first model becomes champion; a second, worse one does not."""
    from mlflow import MlflowClient

    from flows.cli import main

    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({
        "name": "gate-test", "tasks": ["herd_mc", "herd_ppl"], "batch_size": 8,
        "promotion": {"metrics": [{"metric": "herd_ppl/bits_per_byte", "higher_is_better": False}]},
    }))
    good = tiny_checkpoint(tmp_path / "good", seed=1, **SHARP)
    # a worse model: the same weights with the output scaled up, so its predictions are over-confident
    bad_model, _ = load_model(good)
    with torch.no_grad():
        bad_model.norm.weight.mul_(4.0)
    bad = save_checkpoint(bad_model, tmp_path / "bad", load_tokenizer("llama3"))

    args = ["eval", "--config", str(config), "--tracking-uri", store, "--promote"]
    assert main(args + ["--model", str(good)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["promotion"]["promoted"] is True
    assert main(args + ["--model", str(bad)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["promotion"]["promoted"] is False
    assert second["metrics"]["herd_ppl/bits_per_byte"] > first["metrics"]["herd_ppl/bits_per_byte"]

    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias("herd", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("herd", "candidate").version) == "2"
    run = client.get_run(second["run_id"])
    assert run.data.tags["herd.stage"] == "eval" and run.data.tags["herd.model_uri"] == str(bad)
    assert run.data.tags["herd.model_version"] == "2"
    assert "herd_mc/acc" in run.data.metrics and "herd_ppl/bits_per_byte" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(second["run_id"])}
    assert {"eval_config.yaml", "predictions", "tasks", "model"} <= artifacts
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=second["run_id"], artifact_path="predictions/herd_mc.json",
                                                dst_path=str(tmp_path / "dl"), tracking_uri=store)
    table = json.loads(open(local).read())
    assert len(table["data"]) == 36 and "correct" in table["columns"]
