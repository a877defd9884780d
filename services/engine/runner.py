"""The model runner: executes a scheduler step on the paged KV cache and samples.

* decode: one token for each running sequence, one batched forward over their block tables (on
  CUDA, replayed from a CUDA graph captured for the batch-size bucket: services/engine/cuda_graphs.py);
* prefill: chunks of several sequences, padded to a common length and run as one batch; each row's
  logits are read at its own last real token (padding writes go to the null block);
* sampling: one batched sampler for every row, whatever its settings (model/sampler.py).

The block tables live in one host tensor, a row per batch slot, rewritten only when a sequence's
blocks change (`Sequence.blocks_version`); a step gathers its rows from it.
"""

from __future__ import annotations

import logging
import os

import torch

from model.paged_cache import NULL_BLOCK, PagedKVCache
from model.sampler import Sampled, Sampler, settings_of
from services.engine.config import EngineConfig
from services.engine.sequence import Sequence

log = logging.getLogger("herd.engine")


class ModelRunner:
    def __init__(self, model, config: EngineConfig):
        self.model = model.eval()
        self.config = model.config
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = config.block_size
        self.cache = PagedKVCache.for_model(
            self.config, config.total_blocks, config.block_size, dtype=self.dtype, device=self.device
        )
        self.tables = torch.full((config.max_num_seqs, config.blocks_per_seq), NULL_BLOCK, dtype=torch.long)
        self._versions: list[tuple[Sequence | None, int]] = [(None, -1)] * config.max_num_seqs
        self.sampler = Sampler()
        self.graphs = None
        if self.device.type == "cuda" and config.cuda_graphs and os.environ.get("HERD_CUDA_GRAPHS", "1") != "0":
            from services.engine.cuda_graphs import CudaGraphDecoder

            sizes = [b for b in config.cuda_graph_sizes if b <= config.max_num_seqs]
            self.graphs = CudaGraphDecoder(self.model, self.cache, sizes, config.blocks_per_seq)

    # --- cache bookkeeping ---
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.copy_blocks(pairs)

    def _rows(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        """The step's block tables (B, width), on the device."""
        for seq in seqs:
            if self._versions[seq.slot] != (seq, seq.blocks_version):
                row = self.tables[seq.slot]
                row.fill_(NULL_BLOCK)
                row[: len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.long)
                self._versions[seq.slot] = (seq, seq.blocks_version)
        slots = torch.tensor([s.slot for s in seqs])
        return self.tables[slots, :width].to(self.device, non_blocking=True)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    # --- forward ---
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """Logits (B, V) of each sequence's next token, `tokens` fed at its length."""
        lengths = [s.num_computed for s in seqs]
        width = max(lengths) // self.block_size + 1
        if self.graphs is not None and self.graphs.fits(len(seqs)):
            tables = self._rows(seqs, self.tables.shape[1])
            return self.graphs.run(self._to_device(tokens), self._to_device(lengths), tables)
        self.cache.set_step(self._rows(seqs, width), self._to_device(lengths), 1, span=max(lengths) + 1)
        return self.model(self._to_device(tokens)[:, None], cache=self.cache, last_only=True)[:, -1]

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        """chunks: (sequence, tokens from its length on); logits (len(chunks), V) after each chunk."""
        out = [None] * len(chunks)
        for group in _pad_groups([len(t) for _, t in chunks]):
            seqs = [chunks[i][0] for i in group]
            T = max(len(chunks[i][1]) for i in group)
            rows = torch.zeros(len(group), T, dtype=torch.long)
            lens = []
            for r, i in enumerate(group):
                toks = chunks[i][1]
                rows[r, : len(toks)] = torch.tensor(toks)
                lens.append(len(toks))
            starts = [s.num_computed for s in seqs]
            width = (max(starts) + T - 1) // self.block_size + 1
            uniform = min(lens) == T
            lens_t = self._to_device(lens)
            self.cache.set_step(
                self._rows(seqs, min(width, self.tables.shape[1])),
                self._to_device(starts),
                T,
                span=max(starts) + T,
                valid=None if uniform else lens_t,
            )
            if uniform:
                logits = self.model(rows.to(self.device), cache=self.cache, last_only=True)[:, -1]
            else:
                at = torch.arange(len(group), device=self.device)
                # The head hook projects only each row's last real token, never the padding.
                logits = self.model(
                    rows.to(self.device),
                    cache=self.cache,
                    head=lambda h, w, at=at, lens_t=lens_t: self.model.project(h[at, lens_t - 1]),
                )
            for r, i in enumerate(group):
                out[i] = logits[r]
        return torch.stack(out)

    # --- sampling ---
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> Sampled:
        rows = [settings_of(s.params) for s in seqs]
        penalized = any(r.penalized for r in rows)
        return self.sampler(
            logits,
            rows,
            [s.seed for s in seqs],
            [len(s.output_ids) for s in seqs],
            prompts=[s.prompt_ids for s in seqs] if penalized else None,
            outputs=[s.output_ids for s in seqs] if penalized else None,
        )


def _pad_groups(lengths: list[int], waste: float = 0.25) -> list[list[int]]:
    """Group rows of similar length so that padding adds at most ~`waste` of the real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, cur, real = [], [], 0
    for i in order:
        if cur:
            T = lengths[cur[0]]
            if T * (len(cur) + 1) > (real + lengths[i]) * (1 + waste) + 8:
                groups.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        groups.append(cur)
    return groups
