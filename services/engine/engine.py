"""LLMEngine: the scheduler and the model runner joined into `add_request` / `abort` / `step`.

Synchronous and single-threaded; `AsyncLLMEngine` drives it from a background thread.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from model.generate import SamplingParams
from model.sampler import TokenLogprobs, random_seed
from services.engine.config import EngineConfig
from services.engine.errors import ContextLengthError, EngineError, QueueFullError
from services.engine.metrics import EngineMetrics
from services.engine.runner import ModelRunner
from services.engine.scheduler import Scheduler
from services.engine.sequence import Detokenizer, Sequence


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the last output
    token_ids: list[int]  # new token ids since the last output
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # of token_ids, when the request asked for them


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if config.max_model_len > model.config.max_seq_len:
            config.max_model_len = model.config.max_seq_len
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(config)
        self.runner = ModelRunner(model, config)
        self.model_stop_ids = frozenset(tokenizer.stop_ids) | frozenset(model.config.eos_token_ids or ())
        self.seqs: dict[str, Sequence] = {}
        self.metrics = EngineMetrics()
        self._ids = itertools.count()

    # --- requests ---
    @property
    def vocab_size(self) -> int:
        return self.runner.config.vocab_size

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Every check a request passes before it is queued (the HTTP layer asks no other)."""
        if not prompt_ids:
            raise EngineError("the prompt is empty: it needs at least one token", "prompt")
        limit, n = self.config.max_model_len, len(prompt_ids)
        if n >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {n} tokens, "
                "which leaves no room for the completion.",
                "prompt",
            )
        total = n + params.max_tokens
        if total > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested {total} tokens "
                f"({n} in the prompt, {params.max_tokens} for the completion). Please reduce the prompt or "
                "max_tokens.",
                "max_tokens",
            )
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise EngineError(f"prompt token ids must be in [0, {vocab}): below the vocabulary size", "prompt")
        blocks = -(-total // self.config.block_size)
        if blocks > self.scheduler.pool.num_usable:
            raise ContextLengthError(
                f"the request needs {blocks} KV-cache blocks of {self.config.block_size} tokens ({total} tokens), "
                f"more than this server's cache holds ({self.scheduler.pool.num_usable} blocks)",
                "max_tokens",
            )

    def check_capacity(self, in_flight: int | None = None) -> None:
        """QueueFullError when one more request would pass the bound on requests in flight: `in_flight`,
        or else this engine's running and waiting ones."""
        if in_flight is None:
            in_flight = self.num_waiting + self.num_running
        if in_flight >= self.config.max_in_flight:
            self.metrics.rejected += 1
            raise QueueFullError(f"the server is at capacity ({in_flight} requests in flight); retry later")

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival: float | None = None,
        cache_salt: str | None = None,
    ) -> Sequence:
        """Queue a request. cache_salt: prefix-cache blocks are shared only between requests of the
        same salt (a tenant's), as vLLM's."""
        self.validate(prompt_ids, params)
        self.check_capacity()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise EngineError(f"duplicate request id {request_id}")
        stop_ids = frozenset(params.stop_ids) | (frozenset() if params.ignore_eos else self.model_stop_ids)
        seq = Sequence(
            request_id,
            list(prompt_ids),
            params,
            stop_ids=stop_ids,
            arrival=arrival if arrival is not None else time.monotonic(),
            detok=Detokenizer(self.tokenizer, params.stop_strings),
            seed=random_seed() if params.seed is None else params.seed,
            cache_salt=cache_salt,
        )
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its slot now. True if it was still live."""
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return False
        self._release(seq)
        seq.finish_reason = "abort"
        self.metrics.aborted += 1
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.free(seq)

    # --- one step ---
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        t0 = time.monotonic()
        self.runner.copy_blocks(plan.copies)
        logits, seqs = [], []
        if plan.decode:
            logits.append(self.runner.decode(plan.decode, plan.decode_tokens))
            seqs += plan.decode
        if plan.prefill:
            out = self.runner.prefill([(s, s.prompt_ids[a:b]) for s, a, b in plan.prefill])
            done = [i for i, (s, a, b) in enumerate(plan.prefill) if b == len(s.prompt_ids)]
            if done:
                logits.append(out[done])
                seqs += [plan.prefill[i][0] for i in done]
        # One sampler call (and one copy to the host) for every row that gets a token this step.
        sampled = self.runner.sample(torch.cat(logits), seqs) if seqs else None
        self.scheduler.step_done(plan)
        now = time.monotonic()
        self.metrics.step(now - t0, len(plan.decode), plan.num_tokens)
        outputs = (
            []
            if sampled is None
            else [self._append(seq, tok, lp, now) for seq, tok, lp in zip(seqs, sampled.token_ids, sampled.logprobs)]
        )
        self.metrics.kv_usage = self.scheduler.kv_usage
        return outputs

    def _append(self, seq: Sequence, tok: int, logprobs: TokenLogprobs | None, now: float) -> RequestOutput:
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        text, new_ids, stopped, new_logprobs = "", [], False, None
        if tok in seq.stop_ids:
            seq.finish_reason = "stop"
        else:
            seq.output_ids.append(tok)
            new_ids = [tok]
            new_logprobs = None if logprobs is None else [logprobs]
            text, stopped = seq.detok.add(tok)
            if stopped:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if not stopped:  # held-back text that turned out not to start a stop string
                text += seq.detok.flush()
            self._release(seq)
            self.seqs.pop(seq.request_id, None)
            self.metrics.e2e.observe(now - seq.arrival)
            self.metrics.finished += 1
            self.metrics.generation_tokens += len(seq.output_ids)
        return RequestOutput(
            seq.request_id,
            text,
            new_ids,
            seq.finish_reason is not None,
            seq.finish_reason,
            len(seq.prompt_ids),
            len(seq.output_ids),
            seq.num_cached,
            new_logprobs,
        )

    # --- state for metrics ---
    def snapshot(self) -> dict:
        s = self.scheduler
        return {
            "waiting": len(s.waiting),
            "running": len(s.running),
            "kv_usage": s.kv_usage,
            "slots_used": self.config.max_num_seqs - s.num_free_slots,
            "slots": self.config.max_num_seqs,
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_tokens,
            "hit_rate": s.hit_rate,
        }
