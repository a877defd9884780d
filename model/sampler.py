"""One batched sampler: every row of a step with its own settings, in a fixed number of tensor ops.

Per row: temperature (0 = greedy), top-k, top-p, min-p, presence / frequency / repetition penalties,
a seed, and the top-N log-probabilities. No Python loop over rows touches a tensor, and the results
come to the host in one copy.

Truncation, in vLLM's order: min-p keeps x >= max + log(min_p), top-k the k largest, top-p (over
what those kept, renormalised) the smallest prefix of the sorted distribution whose mass before a token
is below top_p. Only tokens that can be kept are sorted: on CPU those above a bound that no kept token
is below ((1 - top_p) / V for top-p); on CUDA the whole vocabulary, which needs no host round trip.

The draw is an inverse-CDF lookup with one uniform number per row, a hash of (seed, step): a row's
token depends on its own logits, seed and step only, never on the rows beside it. Requests without a
seed get a random one when they arrive (`random_seed`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1
_system_random = random.SystemRandom()


def random_seed() -> int:
    return _system_random.getrandbits(63)


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters every input bit."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A number in (0, 1) from (seed, step) alone: the row's draw at that step."""
    h = _mix64(_mix64(seed & _MASK64) ^ (step * 0x9E3779B97F4A7C15 & _MASK64))
    return ((h >> 11) + 0.5) / (1 << 53)


@dataclass(frozen=True)
class RowSettings:
    """What the sampler reads of one request (model.generate.SamplingParams has these fields)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: and the N most likely

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float  # of the chosen token, under the model's raw distribution
    top: tuple[tuple[int, float], ...]  # the N most likely (token id, logprob), most likely first


@dataclass(frozen=True)
class Sampled:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def settings_of(p) -> RowSettings:
    return RowSettings(p.temperature, p.top_k, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
                       p.repetition_penalty, p.logprobs)


def apply_penalties(x: torch.Tensor, rows: Sequence[RowSettings], prompts: Sequence[Sequence[int]],
                    outputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over each row's output tokens, and the CTRL /
    transformers repetition penalty over its prompt and output tokens (x / r where x > 0, x * r below)."""
    B, V = x.shape
    dev = x.device

    def counts(lists):
        width = max((len(t) for t in lists), default=0)
        ids = torch.full((B, max(width, 1)), V, dtype=torch.long)
        for r, t in enumerate(lists):
            if t:
                ids[r, :len(t)] = torch.as_tensor(t, dtype=torch.long)
        c = torch.zeros(B, V + 1, dtype=x.dtype, device=dev)
        return c.scatter_add_(1, ids.to(dev), torch.ones(ids.shape, dtype=x.dtype, device=dev))[:, :V]

    out_counts = counts(outputs)
    seen = (out_counts + counts(prompts)) > 0
    rep = torch.tensor([r.repetition_penalty for r in rows], dtype=x.dtype, device=dev)[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([r.frequency_penalty for r in rows], dtype=x.dtype, device=dev)[:, None]
    pres = torch.tensor([r.presence_penalty for r in rows], dtype=x.dtype, device=dev)[:, None]
    return x - freq * out_counts - pres * (out_counts > 0).to(x.dtype)


class Sampler:
    """`sampler(logits, rows, seeds, steps)`: one token per row. Truncated rows sort only the tokens
    that can be kept (CPU), or, `dense` and on CUDA, the whole vocabulary (no host round trip)."""

    def __init__(self, dense: bool = False):
        self.dense = dense

    def __call__(self, logits: torch.Tensor, rows: Sequence[RowSettings], seeds: Sequence[int],
                 steps: Sequence[int], prompts: Sequence[Sequence[int]] | None = None,
                 outputs: Sequence[Sequence[int]] | None = None) -> Sampled:
        B, V = logits.shape
        dev = logits.device
        raw = logits.float()
        x = raw
        if any(r.penalized for r in rows):
            x = apply_penalties(raw, rows, prompts or [[]] * B, outputs or [[]] * B)
        ids = x.argmax(-1)
        if any(r.temperature > 0 for r in rows):
            ids = torch.where(torch.tensor([r.temperature > 0 for r in rows], device=dev), self._draw(x, rows, seeds, steps),
                              ids)
        n_top = max((r.logprobs or 0 for r in rows), default=0)
        want_logprobs = any(r.logprobs is not None for r in rows)
        parts = [ids.to(torch.float64)[:, None]]
        if want_logprobs:
            lse = torch.logsumexp(raw, -1, keepdim=True)
            parts.append((raw.gather(1, ids[:, None]) - lse).double())
            if n_top:
                top = torch.topk(raw, min(n_top, V), dim=-1)
                parts += [top.indices.double(), (top.values - lse).double()]
        host = torch.cat(parts, 1).cpu()  # the step's one device-to-host copy
        token_ids = host[:, 0].long().tolist()
        logprobs: list[TokenLogprobs | None] = [None] * B
        if want_logprobs:
            k = min(n_top, V)
            for r, row in enumerate(rows):
                if row.logprobs is None:
                    continue
                n = min(row.logprobs, k)
                top = tuple(zip(host[r, 2:2 + n].long().tolist(), host[r, 2 + k:2 + k + n].tolist()))
                logprobs[r] = TokenLogprobs(float(host[r, 1]), top)
        return Sampled(token_ids, logprobs)

    def _draw(self, x: torch.Tensor, rows: Sequence[RowSettings], seeds, steps) -> torch.Tensor:
        B, V = x.shape
        dev = x.device
        temp = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=dev)
        x = x / temp[:, None]
        u = torch.tensor([uniform(s, t) for s, t in zip(seeds, steps)], dtype=torch.float64, device=dev)
        truncating = [r.top_k > 0 or r.top_p < 1 or r.min_p > 0 for r in rows]
        plain = _inverse_cdf(x, u) if not all(truncating) else None
        if not any(truncating):
            return plain
        cut = _Truncation.of(rows, dev)
        ids = _draw_sorted(x, cut, u) if self.dense or dev.type == "cuda" else _draw_candidates(x, cut, u, truncating)
        return ids if plain is None else torch.where(torch.tensor(truncating, device=dev), ids, plain)


