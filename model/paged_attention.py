"""Decode attention over a paged KV cache, as one Triton kernel (CUDA).

One program per (sequence, kv head): it loads the query heads of that kv head's group once, walks the
sequence's own blocks through its block table, BLOCK_N keys at a time, with an online softmax, and
writes the group's outputs. Work follows each row's live length, and no mask of the padded span is
built. The lengths and tables are read on the device, so a CUDA graph captured once replays it for
any lengths (model/paged_cache.py; services/engine/cuda_graphs.py).

Triton ships with torch's CUDA wheels. Where it is missing `paged_decode` returns None and the cache
falls back to gathering the blocks. With TRITON_INTERPRET=1 the kernel runs on CPU tensors
(tests/test_paged_attention.py), slowly, for correctness.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def paged_decode_kernel(
        Q,
        K,
        V,
        Out,
        Tables,
        Lens,
        scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_tb,
        stride_ob,
        stride_oh,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(Lens + row)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + g
        q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for start in range(0, length, BLOCK_N):
            t = start + n
            live = t < length
            block = tl.load(Tables + row * stride_tb + t // BLOCK_SIZE, mask=live, other=0)
            at = block * stride_kb + kv_head * stride_kh + (t % BLOCK_SIZE) * HEAD_DIM
            k = tl.load(K + at[:, None] + d[None, :], mask=live[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(V + at[:, None] + d[None, :], mask=live[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            Out + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=g[:, None] < GROUP,
        )

    return triton, paged_decode_kernel


def paged_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor | None:
    """q (B, heads, head_dim); one layer's k/v (blocks, kv heads, block_size, head_dim); tables (B, W)
    block ids; lengths (B,) keys to attend (the new token's included). Returns (B, heads, head_dim), or
    None where Triton is not installed."""
    found = _kernel()
    if found is None:
        return None
    triton, kernel = found
    B, H, hd = q.shape
    n_kv, block_size = k.shape[1], k.shape[2]
    group = H // n_kv
    q = q.contiguous()
    tables = tables.contiguous()
    out = torch.empty_like(q)
    kernel[(B, n_kv)](
        q,
        k,
        v,
        out,
        tables,
        lengths,
        1.0 / hd**0.5,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=hd,
        BLOCK_SIZE=block_size,
        BLOCK_N=64,
    )
    return out
