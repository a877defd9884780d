"""Shared by completions and chat: sampling settings, limits, streaming as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from model.errors import HerdError
from model.generate import SamplingParams
from model.sampler import TokenLogprobs
from services.api.errors import APIError, error_body, from_engine_error
from services.api.guard import EXCHANGE
from services.api.schemas import SamplingFields
from services.api.state import ServerState
from services.engine.engine import RequestOutput
from services.engine.errors import EngineError


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sampling_params(state: ServerState, body: SamplingFields, prompt_len: int) -> SamplingParams:
    """Settings of one request. Without max_tokens it is what the context leaves, up to the server's
    default; whether the request fits is the engine's check (Run)."""
    wanted = body.requested_max_tokens
    if wanted is None:
        wanted = min(state.config.default_max_tokens, max(state.max_model_len - prompt_len, 1))
    try:
        return body.sampling(wanted)
    except HerdError as e:
        raise APIError(400, str(e), "invalid_value") from None


def check_capacity(state: ServerState) -> None:
    """503 + Retry-After before any tokenizing when the engine holds all it may."""
    try:
        state.engine.check_capacity()
    except EngineError as e:
        raise from_engine_error(e) from None


def check_length(state: ServerState, chars: int, param: str) -> None:
    """400 for a text too long for the context, found before tokenizing it: a token spells at most
    `max_token_bytes` bytes, so n characters are at least n / max_token_bytes tokens."""
    limit = state.max_model_len
    if chars > limit * state.tokenizer.max_token_bytes:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your {param} "
            f"holds {chars} characters, more than {limit} tokens can spell.",
            "context_length_exceeded",
            param,
        )


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


RESPONSE_MARGIN_S = 0.05


class Run:
    """One engine request with a deadline. Leaving `outputs()` early (timeout, error) aborts it, which
    frees its KV-cache slot at the engine's next step; so does the end of the HTTP exchange that
    submitted it (guard.Guard), however it ends: a disconnect before the first chunk included."""

    def __init__(
        self,
        state: ServerState,
        prompt_ids: list[int],
        params: SamplingParams,
        rid: str,
        cache_salt: str | None = None,
        prompt_param: str = "prompt",
    ):
        self.state, self.rid = state, rid
        exchange = EXCHANGE.get()
        start = exchange.arrival if exchange is not None else time.monotonic()
        # The 408 is sent a little before the limit: waking the event loop, aborting the request and
        # writing the answer take a few milliseconds, and no request may outlive request_timeout_s.
        self.deadline = start + max(state.config.request_timeout_s - RESPONSE_MARGIN_S, 0.0)
        try:  # validated (context, vocabulary, capacity) and enqueued now, before any response starts
            self.queue = state.engine.submit(prompt_ids, params, rid, cache_salt)
        except EngineError as e:
            raise from_engine_error(e, prompt_param) from None
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = len(prompt_ids), 0, 0
        self.finish_reason: str | None = None
        self.done = False
        if exchange is not None:
            exchange.runs.append(self)

    def close(self) -> None:
        """Abort the request unless it finished (idempotent)."""
        if not self.done:
            self.done = True
            self.state.engine.abort(self.rid)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                remaining = self.deadline - time.monotonic()
                try:
                    out = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.001))
                except TimeoutError:
                    self.state.engine.metrics.timeouts += 1
                    raise APIError(
                        408,
                        f"the request ran past the server's timeout ({self.state.config.request_timeout_s:g} s)",
                        "timeout",
                    ) from None
                if isinstance(out, EngineError):
                    self.done = True
                    raise from_engine_error(out)
                if isinstance(out, BaseException):
                    self.done = True
                    raise out
                self.completion_tokens = out.completion_tokens
                self.cached_tokens = out.cached_tokens
                if out.finished:
                    self.finish_reason, self.done = out.finish_reason, True
                yield out
                if out.finished:
                    return
        finally:
            self.close()


def chat_logprobs(tokenizer, outs: list[TokenLogprobs], ids: list[int]) -> dict:
    """OpenAI's chat `logprobs` object for the tokens `ids` and their log-probabilities."""

    def item(token_id: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token_id])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**item(t, lp.logprob), "top_logprobs": [item(i, v) for i, v in lp.top]} for t, lp in zip(ids, outs)
        ]
    }


def completion_logprobs(tokenizer, outs: list[TokenLogprobs], ids: list[int], offset: int = 0) -> dict:
    """The completions API's `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens = [tokenizer.decode_bytes([t]).decode("utf-8", errors="replace") for t in ids]
    offsets, at = [], offset
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in outs],
        "top_logprobs": [
            {tokenizer.decode_bytes([i]).decode("utf-8", errors="replace"): v for i, v in lp.top} for lp in outs
        ],
        "text_offset": offsets,
    }


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(error_body(e.status, e.message, e.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def json_response(doc: dict) -> JSONResponse:
    return JSONResponse(doc)
