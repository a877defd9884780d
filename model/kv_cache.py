"""A preallocated, batched KV cache with a length per row.

Rows are independent sequences ("slots"). A forward step writes T new tokens to every
active row at that row's own length, so a continuous-batching scheduler can decode rows
of different lengths together and prefill new rows into free slots. `active` selects
which slots take part in a step; the rest are untouched.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        self._active: torch.Tensor | None = None  # slot ids of the current step, None = all rows
        # Per-step facts computed once in positions(), read by every layer's update():
        self._span = 0  # keys attended: max over active rows of length + T
        self._uniform_start: int | None = None  # shared length when all rows are equal
        self._range: tuple[int, int] | None = None  # the step's rows as a contiguous [start, stop)
        self._scratch: int | None = None  # select_hull: where the hull's unselected rows write
        self._step_lengths: torch.Tensor | None = None  # each stepped row's length, set by positions()
        self._decode_rows: tuple | None = None  # decode_rows() of the current step

    @classmethod
    def for_model(cls, cfg, batch_size: int, max_len: int, dtype=torch.float32, device="cpu") -> "KVCache":
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    # --- step set-up (called by the model's forward) ---
    def select(self, slots: torch.Tensor | list[int] | None) -> "KVCache":
        """Restrict the next forward step to these slots (None = every row)."""
        self._range, self._scratch = None, None
        if slots is not None and not torch.is_tensor(slots):
            ids = list(slots)
            if ids and ids == list(range(ids[0], ids[0] + len(ids))):
                self._range = (ids[0], ids[0] + len(ids))  # contiguous: read the cache through a view
            slots = torch.tensor(ids, dtype=torch.long, device=self.lengths.device)
        self._active = slots
        return self

    def select_hull(self, slots: list[int], scratch: int) -> tuple[int, int]:
        """Step the slots' contiguous hull [lo, hi) instead of gathering the slots' keys/values: the
        caller feeds hi - lo rows and reads slot s's output at row s - lo. Rows of the hull that are
        not selected write at `scratch`, a position no real row ever attends (the cache's padding
        past the longest sequence), and do not advance."""
        lo, hi = min(slots), max(slots) + 1
        if scratch < 0 or scratch >= self.max_len:
            raise ValueError(f"scratch position {scratch} is outside the cache (max_len {self.max_len})")
        self.select(slots)
        self._range, self._scratch = (lo, hi), scratch
        return lo, hi

    def _lengths(self) -> torch.Tensor:
        """Each stepped row's length (select_hull: the scratch position for unselected rows)."""
        if self._scratch is not None:
            lo, hi = self._range
            lengths = torch.full((hi - lo,), self._scratch, dtype=self.lengths.dtype, device=self.lengths.device)
            lengths[self._active - lo] = self.lengths[self._active]
            return lengths
        return self.lengths if self._active is None else self.lengths[self._active]

    def positions(self, T: int) -> torch.Tensor:
        lengths = self._lengths()
        self._step_lengths, self._decode_rows = lengths, None
        host = (self.lengths[self._active] if self._scratch is not None else lengths).tolist()
        longest = max(host)
        if longest + T > self.max_len or (self._scratch is not None and self._scratch + T > self.max_len):
            raise ValueError(f"KV cache overflow: {longest} + {T} tokens > max_len {self.max_len}")
        self._span = longest + T
        uniform = self._active is None and min(host) == longest
        self._uniform_start = longest if uniform else None
        return lengths[:, None] + torch.arange(T, device=lengths.device)

    def decode_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a one-token step after positions(): each fed row's slot, its write position, and
        whether it is a real sequence (uint8; 0 for a hull's idle rows). The CPU attention kernel's
        view of update()."""
        if self._decode_rows is None:
            if self._range is not None:
                slots = torch.arange(*self._range, device=self.lengths.device)
            elif self._active is None:
                slots = torch.arange(self.batch_size, device=self.lengths.device)
            else:
                slots = self._active
            pos = self._step_lengths.contiguous()
            if self._scratch is None:
                active = torch.ones(len(slots), dtype=torch.uint8, device=self.lengths.device)
            else:
                active = torch.zeros(len(slots), dtype=torch.uint8, device=self.lengths.device)
                active[self._active - self._range[0]] = 1
            self._decode_rows = (slots, pos, active)
        return self._decode_rows

    def selected_count(self) -> int:
        """Rows the next step feeds."""
        return self.batch_size if self._active is None else len(self._active)

    def single_row_step(self) -> tuple[int, int]:
        """(slot, length) of a one-token step of one sequence (the fused decode kernel's positions())."""
        if self.selected_count() != 1:
            raise ValueError(f"single_row_step: the step selects {self.selected_count()} rows, not one")
        slot = 0 if self._active is None else int(self._active[0])
        length = int(self.lengths[slot])
        if length + 1 > self.max_len:
            raise ValueError(f"KV cache overflow: {length} + 1 tokens > max_len {self.max_len}")
        return slot, length

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, span) bool, key j visible to query t iff j <= length + t.
        None when one causal mask fits every row: T == 1, or a single row starting empty."""
        lengths = self._step_lengths
        if T == 1 and (self._uniform_start is not None or len(lengths) == 1):
            return None
        q_pos = lengths[:, None] + torch.arange(T, device=lengths.device)  # (B, T)
        k_pos = torch.arange(self._span, device=lengths.device)
        return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys/values; return the keys/values to attend to."""
        T = k.shape[2]
        span = self._span
        if self._active is None:
            if self._uniform_start is not None:
                start = self._uniform_start
                self.k[layer, :, :, start:start + T] = k
                self.v[layer, :, :, start:start + T] = v
            else:
                rows = torch.arange(self.batch_size, device=k.device)[:, None]
                pos = self.lengths[:, None] + torch.arange(T, device=k.device)
                self.k[layer, rows, :, pos] = k.transpose(1, 2)
                self.v[layer, rows, :, pos] = v.transpose(1, 2)
            return self.k[layer, :, :, :span], self.v[layer, :, :, :span]
        if self._range is not None:  # contiguous rows (or a hull): a view, no gather of the whole span
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

    # --- bookkeeping (called by the generation loop / scheduler) ---
    def advance(self, n: int | torch.Tensor) -> None:
        """Accept the step: active rows grow by n tokens (an int or one count per row)."""
        if self._active is None:
            self.lengths += n
        else:
            self.lengths[self._active] += n

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def set_length(self, slot: int, n: int) -> None:
        """Keep the first n cached tokens of a slot (a reused prefix); the rest is overwritten later."""
        self.lengths[slot] = n

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first n cached tokens of slot src into slot dst (prefix caching) and set dst's length."""
        if n:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def usage(self) -> float:
        return float(self.lengths.sum()) / (self.batch_size * self.max_len)
