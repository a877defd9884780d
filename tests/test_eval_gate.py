"""The noise-aware promotion gate: the pure decision, then against a real local MLflow store."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flows.eval.gate import GateConfig, decide, promote, stderr, subsets_of
from flows.eval.registry import register_model, resolve_model_uri, version_metrics
from model.checkpoint import load_model, save_checkpoint
from model.errors import HerdError
from model.tokenizer import load_tokenizer
from tests.tiny import tiny_checkpoint

SHARP = {"std": 0.2, "max_seq_len": 256}
GATE = GateConfig.parse(
    {
        "benchmarks": ["mc/acc", {"metric": "ppl/bits_per_byte", "higher_is_better": False, "tolerance": 0.05}],
        "win_rate": {"metric": "humaneval/win_rate", "floor": 0.5},
        "attack_success": "redteam/attack_success_rate",
        "floors": [{"metric": "mc/acc", "min": 0.3}, {"metric": "redteam/attack_success_rate", "max": 0.5}],
    }
)


def _model(acc: float, n: int = 400, asr: float = 0.10, bpb: float = 1.00, win=None, subjects=None) -> dict:
    m = {
        "mc/acc": acc,
        "mc/n": float(n),
        "ppl/bits_per_byte": bpb,
        "redteam/attack_success_rate": asr,
        "redteam/n": 240.0,
    }
    if win is not None:
        m.update({"humaneval/win_rate": win[0], "humaneval/win_rate_lo": win[1], "humaneval/win_rate_hi": win[2]})
    for name, (a, k) in (subjects or {}).items():
        m[f"mc/{name}/acc"], m[f"mc/{name}/n"] = a, float(k)
    return m


CHAMPION = _model(0.50)
NOISY_EQUAL = _model(0.48, asr=0.12, bpb=1.01, win=(0.50, 0.45, 0.55))  # within every interval, win rate ~ 50%
BETTER = _model(0.62, asr=0.05, bpb=0.95, win=(0.81, 0.76, 0.86))


def test_equal_with_noise_is_not_promoted_and_better_is():
    ok, reason, checks = decide(NOISY_EQUAL, CHAMPION, GATE)
    assert not ok and reason.startswith("not promoted")
    failed = [c.kind for c in checks if not c.passed]
    assert failed == ["win_rate"]  # the benchmark and attack drops are noise; only the win-rate evidence is missing
    bench = next(c for c in checks if c.name == "mc/acc" and c.kind == "benchmark")
    assert bench.passed and 0.02 < bench.bound < 0.08  # 1.96 * sqrt(2 * 0.25 / 400) = 0.069
    ok, reason, checks = decide(BETTER, CHAMPION, GATE)
    assert ok and all(c.passed for c in checks) and reason.startswith("promoted")


def test_a_drop_beyond_the_noise_blocks_even_a_winning_candidate():
    worse_mc = {**BETTER, "mc/acc": 0.40}  # 10 points down on 400 questions: beyond 0.069
    ok, reason, _ = decide(worse_mc, CHAMPION, GATE)
    assert not ok and "mc/acc 0.4000 vs 0.5000" in reason and "beyond" in reason
    unsafe = {**BETTER, "redteam/attack_success_rate": 0.25}  # 0.10 -> 0.25 on 240 prompts
    ok, reason, _ = decide(unsafe, CHAMPION, GATE)
    assert not ok and "redteam/attack_success_rate" in reason
    no_win = {k: v for k, v in BETTER.items() if not k.startswith("humaneval/")}
    ok, reason, _ = decide(no_win, CHAMPION, GATE)
    assert not ok and "no win rate against the champion" in reason


def test_subsets_of_equal_models_pass_together_but_a_real_drop_fails():
    """57 subjects of two equal models (binomial draws): Bonferroni keeps the family from failing by chance."""
    rng = random.Random(0)
    p = {f"s{i:02d}": rng.uniform(0.3, 0.7) for i in range(57)}

    def draw():
        return {s: (sum(rng.random() < q for _ in range(100)) / 100, 100) for s, q in p.items()}

    cfg = GateConfig.parse({"benchmarks": ["mc/acc"]})
    champ, cand = _model(0.5, subjects=draw()), _model(0.5, subjects=draw())
    assert len(subsets_of(cand, "mc/acc")) == 57
    ok, _, checks = decide(cand, champ, cfg)
    assert ok and sum(c.kind == "subset" for c in checks) == 57
    cand["mc/s00/acc"] = champ["mc/s00/acc"] - 0.45  # a subject collapses
    ok, reason, _ = decide(cand, champ, cfg)
    assert not ok and "mc/s00/acc" in reason


def test_first_candidate_faces_the_floors_only():
    ok, reason, checks = decide(_model(0.28), None, GATE)
    assert not ok and "first candidate" in reason and "mc/acc 0.2800 (min 0.3: not met)" in reason
    assert {c.kind for c in checks} == {"floor"}
    assert decide(_model(0.45), None, GATE)[0]


def test_gate_config_errors_are_clear():
    with pytest.raises(HerdError, match="unknown key"):
        GateConfig.parse({"metrics": []})
    with pytest.raises(HerdError, match="nothing to check"):
        GateConfig.parse({})
    with pytest.raises(HerdError, match="needs 'metric' and 'min' and/or 'max'"):
        GateConfig.parse({"floors": [{"metric": "x"}]})
    assert stderr({"t/acc": 0.0, "t/n": 10.0}, "t/acc") > 0  # 0/10 still has noise
    assert stderr({"t/bits": 1.2}, "t/bits") is None


# --- against a real MLflow store -------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_promotion_records_every_number_and_moves_the_champion_only_on_evidence(store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    dirs = [tiny_checkpoint(tmp_path / f"m{i}", seed=i, **SHARP) for i in range(3)]
    v1 = register_model(dirs[0], "herd", metrics=CHAMPION, config_hash="h1", tracking_uri=store)
    d1 = promote("herd", GATE, tracking_uri=store)
    assert d1.promoted and d1.champion_version is None and "first candidate" in d1.reason

    v2 = register_model(dirs[1], "herd", metrics=NOISY_EQUAL, config_hash="h1", tracking_uri=store)
    d2 = promote("herd", GATE, tracking_uri=store)
    assert not d2.promoted and not d2.champion_reevaluated
    assert str(client.get_model_version_by_alias("herd", "champion").version) == str(v1.version)
    rec = client.get_model_version("herd", v2.version)
    assert rec.tags["promotion.decision"] == "rejected" and rec.tags["promotion.compared_to"] == str(v1.version)
    assert json.loads(rec.tags["gate.win_rate.humaneval/win_rate"]) == {
        "passed": False,
        "candidate": 0.5,
        "champion": None,
        "bound": 0.5,
    }
    bench = json.loads(rec.tags["gate.benchmark.mc/acc"])
    assert bench["passed"] and bench["candidate"] == 0.48 and bench["champion"] == 0.5 and bench["bound"] > 0.02
    assert {"gate.attack.redteam/attack_success_rate", "gate.floor.mc/acc", "gate.config_hash"} <= set(rec.tags)
    assert "promotion gate" in rec.description

    v3 = register_model(dirs[2], "herd", metrics=BETTER, config_hash="h1", tracking_uri=store)
    d3 = promote("herd", GATE, tracking_uri=store)
    assert d3.promoted and d3.champion_version == str(v1.version)
    assert str(client.get_model_version_by_alias("herd", "champion").version) == str(v3.version)
    assert str(client.get_model_version_by_alias("herd", "previous_champion").version) == str(v1.version)
    assert client.get_model_version("herd", v1.version).tags["promotion.superseded_by"] == str(v3.version)
    got, _ = load_model(resolve_model_uri("models:/herd@champion", tracking_uri=store))
    want, _ = load_model(dirs[2])
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert promote("herd", GATE, tracking_uri=store).reason.endswith("is already champion")

    # a candidate evaluated under another config: the champion is measured again first
    register_model(dirs[1], "herd", metrics=BETTER, config_hash="h2", tracking_uri=store)
    with pytest.raises(HerdError, match="re-evaluate the champion first"):
        promote("herd", GATE, tracking_uri=store)
    seen = []

    def evaluate(uri):
        seen.append(uri)
        return _model(0.55), "h2"

    d4 = promote("herd", GATE, evaluate_champion=evaluate, tracking_uri=store)
    assert seen == [f"models:/herd/{v3.version}"] and d4.champion_reevaluated and d4.promoted
    old = client.get_model_version("herd", v3.version)
    assert old.tags["eval.config_hash"] == "h2" and version_metrics(old)["mc/acc"] == 0.55


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_herd_eval_promote_reevaluates_the_champion_under_a_changed_config(store, tmp_path, capsys):
    """`herd eval --promote` with real evaluations: a good model becomes champion; an over-confident
    copy is rejected; a changed eval config (another limit) re-runs the champion's evaluation first."""
    from mlflow import MlflowClient

    from flows.cli import main

    gate = {
        "benchmarks": [{"metric": "herd_ppl/bits_per_byte", "higher_is_better": False}, "herd_mc/acc"],
        "floors": [{"metric": "herd_ppl/bits_per_byte", "max": 100.0}],
    }
    config = tmp_path / "eval.yaml"
    config.write_text(
        json.dumps({"name": "gate-test", "tasks": ["herd_mc", "herd_ppl"], "batch_size": 8, "gate": gate})
    )
    good = tiny_checkpoint(tmp_path / "good", seed=1, **SHARP)
    bad_model, _ = load_model(good)
    with torch.no_grad():
        bad_model.norm.weight.mul_(4.0)  # over-confident: its bits per byte rise far beyond any noise allowance
    bad = save_checkpoint(bad_model, tmp_path / "bad", load_tokenizer("llama3"))

    args = ["eval", "--config", str(config), "--tracking-uri", store, "--promote"]
    assert main(args + ["--model", str(good)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["promotion"]["promoted"] is True
    assert main(args + ["--model", str(bad)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["promotion"]["promoted"] is False and not second["promotion"]["champion_reevaluated"]
    assert "herd_ppl/bits_per_byte" in second["promotion"]["reason"]

    client = MlflowClient(store)
    champ = client.get_model_version_by_alias("herd", "champion")
    hash_before = champ.tags["eval.config_hash"]
    assert main(args + ["--model", str(good), "--limit", "12"]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["promotion"]["champion_reevaluated"] is True
    champ = client.get_model_version("herd", champ.version)
    assert champ.tags["eval.config_hash"] != hash_before
    assert version_metrics(champ)["herd_mc/n"] == 12.0  # measured again under the new limit
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`herd.stage` = 'eval'")
    assert sum(r.info.run_name == "eval-gate-test-champion" for r in runs) == 1
    # no win-rate check in this gate: benchmarks ask "not worse", so equal weights pass
    assert third["promotion"]["promoted"] is True
