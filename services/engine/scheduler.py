"""The scheduler: which sequences run in a step, in which KV-cache slot, with which tokens.

Pure Python (no tensors), so its policy is tested on its own. Each `schedule()`:

1. admits waiting requests (FCFS) into free slots. With prefix caching it looks up the longest
   block-aligned prefix of the prompt already computed in some slot -- a running sequence, whose
   first tokens never change, or a freed slot whose contents are still there -- and reuses it: in
   place when that slot is free, else by a copy into the new slot;
2. decodes every running sequence past its prompt (one token each);
3. spends the rest of the step's token budget on prefill chunks (at most `prefill_chunk` tokens
   of one sequence), oldest first, so long prompts are cut into chunks that interleave with
   other sequences' decode steps.

The engine applies the plan through the model runner, then reports back with `step_done`.
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from services.engine.config import EngineConfig
from services.engine.sequence import Sequence, Status


def block_hashes(tokens: list[int], block_size: int, n_blocks: int) -> list[int]:
    """Chained hashes of the first n_blocks full blocks: block i's hash covers tokens[: (i+1)*bs]."""
    out, h = [], 0
    for i in range(n_blocks):
        h = hash((h, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out


class PrefixIndex:
    """Which slots hold which computed prefixes, by chained block hash."""

    def __init__(self, n_slots: int, block_size: int):
        self.bs = block_size
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]  # computed tokens per slot
        self.hashes: list[list[int]] = [[] for _ in range(n_slots)]
        self.where: dict[int, set[int]] = collections.defaultdict(set)

    def match(self, tokens: list[int], limit: int) -> tuple[set[int], int]:
        """(slots holding it, tokens) for the longest cached prefix of at most `limit` tokens."""
        n = 0
        candidates: set[int] = set()
        for h in block_hashes(tokens, self.bs, limit // self.bs):
            holders = self.where.get(h)
            nxt = set(holders) if not n and holders else (candidates & holders if holders else set())
            if not nxt:
                break
            candidates, n = nxt, n + self.bs
        return candidates, n

    def truncate(self, slot: int, n: int) -> None:
        """Slot keeps its first n tokens (n a multiple of the block size or less than one block)."""
        keep = n // self.bs
        for h in self.hashes[slot][keep:]:
            holders = self.where[h]
            holders.discard(slot)
            if not holders:
                del self.where[h]
        del self.hashes[slot][keep:]
        del self.tokens[slot][n:]

    def copy(self, src: int, dst: int, n: int) -> None:
        self.truncate(dst, 0)
        self.tokens[dst] = self.tokens[src][:n]
        self.hashes[dst] = self.hashes[src][: n // self.bs]
        for h in self.hashes[dst]:
            self.where[h].add(dst)

    def extend(self, slot: int, new_tokens: list[int]) -> None:
        toks = self.tokens[slot]
        toks.extend(new_tokens)
        hashes = self.hashes[slot]
        h = hashes[-1] if hashes else 0
        while (len(hashes) + 1) * self.bs <= len(toks):
            i = len(hashes)
            h = hash((h, tuple(toks[i * self.bs:(i + 1) * self.bs])))
            hashes.append(h)
            self.where[h].add(slot)


@dataclass
class SchedulerOutput:
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, tokens), in order
    resets: list[tuple[int, int]] = field(default_factory=list)  # (slot, kept tokens) for in-place reuse
    decode: list[Sequence] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)  # the token each decoding sequence feeds
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, end) of the prompt

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(e - s for _, s, e in self.prefill)


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        n = config.max_num_seqs
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order
        self.slot_seq: list[Sequence | None] = [None] * n
        self.free_since = [0] * n  # step counter when freed: least recently used is evicted first
        self.index = PrefixIndex(n, config.block_size) if config.enable_prefix_caching else None
        self._clock = itertools.count(1)
        self.prompt_tokens = 0  # prompt tokens admitted
        self.cached_tokens = 0  # of which taken from the prefix cache

    # --- requests in and out ---
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def free(self, seq: Sequence) -> int | None:
        """Take a sequence out (finished or aborted); returns its slot, now free."""
        slot = seq.slot
        if seq.status is Status.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq in self.running:
            self.running.remove(seq)
        seq.status = Status.FINISHED
        if slot is not None and self.slot_seq[slot] is seq:
            self.slot_seq[slot] = None
            self.free_since[slot] = next(self._clock)
        return slot

    @property
    def num_free_slots(self) -> int:
        return sum(s is None for s in self.slot_seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ---
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._admit(out)
        budget = self.config.max_num_batched_tokens
        for seq in self.running:
            if not seq.in_prefill:
                out.decode.append(seq)
                out.decode_tokens.append(seq.next_input())
        budget -= len(out.decode)
        for seq in self.running:
            if not seq.in_prefill:
                continue
            # At least a small chunk each step, so decode-heavy batches cannot starve prefill.
            room = max(budget, min(self.config.block_size, self.config.prefill_chunk)) if not out.prefill else budget
            n = min(len(seq.prompt_ids) - seq.num_computed, self.config.prefill_chunk, room)
            if n <= 0:
                break
            out.prefill.append((seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        return out

    def _admit(self, out: SchedulerOutput) -> None:
        while self.waiting and None in self.slot_seq:
            seq = self.waiting.popleft()
            free = [s for s, q in enumerate(self.slot_seq) if q is None]
            src, n = None, 0
            if self.index is not None:
                # Leave at least one prompt token to compute: its logits give the first output token.
                holders, n = self.index.match(seq.prompt_ids, len(seq.prompt_ids) - 1)
                if holders:
                    idle = [s for s in holders if self.slot_seq[s] is None]
                    src = min(idle) if idle else min(holders)
            if src is not None and self.slot_seq[src] is None:
                slot = src  # the freed slot still holds the prefix: reuse in place
            else:
                # Evict the emptiest, least recently freed slot; lowest id keeps the batch compact.
                empties = [s for s in free if not (self.index and self.index.tokens[s])]
                slot = empties[0] if empties else min(free, key=lambda s: self.free_since[s])
            if src is None or n == 0:
                n = 0
                out.resets.append((slot, 0))
                if self.index is not None:
                    self.index.truncate(slot, 0)
            elif src == slot:
                out.resets.append((slot, n))
                self.index.truncate(slot, n)
            else:
                out.copies.append((src, slot, n))
                self.index.copy(src, slot, n)
            seq.slot, seq.status = slot, Status.RUNNING
            seq.num_computed = seq.num_cached = n
            self.slot_seq[slot] = seq
            self.running.append(seq)
            self.prompt_tokens += len(seq.prompt_ids)
            self.cached_tokens += n

    def step_done(self, out: SchedulerOutput) -> None:
        """The runner computed the plan's tokens: they are in the slots' caches now."""
        for seq, tok in zip(out.decode, out.decode_tokens):
            seq.num_computed += 1
            if self.index is not None:
                self.index.extend(seq.slot, [tok])
        for seq, start, end in out.prefill:
            seq.num_computed = end
            if self.index is not None:
                self.index.extend(seq.slot, seq.prompt_ids[start:end])

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
