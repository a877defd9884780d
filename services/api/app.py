"""The FastAPI app and the engine behind it, without Ray: `create_app(state)` for tests and
`herd serve`'s replicas alike (services/deployment.py wraps it in a Ray Serve deployment)."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from services.api import chat, completions, errors, health, metrics, models, page
from services.api.guard import Guard, needs_key
from services.api.state import ServerState, current_state
from services.config import ServerConfig, load_server_config
from services.engine.async_engine import AsyncLLMEngine
from services.engine.engine import LLMEngine

log = logging.getLogger("herd.serve")


def create_app(state: ServerState | None = None) -> FastAPI:
    """The HTTP API over `state` (app.state.herd). Without one (Ray Serve), the deployment sets
    app.state.herd from its replica's rollout as requests arrive; until then the API answers 503."""
    app = FastAPI(
        title="herd", version="0.1.0", description="OpenAI-compatible completions and chat for herd's Llama 3 models."
    )
    app.state.herd = state
    errors.install(app)
    for module in (models, completions, chat, health, metrics, page):
        app.include_router(module.router)
    app.add_middleware(Guard)
    app.openapi = documented_auth(app)
    return app


def documented_auth(app: FastAPI):
    """app.openapi with the bearer key declared on each operation the Guard asks it for."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema, state = base(), current_state(app)
            if state is not None and state.api_key:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                for path, operations in schema["paths"].items():
                    if needs_key(state, path):
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
        return app.openapi_schema

    return openapi


def build_state(args: dict | ServerConfig) -> ServerState:
    """Load the model named by the config and start its engine thread."""
    from flows.eval.registry import resolve_model_uri
    from model.sources import load_for_inference

    config = load_server_config(args)
    api_key = config.api_key()  # before the slow model load: a server without a key never starts
    # Registry URIs are downloaded with every file's sha256 checked (MLFLOW_TRACKING_URI's store).
    path = resolve_model_uri(config.model)
    log.info("loading %s from %s (%s, %s)", config.model, path, config.dtype, config.device)
    # prepacked matmuls: faster batched decode
    model, tokenizer = load_for_inference(str(path), config.dtype, config.device, pack=True)
    engine = LLMEngine(model, tokenizer, config.engine.to_engine_config())
    return ServerState(AsyncLLMEngine(engine, num_threads=config.num_threads), tokenizer, config, api_key)
