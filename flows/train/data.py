"""Training input from herd's packed shards: distinct rows per data-parallel rank, a
resumable cursor, document boundaries kept.

The order of rows is a function of (seed, epoch) only: global row g of the stream is row
perm_epoch[g % N] of the split, epoch = g // N. A step consumes
`dp_size * grad_accum * micro_batch` consecutive stream rows; rank r takes, for micro-step m,
the `micro_batch` rows starting at `(m * dp_size + r) * micro_batch`. The cursor (rows
consumed so far) is the whole read position, so a resumed run reads exactly the rows that the
interrupted one had not, and the stream is the same whatever the number of workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flows.data.shards import load_shard, read_manifest
from model.errors import HerdError

IGNORE = -100


def manifest_digest(directory: str | Path) -> str:
    """sha256 of manifest.json: names the data (it lists every shard's sha256)."""
    return hashlib.sha256((Path(directory) / "manifest.json").read_bytes()).hexdigest()


@dataclass
class Batch:
    """One micro-batch: model inputs and next-token targets, all (B, seq_len - 1)."""

    tokens: torch.Tensor  # int64 inputs
    positions: torch.Tensor  # int64 positions in the document (restart at 0: document masking)
    targets: torch.Tensor  # int64 next tokens, IGNORE where no loss applies
    weights: torch.Tensor  # float32 loss weight per target: 1 / (valid targets in the global batch), 0 elsewhere

    def to(self, device) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=True) for t in (self.tokens, self.positions, self.targets, self.weights))
        )

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def rows_to_batch(tokens: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Shift packed rows into (inputs, positions, targets, valid).

    A target is valid unless it is padding (position -1) or the first token of a document
    (position 0): with document masking the model cannot see the previous document, so
    that prediction would cross a boundary."""
    tok = torch.from_numpy(tokens.astype(np.int64))
    pos = torch.from_numpy(positions.astype(np.int64))
    inputs, in_pos = tok[:, :-1], pos[:, :-1]
    targets, t_pos = tok[:, 1:].clone(), pos[:, 1:]
    valid = t_pos > 0
    targets[~valid] = IGNORE
    return inputs.contiguous(), in_pos.contiguous(), targets, valid


class PackedData:
    """Global-batch reader over one split; `state_dict()` is the resumable read position."""

    def __init__(
        self,
        directory: str | Path,
        split: str,
        micro_batch: int,
        grad_accum: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise HerdError(f"{self.dir}: no split {split!r} in the manifest")
        self.split = split
        shards = self.manifest["splits"][split]["shards"]
        self.arrays = [load_shard(self.dir, s) for s in shards]
        self.sizes = np.array([s["sequences"] for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.num_rows = int(self.offsets[-1])
        self.seq_len = int(self.manifest["seq_len"])
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.cursor = 0
        self._perm_epoch, self._perm = -1, None

    @property
    def global_rows(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    # --- order ---------------------------------------------------------------------------
    def _row_index(self, g: int) -> int:
        if self.num_rows == 0:
            raise HerdError(f"{self.dir}: split {self.split!r} has no sequences")
        epoch, i = divmod(g, self.num_rows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def _rows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        toks, poss = [], []
        for g in range(start, start + count):
            idx = self._row_index(g)
            s = int(np.searchsorted(self.offsets, idx, side="right") - 1)
            t, p = self.arrays[s]
            toks.append(np.asarray(t[idx - self.offsets[s]]))
            poss.append(np.asarray(p[idx - self.offsets[s]]))
        return np.stack(toks), np.stack(poss)

    # --- reading ---------------------------------------------------------------------------
    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch; advances the cursor."""
        mb, dp = self.micro_batch, self.dp_size
        # Loss weights normalise by the valid targets of the whole global batch, so the loss
        # (and the gradient) is the same whatever the split across ranks and micro-steps.
        _, all_pos = self._rows(self.cursor, self.global_rows)
        total_valid = max(int((all_pos[:, 1:] > 0).sum()), 1)
        out = []
        for m in range(self.grad_accum):
            start = self.cursor + (m * dp + self.dp_rank) * mb
            tokens, positions = self._rows(start, mb)
            inputs, in_pos, targets, valid = rows_to_batch(tokens, positions)
            out.append(Batch(inputs, in_pos, targets, valid.float() / total_valid))
        self.cursor += self.global_rows
        return out

    def eval_batches(self, count: int) -> list[Batch]:
        """`count` micro-batches from the start of the split (in order), split over ranks;
        weights are 1 per valid target (the caller sums losses and counts over ranks)."""
        out = []
        rows = min(self.num_rows, count * self.micro_batch)
        for b in range(self.dp_rank, -(-rows // self.micro_batch), self.dp_size):
            start = b * self.micro_batch
            n = min(self.micro_batch, rows - start)
            tokens, positions = self._rows_in_order(start, n)
            inputs, in_pos, targets, valid = rows_to_batch(tokens, positions)
            out.append(Batch(inputs, in_pos, targets, valid.float()))
        return out

    def _rows_in_order(self, start: int, count: int):
        shuffle, self.shuffle = self.shuffle, False
        try:
            return self._rows(start, count)
        finally:
            self.shuffle = shuffle

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "cursor": self.cursor,
            "epoch": self.cursor // max(self.num_rows, 1),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": self.num_rows,
            "split": self.split,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_rows") not in (None, self.num_rows):
            raise HerdError(
                f"{self.dir}: the checkpoint's data had {state['num_rows']} rows, this split has "
                f"{self.num_rows}: resume with the same data"
            )
        self.cursor = int(state["cursor"])


def pack_documents(
    texts: list[str],
    out_dir: str | Path,
    tokenizer: str = "llama3",
    seq_len: int = 128,
    validation_every: int = 50,
    per_shard: int = 256,
) -> Path:
    """Tokenize and pack documents in-process into herd's shard format (same manifest fields
    as `herd data prep`): every `validation_every`-th document goes to validation. For tests
    and benchmarks; the data pipeline proper is `herd data prep`."""
    import json

    from flows.data.shards import FORMAT, PAD_POSITION, POSITION_DTYPE, ShardWriter
    from model.tokenizer import load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    writers = {s: ShardWriter(out, s, seq_len, per_shard, tok.eos_id, True) for s in ("train", "validation")}
    for i, ids in enumerate(tok.encode_batch(list(texts), eos=True)):
        writers["validation" if validation_every and i % validation_every == validation_every - 1 else "train"].add(ids)
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "token_dtype": "uint32",
        "position_dtype": np.dtype(POSITION_DTYPE).name,
        "pad_position": PAD_POSITION,
        "pad_token": tok.eos_id,
        "tokenizer": {
            "name": tok.name,
            "spec": tokenizer,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
        },
        "split": {"by": "document", "validation_every": validation_every},
        "splits": {s: w.close() for s, w in writers.items()},
        "input": {"documents": len(texts)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
