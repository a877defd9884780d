"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is hundreds of kernel launches of a few microseconds each, so on a
GPU the host's launch overhead, not the GPU, sets its pace. Each bucket size (1, 2, 4, ... up to
max_num_seqs) is captured once at start-up with static input buffers: the fed tokens, each row's
cached length and its block table. A step copies its rows into the buffers, pads the bucket with
rows that attend only the null block, replays the graph and reads the first B rows of the logits.
Batch sizes above the largest bucket run eagerly. Everything a captured step reads is on the device
(model/paged_attention.py reads lengths and tables there), so one capture serves every length.
"""

from __future__ import annotations

import bisect
import logging

import torch

log = logging.getLogger("herd.engine")


class CudaGraphDecoder:
    def __init__(self, model, cache, sizes: list[int], width: int):
        self.model, self.cache = model, cache
        self.sizes = sorted(set(sizes))
        largest, dev = self.sizes[-1], cache.device
        self.tokens = torch.zeros(largest, 1, dtype=torch.long, device=dev)
        self.lengths = torch.zeros(largest, dtype=torch.long, device=dev)
        self.tables = torch.zeros(largest, width, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        with torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                pool = self._capture(b, pool)
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def _forward(self, b: int) -> torch.Tensor:
        self.cache.set_step(self.tables[:b], self.lengths[:b], 1)
        return self.model(self.tokens[:b], cache=self.cache, last_only=True)[:, -1]

    def _capture(self, b: int, pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self._forward(b)
        self.graphs[b] = (graph, out)
        return graph.pool()

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, tokens: torch.Tensor, lengths: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for B rows: tokens (B,), lengths (B,), tables (B, width), all on the device."""
        B = tokens.shape[0]
        b = self.sizes[bisect.bisect_left(self.sizes, B)]
        self.tokens[:B, 0].copy_(tokens)
        self.lengths[:B].copy_(lengths)
        self.tables[:B].copy_(tables)
        if b > B:  # padding rows: length 0, every block the null block
            self.lengths[B:b].zero_()
            self.tables[B:b].zero_()
        graph, out = self.graphs[b]
        graph.replay()
        return out[:B]
