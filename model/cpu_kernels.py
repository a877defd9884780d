"""herd's own CPU kernels (kernels/*.c), compiled on first use with the system C compiler.

For one-row decode steps, which read every weight once per token and run many tiny ops:
* `gemv`: torch's bf16 `mv` streams weights at about a third of the machine's memory bandwidth
  (measured here on SmolLM2's layer shapes: ~10-11 GB/s against ~25-35 for this kernel);
* `rms_norm`: torch's composite costs ~30 us a call on one 576-wide row, this ~1 us;
* `attention_step`: a batched decode step's attention (rotary, cache writes, attention over each
  row's own keys) in one call: torch's CPU SDPA over a padded, masked span costs ~1.2 ms a layer
  at 32 rows here for ~10 MFLOP of work;
* `decode_step`: a whole one-sequence decode step (every layer and the output projection) in one
  call, for the ~20 small torch ops a layer that cost more than the weight reads of small models.
And for packed prefill (the eval scorer's rows of a context and its continuations):
* `ragged_attention` (fp32): attention over rows laid end to end (model.ragged.RaggedRows), computing only
  the (query, key) pairs each row's mask lets through, where torch's SDPA would compute padded
  squares under a dense mask.
Where the CPU lacks AVX-512 (bf16: AVX512-BF16), no C compiler is found, or HERD_CPU_KERNELS=0,
they return None and callers keep torch's path.

    python -m model.cpu_kernels     # build now (e.g. in an image) and print what is available
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import weakref
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("kernels") / name for name in ("cpu_decode.c", "cpu_prefill.c")]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC", "-lm"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _cache_dir() -> Path:
    from model.assets import cache_dir

    return cache_dir() / "kernels"


def _build(cc: str) -> Path:
    """Compile once per source and flags; concurrent processes each write a temporary file and
    rename it into place."""
    code = b"".join(source.read_bytes() for source in SOURCES)
    digest = hashlib.sha256(code + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_decode-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        sources = [str(source) for source in SOURCES]
        subprocess.run([cc, *FLAGS, *sources, "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
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
        log.warning("herd CPU kernels off: building them failed: %s", detail.strip()[-500:])
        return {}
    lib.herd_attention_step.argtypes = (
        [ctypes.c_int64]
        + [ctypes.c_void_p] * 3
        + [ctypes.c_int64]
        + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64] * 6
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64] * 2
    )
    lib.herd_attention_step.restype = None
    lib.herd_ragged_attention_f32.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    )
    lib.herd_ragged_attention_f32.restype = None
    fns = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        if dtype == torch.bfloat16 and "avx512_bf16" not in flags:
            continue
        gemv_fn = getattr(lib, f"herd_gemv_{suffix}")
        gemv_fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        norm_fn = getattr(lib, f"herd_rms_norm_{suffix}")
        norm_fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int64]
        step_fn = getattr(lib, f"herd_decode_{suffix}")
        step_fn.argtypes = (
            [ctypes.POINTER(_Model)]
            + [ctypes.c_int64] * 2
            + [ctypes.c_void_p, ctypes.c_int64]
            + [ctypes.c_void_p] * 2
            + [ctypes.c_int64] * 3
            + [ctypes.c_void_p] * 2
            + [ctypes.c_int64]
        )
        for name, fn in (("gemv", gemv_fn), ("rms_norm", norm_fn), ("decode", step_fn)):
            fn.restype = None
            fns[(name, dtype)] = fn
        fns[("attention", dtype)] = functools.partial(lib.herd_attention_step, int(dtype == torch.bfloat16))
    fns[("ragged_attention", torch.float32)] = lib.herd_ragged_attention_f32
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


def _cache_layout(cache) -> tuple[int, int, int] | None:
    """(layer, block, head) strides of a cache's (layers, blocks, kv heads, block_size, head dim) keys,
    which the values share; None where the kernels cannot read it."""
    k, v = cache.k, cache.v
    if not (k.is_contiguous() and v.is_contiguous()) or k.shape != v.shape:
        return None
    return k.stride(0), k.stride(1), k.stride(2)


def attention_step(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, layer: int, n_heads: int
) -> torch.Tensor | None:
    """The attention heads' output (B, n_heads * head_dim) of a one-token step of B cached rows, from
    the fused q|k|v projection (B, 1, width) and the model's cos/sin (B, 1, 1, head_dim); writes this
    step's keys/values into `cache` (model.kv_cache.KVCache or model.paged_cache.PagedKVCache) at
    `layer` as its attend() does. None where the kernel does not apply."""
    fn = _kernel("attention", qkv, cos, sin, cache.k)
    layout = _cache_layout(cache)
    if fn is None or layout is None or not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
        return None
    B, hd = qkv.shape[0], cache.k.shape[-1]
    n_kv = cache.k.shape[2]
    if qkv.shape[-1] != (n_heads + 2 * n_kv) * hd or cos.shape[-1] != hd:
        return None
    tables, pos = cache.kernel_rows()
    _, block_stride, head_stride = layout
    threads = torch.get_num_threads()
    out = torch.empty(B, n_heads * hd, dtype=qkv.dtype)
    scratch = torch.empty(B * (qkv.shape[-1] + hd) + threads * cache.max_len, dtype=torch.float32)
    k, v = cache.k[layer], cache.v[layer]
    fn(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        B,
        tables.data_ptr(),
        tables.stride(0),
        pos.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        cache.block_size,
        block_stride,
        head_stride,
        n_heads,
        n_kv,
        hd,
        out.data_ptr(),
        scratch.data_ptr(),
        cache.max_len,
        threads,
    )
    return out


def ragged_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows, n_heads: int, n_kv: int
) -> torch.Tensor | None:
    """The attention heads' output (N, n_heads * head_dim) of N flat tokens laid out as `rows`
    (model.ragged.RaggedRows), from the fused q|k|v projection (1, N, width), which it rotates in place, and
    the model's cos/sin (1, N, 1, head_dim). None where the kernel does not apply (fp32 CPU only)."""
    fn = _kernel("ragged_attention", qkv, cos, sin)
    N, hd = qkv.shape[1], cos.shape[-1]
    if fn is None or qkv.shape[-1] != (n_heads + 2 * n_kv) * hd or hd not in (16, 32, 64, 128):
        return None
    if qkv.shape[0] != 1 or not all(t.is_contiguous() for t in (qkv, cos, sin)):
        return None
    spans = (rows.starts, rows.prefix, rows.seg)
    if any(t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous() for t in spans):
        return None
    threads = torch.get_num_threads()
    longest = rows.longest
    out = torch.empty(N, n_heads * hd, dtype=qkv.dtype)
    scratch = torch.empty(threads * ((hd + 4) * longest + 4 * hd), dtype=torch.float32)
    fn(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        rows.starts.data_ptr(),
        rows.prefix.data_ptr(),
        rows.seg.data_ptr(),
        len(rows.starts) - 1,
        n_heads,
        n_kv,
        hd,
        out.data_ptr(),
        scratch.data_ptr(),
        longest,
        threads,
    )
    return out


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("attn_norm", "wqkv", "wo", "ffn_norm", "w13", "w2")]


