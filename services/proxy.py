"""Middleware for Ray Serve's HTTP proxy, the endpoint's ingress: it drops the headers by which a
client could change how the proxy treats its request.

Ray's proxy obeys `x-request-timeout-seconds` (a per-request timeout; 0 or less turns it off) and
`x-request-disconnect-disabled: ?1` (keep running after the client leaves). Both are meant for a
trusted load balancer; from a client they would defeat the Serve config's `request_timeout_s` and
the cancellation of abandoned requests. The proxy loads this module when its process has
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=services.proxy:middlewares (the image sets it;
services.deployment.deploy sets it for a Ray it starts).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "services.proxy:middlewares"
# ray.serve._private.constants' SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER and ..._DISCONNECT_DISABLED_HEADER
DROPPED = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})


class DropClientControlHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and any(k.lower() in DROPPED for k, _ in scope["headers"]):
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in DROPPED]}
        await self.app(scope, receive, send)


def middlewares() -> list:
    """The proxy's callback: Starlette middlewares wrapped around the proxy's own ASGI app."""
    from starlette.middleware import Middleware

    return [Middleware(DropClientControlHeaders)]
