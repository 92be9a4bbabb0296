"""The WebSocket Origin allow-list: exact scheme, host and port (docs/security.md, L11).

Django's ``ALLOWED_HOSTS`` (what channels' ``AllowedHostsOriginValidator`` checks) names hosts
only, so a page of another application on the same host, on another port or over plain HTTP,
would pass. This check runs first, before any authentication or database query.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import structlog
from channels.security.websocket import WebsocketDenier

log = structlog.get_logger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin, the port made explicit; None if malformed."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


class OriginAllowList:
    """ASGI middleware: a WebSocket whose Origin is not exactly one of ``allowed`` is denied.

    A connection without an Origin header (a program, not a browser) goes on to ``inner``,
    which authenticates it; an empty ``allowed`` list leaves every origin to ``inner``.
    """

    def __init__(self, inner, *, allowed: Iterable[str]) -> None:
        self._inner = inner
        self._allowed = set()
        for origin in allowed:
            key = origin_key(origin)
            if key is None:
                raise ValueError(f"WS_ALLOWED_ORIGINS: {origin!r} is not scheme://host[:port]")
            self._allowed.add(key)
        self._deny = WebsocketDenier.as_asgi()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and self._allowed:
            origin = next((v for k, v in scope.get("headers", ()) if k == b"origin"), None)
            if origin is not None and origin_key(origin.decode("latin-1")) not in self._allowed:
                log.info("ws.origin_refused", origin=origin.decode("latin-1")[:100])
                return await self._deny(scope, receive, send)
        return await self._inner(scope, receive, send)
