"""One batched sampler: every row of a step with its own settings, in a fixed number of tensor ops.

Per row: temperature (0 = greedy), top-k, top-p, min-p, presence / frequency / repetition penalties,
a seed, and the top-N log-probabilities. No Python loop over rows touches a tensor, and the results
come to the host in one copy.

Truncation, in vLLM's order: min-p keeps x >= max + log(min_p), top-k the k largest, top-p (over
what those kept, renormalised) the smallest prefix of the sorted distribution whose mass before a token
is below top_p. On CPU a row is cut from its top 128 logits when its kept set lies inside them (the
usual case), else through a histogram of its mass that leaves only one narrow band of logits to sort;
on CUDA the whole vocabulary is sorted, which needs no host round trip.

The draw is an inverse-CDF lookup with one uniform number per row, a hash of (seed, step): a row's
token depends on its own logits, seed and step only, never on the rows beside it. Requests without a
seed get a random one when they arrive (`random_seed`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

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
    return RowSettings(
        p.temperature,
        p.top_k,
        p.top_p,
        p.min_p,
        p.presence_penalty,
        p.frequency_penalty,
        p.repetition_penalty,
        p.logprobs,
    )


def apply_penalties(
    x: torch.Tensor, rows: Sequence[RowSettings], prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over each row's output tokens, and the CTRL /
    transformers repetition penalty over its prompt and output tokens (x / r where x > 0, x * r below)."""
    B, V = x.shape
    dev = x.device

    def counts(lists):
        width = max((len(t) for t in lists), default=0)
        ids = torch.full((B, max(width, 1)), V, dtype=torch.long)
        for r, t in enumerate(lists):
            if t:
                ids[r, : len(t)] = torch.as_tensor(t, dtype=torch.long)
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
    """`sampler(logits, rows, seeds, steps)`: one token per row. On CPU a truncated row draws from its
    `top` largest logits when its kept set lies inside them (usual for a language model), else from
    the tokens that can be kept; `dense`, and on CUDA, it sorts the whole vocabulary (no host round
    trip)."""

    def __init__(self, dense: bool = False, top: int = 128):
        self.dense, self.top = dense, top

    def __call__(
        self,
        logits: torch.Tensor,
        rows: Sequence[RowSettings],
        seeds: Sequence[int],
        steps: Sequence[int],
        prompts: Sequence[Sequence[int]] | None = None,
        outputs: Sequence[Sequence[int]] | None = None,
    ) -> Sampled:
        B, V = logits.shape
        dev = logits.device
        raw = logits.float()
        x = raw
        if any(r.penalized for r in rows):
            x = apply_penalties(raw, rows, prompts or [[]] * B, outputs or [[]] * B)
        greedy = [r.temperature == 0 for r in rows]
        if all(greedy):
            ids = x.argmax(-1)
        elif not any(greedy):
            ids = self._draw(x, rows, seeds, steps)
        else:
            ids = torch.where(torch.tensor(greedy, device=dev), x.argmax(-1), self._draw(x, rows, seeds, steps))
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
                top = tuple(zip(host[r, 2 : 2 + n].long().tolist(), host[r, 2 + k : 2 + k + n].tolist()))
                logprobs[r] = TokenLogprobs(float(host[r, 1]), top)
        return Sampled(token_ids, logprobs)

    def _draw(self, x: torch.Tensor, rows: Sequence[RowSettings], seeds, steps) -> torch.Tensor:
        B, V = x.shape
        dev = x.device
        temp = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=dev)
        u = torch.tensor([uniform(s, t) for s, t in zip(seeds, steps)], dtype=torch.float64, device=dev)
        truncating = [r.top_k > 0 or r.top_p < 1 or r.min_p > 0 for r in rows]
        plain = _inverse_cdf(x / temp[:, None], u) if not all(truncating) else None
        if not any(truncating):
            return plain
        cut = _Truncation.of(rows, dev)
        if self.dense or dev.type == "cuda":
            ids = _draw_sorted(x / temp[:, None], cut, u)
        else:
            ids = _draw_top(x, temp, cut, u, self.top)
        return ids if plain is None else torch.where(torch.tensor(truncating, device=dev), ids, plain)


