"""A request inside the engine: its tokens, state, slot and incremental detokenizer."""
from __future__ import annotations

import codecs
import enum
import time
from dataclasses import dataclass, field

from model.generate import SamplingParams, find_stop_string


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"  # has a slot: prefilling while num_computed < len(prompt_ids), then decoding
    FINISHED = "finished"


class Detokenizer:
    """Token ids -> text deltas, byte-exact: a UTF-8 character split across tokens is emitted once whole.

    Stop strings: text that could still be the start of a stop string is held back; at a match the
    text is cut before it (OpenAI semantics: the stop string is not returned)."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stop_strings if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """(new text, stopped)."""
        self.text += self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        if self.stops:
            start = max(0, self.emitted - max(len(s) for s in self.stops))
            cut = find_stop_string(self.text[start:], self.stops)
            if cut >= 0:
                self.text = self.text[: start + cut]
                return self._take(len(self.text)), True
            return self._take(len(self.text) - self._partial_stop()), False
        return self._take(len(self.text)), False

    def flush(self) -> str:
        """The rest at the end (held-back text, an incomplete UTF-8 tail as U+FFFD)."""
        self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _partial_stop(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        new, self.emitted = self.text[self.emitted:upto], upto
        return new


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens whose keys/values are in the slot
    num_cached: int = 0  # prompt tokens taken from the prefix cache
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    detok: Detokenizer | None = None
    seed: int = 0  # the sampler's seed: the request's, or a random one drawn when it arrived
    cache_salt: str | None = None  # prefix-cache blocks are shared only between equal salts
    blocks: list[int] = field(default_factory=list)  # the block table: position p is in blocks[p // bs]
    block_uids: list[int] = field(default_factory=list)  # prefix-cache ids of its full blocks, in order
    blocks_version: int = 0  # bumped whenever `blocks` changes (the runner re-reads the table)
    reserve: int = 0  # blocks it may still need to finish (admission keeps them available)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def next_input(self) -> int:
        """The token a decode step feeds: the last sampled one (not yet in the cache)."""
        return self.output_ids[-1]

    def token(self, i: int) -> int:
        """The i-th token of the sequence (prompt, then output)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]
