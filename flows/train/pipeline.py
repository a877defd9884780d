"""Pipeline parallelism with torch.distributed.pipelining, on an unmodified `Transformer`.

`model.layers` is cut into `pp x virtual_stages` contiguous stages; pipeline rank r runs stages
r, r + pp, ... (one with the 1F1B schedule, several with interleaved 1F1B). The first stage owns
the embedding, the last the final norm, the output projection and the fused cross-entropy, so the
loss is computed inside the last stage's forward, where FSDP2 has gathered the output weight.
The step's rows are split into `parallel.microbatches` micro-batches; each stage passes the
hidden states on together with the rows' positions (document masking and rotary need them in
every stage), targets and loss weights, which carry no gradient.

A rank's stages share their submodules with one `PipelineModel` that keeps the Transformer's
parameter names (`layers.<i>` with the original i), so state dicts, sharded checkpoints (DCP
reshards between layouts) and the seeded initialisation are the same as without pipelining.
Each stage is its own FSDP2 root over the `dp` mesh dim (blocks sharded one by one).

Bubble (idle) fraction of a step, for p stages and m micro-batches: (p - 1) / (m + p - 1) with
1F1B; (p - 1) / (v m + p - 1) interleaved over v virtual stages per rank.
"""

from __future__ import annotations

import torch
from torch import nn

from model.errors import HerdError
from model.model import doc_ids_from_positions, document_causal_mask, flex_document_block_mask, rope_cos_sin


