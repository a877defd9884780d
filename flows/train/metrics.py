"""Throughput, MFU, memory, and the rank-0 MLflow logger.

MFU = achieved model flops / peak flops, with flops per token counted as torchtitan does
(`ModelConfig.flops_per_token`: 6 x matmul params + 12 x layers x heads x head_dim x seq_len).
The peak comes from a table of GPU datasheet numbers (dense bf16 tensor-core flops); on a CPU
(or an unknown GPU) it is measured with a large matmul in the training dtype.
"""

from __future__ import annotations

import functools
import os
import time

import torch

# Dense (no sparsity) bf16 peak flops per device, from the vendors' datasheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # fp16 (no bf16)
}


def gpu_peak_flops(name: str) -> float | None:
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_BF16[key]
    return None


@functools.lru_cache(maxsize=8)
def measured_matmul_flops(
    device: str = "cpu", dtype: torch.dtype = torch.bfloat16, n: int = 1024, seconds: float = 0.5
) -> float:
    """Best matmul throughput of an (n x n) @ (n x n) product on this device, in flop/s."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak flop/s per device, where it came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"datasheet:{name}"
        return measured_matmul_flops("cuda", dtype, 8192, 1.0), f"measured:{name}"
    return measured_matmul_flops("cpu", dtype, 1024, 0.5), f"measured:cpu:{torch.get_num_threads()}threads:{dtype}"


def memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    try:
        import psutil

        return {"memory_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    except ImportError:  # pragma: no cover
        return {}


class MlflowLogger:
    """Logs to an existing MLflow run by id (the driver creates the run; rank 0 logs)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        self.run_id = run_id
        if run_id:
            from flows.tracking import client

            self.client = client(tracking_uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value[:5000])
