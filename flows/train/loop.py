"""The training loop: plain torch, driven by Ray Train (flows/train/ray_trainer.py) or by the
local launcher (flows/train/launch.py) through a `Runtime`.

Reuse (post-training): `train(cfg, runtime, task=...)` where a `Task` supplies the batch
source (`next_step() -> [micro-batch]`, `eval_batches(n)`, `state_dict()`,
`load_state_dict()`) and the loss function `loss_fn(model, batch) -> LossOutput`
(flows/train/losses.py states the weighting contract). `LossOutput.metrics` (floats) are
averaged over the step's micro-batches on rank 0 and logged with the step's metrics.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flows import progress
from flows.train import checkpoint as ckpt
from flows.train.config import PretrainConfig
from flows.train.guard import LoopGuard, inject_hang, inject_inf_grad, inject_kill, inject_spike
from flows.train.losses import LossOutput, causal_lm_loss
from flows.train.metrics import MlflowLogger, memory_gb, peak_flops
from model.errors import HerdError


@dataclass
class Runtime:
    """Where the loop runs: rank and device, how checkpoints are persisted and found."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Persist the checkpoint folder this rank wrote its shards into (`path`, the same folder on
    # ranks that share a staging dir). Every rank calls it at the same steps. Returns the
    # persisted location.
    persist: Callable[[Path, dict, int], str | None] = None
    # Newest persisted checkpoint and the folder that holds its siblings: (path, parent) or None.
    latest: Callable[[], tuple[Path, Path] | None] = None
    staging_dir: Path = Path("/tmp")  # where each rank writes its shards of a checkpoint before persisting
    run_dir: Path | None = None  # shared run folder (fault-injection marker, checkpoints)
    restartable: bool = False  # something restarts a failed worker (Ray Train): the hang watchdog may end it
    logger: MlflowLogger | None = None


@dataclass
class Task:
    """What to train on and what to minimise; pretraining's is packed shards + causal LM."""

    train_data: Any
    eval_data: Any | None
    loss_fn: Callable[..., LossOutput]


@dataclass
class TrainResult:
    step: int
    final_loss: float
    metrics: dict
    checkpoint: str | None  # the last persisted checkpoint (its model/ folder is the export)
    resumed_from: str | None
    warnings: list[str]
    losses: list[float]  # per-step training loss of this attempt, from its first step


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def resolve_precision(precision: str, device: torch.device) -> bool:
    """True for bf16. `auto`: bf16 on CUDA; fp32 on CPU, where most cores lack bf16 matmul
    units and autocast would slow training down."""
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


# --- model construction ----------------------------------------------------------------------


def build_model(cfg: PretrainConfig):
    """(model, tokenizer). From scratch (preset + overrides): the model on the meta device, no
    memory; the loop shards it, then allocates and draws each rank's shards (seeded by
    `cfg.seed`). From a checkpoint: fp32 on CPU."""
    import dataclasses

    from model.config import ModelConfig, get_preset
    from model.model import Transformer
    from model.tokenizer import load_tokenizer

    m = cfg.model
    if m.init_from:
        from model.checkpoint import load_model
        from model.sources import resolve_model

        path = resolve_model(m.init_from)
        model, _ = load_model(path, dtype=torch.float32, device="cpu")
        try:
            tok = load_tokenizer(path)
        except HerdError:
            tok = None
        return model.train(), tok
    base = get_preset(m.preset)
    mc = ModelConfig.from_dict({**base.to_dict(), **m.overrides}) if m.overrides else base
    if m.tokenizer:
        mc = dataclasses.replace(mc, tokenizer=m.tokenizer if m.tokenizer in ("llama3", "gguf") else mc.tokenizer)
    with torch.device("meta"):  # allocated shard by shard after parallelize (train: materialize)
        model = Transformer(mc)
    tok = load_tokenizer(m.tokenizer) if m.tokenizer else None
    return model.train(), tok


