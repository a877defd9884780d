"""The ASGI guard in front of every route: API key, body size, and client disconnects.

It runs before FastAPI parses anything, so
* a request without the key gets 401 on every route but /health (and /metrics with
  `public_metrics`), the OpenAPI schema and docs included;
* a body over `max_body_bytes` gets 413 unread (by Content-Length) or as soon as the bytes received
  pass the limit (chunked bodies);
* a client that disconnects, at any point, cancels its handler, and every engine request the
  exchange submitted is aborted when it ends, whether or not a response had started.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import error_response
from services.api.state import ServerState, current_state

OPEN_PATHS = frozenset({"/health"})


@dataclass
class Exchange:
    """The HTTP exchange being served: when it arrived (request timeouts count from then) and the
    engine requests (generation.Run) it submitted."""

    arrival: float = field(default_factory=time.monotonic)
    runs: list = field(default_factory=list)


EXCHANGE: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("herd_exchange", default=None)


def needs_key(state: ServerState, path: str) -> bool:
    return bool(state.api_key) and path not in OPEN_PATHS and not (path == "/metrics" and state.config.public_metrics)


def key_error(state: ServerState, headers: dict[bytes, bytes]):
    """The 401 response for a request without the right bearer key, or None when it has it."""
    header = headers.get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if not header:
        return error_response(
            401,
            "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'.",
            "missing_api_key",
            headers=challenge,
        )
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), state.api_key.encode()):
        return error_response(401, "Incorrect API key provided.", "invalid_api_key", headers=challenge)
    return None


def too_large(limit: int):
    return error_response(
        413,
        f"the request body is larger than this server's limit of {limit} bytes",
        "request_too_large",
        headers={"Connection": "close"},
    )


class Guard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = current_state(scope["app"])
        root, path = scope.get("root_path", ""), scope["path"]
        if root and path.startswith(root):  # the route, under a Serve route_prefix
            path = path[len(root) :]
        if state is None:  # a replica still loading
            if path in OPEN_PATHS:
                return await self.app(scope, receive, send)
            loading = error_response(503, "the model is still loading", "service_unavailable")
            return await loading(scope, receive, send)
        headers = dict(scope["headers"])
        if needs_key(state, path) and (refusal := key_error(state, headers)) is not None:
            return await refusal(scope, receive, send)
        limit = state.config.max_body_bytes
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            return await too_large(limit)(scope, receive, send)
        await self._run(scope, receive, send, state, limit)

    async def _run(self, scope: Scope, receive: Receive, send: Send, state: ServerState, limit: int) -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        progress = {"started": False, "complete": False, "over": False}

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                progress["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                progress["complete"] = True
            await send(message)

        exchange = Exchange()
        token = EXCHANGE.set(exchange)
        try:
            app = asyncio.create_task(self.app(scope, inbox.get, tracked_send))  # copies the context
        finally:
            EXCHANGE.reset(token)

        async def pump() -> None:
            size = 0
            while True:
                try:
                    message = await receive()
                except Exception:  # noqa: BLE001 - the server's receive gave up: nothing more will come
                    return
                if message["type"] == "http.request":
                    size += len(message.get("body", b""))
                    if size > limit:
                        progress["over"] = True
                        app.cancel()
                        return
                inbox.put_nowait(message)
                if message["type"] == "http.disconnect":
                    if not progress["complete"]:
                        app.cancel()
                    return

        reader = asyncio.create_task(pump())
        try:
            try:
                await asyncio.wait([app])
            except asyncio.CancelledError:  # this exchange itself was cancelled (Ray Serve: the client left)
                app.cancel()
                raise
            if not app.cancelled():
                app.result()  # the app's own exception, if any, goes on to the server
            elif progress["over"] and not progress["started"]:
                await too_large(limit)(scope, receive, send)
            elif not progress["over"] and not exchange.runs and scope["method"] == "POST":
                state.engine.metrics.aborted += 1  # the client left before its request reached the engine
        finally:
            reader.cancel()
            for run in exchange.runs:
                run.close()
