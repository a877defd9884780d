"""The model runner: executes a scheduler step on the KV cache and samples.

* decode: one token for each selected slot, one batched forward (`KVCache.select`). When the
  slots are not contiguous (sequences finished in between) the forward runs over their hull
  (`KVCache.select_hull`): the idle rows in between write to the padding, which costs less than
  gathering every selected slot's keys and values in every layer;
* prefill: chunks of several sequences, padded to a common length and run as one batch; each
  row's logits are read at its own last real token (padding writes past a row's length, which
  the cache overwrites later and the causal mask never shows to real tokens);
* sampling: greedy rows by one argmax, the others one by one with their own settings and
  seeded generators.
"""
from __future__ import annotations

import logging

import torch

from model.generate import greedy, sample_next
from model.kv_cache import KVCache

log = logging.getLogger("herd.engine")


class ModelRunner:
    def __init__(self, model, num_slots: int, max_model_len: int, pad: int = 0):
        self.model = model.eval()
        self.config = model.config
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        # `pad` extra positions absorb the padding of batched prefill chunks.
        self.cache = KVCache.for_model(self.config, num_slots, max_model_len + pad, dtype=self.dtype,
                                       device=self.device)
        self.max_model_len = max_model_len
        self.scratch = max_model_len + pad - 1 if pad else None  # a padding position no real token attends

    # --- cache bookkeeping ---
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.cache.copy_prefix(src, dst, n)

    def set_length(self, slot: int, n: int) -> None:
        self.cache.set_length(slot, n)

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def usage(self) -> float:
        """Share of the cache's token positions held by live sequences."""
        return float(self.cache.lengths.sum()) / (self.cache.batch_size * self.max_model_len)

    # --- forward ---
    @torch.inference_mode()
    def _forward(self, slots: list[int], tokens: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) at index `last` of each row (None: the last column)."""
        self.cache.select(slots)
        if last is None:
            return self.model(tokens, cache=self.cache, last_only=True)[:, -1]
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        # The head hook projects only each row's last real token, never the padding.
        return self.model(tokens, cache=self.cache, head=lambda h, w: self.model.project(h[rows, last]))

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        lo, hi = min(slots), max(slots) + 1
        if self.scratch is None or hi - lo == len(slots) or hi - lo > 2 * len(slots):
            logits = self._forward(slots, torch.tensor(tokens, device=self.device)[:, None], None)
        else:
            self.cache.select_hull(slots, self.scratch)
            fed = [0] * (hi - lo)  # idle rows of the hull feed any token; their output is dropped
            for slot, tok in zip(slots, tokens):
                fed[slot - lo] = tok
            rows = torch.tensor(slots, device=self.device) - lo
            logits = self.model(torch.tensor(fed, device=self.device)[:, None], cache=self.cache, last_only=True,
                                head=lambda h, w: self.model.project(h[rows, -1]))
        self.cache.advance(1)
        return logits

    def prefill(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """chunks: (slot, tokens); returns logits (len(chunks), V) after each chunk's last token."""
        out = [None] * len(chunks)
        for group in _pad_groups([len(t) for _, t in chunks]):
            T = max(len(chunks[i][1]) for i in group)
            rows = torch.zeros(len(group), T, dtype=torch.long)
            lens = []
            for r, i in enumerate(group):
                toks = chunks[i][1]
                rows[r, :len(toks)] = torch.tensor(toks)
                lens.append(len(toks))
            lens_t = torch.tensor(lens, device=self.device)
            uniform = min(lens) == T
            logits = self._forward([chunks[i][0] for i in group], rows.to(self.device),
                                   None if uniform else lens_t - 1)
            self.cache.advance(T if uniform else lens_t)
            for r, i in enumerate(group):
                out[i] = logits[r]
        return torch.stack(out)

    # --- sampling ---
    def sample(self, logits: torch.Tensor, seqs: list) -> list[int]:
        greedy_ids = greedy(logits).tolist()
        out = []
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                out.append(greedy_ids[row])
                continue
            if p.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(device=self.device).manual_seed(p.seed)
            try:
                out.append(sample_row(logits[row], p, seq.generator))
            except RuntimeError:  # degenerate settings (nothing left to sample): one request, not the engine
                log.warning("sampling failed for %s (%s); taking the argmax", seq.request_id, p)
                out.append(greedy_ids[row])
        return out


def _pad_groups(lengths: list[int], waste: float = 0.25) -> list[list[int]]:
    """Group rows of similar length so that padding adds at most ~`waste` of the real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, cur, real = [], [], 0
    for i in order:
        if cur:
            T = lengths[cur[0]]
            if T * (len(cur) + 1) > (real + lengths[i]) * (1 + waste) + 8:
                groups.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        groups.append(cur)
    return groups


def sample_row(logits: torch.Tensor, p, generator=None, candidates: int = 1024) -> int:
    """One token from (V,) logits, as model.generate.sample_next but without sorting the whole
    vocabulary when the top `candidates` already hold the nucleus (the usual case)."""
    x = logits.float() / p.temperature
    V = x.shape[-1]
    k = min(p.top_k or candidates, V)
    if k == V or (p.top_k == 0 and p.top_p >= 1.0):
        return int(sample_next(logits[None], p, generator)[0])
    vals, idx = torch.topk(x, k)  # sorted, descending
    if p.top_k:
        probs = torch.softmax(vals, -1)  # top-k first, then top-p within it (as sample_next)
    else:
        probs = torch.exp(vals - torch.logsumexp(x, -1))
        if float(probs.sum()) < p.top_p:  # the nucleus is wider than the candidates
            return int(sample_next(logits[None], p, generator)[0])
    if p.top_p < 1.0:
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[0] = False
        probs = probs.masked_fill(drop, 0.0)
    return int(idx[torch.multinomial(probs / probs.sum(), 1, generator=generator)[0]])
