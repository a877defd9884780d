"""What every handler needs: the engine, tokenizer and settings of this replica."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from services.config import ServerConfig
from services.engine.async_engine import AsyncLLMEngine


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    tokenizer: object
    config: ServerConfig
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    version: str = ""  # the registered version served (NAME/VERSION), "" for a folder or `smollm2`
    since: float = 0.0  # when this version began answering (time.time())

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    @property
    def response_model(self) -> str:
        """What a response's `model` field says: the exact version that produced it."""
        return self.version or self.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


def current_state(app) -> ServerState | None:
    """The app's serving state, `app.state.herd`: given to create_app(state), or under Ray Serve set
    from the replica's rollout as each request arrives (services/deployment.py); None while loading."""
    return getattr(app.state, "herd", None)


def get_state(request: Request) -> ServerState:
    # request.state.herd: the state a request was pinned to when it arrived (services/deployment.py),
    # so a model swap mid-request never mixes two versions in one answer.
    state = getattr(request.state, "herd", None) or current_state(request.app)
    if state is None:
        from services.api.errors import APIError

        raise APIError(503, "the model is still loading", "service_unavailable")
    return state