@dataclass(frozen=True)
class _Truncation:
    top_k: torch.Tensor  # (B,) 0 = off
    top_p: torch.Tensor  # (B,) 1 = off
    log_min_p: torch.Tensor  # (B,) -inf = off

    @classmethod
    def of(cls, rows: Sequence[RowSettings], dev) -> "_Truncation":
        return cls(torch.tensor([r.top_k for r in rows], device=dev),
                   torch.tensor([r.top_p for r in rows], dtype=torch.float64, device=dev),
                   torch.tensor([math.log(r.min_p) if r.min_p > 0 else float("-inf") for r in rows], device=dev))

    @property
    def renormalised(self) -> torch.Tensor:
        """Rows where min-p or top-k cut before top-p (top-p then reads the renormalised mass)."""
        return (self.top_k > 0) | torch.isfinite(self.log_min_p)


def _inverse_cdf(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An index of each row drawn from softmax(x): where u * total falls in the cumulative mass."""
    mass = torch.exp(x - x.max(-1, keepdim=True).values).double()
    cum = mass.cumsum(-1)
    i = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    return i.clamp(max=x.shape[-1] - 1)


def _segments(rows: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For elements grouped by row (ascending): each row's first element index and each element's rank."""
    counts = torch.bincount(rows, minlength=B)
    start = counts.cumsum(0) - counts
    return start, torch.arange(len(rows), device=rows.device) - start[rows]


def _segment_cumsum(v: torch.Tensor, rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sums that restart at each row's first element."""
    c = v.cumsum(0)
    before_row = (c - v)[start.clamp(max=max(len(v) - 1, 0))]
    return c - before_row[rows]


def _pick(rows: torch.Tensor, start: torch.Tensor, vals: torch.Tensor, keep: torch.Tensor, rank: torch.Tensor,
          top: torch.Tensor, cut: _Truncation, lse_full: torch.Tensor, u: torch.Tensor, B: int) -> torch.Tensor:
    """Top-p over each row's elements (grouped by row, each row sorted by value, descending, starting
    at `start`), then the draw. Returns the position (into the elements) of each row's drawn token."""
    mass = torch.exp((vals - top[rows]).double()) * keep
    kept_mass = torch.zeros(B, dtype=torch.float64, device=mass.device).index_add_(0, rows, mass)
    norm = torch.where(cut.renormalised, kept_mass, torch.exp((lse_full - top).double()))
    p = mass / norm[rows]
    before = _segment_cumsum(p, rows, start) - p
    keep = keep & ((before < cut.top_p[rows]) | (rank == 0))
    mass = mass * keep
    total = torch.zeros(B, dtype=torch.float64, device=mass.device).index_add_(0, rows, mass)
    upto = _segment_cumsum(mass, rows, start)
    hit = keep & (upto > (u * total)[rows])
    # The first hit of each row; the row's last kept element when rounding leaves none.
    last_kept = torch.zeros(B, dtype=torch.long, device=rows.device).scatter_reduce_(
        0, rows, torch.where(keep, torch.arange(len(rows), device=rows.device), -1), "amax")
    n = len(rows)
    first = torch.full((B,), n, dtype=torch.long, device=rows.device).scatter_reduce_(
        0, rows, torch.where(hit, torch.arange(n, device=rows.device), n), "amin")
    return torch.where(first < n, first, last_kept)


def _draw_sorted(x: torch.Tensor, cut: _Truncation, u: torch.Tensor) -> torch.Tensor:
    """Every row's whole vocabulary sorted: no host round trip (the CUDA path)."""
    B, V = x.shape
    vals, idx = torch.sort(x, descending=True, dim=-1)
    top = vals[:, 0]
    rank = torch.arange(V, device=x.device).expand(B, V)
    keep = (vals >= (top + cut.log_min_p)[:, None]) & ((cut.top_k == 0)[:, None] | (rank < cut.top_k[:, None]))
    rows = torch.arange(B, device=x.device).repeat_interleave(V)
    pos = _pick(rows, torch.arange(B, device=x.device) * V, vals.flatten(), keep.flatten(), rank.flatten(), top, cut,
                torch.logsumexp(x, -1), u, B)
    return idx.flatten()[pos]


def _draw_candidates(x: torch.Tensor, cut: _Truncation, u: torch.Tensor, truncating: list[bool]) -> torch.Tensor:
    """Only the tokens that can be kept, sorted: a token of probability below (1 - top_p) / V cannot be
    in the nucleus (all of those together hold less than 1 - top_p), min-p's bound is exact, and top-k's
    is the row's k-th value. The CPU path (a host round trip costs nothing there)."""
    B, V = x.shape
    dev = x.device
    top = x.max(-1).values
    lse_full = torch.logsumexp(x, -1)
    bound = torch.where(cut.top_p < 1, lse_full + torch.log((1 - cut.top_p) / V).float(), float("-inf"))
    bound = torch.maximum(bound, top + cut.log_min_p)
    k_rows = (cut.top_k > 0).nonzero()[:, 0]
    if len(k_rows):
        k = cut.top_k[k_rows].clamp(max=V)
        kth = torch.topk(x[k_rows], int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])[:, 0]
        bound[k_rows] = torch.maximum(bound[k_rows], kth)
    mask = (x >= bound[:, None]) & torch.tensor(truncating, device=dev)[:, None]
    rows, cols = mask.nonzero(as_tuple=True)
    vals = x[rows, cols]
    order = torch.argsort(vals, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, vals = rows[order], cols[order], vals[order]
    start, rank = _segments(rows, B)
    keep = (vals >= (top + cut.log_min_p)[rows]) & ((cut.top_k[rows] == 0) | (rank < cut.top_k[rows]))
    pos = _pick(rows, start, vals, keep, rank, top, cut, lse_full, u, B)
    return cols[pos.clamp(max=max(len(cols) - 1, 0))]
