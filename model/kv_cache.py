"""A preallocated, batched KV cache with a length per row: training-side generation and scoring.

Rows are independent sequences ("slots"). A forward step writes T new tokens to every
active row at that row's own length, so rows of different lengths decode together. `select`
chooses which slots take part in a step; the rest are untouched. (The serving engine pages its
cache instead: model/paged_cache.py.)

What the model asks of a cache (this one and PagedKVCache):
  * `positions(T)` at the start of a forward: each stepped row's positions (B, T);
  * `attend(layer, q, k, v)` in each layer: write the step's keys/values, attend over the row's own;
  * for herd's CPU kernels, `kernel_rows()`: each row's block table and write position, with the
    layer tensors `k`/`v` laid out (layers, blocks, kv heads, block_size, head dim). A dense cache is
    the one-block-per-row case: block = slot, block_size = max_len.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = self.block_size = max_len
        self.batch_size = batch_size
        self._active: torch.Tensor | None = None  # slot ids of the current step, None = all rows
        # Per-step facts computed once in positions(), read by every layer:
        self._span = 0  # keys attended: max over active rows of length + T
        self._uniform_start: int | None = None  # shared length when all rows are equal
        self._range: tuple[int, int] | None = None  # the step's rows as a contiguous [start, stop)
        self._step_lengths: torch.Tensor | None = None  # each stepped row's length, set by positions()
        self._mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, cfg, batch_size: int, max_len: int, dtype=torch.float32, device="cpu") -> KVCache:
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    # --- step set-up ---
    def select(self, slots: torch.Tensor | list[int] | None) -> KVCache:
        """Restrict the next forward step to these slots (None = every row)."""
        self._range = None
        if slots is not None and not torch.is_tensor(slots):
            ids = list(slots)
            if ids and ids == list(range(ids[0], ids[0] + len(ids))):
                self._range = (ids[0], ids[0] + len(ids))  # contiguous: read the cache through a view
            slots = torch.tensor(ids, dtype=torch.long, device=self.lengths.device)
        self._active = slots
        return self

    def positions(self, T: int) -> torch.Tensor:
        lengths = self.lengths if self._active is None else self.lengths[self._active]
        self._step_lengths = lengths
        host = lengths.tolist()
        longest = max(host)
        if longest + T > self.max_len:
            raise ValueError(f"KV cache overflow: {longest} + {T} tokens > max_len {self.max_len}")
        self._span = longest + T
        self._uniform_start = longest if self._active is None and min(host) == longest else None
        self._mask = self._attention_mask(T)
        return lengths[:, None] + torch.arange(T, device=lengths.device)

    def _attention_mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, span) bool, key j visible to query t iff j <= length + t.
        None when one causal mask fits every row: T == 1, or a single row starting empty."""
        lengths = self._step_lengths
        if T == 1 and (self._uniform_start is not None or len(lengths) == 1):
            return None
        q_pos = lengths[:, None] + torch.arange(T, device=lengths.device)  # (B, T)
        k_pos = torch.arange(self._span, device=lengths.device)
        return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]

    def kernel_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each stepped row's block table (B, 1): its slot, and its write position (B,)."""
        if self._range is not None:
            slots = torch.arange(*self._range, device=self.lengths.device)
        elif self._active is None:
            slots = torch.arange(self.batch_size, device=self.lengths.device)
        else:
            slots = self._active
        return slots[:, None].contiguous(), self._step_lengths.contiguous()

    # --- in each layer ---
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's keys/values (B, kv heads, T, head dim) and attend q over each row's keys."""
        k, v = self.update(layer, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask, enable_gqa=True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys/values; return the keys/values to attend to."""
        T = k.shape[2]
        span = self._span
        if self._active is None:
            if self._uniform_start is not None:
                start = self._uniform_start
                self.k[layer, :, :, start : start + T] = k
                self.v[layer, :, :, start : start + T] = v
            else:
                rows = torch.arange(self.batch_size, device=k.device)[:, None]
                pos = self.lengths[:, None] + torch.arange(T, device=k.device)
                self.k[layer, rows, :, pos] = k.transpose(1, 2)
                self.v[layer, rows, :, pos] = v.transpose(1, 2)
            return self.k[layer, :, :, :span], self.v[layer, :, :, :span]
        if self._range is not None:  # contiguous rows: a view, no gather of the whole span
            a, b = self._range
            rows = torch.arange(a, b, device=k.device)[:, None]
            pos = self._step_lengths[:, None] + torch.arange(T, device=k.device)
            self.k[layer, rows, :, pos] = k.transpose(1, 2)
            self.v[layer, rows, :, pos] = v.transpose(1, 2)
            return self.k[layer, a:b, :, :span], self.v[layer, a:b, :, :span]
        slots = self._active
        pos = self.lengths[slots][:, None] + torch.arange(T, device=k.device)
        self.k[layer, slots[:, None], :, pos] = k.transpose(1, 2)
        self.v[layer, slots[:, None], :, pos] = v.transpose(1, 2)
        return self.k[layer, slots, :, :span], self.v[layer, slots, :, :span]

    # --- bookkeeping (called by the generation loop) ---
    def advance(self, n: int | torch.Tensor) -> None:
        """Accept the step: active rows grow by n tokens (an int or one count per row)."""
        if self._active is None:
            self.lengths += n
        else:
            self.lengths[self._active] += n

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first n cached tokens of slot src into slot dst and set dst's length."""
        if n:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
