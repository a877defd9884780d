"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}} for every failure."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.schemas import ErrorResponse
from services.engine.errors import EngineError

log = logging.getLogger("herd.api")

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def from_engine_error(e: EngineError, prompt_param: str = "prompt") -> APIError:
    """The HTTP answer to an engine refusal: the one place engine errors become status codes.
    prompt_param: the request field that holds the prompt (chat: `messages`)."""
    param = prompt_param if e.param == "prompt" else e.param
    return APIError(e.status, str(e), e.code, param, headers={"Retry-After": "1"} if e.status == 503 else None)


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p != "body")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, e: EngineError):
        err = from_engine_error(e)
        return error_response(err.status, err.message, err.code, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        parts = [f"{_loc(x) or 'body'}: {x.get('msg', 'invalid')}" for x in errors[:5]]
        return error_response(400, "; ".join(parts) or "invalid request", "invalid_value", _loc(first) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), None, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")


ERROR_RESPONSES = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    503: {"model": ErrorResponse, "description": "The model is still loading"},
}
# One server-sent event: `data` is a JSON chunk (or an error object), the last one `[DONE]`.
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
GENERATION_RESPONSES = {
    **ERROR_RESPONSES,
    400: {"model": ErrorResponse, "description": "Invalid request, or prompt too long for the context"},
    404: {"model": ErrorResponse, "description": "The request names a model this server does not serve"},
    408: {"model": ErrorResponse, "description": "The request ran past the server's timeout"},
    413: {"model": ErrorResponse, "description": "The body is larger than the server's limit"},
    503: {"model": ErrorResponse, "description": "Queue full (with Retry-After) or model not ready"},
}
