"""The data flow end to end on a real local Ray and a real MLflow store in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.data.config import config_from_dict
from flows.data.filters import DocFilter
from flows.data.stages import validation_mask

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def english_docs() -> tuple[list[str], list[str]]:
    """Real English every Python installation carries (the embedded corpus' first part):
    (40 documents that pass the document filters, 10 that do not)."""
    from flows.data.config import DataConfig
    from flows.data.embedded import embedded_documents
    from flows.data.filters import default_filters
    from flows.data.text import Doc, normalize

    filters = default_filters(DataConfig())
    good, bad = [], []
    for _, text in embedded_documents(0, 8):
        doc = Doc("", normalize(text))
        (good if all(f.filter(doc) is True for f in filters) else bad).append(text)
    return good[:40], bad[:10]


def write_input(path, docs) -> int:
    """The documents as JSONL, with three malformed lines mixed in; returns the line count."""
    lines = [json.dumps({"text": d, "id": f"doc{i}"}).encode() for i, d in enumerate(docs)]
    lines.insert(3, b"{broken json")
    lines.insert(7, json.dumps({"body": "no text field"}).encode())
    lines.insert(9, b'{"text": "bad bytes \xff"}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


def test_prep_end_to_end(tmp_path, ray_local, smollm2_dir):
    from flows.data.cli import prep
    from flows.data.shards import read_manifest, token_stream, verify
    from model.tokenizer import load_tokenizer

    good, bad = english_docs()
    assert len(good) == 40
    # exact copies (the second differs only in whitespace), near copies, filtered documents
    longest = sorted(good, key=len)[-2:]  # near copies of long documents: Jaccard well above 0.8
    docs = (
        good
        + [good[0], good[1] + "  \n", longest[0].replace(" the ", " a ", 1), longest[1] + " Extra words here."]
        + bad
    )
    src = tmp_path / "in.jsonl"
    n_lines = write_input(src, docs)
    cfg = config_from_dict(
        {
            "name": "itest",
            "input": {"paths": [str(src)]},
            "semdedup": {"max_tokens": 32},
            "quality": {"sample_size": 8, "max_tokens": 16, "model_dir": str(smollm2_dir), "threshold": 0.05},
            "pack": {"seq_len": 256, "sequences_per_shard": 8, "validation_fraction": 0.2},
            "output": {"write_documents": True},
            "ray": {"num_cpus": 2, "batch_size": 16, "progress_bars": False},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "itest"},
        }
    )
    out = tmp_path / "out"
    report = prep(cfg, out)
    print(json.dumps(report["phases"]))

    # Accounting: every input line is kept or dropped with one reason.
    assert report["input_documents"] == n_lines
    assert report["kept"] + sum(report["dropped_by_reason"].values()) == n_lines
    for reason in ("read:bad_json", "read:missing_text_field", "read:undecodable_bytes"):
        assert report["dropped_by_reason"][reason] == 1
    assert report["dropped_by_reason"]["exact_dedup:duplicate"] == 2
    assert report["dropped_by_reason"]["minhash:near_duplicate"] == 2
    assert report["dropped"] - 3 - 4 >= 10
    assert report["kept"] >= 20
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} == {"read:bad_json", "read:missing_text_field", "read:undecodable_bytes"}

    # Shards reproduce the kept documents' token stream, split by document.
    verify(out)
    manifest = read_manifest(out)
    tok = load_tokenizer("llama3")
    assert manifest["tokenizer"]["name"] == tok.name and manifest["seq_len"] == 256
    kept = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert len(kept) == report["kept"]
    val = validation_mask([d["id"] for d in kept], 0.2, 0)
    for split, mask in (("train", ~val), ("validation", val)):
        expected = [t for d, m in zip(kept, mask) if m for t in tok.encode(d["text"], eos=True)]
        assert np.array_equal(token_stream(out, split), np.array(expected, dtype=np.uint32)), split
        assert manifest["splits"][split]["documents"] == int(mask.sum())

    # MLflow: params, per-stage metrics, artifacts, the input dataset and the classifier.
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.params["minhash.bands"] == "14"
    assert run.data.metrics["input_documents"] == n_lines
    assert run.data.metrics["stage.read.dropped"] == 3
    assert "phase.filter.docs_per_s" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.json", "manifest.json", "rejects.jsonl", "dropped_samples.jsonl"} <= artifacts
    # The quality stage: judge and prompt digests, the rated set and the classifier as artifacts.
    from flows.data.quality_judge import judge_digest, prompt_sha256

    assert run.data.tags["herd.quality.judge_sha256"] == judge_digest(smollm2_dir)
    assert run.data.tags["herd.quality.prompt_sha256"] == prompt_sha256("fineweb_edu")
    assert run.data.metrics["quality.rated"] == 8
    quality_files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "quality")}
    assert quality_files == {"quality/labels.jsonl", "quality/classifier.npz"}
    labels = [json.loads(line) for line in (out / "quality" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 8 and all(0 <= r["rating"] <= 5 for r in labels)
    assert report["quality"]["rated"] == 8
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == report["input"]["digest"][:32]


MAX_CHARS = 1500


class MaxChars(DocFilter):
    """A filter added by a test: a class of its own and an entry in the filter list, nothing else."""

    name = "max_chars"
    prose_only = False  # every document, whatever its domain

    def __init__(self, limit: int):
        super().__init__(None)
        self.limit = limit

    @classmethod
    def from_config(cls, cfg):
        return cls(MAX_CHARS)

    def filter(self, doc):
        return "too_long" if len(doc.text) > self.limit else True


def test_a_new_filter_is_one_class_and_one_list_entry(tmp_path, ray_local, monkeypatch):
    from flows.data import filters, pipeline
    from flows.data.text import normalize

    monkeypatch.setattr(filters, "DEFAULT", [MaxChars, *filters.DEFAULT])
    good, bad = english_docs()
    docs = good + bad
    n_lines = write_input(tmp_path / "in.jsonl", docs)
    too_long = sum(len(normalize(d)) > MAX_CHARS for d in docs)
    assert 0 < too_long < len(docs)
    cfg = config_from_dict(
        {
            "name": "max-chars",
            "input": {"paths": [str(tmp_path / "in.jsonl")]},
            "semdedup": {"enabled": False},
            "quality": {"enabled": False},
            "pack": {"seq_len": 128, "sequences_per_shard": 8},
            "ray": {"num_cpus": 2, "batch_size": 16, "progress_bars": False},
        }
    )
    report, _ = pipeline.run_prep(cfg, tmp_path / "out")
    print(
        f"max_chars: {too_long} of {len(docs)} documents over {MAX_CHARS} chars; by stage {report['dropped_by_stage']}"
    )
    assert report["input_documents"] == n_lines
    assert report["kept"] + report["dropped"] == n_lines
    assert report["dropped_by_reason"]["max_chars:too_long"] == too_long
    assert report["dropped_by_stage"]["max_chars"] == too_long
    stages = list(report["stages"])
    assert stages[: stages.index("max_chars") + 2] == ["read", "normalize", "max_chars", "langid"]
    assert report["stages"]["max_chars"] == {"in": len(docs), "dropped": too_long}


def test_truncated_gz_is_counted_and_a_bad_count_writes_no_manifest(tmp_path, ray_local, monkeypatch):
    import gzip
    import zlib

    from flows.data import pipeline
    from flows.data.accounting import Accounting
    from flows.data.shards import verify
    from model.errors import HerdError

    good, bad = english_docs()
    src = tmp_path / "in"
    src.mkdir()
    n_plain = write_input(src / "a.jsonl", good[:20])
    blob = "".join(json.dumps({"text": d, "id": f"gz{i}"}) + "\n" for i, d in enumerate(good[20:] + bad)).encode()
    cut = gzip.compress(blob)[: len(gzip.compress(blob)) // 2]
    (src / "b.jsonl.gz").write_bytes(cut)
    whole = zlib.decompressobj(31).decompress(cut).count(b"\n")  # records a decompressor recovers whole
    assert 0 < whole < 30
    cfg = config_from_dict(
        {
            "name": "cut",
            "input": {"paths": [str(src)]},
            "semdedup": {"enabled": False},
            "quality": {"enabled": False},
            "pack": {"seq_len": 128, "sequences_per_shard": 8},
            "ray": {"num_cpus": 2, "batch_size": 16, "progress_bars": False},
        }
    )
    report, _ = pipeline.run_prep(cfg, tmp_path / "out")
    n_input = n_plain + whole + 1  # the plain lines, the gz's whole records, one row for its cut tail
    print(
        f"truncated .gz: {whole} records read, then read:truncated_file; input {report['input_documents']}, "
        f"kept {report['kept']} + dropped {report['dropped']}"
    )
    assert report["input_documents"] == n_input
    assert report["kept"] + report["dropped"] == n_input
    assert report["dropped_by_reason"]["read:truncated_file"] == 1
    assert verify(tmp_path / "out") > 0

    class Undercount(Accounting):  # loses one row: the check at the end must catch it
        def add(self, ids, texts, sources, reasons):
            super().add(ids[1:], texts[1:], sources[1:], reasons[1:])

    monkeypatch.setattr(pipeline, "Accounting", Undercount)
    with pytest.raises(HerdError, match="accounting error.*no manifest written"):
        pipeline.run_prep(cfg, tmp_path / "out2")
    assert (tmp_path / "out2").is_dir() and not (tmp_path / "out2" / "manifest.json").exists()


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from flows.cli import main

    # the failed run is still recorded: in this test's own store, not ./mlflow.db beside other tests
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")

    cfg = tmp_path / "c.yaml"
    cfg.write_text("minhash: {bandz: 2}\n")
    assert main(["data", "prep", "--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "herd: error: data config: unknown key 'minhash.bandz'"
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: x\n")
    assert (
        main(["data", "prep", "--config", str(ok), "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
        == 2
    )
    assert "no such input file or directory" in capsys.readouterr().err
