"""GET /health: 200 while the engine thread runs, else 503; open without the key, and says nothing
more (no model name, no error text) so it tells an outsider nothing."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.errors import error_response
from services.api.schemas import ErrorResponse, Health
from services.api.state import ServerState, get_state

router = APIRouter()


@router.get("/health", responses={200: {"model": Health}, 503: {"model": ErrorResponse, "description": "Not serving"}})
async def health(state: ServerState = Depends(get_state)):
    if not state.engine.healthy:
        return error_response(503, "not serving", "unavailable")
    return {"status": "ok"}