def stage_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) layer ranges, as even as possible (earlier stages get the extra)."""
    if n_stages > n_layers:
        raise HerdError(
            f"parallel: {n_stages} pipeline stages (pp x virtual_stages) but the model has "
            f"{n_layers} layers; each stage needs at least one"
        )
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


class Stage(nn.Module):
    """Layers [start, stop) of a Transformer; the embedding in the first stage, norm + output + loss
    in the last. Attribute names follow the Transformer's, so parameter names are unchanged."""

    def __init__(self, model: nn.Module, start: int, stop: int, first: bool, last: bool, loss_chunk: int = 0):
        super().__init__()
        self.config = model.config
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(start, stop)})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.inv_freq = model.inv_freq
        self.loss_chunk = loss_chunk

    def forward(self, h, positions, targets, weights):
        from flows.train.losses import fused_linear_cross_entropy

        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        doc_ids = doc_ids_from_positions(positions)
        mask = flex_document_block_mask(doc_ids) if h.is_cuda else document_causal_mask(doc_ids)
        if self.inv_freq.device != h.device:
            self.inv_freq = self.inv_freq.to(h.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.norm is None:
            return h, positions, targets, weights
        # A no-op on real targets (ids < vocab, or IGNORE); the schedule's first call infers shapes
        # from uninitialised receive buffers, whose "targets" must still index the vocabulary.
        targets = targets.clamp(max=self.output.weight.shape[0] - 1)
        return fused_linear_cross_entropy(self.norm(h), self.output.weight, targets, weights, self.loss_chunk)


class PipelineModel(nn.Module):
    """This rank's share of the model (its stages' submodules) under the Transformer's names."""

    def __init__(self, model: nn.Module, stages: list[Stage]):
        super().__init__()
        self.config = model.config
        self.tok_embeddings = next((s.tok_embeddings for s in stages if s.tok_embeddings is not None), None)
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
        last = next((s for s in stages if s.norm is not None), None)
        self.norm = last.norm if last is not None else None
        self.output = last.output if last is not None else None


def split_model(model: nn.Module, pp_rank: int, pp: int, virtual_stages: int, loss_chunk: int = 0):
    """(stage indices, Stage modules) of pipeline rank `pp_rank`."""
    if model.output is None:
        raise HerdError(
            "parallel.pp > 1 needs untied embeddings (tie_embeddings false): the embedding lives in "
            "the first stage and the output projection in the last"
        )
    n = pp * virtual_stages
    bounds = stage_bounds(model.config.n_layers, n)
    ids = list(range(pp_rank, n, pp))
    return ids, [Stage(model, *bounds[i], first=i == 0, last=i == n - 1, loss_chunk=loss_chunk) for i in ids]


class Pipeline:
    """The schedule of one pipeline rank: runs a step's rows forward and backward, or forward only."""

    def __init__(
        self,
        stages: list[Stage],
        stage_ids: list[int],
        pp: int,
        virtual_stages: int,
        microbatches: int,
        pp_group,
        device: torch.device,
        grad_scale: int = 1,
    ):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        n = pp * virtual_stages
        self.pp, self.virtual_stages, self.microbatches = pp, virtual_stages, microbatches
        self.stages = [PipelineStage(m, i, n, device, group=pp_group) for m, i in zip(stages, stage_ids)]
        self.has_first = 0 in stage_ids
        self.has_last = n - 1 in stage_ids
        # The last stage returns each micro-batch's weighted loss sum: the objective adds them up;
        # x dp size since FSDP2 averages gradients over data-parallel ranks (as the loop's backward).
        self.grad_scale = grad_scale
        loss_fn = lambda out, _target: out * grad_scale  # noqa: E731
        if virtual_stages == 1:
            self.schedule = Schedule1F1B(self.stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, microbatches, loss_fn=loss_fn, scale_grads=False)

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.pp, self.microbatches, self.virtual_stages)

    def describe(self) -> str:
        kind = "1F1B" if self.virtual_stages == 1 else f"interleaved 1F1B ({self.virtual_stages} stages per rank)"
        return (
            f"pipeline: {self.pp} ranks, {self.pp * self.virtual_stages} stages, schedule {kind}, "
            f"{self.microbatches} micro-batches per step, bubble fraction {self.bubble:.3f}"
        )

    def _run(self, batch, train: bool) -> torch.Tensor:
        """Sum of the micro-batch losses on ranks with the last stage, 0 elsewhere."""
        losses: list[torch.Tensor] = []
        args = (batch.tokens, batch.positions, batch.targets, batch.weights) if self.has_first else ()
        # Targets travel with the activations (the loss runs inside the last stage, where FSDP2 has
        # gathered the output weight); the schedule still wants a target on the last stage.
        kw = {"target": batch.weights} if self.has_last else {}
        run = self.schedule.step if train else self.schedule.eval
        run(*args, losses=losses, return_outputs=False, **kw)
        if not self.has_last:
            return torch.zeros((), dtype=torch.float32, device=batch.tokens.device)
        return torch.stack([x.detach().float() for x in losses]).sum() / self.grad_scale

    def step(self, micro: list) -> torch.Tensor:
        """Forward and backward over the step's micro-batches (concatenated, then re-split)."""
        return self._run(concat(micro, self.microbatches), train=True)

    @torch.no_grad()
    def evaluate(self, batches: list) -> torch.Tensor:
        """[loss sum, weight sum] (float64) of evaluation micro-batches, run as one padded batch;
        zeros on ranks without the last stage."""
        sums = torch.zeros(2, dtype=torch.float64, device=batches[0].tokens.device if batches else "cpu")
        if not batches:
            return sums
        rows = sum(b.tokens.shape[0] for b in batches)
        batch = concat(batches, self.microbatches, pad_to=-(-rows // self.microbatches) * self.microbatches)
        if self.has_last:
            sums[0] = self._run(batch, train=False).double()
            sums[1] = batch.weights.sum().double()
        else:
            self._run(batch, train=False)
        return sums


def concat(micro: list, microbatches: int, pad_to: int = 0):
    """One batch of the micro-batches' rows; rows padded (no loss) up to `pad_to`."""
    from flows.train.data import IGNORE, Batch

    b = Batch(*(torch.cat([getattr(m, k) for m in micro]) for k in ("tokens", "positions", "targets", "weights")))
    rows = b.tokens.shape[0]
    if pad_to > rows:
        extra, T = pad_to - rows, b.tokens.shape[1]
        pos = torch.arange(T, device=b.positions.device).expand(extra, T)
        b = Batch(
            torch.cat([b.tokens, b.tokens.new_zeros(extra, T)]),
            torch.cat([b.positions, pos]),
            torch.cat([b.targets, b.targets.new_full((extra, T), IGNORE)]),
            torch.cat([b.weights, b.weights.new_zeros(extra, T)]),
        )
    if b.tokens.shape[0] % microbatches:
        raise HerdError(
            f"parallel.microbatches={microbatches} must divide the rows per step "
            f"(micro_batch x grad_accum = {b.tokens.shape[0]})"
        )
    return b