def default_task(cfg: PretrainConfig, dp_rank: int, dp_size: int, vocab_size: int) -> Task:
    from flows.train.data import PackedData

    if not cfg.data.dir:
        raise HerdError("pretrain config: data.dir is empty (a folder written by `herd data prep`)")
    t = cfg.training
    train = PackedData(cfg.data.dir, "train", t.micro_batch, t.grad_accum, dp_rank, dp_size, cfg.seed, cfg.data.shuffle)
    vocab = int(train.manifest.get("tokenizer", {}).get("vocab_size", 0))
    if vocab > vocab_size:
        raise HerdError(
            f"{cfg.data.dir}: tokenized with {train.manifest['tokenizer'].get('name')} "
            f"({vocab} tokens) but the model has {vocab_size}; prepare the data with the model's "
            f"tokenizer (pack.tokenizer) or set data.retokenize: true"
        )
    val = None
    if train.manifest["splits"].get("validation", {}).get("sequences", 0) and cfg.eval.every:
        val = PackedData(cfg.data.dir, "validation", t.micro_batch, 1, dp_rank, dp_size, cfg.seed, False)
    return Task(train, val, lambda model, batch: causal_lm_loss(model, batch, t.loss_chunk))


# --- distributed helpers ---------------------------------------------------------------------


def _all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def _gather_objects(obj, world_size: int) -> list:
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj, rank: int):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --- state dicts -----------------------------------------------------------------------------


