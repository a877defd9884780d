"""The KV-cache blocks: who holds which block, and the prefix cache (pure Python, no tensors).

A block holds `block_size` token positions of one sequence's keys/values (model/paged_cache.py). A
sequence holds a list of blocks (its block table). Full blocks are registered in the prefix cache
under their content -- the parent block's entry, the request's `cache_salt` and the block's tokens --
so a later prompt that starts with the same tokens (and salt) takes the same blocks, with a reference
count, instead of computing them again. A registered block is never written again: a sequence that
must write into one (it recomputes the last prompt token of a fully cached prompt) copies it first
(copy-on-write). A lookup compares the stored tokens and parent, not only a hash, so two contents
whose hashes collide can never share a block; the salt keeps tenants' caches apart.

Blocks nobody holds stay cached and are evicted least recently used first when a sequence needs a
block. Block 0 is the null block (model.paged_cache.NULL_BLOCK) and is never handed out.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

from model.paged_cache import NULL_BLOCK


def block_hash(parent: int, salt: str | None, tokens: tuple[int, ...]) -> int:
    """The prefix cache's bucket of a block's content (entries in a bucket are compared in full)."""
    return hash((parent, salt, tokens))


@dataclass(frozen=True)
class Entry:
    """A registered block's content: its own id (never reused), its parent's id, salt and tokens."""

    uid: int
    parent: int  # 0 for a first block
    salt: str | None
    tokens: tuple[int, ...]
    block: int
    key: int  # block_hash of the content, its bucket


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.caching = enable_prefix_caching
        self.free: collections.deque[int] = collections.deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self.refs = [0] * num_blocks
        self.entry_of: list[Entry | None] = [None] * num_blocks
        self.buckets: dict[int, list[Entry]] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._uids = itertools.count(1)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_available(self) -> int:
        """Blocks a sequence could get now: free ones and cached ones nobody holds."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_available

    # --- holding blocks ---
    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            self._unregister(block)
        else:
            raise RuntimeError("no free KV-cache block (the scheduler admits only what fits)")
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more holder of a cached block (a prefix hit)."""
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        # Freed in reverse, so a sequence's tail blocks are evicted before the prefix they extend.
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.entry_of[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def writable(self, block: int) -> bool:
        """False for a block another sequence holds or the prefix cache has registered."""
        return self.refs[block] == 1 and self.entry_of[block] is None

    # --- the prefix cache ---
    def match(self, tokens: list[int], salt: str | None, max_blocks: int) -> list[Entry]:
        """The registered entries of the longest run of full blocks that starts `tokens`."""
        if not self.caching:
            return []
        out, parent, bs = [], 0, self.block_size
        for i in range(min(max_blocks, len(tokens) // bs)):
            entry = self._find(parent, salt, tuple(tokens[i * bs : (i + 1) * bs]))
            if entry is None:
                break
            out.append(entry)
            parent = entry.uid
        return out

    def register(self, parent: int, salt: str | None, tokens: tuple[int, ...], block: int) -> int:
        """Register a full block; returns the uid its children chain from. Content already cached in
        another block keeps that entry (this block stays private)."""
        if not self.caching:
            return 0
        known = self._find(parent, salt, tokens)
        if known is not None:
            return known.uid
        entry = Entry(next(self._uids), parent, salt, tokens, block, block_hash(parent, salt, tokens))
        self.buckets.setdefault(entry.key, []).append(entry)
        self.entry_of[block] = entry
        return entry.uid

    def _find(self, parent: int, salt: str | None, tokens: tuple[int, ...]) -> Entry | None:
        for entry in self.buckets.get(block_hash(parent, salt, tokens), ()):
            if entry.parent == parent and entry.salt == salt and entry.tokens == tokens:
                return entry
        return None

    def _unregister(self, block: int) -> None:
        entry = self.entry_of[block]
        if entry is None:
            return
        self.entry_of[block] = None
        bucket = self.buckets[entry.key]
        bucket.remove(entry)
        if not bucket:
            del self.buckets[entry.key]
