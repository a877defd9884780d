"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.errors import ERROR_RESPONSES, APIError
from services.api.schemas import ErrorResponse, ModelCard, ModelList
from services.api.state import ServerState, get_state

router = APIRouter()


def check_model(state: ServerState, name: str | None) -> None:
    """A request may name the served model or none; any other name is 404 model_not_found."""
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model '{name}' does not exist", "model_not_found", "model")


def card(state: ServerState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "herd",
        "max_model_len": state.max_model_len,
    }


@router.get("/v1/models", responses={**ERROR_RESPONSES, 200: {"model": ModelList}})
async def list_models(state: ServerState = Depends(get_state)):
    return {"object": "list", "data": [card(state)]}


@router.get(
    "/v1/models/{model_id}",
    responses={
        **ERROR_RESPONSES,
        200: {"model": ModelCard},
        404: {"model": ErrorResponse, "description": "This server does not serve that model"},
    },
)
async def get_model(model_id: str, state: ServerState = Depends(get_state)):
    check_model(state, model_id)
    return card(state)
