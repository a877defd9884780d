"""LoRA on herd's nn.Linear projections: y = W x + (alpha / r) * B(A(x)), B zero-initialised.

`apply_lora` freezes the base weights and wraps the target modules (names like `wq`, `w2`);
`merge_lora` folds B @ A into W and restores plain nn.Linear, so the exported checkpoint is a
plain herd model with the same state-dict names as the base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.errors import HerdError

TARGETS = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        lin = self.base
        lin.weight.add_((self.lora_b @ self.lora_a) * self.scale)
        return lin


def apply_lora(model: nn.Module, rank: int, alpha: float, targets, dropout: float = 0.0) -> int:
    """Wrap target projections in every block; freeze everything else. Returns trainable params."""
    targets = set(targets)
    bad = targets - TARGETS
    if bad:
        raise HerdError(f"lora.target_modules: unknown {sorted(bad)} (choose from {sorted(TARGETS)})")
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for block in model.layers:
        for owner in (block.attention, block.feed_forward):
            for name in targets:
                lin = getattr(owner, name, None)
                if isinstance(lin, nn.Linear):
                    wrapped = LoRALinear(lin, rank, alpha, dropout)
                    setattr(owner, name, wrapped)
                    n += wrapped.lora_a.numel() + wrapped.lora_b.numel()
    return n


def merge_lora(model: nn.Module) -> nn.Module:
    for block in model.layers:
        for owner in (block.attention, block.feed_forward):
            for name, child in list(owner.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(owner, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
