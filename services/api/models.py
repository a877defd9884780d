"""GET /v1/models and /v1/models/{id}."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.auth import require_api_key
from services.api.errors import ERROR_RESPONSES, APIError
from services.api.state import ServerState, get_state

router = APIRouter()


def card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "herd",
            "max_model_len": state.max_model_len}


@router.get("/v1/models", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
async def list_models(state: ServerState = Depends(get_state)):
    return {"object": "list", "data": [card(state)]}


@router.get("/v1/models/{model_id}", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
async def get_model(model_id: str, state: ServerState = Depends(get_state)):
    if model_id != state.model_name:
        raise APIError(404, f"The model '{model_id}' does not exist", "model_not_found", "model")
    return card(state)
