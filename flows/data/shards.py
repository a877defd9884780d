"""The packed-shard format that pretraining reads (see docs/architecture.md).

A data directory holds `manifest.json` and, per split and shard, two .npy files:
  <split>-<NNNNN>.tokens.npy     uint32 (N, seq_len)  token ids
  <split>-<NNNNN>.positions.npy  int32  (N, seq_len)  position of each token in its document
Positions restart at 0 at every document start (a document longer than seq_len restarts
every seq_len tokens); a document cut by a row end continues in the next row with its
positions going on. Padding (only in the last row of a split) has position -1 and the EOS
token: mask it out of the loss with `positions >= 0`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flows.digest import sha256_file
from model.errors import HerdError

FORMAT = "herd.packed/v1"
TOKEN_DTYPE = np.uint32
POSITION_DTYPE = np.int32
PAD_POSITION = -1


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise HerdError(f"{path}: no manifest (not a herd data directory)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HerdError(f"{path}: not valid JSON ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise HerdError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _split(manifest: dict, split: str) -> dict:
    if split not in manifest["splits"]:
        raise HerdError(f"no split {split!r}; the manifest has {', '.join(manifest['splits'])}")
    return manifest["splits"][split]


def load_shard(directory: str | Path, shard: dict, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, positions) of one shard entry from the manifest, memory-mapped by default."""
    mode = "r" if mmap else None
    directory = Path(directory)
    return np.load(directory / shard["tokens"], mmap_mode=mode), np.load(directory / shard["positions"], mmap_mode=mode)


def iter_sequences(
    directory: str | Path, split: str = "train", start: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, positions) rows of one split in order, from sequence number `start` (resume)."""
    manifest = read_manifest(directory)
    offset = 0
    for shard in _split(manifest, split)["shards"]:
        n = shard["sequences"]
        if start < offset + n:
            tokens, positions = load_shard(directory, shard)
            for i in range(max(0, start - offset), n):
                yield np.asarray(tokens[i]), np.asarray(positions[i])
        offset += n


def num_sequences(directory: str | Path, split: str = "train") -> int:
    return _split(read_manifest(directory), split)["sequences"]


def token_stream(directory: str | Path, split: str = "train") -> np.ndarray:
    """All non-padding tokens of a split in order: the documents, each ending in EOS."""
    parts = [t[p >= 0] for t, p in iter_sequences(directory, split)]
    return np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)


def verify(directory: str | Path) -> int:
    """Check every shard file against the manifest's sha256 (training calls it before it reads
    any); HerdError names the first bad or missing one. Returns the number of files checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    n = 0
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for key in ("tokens", "positions"):
                path = directory / shard[key]
                if not path.is_file():
                    raise HerdError(f"{path}: shard file missing (listed in the manifest)")
                if sha256_file(path) != shard["sha256"][key]:
                    raise HerdError(f"{path}: sha256 does not match the manifest (corrupted shard)")
                n += 1
    return n


class ShardWriter:
    """Packs one split's documents into fixed-length rows and writes full shards as they fill."""

    def __init__(self, directory: Path, split: str, seq_len: int, per_shard: int, pad_token: int, pad_last: bool):
        self.dir, self.split, self.L, self.per_shard = directory, split, seq_len, per_shard
        self.pad_token, self.pad_last = pad_token, pad_last
        self.tokens: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.documents = self.doc_tokens = self.padding = self.dropped_tail = 0

    def add(self, ids: list[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=TOKEN_DTYPE)
        if not len(ids):
            return
        self.tokens.append(ids)
        # Offset in the document, restarting every seq_len tokens.
        self.positions.append((np.arange(len(ids)) % self.L).astype(POSITION_DTYPE))
        self.buffered += len(ids)
        self.documents += 1
        self.doc_tokens += len(ids)
        while self.buffered >= self.L * self.per_shard:
            self._flush(self.per_shard)

    def _flush(self, rows: int) -> None:
        tokens, positions = np.concatenate(self.tokens), np.concatenate(self.positions)
        n = rows * self.L
        self._write(tokens[:n].reshape(rows, self.L), positions[:n].reshape(rows, self.L))
        self.tokens, self.positions = [tokens[n:]], [positions[n:]]
        self.buffered -= n

    def _write(self, tokens: np.ndarray, positions: np.ndarray) -> None:
        stem = f"{self.split}-{len(self.shards):05d}"
        entry = {
            "tokens": f"{stem}.tokens.npy",
            "positions": f"{stem}.positions.npy",
            "sequences": len(tokens),
            "sha256": {},
        }
        for key, array in (("tokens", tokens), ("positions", positions)):
            np.save(self.dir / entry[key], array)
            entry["sha256"][key] = sha256_file(self.dir / entry[key])
        self.shards.append(entry)

    def close(self) -> dict:
        if self.buffered:
            full, rest = divmod(self.buffered, self.L)
            if full:
                self._flush(full)
            if rest and self.pad_last:
                tokens, positions = np.concatenate(self.tokens), np.concatenate(self.positions)
                pad = self.L - rest
                self._write(
                    np.concatenate([tokens, np.full(pad, self.pad_token, TOKEN_DTYPE)])[None],
                    np.concatenate([positions, np.full(pad, PAD_POSITION, POSITION_DTYPE)])[None],
                )
                self.padding = pad
            elif rest:
                self.dropped_tail = rest
            self.tokens, self.positions, self.buffered = [], [], 0
        return {
            "documents": self.documents,
            "tokens": self.doc_tokens - self.dropped_tail,
            "padding_tokens": self.padding,
            "dropped_tail_tokens": self.dropped_tail,
            "sequences": sum(s["sequences"] for s in self.shards),
            "shards": self.shards,
        }
