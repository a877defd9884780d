"""The sealed human-evaluation set: classifier and templates, encryption, ratings, and a scan of
everything the eval stage records for any prompt's 8-grams."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest

from flows.eval import promptset as P
from flows.eval.ratings import Verdict, bootstrap_ci, judge_pairs, verdict, win_rate_metrics
from flows.eval.sealed import KEY_ENV, KEY_FILE_ENV, new_key, seal, unseal
from flows.heldout import HELDOUT_DIGESTS
from model.errors import HerdError

REQUESTS = {
    "advice": "How can I get better sleep when my neighbours are loud at night?",
    "brainstorming": "Brainstorm names for a bakery that only sells sourdough bread.",
    "classification": "Classify these animals by habitat: whale, camel, penguin.",
    "closed_qa": "Based on the passage, when did the bridge reopen to traffic?",
    "coding": "Write a Python function that reverses a linked list.",
    "creative_writing": "Write a poem about the first snow of winter in a city.",
    "extraction": "Extract all the dates mentioned in the following email.",
    "inhabiting_a_character": "Pretend you are a medieval knight and describe your morning.",
    "open_qa": "Why is the sky blue during the day?",
    "reasoning": "If a train leaves at 3pm and travels for 150 minutes, when does it arrive? How many hours is that?",
    "rewriting": "Rewrite this sentence in the passive voice: the cat chased the mouse.",
    "summarization": "Summarize the plot of Hamlet in three sentences.",
}
PASSAGE = (
    "The river rose slowly through the night, and by morning the low fields along its banks were silver "
    "with standing water. Farmers came out early to look at the damage. Most of them said little; they had "
    "seen floods before and knew that the water would go down in a few days, leaving a thin layer of mud "
    "that would make the next harvest better than the last."
)


def test_classifier_names_each_use_case():
    assert {uc: P.classify(r) for uc, r in REQUESTS.items()} == {uc: uc for uc in REQUESTS}
    assert len(P.USE_CASES) == 12 and set(REQUESTS) == set(P.USE_CASES)


def _sources() -> list[P.Source]:
    return [P.Source(f"s{i}", "test", r, PASSAGE) for i, r in enumerate(REQUESTS.values())]


def test_templates_fill_every_use_case_from_one_source():
    cands = P.candidates(_sources()[0])
    assert cands[0].prompt == REQUESTS["advice"] and not cands[0].templated
    assert {c.use_case for c in cands[1:]} == set(P.USE_CASES)
    assert all(REQUESTS["advice"] in c.prompt or PASSAGE[:40] in c.prompt for c in cands)
    short = P.Source("x", "test", "Name a colour.", "Blue.")  # no passage: only request templates
    assert all("Blue." not in c.prompt for c in P.candidates(short))


def test_contamination_counts_prompts_sharing_a_13_gram():
    grams = P.training_grams({"sft": [PASSAGE], "other": ["nothing in common here at all"]})
    prompts = ["Summarize this text in two sentences.\n\n" + PASSAGE, "Why is the sky blue during the day?"]
    assert P.contamination(prompts, grams) == {"sft": 1, "other": 0}
    twelve = " ".join(PASSAGE.split()[:12])  # 12 shared words are not a 13-gram
    assert P.contamination([twelve + " zebra"], grams) == {"sft": 0, "other": 0}


def test_sealed_round_trip_and_key_errors(tmp_path, monkeypatch):
    key = new_key()
    records = P.to_records([c for s in _sources() for c in P.candidates(s)])
    path = seal(records, tmp_path / "set.sealed", key.encode())
    blob = path.read_bytes()
    assert b"river" not in blob and b"Hamlet" not in blob  # not stored in the clear
    assert unseal(path, key.encode()) == records
    monkeypatch.setenv(KEY_ENV, key)
    assert len(unseal(path)) == len(records)
    monkeypatch.setenv(KEY_ENV, new_key())
    with pytest.raises(HerdError, match="wrong key"):
        unseal(path)
    monkeypatch.delenv(KEY_ENV)
    (tmp_path / "key").write_text(key + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "key"))  # a mounted Kubernetes Secret
    assert len(unseal(path)) == len(records)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "absent"))
    with pytest.raises(HerdError, match="no key"):
        unseal(path)


def test_verdicts_need_both_orders_and_intervals_cover_the_rate():
    assert verdict("x", 0.9, 0.2).score == 1.0  # preferred first, and second when shown second
    assert verdict("x", 0.9, 0.8).score == 0.5  # the judge always picks the first: a tie
    assert verdict("x", 0.3, 0.7).score == 0.0
    m = win_rate_metrics([Verdict("a", 0.5)] * 40 + [Verdict("b", 1.0)] * 30 + [Verdict("b", 0.0)] * 10)
    assert m["a/win_rate"] == 0.5 and m["a/win_rate_lo"] == m["a/win_rate_hi"] == 0.5 and m["a/n"] == 40
    assert m["b/win_rate"] == 0.75 and m["b/win_rate_lo"] < 0.75 < m["b/win_rate_hi"]
    assert m["win_rate"] == (20 + 30) / 80 and m["ties"] == 40 and m["wins"] == 30 and m["losses"] == 10
    lo, hi = bootstrap_ci([1.0] * 60 + [0.0] * 40)
    assert 0.49 < lo < 0.6 < hi < 0.71  # 0.6 +- 1.96 * sqrt(0.24 / 100)

    class FirstIsBetter:  # a judge with total position bias
        def prefer_first(self, items):
            return [0.9] * len(items)

    vs = judge_pairs(FirstIsBetter(), [("a", "p1"), ("a", "p2")], ["same answer", "x"], ["same  answer", "y"])
    assert [v.score for v in vs] == [0.5, 0.5]  # identical answers tie unjudged; a biased judge ties


@pytest.mark.slow
def test_the_shared_data_gives_1800_prompts_in_12_use_cases_with_no_contamination(shared_data, tmp_path):
    listed = P.write_digests(shared_data, tmp_path / "digests")
    assert listed.read_text() == HELDOUT_DIGESTS.read_text(), "configs/eval/heldout_sources.sha256 is stale"
    built = P.build(shared_data)
    counts = Counter(p.use_case for p in built.prompts)
    assert len(built.prompts) == 1800 and set(counts) == set(P.USE_CASES) and min(counts.values()) >= 100
    assert len({p.prompt for p in built.prompts}) == 1800
    shared = P.contamination([p.prompt for p in built.prompts], P.training_grams(P.training_sets(shared_data)))
    print(f"{len(built.sources)} sources, {built.dropped_contaminated} candidates dropped; contamination {shared}")
    assert len(shared) >= 5 and sum(shared.values()) == 0


# --- the eval stage: aggregates only, and no key no run --------------------------------------------


def _eight_grams(text: str) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(w[i : i + 8]) for i in range(len(w) - 7)}


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_eval_stage_records_no_prompt_text_and_needs_the_key(tmp_path, monkeypatch, caplog, capsys):
    import mlflow
    from mlflow import MlflowClient

    from flows.cli import main
    from flows.eval.stage import run_eval
    from tests.tiny import tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    key = new_key()
    prompts = [c for s in _sources() for c in P.candidates(s)]
    sealed = seal(P.to_records(prompts), tmp_path / "he.sealed", key.encode())
    cand = tiny_checkpoint(tmp_path / "cand", seed=1, std=0.2, max_seq_len=512)
    ref = tiny_checkpoint(tmp_path / "ref", seed=2, std=0.2, max_seq_len=512)
    judge = tiny_checkpoint(tmp_path / "judge", seed=3, std=0.2, max_seq_len=512)
    spec = {
        "name": "humaneval",
        "type": "rated",
        "data": {"test": str(sealed)},
        "max_tokens": 6,
        "until": [],
        "judge": {"kind": "likelihood", "model": str(judge)},
    }
    spec_path = tmp_path / "humaneval.json"
    spec_path.write_text(json.dumps(spec))
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = {"name": "sealed", "tasks": [{"task": str(spec_path), "limit": 2}], "batch_size": 8}

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    (tmp_path / "eval.json").write_text(json.dumps(cfg))
    rc = main(["eval", "--config", str(tmp_path / "eval.json"), "--model", str(cand), "--tracking-uri", store])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("herd: error: sealed prompt set: no key")

    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)
    res = run_eval(cfg, cand, tracking_uri=store, experiment="sealed", reference=str(ref))
    m = res.metrics
    assert m["humaneval/n"] == 24 and m["humaneval/use_cases"] == 12
    assert 0 <= m["humaneval/win_rate_lo"] <= m["humaneval/win_rate"] <= m["humaneval/win_rate_hi"] <= 1
    assert all(f"humaneval/{uc}/win_rate" in m for uc in P.USE_CASES)

    client = MlflowClient(store)
    run = client.get_run(res.run_id)
    recorded = [
        json.dumps(run.data.params),
        json.dumps(run.data.tags),
        " ".join(run.data.metrics),
        caplog.text,
        capsys.readouterr().err,
    ]
    art = Path(
        mlflow.artifacts.download_artifacts(run_id=res.run_id, dst_path=str(tmp_path / "art"), tracking_uri=store)
    )
    files = [f for f in art.rglob("*") if f.is_file()]
    assert files  # the config and the task spec, at least
    recorded += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    leaked = set().union(*(_eight_grams(p.prompt) for p in prompts)) & set().union(*(_eight_grams(t) for t in recorded))
    assert not leaked, f"prompt 8-grams in MLflow or the log: {sorted(leaked)[:3]}"
