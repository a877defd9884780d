"""POST /v1/completions (text completion), streaming and not."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends

from services.api.errors import GENERATION_RESPONSES, SSE_EVENT, APIError
from services.api.generation import (
    Run,
    check_capacity,
    check_length,
    completion_logprobs,
    json_response,
    request_id,
    sampling_params,
    sse,
    usage,
)
from services.api.models import check_model
from services.api.schemas import Completion, CompletionRequest
from services.api.state import ServerState, get_state

router = APIRouter()


def split_prompts(prompt) -> list:
    """The request's prompts: a string, or a list of token ids, is one."""
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


async def prompt_token_lists(state: ServerState, prompts: list) -> list[list[int]]:
    tok = state.tokenizer
    for p in prompts:
        if isinstance(p, str):
            check_length(state, len(p), "prompt")
    # off the event loop: other requests' streams go on meanwhile
    encoded = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts])
    out = []
    for ids in encoded:
        if not ids:
            if tok.bos_id is None:
                raise APIError(400, "prompt must not be empty", "invalid_value", "prompt")
            ids = [tok.bos_id]  # an empty prompt starts from BOS
        out.append(ids)
    return out


@router.post(
    "/v1/completions",
    responses={
        **GENERATION_RESPONSES,
        200: {"model": Completion, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    },
)
async def completions(body: CompletionRequest, state: ServerState = Depends(get_state)):
    check_model(state, body.model)
    prompts = split_prompts(body.prompt)
    if body.stream and len(prompts) > 1:
        raise APIError(400, "streaming takes a single prompt", "invalid_value", "prompt")
    limit = state.engine.max_in_flight
    if len(prompts) > limit:  # could never be admitted: not a retryable 503
        raise APIError(
            400,
            f"{len(prompts)} prompts in one request; this server holds at most {limit} requests in flight",
            "invalid_value",
            "prompt",
        )
    check_capacity(state)
    prompts = await prompt_token_lists(state, prompts)
    rid, created = request_id("cmpl"), int(time.time())
    runs = []
    try:
        for i, ids in enumerate(prompts):
            runs.append(Run(state, ids, sampling_params(state, body, len(ids)), f"{rid}-{i}", body.cache_salt))
    except APIError:
        for r in runs:
            r.close()
        raise
    echo = [state.tokenizer.decode(p) if body.echo else "" for p in prompts]

    def logprobs_of(outs, offset: int) -> dict | None:
        if body.logprobs is None:
            return None
        return completion_logprobs(
            state.tokenizer,
            [lp for o in outs for lp in o.logprobs or ()],
            [t for o in outs for t in o.token_ids],
            offset,
        )

    def chunk(text: str, index: int, finish: str | None, logprobs: dict | None = None) -> dict:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": state.response_model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    if body.stream:
        run = runs[0]

        async def events():
            if echo[0]:
                yield chunk(echo[0], 0, None)
            offset = len(echo[0])
            async for out in run.outputs():
                if out.text or out.token_ids or out.finished:
                    yield chunk(out.text, 0, out.finish_reason if out.finished else None, logprobs_of([out], offset))
                    offset += len(out.text)
            if body.include_usage:
                yield {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": state.response_model,
                    "choices": [],
                    "usage": usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens),
                }

        return sse(events())

    async def collect(run: Run) -> list:
        return [out async for out in run.outputs()]

    results = await asyncio.gather(*(collect(r) for r in runs))
    return json_response(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": state.response_model,
            "choices": [
                {
                    "index": i,
                    "text": echo[i] + "".join(o.text for o in outs),
                    "logprobs": logprobs_of(outs, len(echo[i])),
                    "finish_reason": r.finish_reason,
                }
                for i, (outs, r) in enumerate(zip(results, runs))
            ],
            "usage": usage(
                sum(r.prompt_tokens for r in runs),
                sum(r.completion_tokens for r in runs),
                sum(r.cached_tokens for r in runs),
            ),
        }
    )
