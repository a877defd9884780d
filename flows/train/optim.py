"""AdamW with per-group weight decay, and the learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def param_kind(name: str) -> str:
    if name.endswith("norm.weight"):
        return "norm"
    if name.endswith("tok_embeddings.weight"):
        return "embedding"
    if name.endswith("output.weight"):
        return "output"
    return "matrix"


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if param_kind(name) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def _fused_ok(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    devices = {p.device.type for p in params}
    if devices == {"cuda"}:
        return True
    # The CPU fused kernel takes plain tensors; sharded (DTensor) params go through foreach.
    return devices == {"cpu"} and not any(isinstance(p, DTensor) for p in params)


def build_optimizer(
    model: nn.Module, lr: float, betas, eps: float, weight_decay: float, no_decay: list[str], fused: str = "auto"
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, no_decay)
    from torch.distributed.tensor import DTensor

    use_fused = _fused_ok(model) if fused == "auto" else fused == "true"
    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    # foreach kernels refuse a group mixing DTensor (TP-sharded) and plain (replicated) params.
    kwargs = {"fused": True} if use_fused else {"foreach": len(kinds) == 1}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def lr_ratio(step: int, *, kind: str, total: int, warmup: int, min_ratio: float, decay_fraction: float) -> float:
    """Multiplier of the peak lr for the update at `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable at the peak, then a linear decay over the last `decay_fraction` of training.
    decay_steps = max(1, round(total * decay_fraction))
    start = total - decay_steps
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay_steps)
    return 1.0 - (1 - min_ratio) * progress


def build_scheduler(
    optimizer, *, kind: str, total: int, warmup: int, min_ratio: float, decay_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = functools.partial(
        lr_ratio, kind=kind, total=total, warmup=warmup, min_ratio=min_ratio, decay_fraction=decay_fraction
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
