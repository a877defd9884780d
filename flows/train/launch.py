"""Run the loop without Ray: N local processes over gloo (CPU) or NCCL (one GPU each).

Used by tests (DDP vs FSDP vs TP numerics without Ray's start-up cost) and by
`herd pretrain --local`. Checkpoints go straight to `out_dir/checkpoints` (atomic rename,
last K kept); restart by running again with the same `out_dir`.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from flows.train import checkpoint as ckpt
from flows.train.config import PretrainConfig
from flows.train.loop import Runtime, TrainResult, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_runtime(
    cfg: PretrainConfig, rank: int, world_size: int, out_dir: Path, device: torch.device, logger=None
) -> Runtime:
    root = Path(out_dir) / "checkpoints"

    def persist(path, metrics, step):
        if rank == 0:
            ckpt.prune(root, cfg.checkpoint.keep)
        return str(path)

    def latest():
        found = ckpt.candidates(root)
        return (found[0], root) if found else None

    return Runtime(
        rank=rank,
        world_size=world_size,
        local_rank=rank,
        device=device,
        persist=persist,
        latest=latest,
        staging_dir=root,
        run_dir=Path(out_dir),
        logger=logger,
    )


def _worker(
    rank: int,
    world_size: int,
    port: int,
    cfg: PretrainConfig,
    out_dir: str,
    result_file: str,
    threads: int,
    train_fn,
    train_kwargs,
) -> None:
    torch.set_num_threads(threads)
    use_cuda = cfg.ray.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        rt = local_runtime(cfg, rank, world_size, Path(out_dir), device)
        result = (train_fn or train)(cfg, rt, **(train_kwargs or {}))
        if rank == 0:
            with open(result_file, "wb") as f:
                pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_local(
    cfg: PretrainConfig,
    workers: int,
    out_dir: str | Path,
    threads: int | None = None,
    train_fn=None,
    train_kwargs: dict | None = None,
) -> TrainResult:
    """Train with `workers` local processes; returns rank 0's TrainResult."""
    import torch.multiprocessing as mp

    if train_fn is None and cfg.data.dir:
        from flows.data.shards import verify

        verify(cfg.data.dir)  # a corrupted shard is refused before any worker reads it
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pkl")
        args = (workers, free_port(), cfg, str(out_dir), result_file, threads, train_fn, train_kwargs)
        if workers == 1:
            _worker(0, *args)
        else:
            mp.start_processes(_worker, args=args, nprocs=workers, join=True, start_method="spawn")
        with open(result_file, "rb") as f:
            return pickle.load(f)
