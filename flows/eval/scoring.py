"""Log-likelihood scoring on herd's KV cache: every context computed once, choices scored from it.

`Scorer.loglikelihood_tokens([(context, continuation), ...])` returns (log p(continuation |
context), is_greedy) per request, exactly the quantity lm-evaluation-harness computes, but:

  * requests with the same context are one group: the context goes through the model once;
    single-token continuations (MMLU's " A") are read off its last logits, longer ones are
    forked from the context's cache rows (copied keys/values) and only their own tokens run;
  * groups are sorted by their tokens, so contexts that share a prefix sit together; a prefix
    shared by a run of groups (the description and few-shot examples of an MMLU subject) is
    computed once and copied into every row of every batch that starts with it;
  * contexts are batched (right-padded; a row's padding sits after its last token, where the
    causal mask keeps it invisible), and the output projection runs only at the positions
    whose logits are used;
  * a context longer than the model's window is truncated from the left, keeping the
    continuation whole (as lm-eval: at most max_length + 1 tokens of context + continuation).

Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the
continuation, the pair is encoded whole, and the continuation is the whole minus the context's
tokens. An empty context is replaced by the prefix token (BOS, else EOS). Contexts start with
BOS where transformers' tokenizer adds it by default (Llama 3; not SmolLM2), see default_add_bos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.kv_cache import KVCache
from model.model import linear, pack_weight
from model.ragged import RaggedRows


@dataclass
class _Group:
    context: list[int]
    conts: list[list[int]]
    index: list[int]  # request index of each continuation


def _lcp(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _project_at(rows: torch.Tensor, cols: torch.Tensor):
    """A `head` for Transformer.forward: the output projection at (row, col) positions only, (B, 1, V)."""

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden[rows, cols][:, None], weight)

    return head


def default_add_bos(tokenizer) -> bool:
    """Whether a plain-text prompt starts with BOS, as transformers' tokenizer for the same model
    does by default: Llama 3 (`<|begin_of_text|>`) yes; SmolLM2 and other GPT-2-style BPEs no."""
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None or not hasattr(tokenizer, "decode"):
        return False
    try:
        return tokenizer.decode([bos]) == "<|begin_of_text|>"
    except Exception:  # a tokenizer without that id in its table
        return False


class Scorer:
    """Batched log-likelihoods for a herd model (any object with herd's Transformer interface)."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 16,
        max_length: int | None = None,
        share_prefix: bool = True,
        min_prefix: int = 16,
        token_budget: int = 2048,
        add_bos: bool | None = None,
        pack: bool = True,
        pack_max_len: int = 1024,
        attn_budget: int = 2048,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.add_bos = default_add_bos(tokenizer) if add_bos is None else add_bos
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or model.config.max_seq_len)
        self.share_prefix = share_prefix
        self.min_prefix = min_prefix
        # per forward: rows x longest (forks), real tokens (packed rows). 2048 keeps a layer's widest
        # fp32 activation (SmolLM2's gate|up: 2048 x 3072) under glibc's 32 MiB mmap ceiling, so
        # freed activations are reused instead of faulted in afresh at every layer.
        self.token_budget = token_budget
        self.pack = pack  # contexts in no shared-prefix family: packed rows (see _score_packed)
        self.pack_max_len = pack_max_len  # a row's length beyond its context and longest continuation
        self.attn_budget = attn_budget  # padded row slots per attention call (packed rows)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.stats = {"forward_tokens": 0, "prefix_tokens": 0, "truncated": 0}
        self._head_blocks = None  # ((weight address, block width), the output projection in packed blocks)

    # --- tokenisation (lm-eval's rules) ---
    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tokenizer.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenizer.encode(context + continuation, bos=self.add_bos)
        ctx = self.tokenizer.encode(context, bos=self.add_bos)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    def score_choices(self, context: str, choices: list[str], delimiter: str = " ") -> list[tuple[float, bool]]:
        return self.loglikelihood([(context, delimiter + c) for c in choices])

    # --- scoring ---
    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, _Group] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:
                raise ValueError("empty context: use the prefix token (Scorer.encode_pair does)")
            if not cont:
                out[i] = (0.0, True)
                continue
            key = tuple(ctx)
            g = groups.get(key)
            if g is None:
                g = groups[key] = _Group(list(ctx), [], [])
            g.conts.append(list(cont))
            g.index.append(i)
        ordered = sorted(groups.values(), key=lambda g: g.context)
        for g in ordered:
            self._truncate(g)
        for prefix_len, family in self._families(ordered):
            if not prefix_len and self.pack:
                for g, scores in self._score_packed(family):
                    for i, sc in zip(g.index, scores):
                        out[i] = sc
                continue
            family.sort(key=lambda g: len(g.context))
            prefix_kv = self._prefill_prefix(family[0].context[:prefix_len]) if prefix_len else None
            for start in range(0, len(family), self.batch_size):
                batch = family[start : start + self.batch_size]
                for g, scores in zip(batch, self._score_batch(batch, prefix_len, prefix_kv)):
                    for i, s in zip(g.index, scores):
                        out[i] = s
        return out  # type: ignore[return-value]

    def _truncate(self, g: _Group) -> None:
        longest = max(len(c) for c in g.conts)
        if longest > self.max_length:
            raise ValueError(f"continuation of {longest} tokens exceeds the window of {self.max_length}")
        keep = self.max_length + 1 - longest
        if len(g.context) > keep:
            g.context = g.context[-keep:]
            self.stats["truncated"] += 1

    def _families(self, ordered: list[_Group]):
        """Split the sorted groups into families sharing a prefix (>= min_prefix tokens).

        With lcp[i] the common prefix of neighbours i and i+1, a segment is one family when its
        smallest lcp is at least half its median; else it splits wherever lcp falls below that and
        each part is looked at again. MMLU: ~500 shared tokens inside a subject, ~14 across.
        Groups in no family come last, as family 0 (no shared prefix), batched together.
        """
        if not self.share_prefix or len(ordered) < 2:
            yield 0, list(ordered)
            return
        lcp = [_lcp(ordered[i].context, ordered[i + 1].context) for i in range(len(ordered) - 1)]
        loners: list[_Group] = []

        def split(lo: int, hi: int):
            if lo == hi:
                loners.append(ordered[lo])
                return
            seg = lcp[lo:hi]
            cut = max(self.min_prefix, sorted(seg)[len(seg) // 2] // 2)
            if min(seg) >= cut:
                members = ordered[lo : hi + 1]
                P = self._prefix_len(members, min(seg))
                if P:
                    yield P, members
                else:
                    loners.extend(members)
                return
            start = lo
            for i in range(lo, hi):
                if lcp[i] < cut:
                    yield from split(start, i)
                    start = i + 1
            yield from split(start, hi)

        yield from split(0, len(ordered) - 1)
        if loners:
            yield 0, loners

    def _prefix_len(self, run: list[_Group], common: int) -> int:
        if len(run) < 2:
            return 0
        # every row keeps at least one token of its own: its last logits come from that step
        common = min(common, min(len(g.context) for g in run) - 1)
        return common if common >= self.min_prefix else 0

    def _prefill_prefix(self, prefix: list[int]):
        cache = KVCache.for_model(self.model.config, 1, len(prefix), dtype=self.dtype, device=self.device)
        self.model(torch.tensor([prefix], device=self.device), cache=cache, last_only=True)
        self.stats["prefix_tokens"] += len(prefix)
        self.stats["forward_tokens"] += len(prefix)
        return cache.k, cache.v

    def _score_batch(self, batch: list[_Group], P: int, prefix_kv) -> list[list[tuple[float, bool]]]:
        model, dev = self.model, self.device
        suffixes = [g.context[P:] for g in batch]
        S = max(len(s) for s in suffixes)
        longest_cont = max(len(c) for g in batch for c in g.conts)
        B = len(batch)
        cache = KVCache.for_model(model.config, B, P + S + longest_cont, dtype=self.dtype, device=dev)
        if P:
            k, v = prefix_kv
            cache.k[:, :, :, :P] = k
            cache.v[:, :, :, :P] = v
            cache.advance(P)
        tokens = torch.zeros(B, S, dtype=torch.long)
        for r, s in enumerate(suffixes):
            tokens[r, : len(s)] = torch.tensor(s)
        lens = torch.tensor([len(s) for s in suffixes])
        rows = torch.arange(B)
        head = _project_at(rows.to(dev), (lens - 1).to(dev))
        last = model(tokens.to(dev), cache=cache, head=head)[:, 0].float().log_softmax(-1)  # (B, V)
        cache.advance(lens.to(dev))
        self.stats["forward_tokens"] += int(lens.sum())

        results: list[list[tuple[float, bool] | None]] = [[None] * len(g.conts) for g in batch]
        forks = []  # (batch row, choice idx, cont) for continuations longer than one token
        for r, g in enumerate(batch):
            greedy = int(last[r].argmax())
            for j, cont in enumerate(g.conts):
                if len(cont) == 1:
                    results[r][j] = (float(last[r, cont[0]]), greedy == cont[0])
                else:
                    forks.append((r, j, cont))
        if forks:
            self._score_forks(cache, last, forks, results)
        return results  # type: ignore[return-value]

    def _score_forks(self, src: KVCache, last: torch.Tensor, forks, results) -> None:
        """Each multi-token continuation gets a row holding a copy of its context's keys/values."""
        model, dev = self.model, self.device
        forks = sorted(forks, key=lambda f: len(f[2]))  # chunks of similar lengths: little padding
        longest = max(len(c) for _, _, c in forks)
        span = int(src.lengths.max()) + longest
        start = 0
        while start < len(forks):
            stop = start + 1
            while stop < len(forks) and (stop - start + 1) * len(forks[stop][2]) <= self.token_budget:
                stop += 1
            chunk = forks[start:stop]
            start = stop
            R = len(chunk)
            src_rows = torch.tensor([r for r, _, _ in chunk], device=dev)
            cache = KVCache.for_model(model.config, R, span, dtype=self.dtype, device=dev)
            width = int(src.lengths[src_rows].max())
            cache.k[:, :, :, :width] = src.k[:, src_rows, :, :width]
            cache.v[:, :, :, :width] = src.v[:, src_rows, :, :width]
            cache.lengths[:] = src.lengths[src_rows]
            C = max(len(c) for _, _, c in chunk) - 1
            tokens = torch.zeros(R, C, dtype=torch.long)
            for i, (_, _, cont) in enumerate(chunk):
                tokens[i, : len(cont) - 1] = torch.tensor(cont[:-1])
            hidden = model(tokens.to(dev), cache=cache, head=lambda h, _w: h)  # (R, C, dim), normed
            self.stats["forward_tokens"] += sum(len(c) - 1 for _, _, c in chunk)
            rows = torch.tensor([i for i, (_, _, c) in enumerate(chunk) for _ in c[1:]], device=dev)
            cols = torch.tensor([t for _, _, c in chunk for t in range(len(c) - 1)], device=dev)
            ll, greedy = self._target_logprobs(
                hidden[rows, cols], torch.tensor([t for _, _, c in chunk for t in c[1:]], device=dev)
            )
            a = 0
            for r, j, cont in chunk:
                b = a + len(cont) - 1
                first = last[r, cont[0]]
                results[r][j] = (
                    float(first) + float(ll[a:b].sum()),
                    bool(int(last[r].argmax()) == cont[0] and greedy[a:b].all()),
                )
                a = b

    # --- packed rows: a context and all its continuations in one row ---
    def _pack_rows(self, groups: list[_Group]) -> list[tuple[_Group, list[int]]]:
        """(group, continuation indices) per row: a context with as many of its continuations as
        fit in pack_max_len (a row always holds at least one)."""
        rows = []
        for g in groups:
            cur, n = [], len(g.context)
            for j, c in enumerate(g.conts):
                if cur and n + len(c) - 1 > max(self.pack_max_len, len(g.context) + len(c) - 1):
                    rows.append((g, cur))
                    cur, n = [], len(g.context)
                cur.append(j)
                n += len(c) - 1
            rows.append((g, cur))
        return rows

    def _score_packed(self, groups: list[_Group]):
        """Yield (group, scores) for groups in no shared-prefix family.

        A row holds the context, then each continuation but its last token, every continuation at
        the positions right after the context: an attention mask lets a continuation's tokens
        see the context and its own earlier tokens only, so the context runs once for all of its
        continuations, with no cache to copy. Rows are sorted by length and batched up to
        token_budget (little padding). The output projection runs only where a continuation's
        token is predicted, in chunks: log p = logit[target] - logsumexp(logits), in fp32,
        without a log-softmax over the whole vocabulary at every position."""
        rows = self._pack_rows(groups)
        lengths = [len(g.context) + sum(len(g.conts[j]) - 1 for j in js) for g, js in rows]
        order = sorted(range(len(rows)), key=lambda r: lengths[r])
        results = {id(g): [None] * len(g.conts) for g in groups}
        start = 0
        while start < len(order):
            stop, n = start + 1, lengths[order[start]]
            while stop < len(order) and n + lengths[order[stop]] <= self.token_budget:
                n += lengths[order[stop]]
                stop += 1
            batch = [rows[r] for r in order[start:stop]]
            for (g, js), scores in zip(batch, self._score_packed_batch(batch)):
                for j, sc in zip(js, scores):
                    results[id(g)][j] = sc
            start = stop
        for g in groups:
            yield g, results[id(g)]

    def _score_packed_batch(self, batch: list[tuple[_Group, list[int]]]) -> list[list[tuple[float, bool]]]:
        """One forward over the batch's rows laid end to end (model.ragged.RaggedRows: no padding in the
        matmuls): a row's context tokens see the context up to themselves, a continuation's tokens
        the whole context and their own continuation up to themselves."""
        dev = self.device
        tokens, pos, prefix, seg = [], [], [], []  # flat, over the rows laid end to end
        picks, targets, spans, starts = [], [], [], [0]  # picks: flat positions whose logits are used
        for g, js in batch:
            L, base = len(g.context), len(tokens)
            tokens += g.context
            pos += range(L)
            prefix += [0] * L
            seg += [0] * L
            for j in js:
                c = g.conts[j]
                first, at = len(targets), len(tokens)
                picks += [base + L - 1] + list(range(at, at + len(c) - 1))
                targets += c
                spans.append((first, len(targets)))
                tokens += c[:-1]
                pos += range(L, L + len(c) - 1)
                prefix += [L] * (len(c) - 1)
                seg += [at - base] * (len(c) - 1)
            starts.append(len(tokens))
        rows = RaggedRows(*(torch.tensor(x, device=dev) for x in (starts, prefix, seg)), attn_budget=self.attn_budget)
        picks_t = torch.tensor(picks, device=dev)
        hidden = self.model(
            torch.tensor(tokens, device=dev)[None],
            positions=torch.tensor(pos, device=dev)[None],
            attn_mask=rows,
            head=lambda h, _w: h[0, picks_t],
        )
        self.stats["forward_tokens"] += len(tokens)
        ll, greedy = self._target_logprobs(hidden, torch.tensor(targets, device=dev))
        out, k = [], 0
        for _g, js in batch:
            row = []
            for _ in js:
                a, b = spans[k]
                row.append((float(ll[a:b].sum()), bool(greedy[a:b].all())))
                k += 1
            out.append(row)
        return out

    def _target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, rows: int = 512, cols: int = 4096):
        """log p(target) and whether it is the argmax (the first, as torch.argmax), per position.

        The output projection runs on blocks of `rows` positions by `cols` vocabulary entries: a
        block's logits stay small enough for the cache, and a block as wide as the vocabulary with few
        rows runs the matmul at about two thirds of the speed. Each block folds into a running max,
        argmax and sum of exponentials (log p = logit[target] - logsumexp), in fp32."""
        weight = self.model.output_weight
        if self._head_blocks is None or self._head_blocks[0] != (weight.data_ptr(), cols):
            blocks = [pack_weight(weight[c : c + cols]) for c in range(0, weight.shape[0], cols)]
            self._head_blocks = ((weight.data_ptr(), cols), blocks)
        packed = self._head_blocks[1]
        lls, greedy = [], []
        for a in range(0, len(targets), rows):
            h, t = hidden[a : a + rows], targets[a : a + rows]
            top = torch.full(t.shape, -math.inf, device=t.device)
            total = torch.zeros(t.shape, device=t.device)
            argmax, picked = torch.zeros_like(t), torch.zeros(t.shape, device=t.device)
            for c, block in zip(range(0, weight.shape[0], cols), packed):
                logits = linear(h, weight[c : c + cols], block).float()
                here = (t >= c) & (t < c + logits.shape[1])
                at = (t - c).clamp(0, logits.shape[1] - 1)[:, None]
                picked = torch.where(here, logits.gather(1, at)[:, 0], picked)
                best, where = logits.max(-1)
                higher = best > top  # strictly: an equal later maximum leaves the first argmax
                argmax = torch.where(higher, where + c, argmax)
                new_top = torch.maximum(top, best)
                total = total * torch.exp(top - new_top) + logits.sub_(new_top[:, None]).exp_().sum(-1)
                top = new_top
            lls.append(picked - (top + total.log()))
            greedy.append(argmax == t)
        return torch.cat(lls).double().cpu(), torch.cat(greedy).cpu()

    # --- rolling (perplexity) ---
    def rolling_windows(self, tokens: list[int], max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint rolling windows (context_len 1): every token predicted exactly once."""
        L = max_length or self.max_length
        if not tokens:
            return []
        windows = []
        first = min(L, len(tokens))
        windows.append(([self.prefix_token_id] + tokens[: first - 1], tokens[:first]))
        done = first
        while done < len(tokens):
            n = min(len(tokens) - done, L)
            end = done + n
            windows.append((tokens[end - L - 1 : end - 1], tokens[end - n : end]))
            done += n
        # make the context disjoint from the prediction: keep what precedes the first predicted token
        return [(ctx[: len(ctx) - (len(pred) - 1)], pred) for ctx, pred in windows]

    def loglikelihood_rolling(self, texts: list[str], max_length: int | None = None) -> list[tuple[float, int]]:
        """(sum of token log-likelihoods, token count) per text."""
        reqs, owner = [], []
        for t, text in enumerate(texts):
            for w in self.rolling_windows(self.tokenizer.encode(text), max_length):
                reqs.append(w)
                owner.append(t)
        scores = self.loglikelihood_tokens(reqs)
        totals = [[0.0, 0] for _ in texts]
        for (ll, _), t, (_, pred) in zip(scores, owner, reqs):
            totals[t][0] += ll
            totals[t][1] += len(pred)
        return [(ll, n) for ll, n in totals]


def reference_loglikelihood(
    model, requests: list[tuple[list[int], list[int]]], max_length: int
) -> list[tuple[float, bool]]:
    """One full forward per request, no cache, no batching: the obviously-correct baseline for tests."""
    out = []
    with torch.inference_mode():
        for ctx, cont in requests:
            inp = (ctx + cont)[-(max_length + 1) :][:-1]
            logits = model(torch.tensor([inp])).float().log_softmax(-1)[0, -len(cont) :]
            target = torch.tensor(cont)
            out.append((float(logits.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
    return out


def acc_from_scores(lls: list[float], choices: list[str], gold: int) -> dict:
    """acc (argmax log-likelihood) and acc_norm (divided by the choice's length in characters, as lm-eval)."""
    pred = max(range(len(lls)), key=lambda i: lls[i])
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]
    pred_norm = max(range(len(lls)), key=lambda i: norm[i])
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}
