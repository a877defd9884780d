"""Packed shards: the token stream survives the round trip and positions mark every document."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.data import shards
from flows.data.shards import PAD_POSITION, ShardWriter
from model.errors import HerdError

EOS = 9


def write(tmp_path, docs, seq_len=16, per_shard=3, pad_last=True):
    w = ShardWriter(tmp_path, "train", seq_len, per_shard, EOS, pad_last)
    for d in docs:
        w.add(d)
    split = w.close()
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": shards.FORMAT, "seq_len": seq_len, "splits": {"train": split}})
    )
    return split


def make_docs(n, rng, max_len=40):
    # tokens 10.. are ordinary; every document ends with EOS
    return [list(rng.integers(10, 1000, size=rng.integers(1, max_len))) + [EOS] for _ in range(n)]


def test_round_trip_and_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    docs = make_docs(60, rng)
    split = write(tmp_path, docs)
    stream = np.concatenate([np.array(d) for d in docs])
    assert np.array_equal(shards.token_stream(tmp_path, "train"), stream)
    assert split["tokens"] == len(stream) and split["documents"] == 60
    shards.verify(tmp_path)

    rows = list(shards.iter_sequences(tmp_path, "train"))
    tokens = np.concatenate([t for t, _ in rows])
    positions = np.concatenate([p for _, p in rows])
    real = positions >= 0
    assert (positions[~real] == PAD_POSITION).all() and (tokens[~real] == EOS).all()
    assert real[: real.sum()].all()  # padding only at the very end
    # Every document starts at position 0, and position 0 appears only at document starts
    # (or every seq_len tokens inside a long document).
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]])
    offsets = np.concatenate([np.arange(len(d)) for d in docs])
    assert (positions[real][starts] == 0).all()
    assert np.array_equal(positions[real], offsets % 16)
    # No row joins two documents without a boundary: inside a row, a token right after EOS
    # starts a document.
    for t, p in rows:
        after_eos = np.flatnonzero(t[:-1] == EOS) + 1
        assert ((p[after_eos] == 0) | (p[after_eos] == PAD_POSITION)).all()


def test_long_documents_restart_every_seq_len(tmp_path):
    doc = list(range(10, 10 + 50)) + [EOS]
    write(tmp_path, [doc], seq_len=16)
    positions = np.concatenate([p for _, p in shards.iter_sequences(tmp_path, "train")])
    assert positions[:51].tolist() == [i % 16 for i in range(51)]


def test_resume_from_sequence_and_drop_tail(tmp_path):
    rng = np.random.default_rng(1)
    docs = make_docs(30, rng)
    split = write(tmp_path, docs, pad_last=False)
    assert split["padding_tokens"] == 0 and split["dropped_tail_tokens"] < 16
    all_rows = list(shards.iter_sequences(tmp_path, "train"))
    assert len(all_rows) == split["sequences"] == shards.num_sequences(tmp_path, "train")
    resumed = list(shards.iter_sequences(tmp_path, "train", start=4))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(all_rows[4:], resumed))


def test_tampered_shard_and_bad_manifest(tmp_path):
    write(tmp_path, make_docs(10, np.random.default_rng(2)))
    first = tmp_path / "train-00000.tokens.npy"
    data = np.load(first)
    data[0, 0] += 1
    np.save(first, data)
    with pytest.raises(HerdError, match="sha256"):
        shards.verify(tmp_path)
    with pytest.raises(HerdError, match="no split"):
        list(shards.iter_sequences(tmp_path, "test"))
    with pytest.raises(HerdError, match="no manifest"):
        shards.read_manifest(tmp_path / "nowhere")


def test_training_refuses_a_corrupted_or_missing_shard_before_it_starts(tmp_path):
    """Both launchers verify every shard's sha256 before a worker (or Ray) starts."""
    from flows.train.config import config_from_dict
    from flows.train.launch import run_local
    from flows.train.ray_trainer import run_pretrain

    write(tmp_path, make_docs(20, np.random.default_rng(3)))
    assert shards.verify(tmp_path) == 2 * len(list(tmp_path.glob("train-*.tokens.npy")))
    second = tmp_path / "train-00001.positions.npy"
    blob = bytearray(second.read_bytes())
    blob[-1] ^= 1  # one flipped bit in the data, the header intact: np.load would read it silently
    second.write_bytes(bytes(blob))
    cfg = config_from_dict(
        {
            "name": "refuse",
            "data": {"dir": str(tmp_path)},
            "mlflow": {"enabled": False},
            "ray": {"storage_path": str(tmp_path / "ray")},
        }
    )
    for launch in (lambda: run_pretrain(cfg), lambda: run_local(cfg, 1, tmp_path / "local")):
        with pytest.raises(HerdError, match=r"train-00001\.positions\.npy: sha256 does not match the manifest"):
            launch()
    assert not (tmp_path / "ray").exists() and not (tmp_path / "local").exists()  # nothing started
    second.unlink()
    with pytest.raises(HerdError, match=r"train-00001\.positions\.npy: shard file missing"):
        shards.verify(tmp_path)
