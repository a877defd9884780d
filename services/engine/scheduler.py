"""The scheduler: which sequences run in a step, with which tokens, in which KV-cache blocks.

Pure Python (no tensors), so its policy is tested on its own. Each `schedule()`:

1. admits waiting requests (FCFS) into free batch rows ("slots", at most `max_num_seqs`) while the
   block pool can hold them to the end (prompt + max_tokens, so a running sequence never waits for
   memory). With prefix caching a prompt first takes the longest run of cached full blocks that
   starts it (services/engine/blocks.py) and computes only the rest;
2. decodes every running sequence past its prompt (one token each);
3. spends the rest of the step's token budget on prefill chunks (at most `prefill_chunk` tokens of
   one sequence), oldest first, so long prompts are cut into chunks that interleave with other
   sequences' decode steps;
4. gives each scheduled sequence the blocks its new tokens go to, copying a shared block it must
   write into first (`copies`: copy-on-write).

The engine applies the plan through the model runner, then reports back with `step_done`, which
registers the blocks that became full in the prefix cache.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from services.engine.blocks import BlockPool
from services.engine.config import EngineConfig
from services.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src block, dst block), before the forward
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
        self.bs = config.block_size
        self.pool = BlockPool(config.total_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order
        self.slot_seq: list[Sequence | None] = [None] * config.max_num_seqs
        self.reserved = 0  # blocks running sequences may still take
        self.prompt_tokens = 0  # prompt tokens admitted
        self.cached_tokens = 0  # of which taken from the prefix cache

    def blocks_for(self, seq: Sequence) -> int:
        """Blocks a request needs at most: its prompt and max_tokens."""
        return -(-(len(seq.prompt_ids) + seq.params.max_tokens) // self.bs)

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
        self.pool.release(seq.blocks)
        self.reserved -= seq.reserve
        seq.blocks, seq.reserve = [], 0
        seq.blocks_version += 1
        if slot is not None and self.slot_seq[slot] is seq:
            self.slot_seq[slot] = None
        return slot

    @property
    def num_free_slots(self) -> int:
        return sum(s is None for s in self.slot_seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ---
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._admit()
        budget = self.config.max_num_batched_tokens
        for seq in self.running:
            if not seq.in_prefill:
                out.decode.append(seq)
                out.decode_tokens.append(seq.next_input())
                self._make_room(seq, seq.num_computed, seq.num_computed + 1, out)
        budget -= len(out.decode)
        for seq in self.running:
            if not seq.in_prefill:
                continue
            # At least a small chunk each step, so decode-heavy batches cannot starve prefill.
            room = max(budget, min(self.bs, self.config.prefill_chunk)) if not out.prefill else budget
            n = min(len(seq.prompt_ids) - seq.num_computed, self.config.prefill_chunk, room)
            if n <= 0:
                break
            out.prefill.append((seq, seq.num_computed, seq.num_computed + n))
            self._make_room(seq, seq.num_computed, seq.num_computed + n, out)
            budget -= n
        return out

    def _admit(self) -> None:
        pool = self.pool
        while self.waiting and None in self.slot_seq:
            seq = self.waiting[0]
            n_prompt = len(seq.prompt_ids)
            # Leave at least one prompt token to compute: its logits give the first output token.
            hits = pool.match(seq.prompt_ids, seq.cache_salt, n_prompt // self.bs)
            while True:
                n_hit = min(len(hits) * self.bs, n_prompt - 1)
                copy_on_write = n_hit < len(hits) * self.bs
                need = self.blocks_for(seq) - len(hits) + copy_on_write
                revived = sum(pool.refs[e.block] == 0 for e in hits)  # cached blocks nobody holds yet
                if pool.num_available - revived - self.reserved >= need or not hits:
                    break
                hits = []  # holding the hit (and its copy) would not fit where computing it all does
            if pool.num_available - revived - self.reserved < need:
                break  # FCFS: the head of the queue waits for blocks
            self.waiting.popleft()
            for e in hits:
                pool.hold(e.block)
            slot = self.slot_seq.index(None)
            seq.slot, seq.status = slot, Status.RUNNING
            seq.blocks, seq.block_uids = [e.block for e in hits], [e.uid for e in hits]
            seq.blocks_version += 1
            seq.reserve = need
            self.reserved += need
            seq.num_computed = seq.num_cached = n_hit
            self.slot_seq[slot] = seq
            self.running.append(seq)
            self.prompt_tokens += n_prompt
            self.cached_tokens += n_hit

    def _make_room(self, seq: Sequence, start: int, end: int, out: SchedulerOutput) -> None:
        """Blocks for positions start..end-1 of seq, the first of them copied if it is shared."""
        first = start // self.bs
        if first < len(seq.blocks) and not self.pool.writable(seq.blocks[first]):
            old, new = seq.blocks[first], self._allocate(seq)
            out.copies.append((old, new))
            self.pool.release([old])
            seq.blocks[first] = new
            seq.blocks_version += 1
        while len(seq.blocks) * self.bs < end:
            seq.blocks.append(self._allocate(seq))
            seq.blocks_version += 1

    def _allocate(self, seq: Sequence) -> int:
        seq.reserve -= 1
        self.reserved -= 1
        return self.pool.allocate()

    def step_done(self, out: SchedulerOutput) -> None:
        """The runner computed the plan's tokens: they are in the sequences' blocks now."""
        for seq in out.decode:
            seq.num_computed += 1
            self._register_full(seq)
        for seq, _, end in out.prefill:
            seq.num_computed = end
            self._register_full(seq)

    def _register_full(self, seq: Sequence) -> None:
        bs = self.bs
        while len(seq.block_uids) < seq.num_computed // bs:
            i = len(seq.block_uids)
            tokens = tuple(seq.token(j) for j in range(i * bs, (i + 1) * bs))
            parent = seq.block_uids[-1] if seq.block_uids else 0
            seq.block_uids.append(self.pool.register(parent, seq.cache_salt, tokens, seq.blocks[i]))

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        """Share of the cache's blocks that running sequences hold."""
        return self.pool.num_used / self.pool.num_usable
