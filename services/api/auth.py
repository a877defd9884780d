"""Bearer API-key auth: on when the configured env var (HERD_API_KEY) is non-empty."""
from __future__ import annotations

import hmac

from fastapi import Depends, Request

from services.api.errors import APIError
from services.api.state import ServerState, get_state


def require_api_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    if not state.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(401, "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'.",
                       "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