def sharded_state(par, optimizer) -> tuple[dict, dict]:
    """This rank's model and optimizer state dicts (DTensor shards under FSDP2 / TP), keyed by
    herd's parameter names: what torch.distributed.checkpoint writes and reads in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(par.model, optimizer)


def load_sharded_state(par, optimizer, path: str) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optim_state = sharded_state(par, optimizer)
    ckpt.load_sharded(path, model_state, optim_state)
    set_state_dict(par.model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


# --- the loop --------------------------------------------------------------------------------


def train(cfg: PretrainConfig, rt: Runtime, task: Task | None = None, model_builder=build_model) -> TrainResult:
    from flows.train.optim import build_optimizer, build_scheduler
    from flows.train.parallelize import clip_grad_norm_, parallelize

    t, dev = cfg.training, rt.device
    bf16 = resolve_precision(t.precision, dev)
    seed_everything(cfg.seed)  # the same init everywhere; per-rank streams after restore/setup
    model, tokenizer = model_builder(cfg)
    model_config = model.config
    if not any(p.is_meta for p in model.parameters()):
        model.to(dev)
    p = cfg.parallel
    if p.pp > 1 and task is not None:
        raise HerdError("parallel.pp > 1 runs pretraining's causal LM loss only (its last stage computes it)")
    par = parallelize(
        model,
        device=dev,
        world_size=rt.world_size,
        strategy=p.strategy,
        tp=p.tp,
        pp=p.pp,
        virtual_stages=p.virtual_stages,
        microbatches=p.microbatches,
        loss_chunk=t.loss_chunk,
        activation_checkpointing=t.activation_checkpointing,
        compile=t.compile,
        bf16=bf16,
        reshard_after_forward=p.reshard_after_forward,
        seed=cfg.seed,
    )
    if par.pipeline is not None and rt.rank == 0:
        print(f"herd pretrain: {par.pipeline.describe()}", flush=True)
        if rt.logger:
            rt.logger.tag("herd.pipeline_bubble", f"{par.pipeline.bubble:.4f}")
    o, s = cfg.optimizer, cfg.schedule
    optimizer = build_optimizer(par.model, o.lr, o.betas, o.eps, o.weight_decay, o.no_decay, o.fused)
    scheduler = build_scheduler(
        optimizer,
        kind=s.kind,
        total=t.steps,
        warmup=s.warmup_steps,
        min_ratio=s.min_lr_ratio,
        decay_fraction=s.decay_fraction,
    )
    task = task or default_task(cfg, par.dp_rank, par.dp_size, model_config.vocab_size)
    # FSDP2 with bf16 gathers params in bf16 (no autocast); DDP / single process autocast.
    use_autocast = bf16 and par.param_dtype is None
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext

    # --- restore -----------------------------------------------------------------------------
    step, resumed_from, warn_msgs = 0, None, []
    found = rt.latest() if rt.latest else None
    chosen = None
    if rt.rank == 0 and found is not None:
        latest_path, parent = found
        cands = ckpt.candidates(parent, newest=latest_path) or [latest_path]
        path, warn_msgs = ckpt.select_valid(cands, warn=True)
        for m in warn_msgs:
            print(f"herd pretrain: warning: {m}", file=sys.stderr, flush=True)
        if path is None:
            raise HerdError(f"no valid checkpoint to resume from in {parent}: " + "; ".join(warn_msgs))
        chosen = str(path)
    chosen, warn_msgs = _broadcast_object((chosen, warn_msgs), rt.rank)
    if chosen is not None:
        state = ckpt.load_trainer(chosen)
        load_sharded_state(par, optimizer, chosen)
        tr = state["trainer"]
        scheduler.load_state_dict(tr["scheduler"])
        task.train_data.load_state_dict(tr["data"])
        step = int(tr["step"])
        rngs = state["rng"]
        if len(rngs) == rt.world_size:
            ckpt.set_rng_state(rngs[rt.rank])
        else:
            seed_everything(cfg.seed + 7919 * step, rt.rank)
        resumed_from = chosen
        del state
        if rt.rank == 0 and rt.logger:
            rt.logger.tag("herd.resumed_from", chosen)
            if warn_msgs:
                rt.logger.tag("herd.checkpoint_warning", " | ".join(warn_msgs))
    else:
        seed_everything(cfg.seed, rt.rank)

    peak, peak_src = peak_flops(dev, torch.bfloat16 if bf16 else torch.float32)
    seq = task.train_data.seq_len - 1 if hasattr(task.train_data, "seq_len") else 0
    flops_tok = model_config.flops_per_token(seq) if seq else 0
    if rt.rank == 0 and rt.logger:
        rt.logger.tag("herd.peak_flops", f"{peak:.4g} ({peak_src})")

    # --- train -------------------------------------------------------------------------------
    losses: list[float] = []
    window_time, window_tokens, last_metrics, initial = 0.0, 0, {}, {}
    last_persisted = None
    params = [p for p in par.model.parameters() if p.requires_grad]
    if step == 0 and task.eval_data is not None and cfg.eval.every:
        val = evaluate(par, task, cfg.eval.batches, amp, dev)  # the starting point of the curve
        initial = {"initial_" + k: v for k, v in val.items()}
        if rt.rank == 0 and rt.logger:
            rt.logger.metrics(val, 0)
    # Error handling (flows/train/guard.py): each step is judged before the optimizer sees it.
    start_step, loss = step, float("nan")
    guard = (
        LoopGuard(cfg.guard, rt, step, params, optimizer, scheduler, task.train_data, ckpt.rng_state())
        if cfg.guard.enabled
        else None
    )
    try:
        while step < t.steps:
            t0 = time.perf_counter()
            # (the watchdog times the step from here; a batch that took part in a rolled-back
            # failure is spent without training on it)
            skip_batch = guard is not None and guard.begin(step + 1)
            micro = task.train_data.next_step()
            inject_hang(cfg.fault, rt.rank, rt.world_size, step + 1, rt.run_dir)
            tokens, loss_metrics, grad_norm = 0, {}, 0.0
            lr = optimizer.param_groups[0]["lr"]
            if not skip_batch:
                optimizer.zero_grad(set_to_none=True)
                total, tokens, loss_metrics = forward_backward(par, task, micro, amp, dev)
                inject_inf_grad(cfg.fault, rt.rank, rt.world_size, step + 1, params)
                total = inject_spike(cfg.fault, step + 1, total)
                grad_norm = clip_grad_norm_(params, o.grad_clip, par.pp_group)
                if par.pp_group is not None:  # the loss is on the last stage's ranks
                    total = _all_reduce_sum(total, par.pp_group)
                total = _all_reduce_sum(total, par.dp_group)
                action = guard.judge(step + 1, total, grad_norm) if guard else "ok"
                if action == "rollback":
                    step = guard.rollback(params, optimizer, scheduler, task.train_data)
                    del losses[max(0, step - start_step) :]
                    continue
                if action == "ok":
                    optimizer.step()
                loss = total.item()
                losses.append(loss)
                if guard is None and not math.isfinite(loss):
                    raise HerdError(f"training diverged: loss is {loss} at step {step + 1}")
            scheduler.step()
            step_time = time.perf_counter() - t0
            step += 1
            if guard:
                guard.end()
            global_tokens = tokens * par.dp_size
            window_time += step_time
            window_tokens += global_tokens
            if rt.rank == 0:
                tok_s = global_tokens / step_time if step_time else 0.0
                progress.tick("steps", step, t.steps, tok_s=round(tok_s, 1), loss=round(loss, 4))

            if step % cfg.logging.every == 0 or step == t.steps:
                tps = window_tokens / window_time if window_time else 0.0
                last_metrics = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tps,
                    "tokens_per_s_per_device": tps / rt.world_size,
                    "step_time_s": window_time / max(1, cfg.logging.every),
                    "mfu": tps * flops_tok / (peak * rt.world_size) if flops_tok else 0.0,
                    "tokens_seen": step * global_tokens,
                    **memory_gb(dev),
                    **initial,
                    **(guard.metrics() if guard else {}),
                    **{k: sum(v) / len(v) for k, v in loss_metrics.items()},
                }
                window_time, window_tokens = 0.0, 0
                if rt.rank == 0 and rt.logger:
                    rt.logger.metrics(last_metrics, step)
            if task.eval_data is not None and cfg.eval.every and (step % cfg.eval.every == 0 or step == t.steps):
                val = evaluate(par, task, cfg.eval.batches, amp, dev)
                last_metrics.update(val)
                if rt.rank == 0 and rt.logger:
                    rt.logger.metrics(val, step)
            if step % cfg.checkpoint.every == 0 or step == t.steps:
                last_persisted = save(
                    cfg,
                    rt,
                    par,
                    optimizer,
                    scheduler,
                    task,
                    step,
                    model_config,
                    tokenizer,
                    {**last_metrics, "loss": loss},
                )
                if guard:
                    guard.saved(step, params, optimizer, scheduler, task.train_data, ckpt.rng_state())
            inject_kill(cfg.fault, rt.rank, step, rt.run_dir)
    finally:
        if guard:
            guard.close()

    final = {
        **initial,
        **last_metrics,
        **(guard.metrics() if guard else {}),
        "loss": losses[-1] if losses else float("nan"),
        "step": step,
    }
    return TrainResult(step, final["loss"], final, last_persisted, resumed_from, warn_msgs, losses)


def forward_backward(par, task: Task, micro: list, amp, dev) -> tuple[torch.Tensor, int, dict]:
    """One step's forward and backward over its micro-batches: (this rank's loss sum, tokens,
    the loss function's own metrics per micro-batch, e.g. DPO margin, PPO clip fraction)."""
    micro = [mb.to(dev) for mb in micro]
    tokens = sum(mb.num_tokens for mb in micro)
    if par.pipeline is not None:
        with amp():
            return par.pipeline.step(micro), tokens, {}
    total = torch.zeros((), dtype=torch.float32, device=dev)
    loss_metrics: dict[str, list[float]] = {}
    for i, mb in enumerate(micro):
        with par.grad_sync(i == len(micro) - 1):
            with amp():
                out = task.loss_fn(par.module, mb)
            (out.loss * par.dp_size).backward()
        total += out.loss.detach().float()
        for k, v in out.metrics.items():
            loss_metrics.setdefault(k, []).append(float(v))
    return total, tokens, loss_metrics


