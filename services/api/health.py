"""GET /health: 200 while the engine thread runs, else 503."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.errors import error_response
from services.api.state import ServerState, get_state

router = APIRouter()


@router.get("/health", responses={503: {"description": "The engine is down"}})
async def health(state: ServerState = Depends(get_state)):
    if not state.engine.healthy:
        return error_response(503, f"engine stopped: {state.engine.error!r}", "engine_dead")
    return {"status": "ok", "model": state.model_name}
