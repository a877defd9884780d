"""POST /v1/chat/completions, streaming (chat.completion.chunk events) and not."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends

from model.errors import HerdError
from services.api.errors import GENERATION_RESPONSES, SSE_EVENT, APIError
from services.api.generation import (
    Run,
    chat_logprobs,
    check_capacity,
    check_length,
    json_response,
    request_id,
    sampling_params,
    sse,
    usage,
)
from services.api.models import check_model
from services.api.schemas import ChatCompletion, ChatCompletionRequest
from services.api.state import ServerState, get_state

router = APIRouter()


async def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    check_length(state, sum(len(m["content"]) for m in messages), "messages")
    try:  # off the event loop: other requests' streams go on meanwhile
        return await asyncio.to_thread(state.tokenizer.encode_chat, messages, body.add_generation_prompt)
    except HerdError as e:
        raise APIError(400, str(e), "invalid_value", "messages") from None


@router.post(
    "/v1/chat/completions",
    responses={
        **GENERATION_RESPONSES,
        200: {"model": ChatCompletion, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    },
)
async def chat_completions(body: ChatCompletionRequest, state: ServerState = Depends(get_state)):
    check_model(state, body.model)
    check_capacity(state)
    ids = await chat_prompt(state, body)
    run = Run(
        state,
        ids,
        sampling_params(state, body, len(ids)),
        request_id("chatcmpl"),
        body.cache_salt,
        prompt_param="messages",
    )
    rid, created = run.rid, int(time.time())

    def logprobs_of(outs) -> dict | None:
        if not body.logprobs:
            return None
        return chat_logprobs(
            state.tokenizer, [lp for o in outs for lp in o.logprobs or ()], [t for o in outs for t in o.token_ids]
        )

    if body.stream:

        def chunk(delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.response_model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }

        async def events():
            yield chunk({"role": "assistant", "content": ""}, None)
            async for out in run.outputs():
                if out.text or out.token_ids:
                    yield chunk({"content": out.text}, None, logprobs_of([out]))
                if out.finished:
                    yield chunk({}, out.finish_reason)
            if body.include_usage:
                yield {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": state.response_model,
                    "choices": [],
                    "usage": usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens),
                }

        return sse(events())

    outs = [out async for out in run.outputs()]
    text = "".join(out.text for out in outs)
    return json_response(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": state.response_model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs_of(outs),
                    "finish_reason": run.finish_reason,
                }
            ],
            "usage": usage(run.prompt_tokens, run.completion_tokens, run.cached_tokens),
        }
    )