@torch.no_grad()
def evaluate(par, task: Task, batches: int, amp, dev) -> dict:
    """Validation loss (mean over valid targets, all ranks) and perplexity."""
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    eval_batches = [mb.to(dev) for mb in task.eval_data.eval_batches(batches)]
    if par.pipeline is not None:
        with amp():
            sums += par.pipeline.evaluate(eval_batches)
        sums = _all_reduce_sum(sums, par.pp_group)
    for mb in eval_batches if par.pipeline is None else []:
        with amp():
            out = task.loss_fn(par.module, mb)
        sums[0] += out.loss.double()
        sums[1] += out.count.double()
    sums = _all_reduce_sum(sums, par.dp_group)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def save(cfg, rt: Runtime, par, optimizer, scheduler, task, step, model_config, tokenizer, metrics) -> str | None:
    """Every rank writes its shards (collective); persisted as one checkpoint."""
    model_state, optim_state = sharded_state(par, optimizer)
    rngs = _gather_objects(ckpt.rng_state(), rt.world_size)
    trainer_state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data": task.train_data.state_dict(),
        "world_size": rt.world_size,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config_name": cfg.name,
        "seed": cfg.seed,
    }
    name = _broadcast_object(ckpt.checkpoint_name(step, f"{int(time.time() * 1000) % 10**10:010d}"), rt.rank)
    path = ckpt.write_checkpoint(
        rt.staging_dir,
        name,
        rank=rt.rank,
        model_state=model_state,
        optimizer_state=optim_state,
        model_config=model_config,
        tokenizer=tokenizer,
        trainer_state=trainer_state,
        rng_states=rngs,
        gather=lambda obj: _gather_objects(obj, rt.world_size),
    )
    del model_state, optim_state
    return rt.persist(path, {**metrics, "step": step}, step) if rt.persist else str(path)
