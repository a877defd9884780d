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
# pass over the (vocab x dim) fp32 weight gradient, so smaller chunks cost more passes.
CHUNK_ELEMENTS = 1 << 27

_CPU_BUFFERS: dict = {}


def _chunk_buffers(device: torch.device, shapes: dict) -> dict:
    """The loss's work tensors, kept from call to call on CPU (one of each name; another shape
    replaces it): glibc maps every fresh tensor of this size anew, and the page faults cost ~100 ms
    per (vocab x rows) tensor. CUDA's caching allocator already reuses its blocks."""
    if device.type != "cpu":
        return {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in shapes.items()}
    for k, (s, d) in shapes.items():
        b = _CPU_BUFFERS.get(k)
        if b is None or b.shape != s or b.dtype != d:
            _CPU_BUFFERS[k] = torch.empty(s, dtype=d)
    return _CPU_BUFFERS


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
    Matmuls run in the autocast dtype (or the inputs' dtype); softmax in fp32.

    A chunk's logits are held transposed, (vocab x rows): the three matmuls then read their
    operands in layouts oneDNN runs fast (on this CPU the loss's fwd+bwd took ~3.8-6.5 s in row
    layout at 2048 x 128256, ~2.4-3.5 s so)."""

    @staticmethod
    def forward(ctx, h, w, targets, weights, chunk: int):
        device_type = h.device.type
        cdt = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, (V, D) = h.shape[0], w.shape
        rows = max(1, min(chunk, n))
        # On CPU sized for a full chunk whatever n (only the pages used are touched): no
        # reallocation when the batch changes (training, then validation).
        size = torch.Size([V * (chunk if h.device.type == "cpu" else rows)])
        shapes = {"logits": (size, cdt)}
        if w.dtype != cdt:
            shapes["w"] = (torch.Size([V, D]), cdt)
        if cdt != torch.float32:
            shapes["logits32"] = (size, torch.float32)
        if need_w:
            shapes["grad_w_part"] = (torch.Size([V, D]), cdt)
        with torch.autocast(device_type, enabled=False):
            buf = _chunk_buffers(h.device, shapes)
            wc = w if w.dtype == cdt else buf["w"].copy_(w)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
            grad_w = None  # fp32, from the first chunk's product (no zero-filled pass)
            safe_t = targets.clamp(min=0)[None]
            weights = weights.float()[None]
            for s in range(0, n, rows):
                e = min(s + rows, n)
                hc = h[s:e].to(cdt)
                lt = torch.mm(wc, hc.t(), out=buf["logits"][: V * (e - s)].view(V, e - s))
                f = lt if cdt == torch.float32 else buf["logits32"][: V * (e - s)].view(V, e - s).copy_(lt)
                tc, wts = safe_t[:, s:e], weights[:, s:e]
                # In place, one buffer: shift by the max, exp, sum; softmax = exp / sum.
                f.sub_(f.amax(dim=0, keepdim=True))
                target = f.gather(0, tc)
                sumexp = f.exp_().sum(dim=0, keepdim=True)
                total += ((sumexp.log() - target) * wts).sum()
                if need_h or need_w:
                    f.mul_(wts / sumexp)  # w_i * softmax
                    f.scatter_add_(0, tc, -wts)  # - w_i * onehot
                    if f is not lt:
                        lt.copy_(f)
                    if need_h:
                        grad_h[s:e] = torch.mm(lt.t(), wc)
                    if need_w:
                        if grad_w is not None:
                            grad_w.add_(torch.mm(lt, hc, out=buf["grad_w_part"]))
                        elif cdt == torch.float32:
                            grad_w = torch.mm(lt, hc)  # a tensor of its own: it becomes w.grad
                        else:
                            grad_w = torch.mm(lt, hc, out=buf["grad_w_part"]).float()
            if need_w and grad_w is None:  # no rows
                grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        # Not save_for_backward: backward scales these in place (no second (vocab x dim) tensor).
        ctx.grads = (grad_h, grad_w.to(w.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("FusedLinearCrossEntropy: a second backward through the same loss is not supported")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return (
            grad_h.mul_(grad_out) if grad_h is not None else None,
            grad_w.mul_(grad_out) if grad_w is not None else None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, chunk: int = 0
) -> torch.Tensor:
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
