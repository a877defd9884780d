"""Will a pretrain config fit? Build its model on the meta device, shard it with the real plan
(parallelize.py) over a fake process group of the config's world size, and estimate each rank's
GPU memory. Nothing is allocated: an 8B or 70B layout is checked on a laptop in seconds.

    herd pretrain --config configs/pretrain/llama3-8b.yaml --plan [--seq 8192] [--gpu-gb 80]

Per rank, in bytes (bf16 training with fp32 master weights, as the loop runs on CUDA):
  state        local (sharded) params x 16: fp32 weights, fp32 grads, AdamW's two fp32 moments
  gathered     FSDP2's bf16 unsharded weights in flight: the root unit (embeddings, norm, output,
               held through the forward) and two blocks (the current one and the prefetched one),
               with their bf16 grads before the fp32 reduce-scatter
  (with pipeline stages the plan is rank 0's: the first stage, with up to pp micro-batches in flight)
  activations  per micro-batch of b x s tokens in bf16: with activation checkpointing each block
               keeps its input (2sbh) and one block at a time recomputes its full set; without it
               every block keeps the full set, ~ sb(8h + (4(h + 2 h_kv) + 4h + 8f) / tp)
  loss         the fused projection + cross-entropy: a chunk of ~128M logits (bf16 and fp32) and
               the output weight's full gradient (bf16 part, fp32 sum)
  overhead     CUDA context, NCCL buffers, allocator fragmentation: 3 GiB + 10%
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flows.train.config import PretrainConfig
from model.errors import HerdError

GIB = 2**30
LOSS_CHUNK_ELEMENTS = 1 << 27  # flows/train/losses.py's CHUNK_ELEMENTS


@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    dp: int
    tp: int
    pp: int
    seq_len: int
    micro_batch: int
    activation_checkpointing: str
    params_total: int
    params_per_rank: int  # the largest rank's local (sharded) parameters
    state_gb: float
    gathered_gb: float
    activations_gb: float
    loss_gb: float
    overhead_gb: float
    capacity_gb: float

    @property
    def total_gb(self) -> float:
        return self.state_gb + self.gathered_gb + self.activations_gb + self.loss_gb + self.overhead_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.capacity_gb

    def report(self) -> str:
        layout = f"dp {self.dp} x tp {self.tp}" + (f" x pp {self.pp}" if self.pp > 1 else "")
        return "\n".join(
            [
                f"layout: {self.world_size} ranks = {layout}; micro-batch {self.micro_batch} x {self.seq_len} tokens, "
                f"activation checkpointing {self.activation_checkpointing}",
                f"parameters: {self.params_total / 1e9:.3f}B total, {self.params_per_rank / 1e9:.3f}B on the largest "
                "rank",
                "estimated memory per rank (GiB):",
                f"  sharded state (fp32 weights, grads, AdamW moments)  {self.state_gb:7.2f}",
                f"  FSDP2 gathered bf16 weights and grads in flight     {self.gathered_gb:7.2f}",
                f"  activations                                         {self.activations_gb:7.2f}",
                f"  fused output projection + cross-entropy             {self.loss_gb:7.2f}",
                f"  CUDA context, NCCL, fragmentation                   {self.overhead_gb:7.2f}",
                f"  total                                               {self.total_gb:7.2f} of "
                f"{self.capacity_gb:.0f}: " + ("fits" if self.fits else "DOES NOT FIT"),
            ]
        )


def _local_numel(p) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def plan_memory(cfg: PretrainConfig, world_size: int, seq_len: int, capacity_gb: float = 80.0) -> MemoryPlan:
    """Shard the config's model on the meta device over a fake `world_size`-rank group; estimate."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from flows.train.loop import build_model
    from flows.train.parallelize import parallelize

    if cfg.model.init_from:
        raise HerdError("--plan: model.init_from is set; plan a from-scratch preset (model.preset)")
    if dist.is_initialized():
        raise HerdError("--plan: a process group is already up; run the plan in its own process")
    model, _ = build_model(cfg.replace(model={"tokenizer": ""}))
    mc = model.config
    p = cfg.parallel
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        par = parallelize(
            model,
            device=torch.device("cpu"),
            world_size=world_size,
            strategy=p.strategy,
            tp=p.tp,
            pp=p.pp,
            virtual_stages=p.virtual_stages,
            activation_checkpointing=cfg.training.activation_checkpointing,
            seed=None,
        )
        local = sum(_local_numel(q) for q in par.model.parameters())
        local_layers = len(par.model.layers)
    finally:
        dist.destroy_process_group()
    tp, dp = p.tp, world_size // (p.tp * p.pp)
    fsdp = p.strategy == "fsdp" and dp > 1
    b, s, h, f, L = cfg.training.micro_batch, seq_len, mc.dim, mc.ffn_hidden_dim, mc.n_layers
    if p.pp > 1:  # the pipeline's micro-batches re-split the step's rows
        b = cfg.training.micro_batch * cfg.training.grad_accum // (p.microbatches or p.pp)
    kv = mc.n_kv_heads * mc.head_dim
    emb = mc.vocab_size * h
    block = (mc.num_params() - emb * (1 if mc.tie_embeddings else 2) - h) // L
    root = emb * (1 if mc.tie_embeddings else 2) + h
    gathered = ((root + 2 * block / tp) * (2 + 2)) if fsdp else 0  # bf16 weights + bf16 grads
    per_block_full = s * b * (8 * h + (4 * (h + 2 * kv) + 4 * h + 8 * f) / tp)
    # 1F1B keeps up to pp micro-batches in flight on the first pipeline rank (rank 0, planned here)
    in_flight = min(p.pp, p.microbatches or p.pp)
    if cfg.training.activation_checkpointing == "full":
        acts = in_flight * local_layers * 2 * s * b * h + per_block_full
    else:
        acts = in_flight * local_layers * per_block_full
    rows = max(1, min(s * b, LOSS_CHUNK_ELEMENTS // mc.vocab_size))
    loss = rows * mc.vocab_size * (2 + 4) + emb * (2 + 4)
    known = (local * 16 + gathered + acts + loss) / GIB
    return MemoryPlan(
        world_size,
        dp,
        tp,
        p.pp,
        s,
        b,
        cfg.training.activation_checkpointing,
        mc.num_params(),
        local,
        local * 16 / GIB,
        gathered / GIB,
        acts / GIB,
        loss / GIB,
        3.0 + 0.1 * known,
        capacity_gb,
    )
