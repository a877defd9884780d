"""Errors the engine raises to its callers (the API maps them to HTTP status codes)."""
from __future__ import annotations


class EngineError(Exception):
    """A request the engine cannot take."""

    status = 400


class ContextLengthError(EngineError):
    """Prompt plus max_tokens does not fit the context (HTTP 400)."""


class QueueFullError(EngineError):
    """The waiting queue is at its bound (HTTP 503)."""

    status = 503


class EngineStoppedError(EngineError):
    status = 503
