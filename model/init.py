"""Seeded from-scratch initialisation that any shard of a parameter can compute alone.

Each parameter is drawn in row blocks of ~1M elements, each block from its own generator seeded
by (seed, parameter name, block index). A rank that holds rows [a, b) (and any column range) of
a parameter draws only the blocks that overlap them, so a model sharded while it is built (FSDP2
on the meta device, tensor or pipeline parallel) gets exactly the values of an unsharded one,
and no rank ever holds more than its shard plus one block.
"""

from __future__ import annotations

import hashlib
import math

import torch

BLOCK_ELEMENTS = 1 << 20


def param_std(name: str, n_layers: int, std: float) -> float | None:
    """N(0, std); residual projections scaled by depth (as torchtitan); None: RMSNorm weights (ones)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("wo.weight", "w2.weight")):
        return std / math.sqrt(2 * n_layers)
    return std


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def fill_normal(
    out: torch.Tensor, name: str, global_shape: tuple[int, ...], offset: tuple[int, ...], seed: int, std: float
) -> None:
    """Write into `out` (the local piece at `offset` of a `global_shape` parameter) its N(0, std) values."""
    if out.numel() == 0:
        return
    row_elems = math.prod(global_shape[1:]) if len(global_shape) > 1 else 1
    rows_per_block = max(1, BLOCK_ELEMENTS // row_elems)
    start, stop = offset[0], offset[0] + out.shape[0]
    cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], out.shape[1:]))
    for b in range(start // rows_per_block, (stop - 1) // rows_per_block + 1):
        b0, b1 = b * rows_per_block, min((b + 1) * rows_per_block, global_shape[0])
        g = torch.Generator().manual_seed(_block_seed(seed, name, b))
        block = torch.randn((b1 - b0, *global_shape[1:]), generator=g, dtype=torch.float32)
        lo, hi = max(b0, start), min(b1, stop)
        piece = block[(slice(lo - b0, hi - b0), *cols)]
        out[lo - start : hi - start].copy_(piece.mul_(std) if std != 1.0 else piece)


@torch.no_grad()
def init_parameters(named_pieces, n_layers: int, seed: int, std: float = 0.02) -> None:
    """named_pieces: (name, local tensor, global shape, offset) for every parameter (or shard) to fill."""
    for name, local, shape, offset in named_pieces:
        s = param_std(name, n_layers, std)
        if s is None:
            local.fill_(1.0)
        else:
            fill_normal(local, name, tuple(shape), tuple(offset), seed, s)
