"""Losses the loop can run, and the fused output projection + cross-entropy.

A loss function takes `(model, batch)` and returns a `LossOutput` whose `loss` is a weighted
*sum*: the batch source sets the weights so that summing `loss` over every micro-batch of
every data-parallel rank gives the step's objective (e.g. 1 / valid targets of the global
batch for language modelling). The loop backpropagates `loss * dp_size` (DDP and FSDP average
gradients over ranks) and reports the all-reduced sum. Post-training (SFT, DPO, PPO) plugs in
its own batch source and loss function with the same contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Logits per chunk: ~128M elements (512 MiB in fp32) whatever the vocabulary. Each chunk adds one
# pass over the (vocab x dim) fp32 weight gradient; 4x smaller chunks cost ~25% more on CPU.
CHUNK_ELEMENTS = 1 << 27


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, weighted sum (see module doc)
    count: torch.Tensor  # scalar, sum of the weights (evaluation divides loss by it)
    metrics: dict = field(default_factory=dict)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, t_i), chunk by chunk, without materialising the logits.

    Forward computes each chunk's logits, its loss and, when gradients are needed, the
    gradient of the chunk's logits (w_i * (softmax - onehot)), folding it at once into
    dL/dh and dL/dW; backward only scales them by the incoming scalar. Same flops as the
    plain path, but the (tokens x vocab) logits never exist in full, in fp32 or otherwise.
    Matmuls run in the autocast dtype (or the inputs' dtype); softmax in fp32."""

    @staticmethod
    def forward(ctx, h, w, targets, weights, chunk: int):
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            cdt = torch.get_autocast_dtype(device_type)
        else:
            cdt = h.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            wc = w.to(cdt)
            n = h.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
            grad_w = None  # fp32, from the first chunk's product (no zero-filled pass)
            safe_t = targets.clamp(min=0)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                hc = h[s:e].to(cdt)
                logits = (hc @ wc.t()).float()
                tc, wts = safe_t[s:e, None], weights[s:e, None].float()
                # In place, one buffer: shift by the max, exp, sum; softmax = exp / sum.
                logits.sub_(logits.amax(dim=-1, keepdim=True))
                target = logits.gather(1, tc)
                sumexp = logits.exp_().sum(dim=-1, keepdim=True)
                total += ((sumexp.log() - target) * wts).sum()
                if need_h or need_w:
                    g = logits.mul_(wts / sumexp)  # w_i * softmax
                    g.scatter_add_(1, tc, -wts)  # - w_i * onehot
                    g = g.to(cdt)
                    if need_h:
                        grad_h[s:e] = (g @ wc).to(h.dtype)
                    if need_w:
                        part = g.t() @ hc
                        grad_w = part.float() if grad_w is None else grad_w.add_(part)
            if need_w and grad_w is None:  # no rows
                grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(w.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None
        gw = grad_w * grad_out if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                               chunk: int = 0) -> torch.Tensor:
    """h (..., D), w (V, D), targets (...) with negatives ignored, weights (...): weighted CE sum."""
    d = h.shape[-1]
    if chunk <= 0:
        chunk = max(1, CHUNK_ELEMENTS // w.shape[0])
    return FusedLinearCrossEntropy.apply(h.reshape(-1, d), w, targets.reshape(-1), weights.reshape(-1), chunk)


def reference_cross_entropy(h, w, targets, weights):
    """The plain path (full logits), for tests."""
    logits = F.linear(h, w).float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp(min=0), reduction="none")
    return (nll * weights.reshape(-1).float()).sum()


def causal_lm_loss(model, batch, chunk: int = 0) -> LossOutput:
    """Next-token prediction on packed rows, with document masking (positions restart at 0)."""
    head = lambda h, w: fused_linear_cross_entropy(h, w, batch.targets, batch.weights, chunk)  # noqa: E731
    loss = model(batch.tokens, positions=batch.positions, head=head)
    return LossOutput(loss, batch.weights.sum())
