"""Ragged rows: rows of different lengths laid end to end as one flat sequence, so the model's
matmuls run on real tokens only (model.Attention reads the layout; flows/eval/scoring.py builds it)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class RaggedRows:
    """Rows of different lengths laid end to end as one flat sequence (tokens (1, N)): every matmul
    sees the N real tokens and no padding. The token at place t of its row sees the row's first
    prefix[t] tokens (a prefix the row shares, e.g. a context that each continuation packed after it
    sees) and the row's tokens seg[t]..t (its own segment up to itself); prefix[t] <= seg[t] <= t.

    starts: (R + 1,) int64 row boundaries in flat tokens; prefix, seg: (N,) int64, row-relative.
    For a fused model (fuse_projections) on CPU in fp32, herd's C kernel computes just the visible
    pairs (model/cpu_kernels.py); elsewhere SDPA runs on padded rows, in groups of consecutive rows
    of at most attn_budget padded slots (rows sorted by length pad little).
    """

    starts: torch.Tensor
    prefix: torch.Tensor
    seg: torch.Tensor
    attn_budget: int = 2048

    @functools.cached_property
    def longest(self) -> int:
        return int((self.starts[1:] - self.starts[:-1]).max())

    @functools.cached_property
    def padded(self) -> tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], torch.Tensor]:
        """(groups, at) for SDPA: per group, (index (B, T): the flat token in each row slot, padding
        repeating the row's first; mask (B, 1, T, T) bool, a padding slot seeing itself only); at (N,):
        each flat token's slot in the groups' slots laid end to end."""
        starts = self.starts.tolist()
        lens = [b - a for a, b in zip(starts, starts[1:])]
        groups, at, slots, r0, dev = [], [], 0, 0, self.starts.device
        while r0 < len(lens):
            r1 = r0 + 1
            while r1 < len(lens) and (r1 - r0 + 1) * max(lens[r0 : r1 + 1]) <= self.attn_budget:
                r1 += 1
            T = max(lens[r0:r1])
            t = torch.arange(T, device=dev)
            length = torch.tensor(lens[r0:r1], device=dev)[:, None]  # (B, 1)
            real = t[None] < length  # (B, T)
            index = torch.tensor(starts[r0:r1], device=dev)[:, None] + torch.where(real, t[None], 0)
            prefix, seg = self.prefix[index], self.seg[index]  # (B, T) per query slot
            key = t[None, None, :]
            sees = (key < prefix[:, :, None]) | ((key >= seg[:, :, None]) & (key <= t[None, :, None]))
            mask = (sees & real[:, None, :]) | (torch.eye(T, dtype=torch.bool, device=dev) & ~real[:, :, None])
            groups.append((index, mask[:, None]))
            at.append((slots + torch.arange(r1 - r0, device=dev)[:, None] * T + t[None])[real])
            slots += (r1 - r0) * T
            r0 = r1
        return tuple(groups), torch.cat(at)
