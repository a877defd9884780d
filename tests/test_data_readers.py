"""Readers (JSONL, Parquet, text, .gz/.zst, embedded corpus), malformed records, config loading."""

from __future__ import annotations

import gzip
import json

import pytest

from flows.data.config import DataConfig, InputConfig, config_from_dict, load_config
from flows.data.readers import plan_tasks, read_all
from model.errors import HerdError


def rows(cfg: InputConfig):
    return list(read_all(cfg))


def test_jsonl_fields_and_malformed_records(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                json.dumps({"doc": "hello world", "key": "a"}).encode(),
                b"{not json",
                json.dumps({"other": "no text"}).encode(),
                json.dumps({"doc": 5}).encode(),
                b'{"doc": "caf\xff"}',
                b"[1, 2]",
                json.dumps({"doc": "no id"}).encode(),
                b"",
            ]
        )
    )
    out = rows(InputConfig(paths=[str(path)], text_field="doc", id_field="key"))
    assert [r["reason"] for r in out] == [
        "",
        "read:bad_json",
        "read:missing_text_field",
        "read:text_not_a_string",
        "read:undecodable_bytes",
        "read:not_an_object",
        "",
    ]
    assert out[0]["id"] == "a" and out[0]["text"] == "hello world"
    assert out[-1]["id"] == "in.jsonl:7"
    assert len({r["seq"] for r in out}) == len(out)


def test_compressed_and_split_jsonl_read_the_same(tmp_path):
    import zstandard

    lines = [json.dumps({"text": f"document number {i} " * (i % 7 + 1), "id": str(i)}) for i in range(500)]
    blob = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(blob)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(blob))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    expected = [(str(i), json.loads(line)["text"]) for i, line in enumerate(lines)]
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        got = [(r["id"], r["text"]) for r in rows(InputConfig(paths=[str(tmp_path / name)]))]
        assert got == expected, name
    # Byte-range tasks: every line read exactly once, whatever the cut points.
    cfg = InputConfig(paths=[str(tmp_path / "a.jsonl")], chunk_bytes=997)
    assert len(plan_tasks(cfg)) > 5
    assert [(r["id"], r["text"]) for r in rows(cfg)] == expected


def _complete_lines(prefix: bytes, kind: str) -> int:
    """Lines that a decompressor independent of the reader recovers whole from a cut file."""
    import zlib

    import zstandard

    if kind == "gz":
        data = zlib.decompressobj(31).decompress(prefix)
    else:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(prefix)
    return data.count(b"\n")


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_input_is_counted_not_fatal(tmp_path, kind):
    import zstandard

    lines = [json.dumps({"text": f"record {i} " * (i % 9 + 1), "id": str(i)}) for i in range(3000)]
    blob = ("\n".join(lines) + "\n").encode()
    packed = gzip.compress(blob) if kind == "gz" else zstandard.ZstdCompressor().compress(blob)
    cut = packed[: len(packed) * 2 // 3]  # a download or copy that stopped early
    (tmp_path / f"in.jsonl.{kind}").write_bytes(cut)
    (tmp_path / "ok.txt.gz").write_bytes(gzip.compress(b"whole"))
    text = gzip.compress(" ".join(f"word{i}" for i in range(5000)).encode())
    (tmp_path / "cut.txt.gz").write_bytes(text[: len(text) // 2])
    out = rows(InputConfig(paths=[str(tmp_path)]))
    reasons = [r["reason"] for r in out]
    whole = _complete_lines(cut, kind)
    assert 0 < whole < len(lines)
    assert reasons.count("") == whole + 1  # the complete records, and ok.txt.gz
    assert reasons.count("read:truncated_file") == 2  # one row for each file's unreadable rest
    assert len(out) == whole + 3  # kept + dropped = every row read
    bad = [r for r in out if r["reason"] == "read:truncated_file"]
    assert {r["id"] for r in bad} == {f"in.jsonl.{kind}:{whole + 1}", "cut.txt.gz"}
    print(f"{kind}: {whole} records read before the cut, then 1 read:truncated_file row")


def test_parquet_and_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "three"], "id": ["x", "y", "z"]}), tmp_path / "d.parquet")
    out = rows(InputConfig(paths=[str(tmp_path / "d.parquet")]))
    assert [(r["id"], r["reason"]) for r in out] == [("x", ""), ("d.parquet:2", "read:missing_text_field"), ("z", "")]

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("First para.\n\nSecond para.\n")
    (docs / "b.txt.gz").write_bytes(gzip.compress(b"Only one."))
    (docs / "bad.txt").write_bytes(b"\xff\xfe\xfa broken")
    out = rows(InputConfig(paths=[str(docs)]))
    assert [(r["id"], r["reason"]) for r in out] == [
        ("a.txt", ""),
        ("b.txt.gz", ""),
        ("bad.txt", "read:undecodable_bytes"),
    ]
    out = rows(InputConfig(paths=[str(docs / "a.txt")], text_unit="paragraph"))
    assert [r["text"] for r in out] == ["First para.", "Second para.\n"]


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(HerdError, match="no such input"):
        plan_tasks(InputConfig(paths=[str(tmp_path / "missing.jsonl")]))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(HerdError, match="cannot tell the format"):
        plan_tasks(InputConfig(paths=[str(tmp_path / "x.bin")]))


def test_embedded_corpus_is_deterministic():
    from flows.data.embedded import embedded_documents

    first = list(embedded_documents(0, 8))
    assert len(first) > 50
    assert first == list(embedded_documents(0, 8))
    assert all(len(text) >= 400 for _, text in first)


def test_config_unknown_key_and_types(tmp_path):
    assert isinstance(config_from_dict({}), DataConfig)
    with pytest.raises(HerdError, match="unknown key 'minhash.bandz'"):
        config_from_dict({"minhash": {"bandz": 3}})
    with pytest.raises(HerdError, match="unknown key 'stages'"):
        config_from_dict({"stages": []})
    with pytest.raises(HerdError, match="pack.seq_len must be an integer"):
        config_from_dict({"pack": {"seq_len": "long"}})
    with pytest.raises(HerdError, match="langid.enabled must be true or false"):
        config_from_dict({"langid": {"enabled": "yes"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(HerdError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", ["default", "bench"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "data" / f"{name}.yaml")
    assert cfg.name == name
