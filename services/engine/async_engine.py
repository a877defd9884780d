"""AsyncLLMEngine: LLMEngine on a background thread, streaming outputs to asyncio tasks.

New requests are checked (context length, queue bound) in the caller, then handed to the engine
thread, which admits them at its next step. The queue bound counts the requests this wrapper holds,
from submit until the engine thread has released them; the engine's own running and waiting counts
would miss the ones in hand-over and in its scheduler's moves, and let one too many in.

Closing a stream early (client disconnect, timeout, cancellation) aborts the request: the engine
thread frees its slot before its next step.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator

import torch

from model.generate import SamplingParams
from services.engine.engine import LLMEngine, RequestOutput
from services.engine.errors import EngineError, EngineStoppedError

log = logging.getLogger("herd.engine")


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, num_threads: int | None = None):
        self.engine = engine
        self.num_threads = num_threads
        self._cond = threading.Condition()
        self._incoming: collections.deque = collections.deque()  # (seq args) to add
        self._aborts: collections.deque = collections.deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._held: set[str] = set()  # submitted and not yet finished, failed or aborted in the engine
        self._ids = itertools.count()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
        self._thread.start()

    # --- caller side (asyncio) ---
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request."""
        request_id = request_id or f"req-{next(self._ids)}"
        queue = self.submit(prompt_ids, params, request_id, cache_salt)
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, cache_salt: str | None = None
    ) -> asyncio.Queue:
        if self._stopped or self.error is not None:
            raise EngineStoppedError(f"the engine is not running: {self.error!r}")
        eng = self.engine
        eng.validate(prompt_ids, params)
        with self._cond:
            if request_id in self._held:
                raise EngineError(f"duplicate request id {request_id}")
            self.check_capacity()
            queue: asyncio.Queue = asyncio.Queue()
            self._held.add(request_id)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._incoming.append((prompt_ids, params, request_id, time.monotonic(), cache_salt))
            self._cond.notify()
        return queue

    def check_capacity(self) -> None:
        """QueueFullError when one more request would pass the engine's bound on requests held. The
        HTTP layer also asks before tokenizing, so a flood is refused at the cost of a JSON parse."""
        self.engine.check_capacity(len(self._held))

    # What the HTTP layer reads of the engine.
    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def max_in_flight(self) -> int:
        return self.engine.config.max_in_flight

    @property
    def metrics(self):
        """The engine's counters (EngineMetrics); the HTTP layer counts timeouts and early aborts."""
        return self.engine.metrics

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
            self._cond.notify()

    def snapshot(self) -> dict:
        snap = self.engine.snapshot()
        snap["waiting"] += len(self._incoming)
        return snap

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # --- engine thread ---
    def _loop(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        eng = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._stopped or self._incoming or self._aborts or eng.has_work()):
                        self._cond.wait()
                    if self._stopped:
                        break
                    incoming, self._incoming = list(self._incoming), collections.deque()
                    aborts, self._aborts = list(self._aborts), collections.deque()
                for rid in aborts:
                    eng.abort(rid)
                if aborts:
                    with self._cond:
                        self._held.difference_update(aborts)
                for prompt_ids, params, rid, arrival, salt in incoming:
                    if rid not in self._streams:  # aborted before it was admitted
                        eng.metrics.aborted += 1
                        continue
                    try:
                        eng.add_request(prompt_ids, params, rid, arrival=arrival, cache_salt=salt)
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        self._deliver([(rid, e)])
                outputs = eng.step()
                if outputs:
                    self._deliver([(o.request_id, o) for o in outputs])
        except BaseException as e:  # noqa: BLE001 - a broken engine fails every stream, then health
            log.exception("engine thread failed")
            self.error = e
            with self._cond:
                streams = list(self._streams)
            self._deliver([(rid, EngineStoppedError(f"engine failed: {e!r}")) for rid in streams])

    def _deliver(self, items) -> None:
        by_loop: dict = collections.defaultdict(list)
        with self._cond:
            for rid, item in items:
                if isinstance(item, BaseException) or item.finished:
                    self._held.discard(rid)
                    target = self._streams.pop(rid, None)
                else:
                    target = self._streams.get(rid)
                if target is None:
                    continue
                by_loop[target[0]].append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the caller's loop is closed
                pass


def _put_all(batch) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
