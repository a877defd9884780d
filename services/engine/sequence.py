"""A request inside the engine: its tokens, state, slot and incremental detokenizer."""

from __future__ import annotations

import codecs
import collections
import enum
import functools
import time
from dataclasses import dataclass, field

from model.generate import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"  # has a slot: prefilling while num_computed < len(prompt_ids), then decoding
    FINISHED = "finished"


class StopMatcher:
    """An Aho-Corasick automaton over a request's stop strings: text is fed one character at a time,
    at amortised constant cost whatever the number and length of the stop strings.

    A state is a node of the trie of stop strings: the longest suffix of the text fed so far that
    begins some stop string, `depth[state]` characters long (the text to hold back), and
    `match[state]` is the length of the longest stop string ending there (0: none)."""

    def __init__(self, stops: tuple[str, ...]):
        self.goto: list[dict[str, int]] = [{}]
        self.depth, self.match = [0], [0]
        for s in stops:
            node = 0
            for ch in s:
                if ch not in self.goto[node]:
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.match.append(0)
                    self.goto[node][ch] = len(self.goto) - 1
                node = self.goto[node][ch]
            self.match[node] = len(s)
        self.fail = [0] * len(self.goto)
        queue = collections.deque(self.goto[0].values())
        while queue:  # breadth first: a node's fail link (a shallower node) is set before its children's
            node = queue.popleft()
            if not self.match[node]:
                self.match[node] = self.match[self.fail[node]]
            for ch, child in self.goto[node].items():
                queue.append(child)
                self.fail[child] = self.step(self.fail[node], ch) if node else 0

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)


@functools.lru_cache(maxsize=64)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """Shared by requests with the same stop strings (a client's every request, usually)."""
    return StopMatcher(stops)


class Detokenizer:
    """Token ids -> text deltas, byte-exact: a UTF-8 character split across tokens is emitted once whole.

    Stop strings: text that could still be the start of a stop string is held back; at a match the
    text is cut before it (OpenAI semantics: the stop string is not returned). Of the matches ending
    in one token's text, the one starting first wins."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stop_strings if s)
        self._matcher = stop_matcher(self.stops) if self.stops else None
        self._state = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """(new text, stopped)."""
        new = self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        end = len(self.text)
        self.text += new
        m = self._matcher
        if m is None:
            return self._take(len(self.text)), False
        cut, state = -1, self._state
        for ch in new:
            state = m.step(state, ch)
            end += 1
            if m.match[state] and (cut < 0 or end - m.match[state] < cut):
                cut = end - m.match[state]
        self._state = state
        if cut >= 0:
            self.text = self.text[:cut]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - m.depth[state]), False

    def flush(self) -> str:
        """The rest at the end (held-back text, an incomplete UTF-8 tail as U+FFFD)."""
        self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        new, self.emitted = self.text[self.emitted : upto], upto
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