class _Model(ctypes.Structure):  # herd_model in cpu_decode.c
    _fields_ = [
        (name, ctypes.c_int64) for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "vocab")
    ] + [
        ("eps", ctypes.c_float),
        ("inv_freq", ctypes.c_void_p),
        ("layers", ctypes.POINTER(_Layer)),
        ("norm", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("embedding", ctypes.c_void_p),
    ]


class _DecodePlan:
    """The C view of a fused model's weights (pointers, so it holds the tensors), built once, and the
    step's scratch memory (one decoding thread per model, as generate() and the serving engine run)."""

    def __init__(self, model):
        cfg = model.config
        self.tensors = [model.inv_freq, model.norm.weight, model.output_weight, model.tok_embeddings.weight]
        layers = (_Layer * cfg.n_layers)()
        for row, layer in zip(layers, model.layers):
            attn, ffn = layer.attention, layer.feed_forward
            weights = (
                layer.attention_norm.weight,
                attn.wqkv,
                attn.wo.weight,
                layer.ffn_norm.weight,
                ffn.w13,
                ffn.w2.weight,
            )
            self.tensors += weights
            for (name, _), w in zip(_Layer._fields_, weights):
                setattr(row, name, w.data_ptr())
        self.layers = layers
        self.model = _Model(
            cfg.n_layers,
            cfg.dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.ffn_hidden_dim,
            cfg.vocab_size,
            cfg.norm_eps,
            model.inv_freq.data_ptr(),
            layers,
            model.norm.weight.data_ptr(),
            model.output_weight.data_ptr(),
            model.tok_embeddings.weight.data_ptr(),
        )
        self.scratch = torch.empty(0)

    def scratch_for(self, max_len: int) -> torch.Tensor:
        cfg = self.model
        n = (
            cfg.dim
            + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
            + cfg.head_dim
            + cfg.n_heads * max_len
            + cfg.dim
            + cfg.hidden
        )
        if self.scratch.numel() < n:
            self.scratch = torch.empty(n, dtype=torch.float32)
        return self.scratch


def _plan_key(model) -> tuple:
    """Changes when .to() or a reload moves the weights (then the plan is rebuilt)."""
    first, last = model.layers[0], model.layers[-1]
    return (
        model.tok_embeddings.weight.data_ptr(),
        first.attention.wq.weight.data_ptr(),
        last.feed_forward.w2.weight.data_ptr(),
        model.output_weight.data_ptr(),
    )


# Kept beside the model, not on it: ctypes pointers can be neither deep-copied nor pickled (Ray).
# A model the kernel does not apply to is remembered too (None), until its weights move.
_plans: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()


def _plan(model, fn) -> _DecodePlan | None:
    key = (_plan_key(model), fn)
    known = _plans.get(model)
    if known is not None and known[0] == key:
        return known[1]
    plan = _DecodePlan(model) if _fused_for_kernel(model) else None
    _plans[model] = (key, plan)
    return plan


def _fused_for_kernel(model) -> bool:
    cfg, dtype = model.config, model.tok_embeddings.weight.dtype
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        # Fused (fuse_projections) and still current: the separate weights are views into the fused ones.
        if (
            attn.wqkv is None
            or ffn.w13 is None
            or attn.wqkv.data_ptr() != attn.wq.weight.data_ptr()
            or ffn.w13.data_ptr() != ffn.w1.weight.data_ptr()
            or attn.wqkv.shape != ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim)
        ):
            return False
        weights = (
            layer.attention_norm.weight,
            attn.wqkv,
            attn.wo.weight,
            layer.ffn_norm.weight,
            ffn.w13,
            ffn.w2.weight,
        )
        if any(w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous() for w in weights):
            return False
    out = model.output_weight
    return model.norm.weight.dtype == dtype and out.dtype == dtype and out.is_contiguous()


