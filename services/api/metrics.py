"""GET /metrics: this replica's engine metrics in Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from services.api.errors import ERROR_RESPONSES
from services.api.state import ServerState, get_state
from services.engine.metrics import render

router = APIRouter()


@router.get(
    "/metrics",
    responses={
        **ERROR_RESPONSES,
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
    },
)
async def metrics(state: ServerState = Depends(get_state)):
    text = render(state.engine.metrics, state.engine.snapshot(), state.model_name)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
