"""herd's own CPU kernels (kernels/*.c), compiled on first use with the system C compiler.

For one-row decode steps, which read every weight once per token and run many tiny ops:
* `gemv`: torch's bf16 `mv` streams weights at about half the machine's memory bandwidth
  (measured here: ~10-11 GB/s against ~20-25 for this kernel on SmolLM2's layer shapes; fp32
  ~10% faster than torch's);
* `rms_norm`: torch's composite costs ~30 us a call on one 576-wide row, this ~1 us.
Where the CPU lacks AVX-512 (bf16: AVX512-BF16), no C compiler is found, or HERD_CPU_KERNELS=0,
they return None and callers keep torch's path.

    python -m model.cpu_kernels     # build now (e.g. in an image) and print what is available
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "cpu_decode.c"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _cache_dir() -> Path:
    root = os.environ.get("HERD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "herd")
    return Path(root) / "kernels"


def _build(cc: str) -> Path:
    """Compile once per source and flags; concurrent processes each write a temporary file and
    rename it into place."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_decode-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@lru_cache(maxsize=1)
def _library() -> dict:
    """{(kernel, dtype): C function} for what this CPU runs; empty when off (the reason is logged once)."""
    if os.environ.get("HERD_CPU_KERNELS", "1") == "0":
        return {}
    flags = _cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl"} <= flags:
        log.info("herd CPU kernels off: this CPU has no AVX-512")
        return {}
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("herd CPU kernels off: no C compiler (cc/gcc) found; torch's ops are used")
        return {}
    try:
        lib = ctypes.CDLL(str(_build(cc)))  # libgomp.so.1 resolves to the copy torch loaded
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("herd CPU kernels off: building %s failed: %s", SOURCE.name, detail.strip()[-500:])
        return {}
    fns = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        if dtype == torch.bfloat16 and "avx512_bf16" not in flags:
            continue
        gemv_fn = getattr(lib, f"herd_gemv_{suffix}")
        gemv_fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        norm_fn = getattr(lib, f"herd_rms_norm_{suffix}")
        norm_fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int64]
        for name, fn in (("gemv", gemv_fn), ("rms_norm", norm_fn)):
            fn.restype = None
            fns[(name, dtype)] = fn
    return fns


def _kernel(name: str, *tensors: torch.Tensor):
    """The C function for these inference-only CPU tensors of one dtype, or None."""
    t0 = tensors[0]
    if t0.device.type != "cpu" or any(t.dtype != t0.dtype for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None  # autograd needs torch's ops
    return _library().get((name, t0.dtype))


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """weight (n, k) @ x (k,) -> (n,), or None where the kernels do not apply (then use torch)."""
    fn = _kernel("gemv", weight, x)
    if fn is None or not weight.is_contiguous():
        return None
    x = x.contiguous()
    y = torch.empty(weight.shape[0], dtype=weight.dtype)
    fn(weight.data_ptr(), x.data_ptr(), y.data_ptr(), weight.shape[0], weight.shape[1], torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """model.RMSNorm's result over x's last dimension, or None where the kernels do not apply."""
    fn = _kernel("rms_norm", x, weight)
    if fn is None or weight.shape != x.shape[-1:] or not weight.is_contiguous():
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    d = x.shape[-1]
    fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads())
    return y


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    fns = _library()
    print("herd CPU kernels:", ", ".join(f"{k} {str(d).replace('torch.', '')}" for k, d in fns) if fns else "off")
