"""herd's own CPU kernels (kernels/*.c), compiled on first use with the system C compiler.

Only the one-row matrix-vector product is here: a decode step reads every weight once per token,
and torch's bf16 `mv` streams weights at about half the machine's memory bandwidth (measured
here: ~10-11 GB/s against ~20-25 for these kernels on SmolLM2's layer shapes; fp32 ~10% faster).
Where the CPU lacks AVX-512 (bf16: AVX512-BF16), no C compiler is found, or HERD_CPU_KERNELS=0,
`gemv` returns None and callers keep torch's path.

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

SOURCE = Path(__file__).with_name("kernels") / "gemv.c"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]


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
    out = _cache_dir() / f"gemv-{digest}.so"
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
def _library():
    """The loaded kernels with the dtypes they serve, or None (the reason is logged once)."""
    if os.environ.get("HERD_CPU_KERNELS", "1") == "0":
        return None
    flags = _cpu_flags()
    if not {"avx512f", "avx512bw"} <= flags:
        log.info("herd CPU kernels off: this CPU has no AVX-512")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("herd CPU kernels off: no C compiler (cc/gcc) found; torch's mv is used")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))  # libgomp.so.1 resolves to the copy torch loaded
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("herd CPU kernels off: building %s failed: %s", SOURCE.name, detail.strip()[-500:])
        return None
    fns = {}
    for dtype, name in ((torch.float32, "herd_gemv_f32"), (torch.bfloat16, "herd_gemv_bf16")):
        if dtype == torch.bfloat16 and "avx512_bf16" not in flags:
            continue
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        fn.restype = None
        fns[dtype] = fn
    return fns


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """weight (n, k) @ x (k,) -> (n,), or None where the kernels do not apply (then use torch)."""
    if (weight.device.type != "cpu" or x.dtype != weight.dtype or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return None
    fns = _library()
    fn = fns.get(weight.dtype) if fns else None
    if fn is None:
        return None
    x = x.contiguous()
    y = torch.empty(weight.shape[0], dtype=weight.dtype)
    fn(weight.data_ptr(), x.data_ptr(), y.data_ptr(), weight.shape[0], weight.shape[1], torch.get_num_threads())
    return y


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    fns = _library()
    print("herd CPU kernels:", ", ".join(str(d).replace("torch.", "") for d in fns) if fns else "off")
