"""Errors the engine raises to its callers. Each carries what the HTTP layer needs to answer it
(services/api/errors.from_engine_error maps them, in one place): a status, an OpenAI error code and
the request field at fault."""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine cannot take."""

    status = 400
    code = "invalid_value"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # "prompt", "max_tokens" or None


class ContextLengthError(EngineError):
    """Prompt plus max_tokens does not fit the context or the KV cache (HTTP 400)."""

    code = "context_length_exceeded"


class QueueFullError(EngineError):
    """The waiting queue is at its bound (HTTP 503)."""

    status = 503
    code = "server_overloaded"


class EngineStoppedError(EngineError):
    status = 503
    code = "server_overloaded"