@dataclass(frozen=True)
class _Truncation:
    top_k: torch.Tensor  # (B,) 0 = off
    top_p: torch.Tensor  # (B,) 1 = off
    log_min_p: torch.Tensor  # (B,) -inf = off

    @classmethod
    def of(cls, rows: Sequence[RowSettings], dev) -> _Truncation:
        return cls(
            torch.tensor([r.top_k for r in rows], device=dev),
            torch.tensor([r.top_p for r in rows], dtype=torch.float64, device=dev),
            torch.tensor([math.log(r.min_p) if r.min_p > 0 else float("-inf") for r in rows], device=dev),
        )

    @property
    def renormalised(self) -> torch.Tensor:
        """Rows where min-p or top-k cut before top-p (top-p then reads the renormalised mass)."""
        return (self.top_k > 0) | torch.isfinite(self.log_min_p)


def _inverse_cdf(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An index of each row drawn from softmax(x): where u * total falls in the cumulative mass."""
    return _inverse_cdf_mass(torch.exp(x - x.max(-1, keepdim=True).values), u)


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


def _pick(
    rows: torch.Tensor,
    start: torch.Tensor,
    vals: torch.Tensor,
    keep: torch.Tensor,
    rank: torch.Tensor,
    top: torch.Tensor,
    cut: _Truncation,
    lse_full: torch.Tensor,
    u: torch.Tensor,
    B: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over each row's elements (grouped by row, each row sorted by value, descending, starting
    at `start`), then the draw. Returns the position (into the elements) of each row's drawn token,
    and how many of its elements each row kept."""
    mass = torch.exp((vals - top[rows]).double()) * keep
    kept_mass = torch.zeros(B, dtype=torch.float64, device=mass.device).index_add_(0, rows, mass)
    norm = torch.where(cut.renormalised, kept_mass, torch.exp((lse_full - top).double()))
    p = mass / norm[rows]
    before = _segment_cumsum(p, rows, start) - p
    keep = keep & ((before < cut.top_p[rows]) | (rank == 0))
    mass = mass * keep
    total = torch.zeros(B, dtype=torch.float64, device=mass.device).index_add_(0, rows, mass)
    upto = _segment_cumsum(mass, rows, start)
    kept = torch.zeros(B, dtype=torch.long, device=rows.device).index_add_(0, rows, keep.long())
    hit = keep & (upto > (u * total)[rows])
    # The first hit of each row; the row's last kept element when rounding leaves none.
    last_kept = torch.zeros(B, dtype=torch.long, device=rows.device).scatter_reduce_(
        0, rows, torch.where(keep, torch.arange(len(rows), device=rows.device), -1), "amax"
    )
    n = len(rows)
    first = torch.full((B,), n, dtype=torch.long, device=rows.device).scatter_reduce_(
        0, rows, torch.where(hit, torch.arange(n, device=rows.device), n), "amin"
    )
    return torch.where(first < n, first, last_kept), kept


def _draw_sorted(x: torch.Tensor, cut: _Truncation, u: torch.Tensor) -> torch.Tensor:
    """Every row's whole vocabulary sorted: no host round trip (the CUDA path)."""
    B, V = x.shape
    vals, idx = torch.sort(x, descending=True, dim=-1)
    top = vals[:, 0]
    rank = torch.arange(V, device=x.device).expand(B, V)
    keep = (vals >= (top + cut.log_min_p)[:, None]) & ((cut.top_k == 0)[:, None] | (rank < cut.top_k[:, None]))
    rows = torch.arange(B, device=x.device).repeat_interleave(V)
    pos, _ = _pick(
        rows,
        torch.arange(B, device=x.device) * V,
        vals.flatten(),
        keep.flatten(),
        rank.flatten(),
        top,
        cut,
        torch.logsumexp(x, -1),
        u,
        B,
    )
    return idx.flatten()[pos]


_BIN = 0.125  # nats per histogram bin of _draw_histogram
_BINS = 256  # the last bin holds every token more than 32 nats below the row's best


def _draw_histogram(x: torch.Tensor, cut: _Truncation, u: torch.Tensor) -> torch.Tensor:
    """Any row, exactly, without sorting its kept set: min-p and top-k are thresholds; top-p's cut is
    found in a histogram of the row's mass by distance to its best logit (_BIN nats a bin), and only
    the tokens of the bin where the cut falls are sorted. Then one inverse-CDF draw over the kept
    tokens. The CPU fallback (nonzero() needs the host)."""
    B, V = x.shape
    dev = x.device
    best = x.max(-1).values
    base = x >= (best + cut.log_min_p)[:, None]
    k_rows = (cut.top_k > 0).nonzero()[:, 0]
    if len(k_rows):
        k = cut.top_k[k_rows].clamp(max=V)
        kth = torch.topk(x[k_rows], int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        base[k_rows] &= x[k_rows] >= kth
    mass = torch.exp(x - best[:, None]) * base  # top-p reads the mass min-p and top-k kept
    tau = torch.full((B,), float("-inf"), device=dev)
    p_rows = (cut.top_p < 1).nonzero()[:, 0]
    if len(p_rows):
        xp, mp, bp = x[p_rows], mass[p_rows], best[p_rows]
        target = cut.top_p[p_rows] * mp.sum(-1, dtype=torch.float64)
        bins = ((bp[:, None] - xp) / _BIN).clamp(max=_BINS - 1).long()
        hist = torch.zeros(len(p_rows), _BINS, dtype=torch.float64, device=dev).scatter_add_(1, bins, mp.double())
        before = hist.cumsum(1) - hist
        c = (before < target[:, None]).sum(1) - 1  # the cut bin: bins before it are kept, bins after not
        rows, cols = ((bins == c[:, None]) & (mp > 0)).nonzero(as_tuple=True)
        vals = xp[rows, cols]
        key = rows.double() * 2 + ((bp[rows] - vals) / _BIN - c[rows]).double().clamp(0, 1)  # row, then value down
        order = torch.argsort(key)
        rows, vals, p = rows[order], vals[order], mp[rows[order], cols[order]].double()
        start, _ = _segments(rows, len(p_rows))
        kept = before[rows, c[rows]] + _segment_cumsum(p, rows, start) - p < target[rows]
        tau_p = torch.full((len(p_rows),), float("inf"), device=dev).scatter_reduce_(0, rows[kept], vals[kept], "amin")
        tau[p_rows] = tau_p
    return _inverse_cdf_mass(mass * (x >= tau[:, None]), u)


def _inverse_cdf_mass(mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cum = mass.double().cumsum(-1)
    i = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    return i.clamp(max=mass.shape[-1] - 1)


def _largest(x: torch.Tensor, k: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) of each row, in fewer passes on CPU (where topk over a 128K vocabulary costs
    ~20 elementwise passes): the k largest lie in the k chunks of `chunk` tokens with the largest
    maxima, so one max pass picks those chunks and topk runs over them alone."""
    B, V = x.shape
    if V % chunk or V < 4 * k * chunk:
        return torch.topk(x, k, dim=-1)
    chunks = torch.topk(x.view(B, V // chunk, chunk).amax(-1), k, dim=-1).indices
    where = (chunks[:, :, None] * chunk + torch.arange(chunk, device=x.device)).view(B, -1)
    vals, j = torch.topk(x.gather(1, where), k, dim=-1)
    return vals, where.gather(1, j)


def _draw_top(x: torch.Tensor, temp: torch.Tensor, cut: _Truncation, u: torch.Tensor, top: int) -> torch.Tensor:
    """Draw among each row's `top` largest logits (found on the raw logits: temperature keeps the
    order), exact when the row's kept set lies inside them; the other rows go to _draw_histogram."""
    B, V = x.shape
    dev = x.device
    K = min(V, max(top, int(cut.top_k.max())))
    vals, idx = _largest(x, K)
    vals = vals / temp[:, None]
    rank = torch.arange(K, device=dev).expand(B, K)
    best = vals[:, 0]
    keep = (vals >= (best + cut.log_min_p)[:, None]) & ((cut.top_k == 0)[:, None] | (rank < cut.top_k[:, None]))
    rows = torch.arange(B, device=dev).repeat_interleave(K)
    pos, kept = _pick(
        rows,
        torch.arange(B, device=dev) * K,
        vals.flatten(),
        keep.flatten(),
        rank.flatten(),
        best,
        cut,
        torch.logsumexp(x / temp[:, None], -1),
        u,
        B,
    )
    ids = idx.flatten()[pos]
    if K == V:
        return ids
    # Inside: the last candidate is not kept, and min-p's set (what top-p renormalised) ends before it.
    inside = (kept < K) & ((cut.top_k > 0) | ~torch.isfinite(cut.log_min_p) | (best + cut.log_min_p > vals[:, -1]))
    if bool(inside.all()):
        return ids
    redo = (~inside).nonzero()[:, 0]
    sub = _Truncation(cut.top_k[redo], cut.top_p[redo], cut.log_min_p[redo])
    ids[redo] = _draw_histogram(x[redo] / temp[redo, None], sub, u[redo])
    return ids
