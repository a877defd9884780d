"""Parallelism applied to an unmodified `model.model.Transformer`, as torchtitan does: the model
knows nothing of meshes, the loop knows nothing of sharding.

Order (torchtitan's): pipeline split -> tensor parallel -> activation checkpointing ->
torch.compile -> data parallel (FSDP2 `fully_shard` or DDP) -> allocation of a meta-device model.

Mesh: world = dp x tp, dims ("dp", "tp"); with pipeline stages world = pp x dp x tp, dims ("pp",
"dp", "tp"). A TP group is `tp` consecutive ranks (one node on a GPU cluster, where NVLink is);
pipeline ranks are the outermost dim (stages may sit on different nodes). flows/train/pipeline.py
cuts `model.layers` into stages (torch.distributed.pipelining, 1F1B or interleaved 1F1B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.errors import HerdError


@dataclass
class Parallelized:
    module: nn.Module  # what the loop calls (a DDP wrapper, or the model itself)
    model: nn.Module  # the Transformer (FSDP/TP-sharded in place), or this rank's PipelineModel: state dicts
    mesh: object | None  # DeviceMesh with dims ("dp", "tp") or ("pp", "dp", "tp"), None in a single process
    dp_rank: int
    dp_size: int
    strategy: str
    param_dtype: torch.dtype | None  # FSDP2 mixed precision: params gathered in this dtype
    pipeline: object | None = None  # flows.train.pipeline.Pipeline when parallel.pp > 1

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.pipeline is not None else None

    def grad_sync(self, enabled: bool):
        """Context for one micro-step: gradient sync only on the last one of a step."""
        import contextlib

        if self.strategy == "ddp" and isinstance(self.module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if enabled else self.module.no_sync()
        if self.strategy == "fsdp" and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()


def build_mesh(device_type: str, world_size: int, tp: int, pp: int = 1):
    if world_size == 1 and tp == 1 and pp == 1:
        return None
    if world_size % (tp * pp):
        raise HerdError(f"parallel.tp={tp} x parallel.pp={pp} does not divide the {world_size} workers")
    from torch.distributed.device_mesh import init_device_mesh

    dp = world_size // (tp * pp)
    if pp == 1:
        return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def _blocks(module: nn.Module) -> list[tuple]:
    """(key, block) of `module.layers`, a ModuleList (Transformer) or a ModuleDict (pipeline stage)."""
    layers = module.layers
    return list(layers.items()) if isinstance(layers, nn.ModuleDict) else list(enumerate(layers))


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Megatron-style plan per block: wq/wk/wv/w1/w3 column-parallel (heads and hidden units
    split over ranks), wo/w2 row-parallel (partial sums all-reduced). Embeddings, norms and the
    output projection stay replicated, so the residual stream is a plain replicated tensor."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.config
    tp = tp_mesh.size()
    if cfg.n_heads % tp or cfg.n_kv_heads % tp or cfg.ffn_hidden_dim % tp:
        raise HerdError(
            f"parallel.tp={tp} must divide n_heads ({cfg.n_heads}), n_kv_heads ({cfg.n_kv_heads}) "
            f"and ffn_hidden_dim ({cfg.ffn_hidden_dim})"
        )
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for _, block in _blocks(model):
        parallelize_module(block, tp_mesh, plan)


def _selective_policy():
    """Op-level selective AC: keep the matmul and attention outputs (the costly ops), recompute the
    cheap elementwise rest (norms, rotary, SiLU, residual adds) in backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
    }

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> None:
    """Recompute each block in backward: all of it (full) or its elementwise ops (selective).
    The wrapper's state-dict hooks keep herd's names."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy())
    for key, block in _blocks(model):
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)


def apply_compile(model: nn.Module) -> None:
    """Compile block by block, in place (parameter names unchanged); blocks share one graph."""
    for _, block in _blocks(model):
        block.compile(fullgraph=False)


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype, reshard_after_forward: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = _blocks(model)
    for i, (_, block) in enumerate(blocks):
        # The last block's params are needed again at once by backward: keep them gathered.
        last = i == len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def parallelize(
    model: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    strategy: str,
    tp: int = 1,
    pp: int = 1,
    virtual_stages: int = 1,
    microbatches: int = 0,
    loss_chunk: int = 0,
    activation_checkpointing: str = "none",
    compile: bool = False,
    bf16: bool = False,
    reshard_after_forward: bool = True,
    seed: int | None = 0,
) -> Parallelized:
    """Shard/replicate `model` (on `device`, fp32; or on the meta device) over `world_size` ranks
    (process group up). A model on the meta device is allocated once sharded (before DDP, which
    replicates it) and drawn from `seed` (materialize): no rank holds more than its shards.
    seed None leaves it on the meta device (flows/train/plan.py: memory plans, no allocation).
    pp > 1: this rank keeps only its pipeline stages (`microbatches` per step, 0: pp)."""
    if strategy == "ddp" and world_size > tp * pp and (tp > 1 or pp > 1):
        raise HerdError("parallel: tp or pp > 1 with data parallelism needs strategy fsdp (FSDP2 + TP / PP)")
    mesh = build_mesh(device.type, world_size, tp, pp)
    parts, stages = [model], None
    if pp > 1:
        from flows.train.pipeline import split_model

        stage_ids, stages = split_model(model, mesh["pp"].get_local_rank(), pp, virtual_stages, loss_chunk)
        parts = stages
    for part in parts:
        if tp > 1:
            apply_tp(part, mesh["tp"])
        if activation_checkpointing != "none":
            apply_activation_checkpointing(part, activation_checkpointing)
        if compile:
            apply_compile(part)
    if pp > 1:
        from flows.train.pipeline import PipelineModel

        model = PipelineModel(model, stages)
    module, param_dtype = model, None
    dp_size = world_size // (tp * pp)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    if strategy == "fsdp" and dp_size > 1:
        param_dtype = torch.bfloat16 if bf16 else None
        for part in parts:
            apply_fsdp(part, mesh["dp"], param_dtype, reshard_after_forward)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and seed is not None:
        materialize(model, device, seed)
        on_meta = False
    if strategy == "ddp" and dp_size > 1 and not on_meta:
        ids = [device.index] if device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=mesh["dp"].get_group())
    pipeline = None
    if pp > 1 and not on_meta:
        from flows.train.pipeline import Pipeline

        pipeline = Pipeline(
            stages,
            stage_ids,
            pp,
            virtual_stages,
            microbatches or pp,
            mesh["pp"].get_group(),
            device,
            grad_scale=dp_size,
        )
    return Parallelized(module, model, mesh, dp_rank, dp_size, strategy, param_dtype, pipeline)


def canonical_name(name: str) -> str:
    """A parameter's name in the plain Transformer (wrappers add path segments)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def local_pieces(model: nn.Module):
    """(name, local tensor, global shape, global offset) of every parameter this rank holds."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            yield canonical_name(name), p.to_local(), tuple(p.shape), tuple(offset)
        else:
            yield canonical_name(name), p.data, tuple(p.shape), (0,) * p.dim()


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a model built on the meta device (and sharded there) and draw its from-scratch
    weights: each rank allocates and fills only its own shards (model/init.py)."""
    from model.init import init_parameters

    model.to_empty(device=device)
    init_parameters(local_pieces(model), model.config.n_layers, seed)


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Global grad norm (and clipping when max_norm > 0) over plain and DTensor grads.

    FSDP2 grads are all DTensors (torch's get_total_norm handles them); under TP, norms and
    embeddings keep plain grads beside DTensor ones, so the two kinds are reduced apart. Pipeline
    ranks hold disjoint parameters: their squared norms are summed over `pp_group`."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    dt = [p.grad for p in params if isinstance(p.grad, DTensor)]
    plain = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    sq = torch.zeros((), dtype=torch.float32, device=params[0].grad.device if params else "cpu")
    if plain:
        sq = sq + torch.nn.utils.get_total_norm(plain, 2.0).float() ** 2
    by_mesh: dict = {}
    for g in dt:
        by_mesh.setdefault(id(g.device_mesh), []).append(g)
    for grads in by_mesh.values():  # FSDP x TP grads live on different (sub)meshes
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq = sq + n.float() ** 2
    if pp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    if max_norm > 0 and params:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if dt:
            c = float(coef)  # DTensor grads take a Python scalar
            for g in dt:
                g.mul_(c)
            torch._foreach_mul_(plain, coef) if plain else None
        else:
            torch._foreach_mul_(plain, coef.to(plain[0].device))
    return total
