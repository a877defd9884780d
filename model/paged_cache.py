"""The serving engine's KV cache: a pool of fixed-size blocks that sequences hold by block table.

Memory is `num_blocks` x `block_size` token positions shared by every sequence, so a replica holds
as many sequences as their live tokens fill, not slots x the longest context. Block 0 is the null
block: padding rows and padding tokens write there, and nothing real ever reads it. Which blocks a
sequence holds, and which blocks several sequences share (prefix caching), is the engine's business
(services/engine/blocks.py); this class only stores keys/values and runs attention over them.

A step is set up with `set_step(tables, lengths, ...)`: row r holds the blocks tables[r] and already
has lengths[r] tokens; its T new tokens go at positions lengths[r] .. lengths[r] + T - 1. Attention,
chosen per device and phase, never builds a mask of the whole span for decode:
  * CPU, one new token a row: herd's C kernels read the block tables directly (model/cpu_kernels.py);
  * CUDA, one new token a row: a Triton kernel over each row's own blocks (model/paged_attention.py),
    whose inputs are fixed-size tensors, so CUDA graphs can capture it;
  * prefill chunks (and CPUs without the kernels): the rows' blocks are gathered and SDPA runs with a
    causal mask over that span; on CUDA, cuDNN's attention (which rebuilds its graph for every new
    span) is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NULL_BLOCK = 0


class PagedKVCache:
    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks (block 0 is the null block), got {num_blocks}")
        shape = (n_layers, num_blocks, n_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = self.k.device
        # One-token steps through the Triton kernel: on CUDA; tests turn it on for CPU tensors under
        # TRITON_INTERPRET=1.
        self.triton_decode = self.device.type == "cuda"
        self._tables: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._T, self._span = 0, None

    @classmethod
    def for_model(cls, cfg, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu") -> PagedKVCache:
        return cls(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    # --- step set-up (the engine's runner) ---
    def set_step(
        self,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        T: int,
        span: int | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """tables (B, W) block ids (NULL_BLOCK past a row's own), lengths (B,) tokens already cached, on
        the cache's device. span: the longest row's length + T (needed by the gathered path; None when
        only the decode kernels run, e.g. inside a CUDA graph). valid (B,): real tokens of each row this
        step when rows are padded to T; padding writes go to the null block."""
        self._tables, self._lengths, self._T, self._span = tables, lengths, T, span
        pos = lengths[:, None] + torch.arange(T, device=lengths.device)
        self._positions = pos
        bs = self.block_size
        blocks = tables.gather(1, torch.div(pos, bs, rounding_mode="floor").clamp(max=tables.shape[1] - 1))
        if valid is not None:
            blocks = torch.where(torch.arange(T, device=pos.device)[None] < valid[:, None], blocks, NULL_BLOCK)
        self._write_blocks, self._write_offsets = blocks, pos % bs

    def positions(self, T: int) -> torch.Tensor:
        if self._positions is None or self._T != T:
            raise ValueError("PagedKVCache.set_step must set up each step before the forward")
        return self._positions

    def kernel_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's block table (B, W) and write position (B,) for herd's CPU kernels."""
        return self._tables, self._lengths

    @property
    def max_len(self) -> int:
        """Positions a row's table can address (the CPU kernels size their scratch by it)."""
        return self._tables.shape[1] * self.block_size

    # --- in each layer ---
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's keys/values (B, kv heads, T, head dim) and attend q (B, heads, T, hd) over
        each row's cached keys and its own new ones."""
        kl, vl = self.k[layer], self.v[layer]
        kl[self._write_blocks, :, self._write_offsets] = k.transpose(1, 2).to(kl.dtype)
        vl[self._write_blocks, :, self._write_offsets] = v.transpose(1, 2).to(vl.dtype)
        if q.shape[2] == 1 and self.triton_decode:
            from model.paged_attention import paged_decode

            out = paged_decode(q[:, :, 0], kl, vl, self._tables, self._lengths + 1)
            if out is not None:
                return out[:, :, None]
        return self._gathered(q, kl, vl)

    def _gathered(self, q: torch.Tensor, kl: torch.Tensor, vl: torch.Tensor) -> torch.Tensor:
        if self._span is None:
            raise ValueError("the gathered attention path needs set_step(span=...)")
        B, H, T, hd = q.shape
        n = -(-self._span // self.block_size)
        table = self._tables[:, :n]
        keys = kl[table].permute(0, 2, 1, 3, 4).reshape(B, kl.shape[1], n * self.block_size, hd)[:, :, : self._span]
        vals = vl[table].permute(0, 2, 1, 3, 4).reshape(B, vl.shape[1], n * self.block_size, hd)[:, :, : self._span]
        k_pos = torch.arange(self._span, device=q.device)
        mask = (k_pos[None, None, :] <= self._positions[:, :, None])[:, None]  # (B, 1, T, span)
        if not q.is_cuda:
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        group = H // keys.shape[1]
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)

    # --- block copies (copy-on-write of a shared block) ---
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