def decode_step(model, token: torch.Tensor, cache) -> torch.Tensor | None:
    """Logits (1, 1, vocab) of one token of one sequence through `model` (a fused model.Transformer),
    its keys/values written into `cache` (set up for the step: positions() was called) as the model's
    forward writes them; None where the kernel does not apply (then use the model's torch path)."""
    emb = model.tok_embeddings.weight
    fn = _kernel("decode", emb)
    layout = _cache_layout(cache)
    if fn is None or cache.k.dtype != emb.dtype or layout is None:
        return None
    tables, pos = cache.kernel_rows()
    if tables.shape[0] != 1:
        return None
    plan = _plan(model, fn)
    if plan is None:
        return None
    length = int(pos[0])
    if length + 1 > cache.max_len:
        raise ValueError(f"KV cache overflow: {length} + 1 tokens > max_len {cache.max_len}")
    table = tables[0].contiguous()
    logits = torch.empty(1, 1, model.config.vocab_size, dtype=emb.dtype)
    fn(
        ctypes.byref(plan.model),
        int(token),
        length,
        table.data_ptr(),
        cache.block_size,
        cache.k.data_ptr(),
        cache.v.data_ptr(),
        *layout,
        logits.data_ptr(),
        plan.scratch_for(cache.max_len).data_ptr(),
        torch.get_num_threads(),
    )
    return logits


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    fns = _library()
    print("herd CPU kernels:", ", ".join(f"{k} {str(d).replace('torch.', '')}" for k, d in fns) if fns else "off")
