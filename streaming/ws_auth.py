"""Who is on the other end of a WebSocket: an API token for programs, else the Django session.

A connection that presents an API token (header ``Authorization: Token <key>`` or subprotocol
``tickerproj.token.<key>``) is authenticated by that token alone: a token is never sent by a
browser on its own, so cross-site WebSocket hijacking does not apply and programs may omit the
Origin header (an Origin they do send must still be an allowed host). Every other connection
is authenticated by its session cookie behind ``AllowedHostsOriginValidator``.

The key never travels further than this module: it is removed from the scope's headers and
subprotocols before the consumer sees them, and it is never logged (only its 8-character
prefix, which the admin shows too). The consumer refuses anonymous connections.

Order of the checks, cheapest first, so that a flood of connects costs no database work: the
per-IP connect rate (in memory), then the Origin, then the token (one query, through
``accounts.auth.apitoken_authenticate``, shared with the HTTP API). A token needs the
``read`` scope: the stream is market data.
"""

from __future__ import annotations

from typing import Any

import structlog
from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator, OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from accounts.auth import apitoken_authenticate
from accounts.models import ApiToken
from streaming.protocol import TOKEN_SUBPROTOCOL_PREFIX

log = structlog.get_logger(__name__)

WS_SCOPE_REQUIRED = ApiToken.Scope.READ


def extract_token(scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """The API key a WebSocket scope carries and how (``header`` / ``subprotocol``), if any."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, key = value.decode("latin1").strip().partition(" ")
            if scheme.lower() == "token":
                return key.strip(), "header"
            break
    for proto in scope.get("subprotocols", ()):
        if proto.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return proto[len(TOKEN_SUBPROTOCOL_PREFIX) :], "subprotocol"
    return None, None


def _without_secrets(scope: dict[str, Any]) -> dict[str, Any]:
    scope = dict(scope)
    scope["headers"] = [(n, v) for n, v in scope.get("headers", ()) if n != b"authorization"]
    scope["subprotocols"] = [
        p for p in scope.get("subprotocols", ()) if not p.startswith(TOKEN_SUBPROTOCOL_PREFIX)
    ]
    return scope


@database_sync_to_async
def _authenticate(key: str) -> ApiToken | None:
    return apitoken_authenticate(key=key)


class _OriginOptionalValidator(OriginValidator):
    """Like AllowedHostsOriginValidator, but a missing Origin is fine (programs send none)."""

    def valid_origin(self, parsed_origin) -> bool:
        return parsed_origin is None or self.validate_origin(parsed_origin)


class _TokenAuth:
    """Authenticates a token-bearing scope; runs behind the Origin check, so a foreign origin
    never reaches the database."""

    def __init__(self, inner) -> None:
        self._inner = inner

    async def __call__(self, scope, receive, send):
        token = await _authenticate(scope.pop("_api_key", ""))
        if token is None:
            log.info("ws.token_rejected", via=scope["token_via"], client=_client(scope))
            scope.update(user=AnonymousUser(), auth_error="invalid_token")
        elif not token.has_scope(WS_SCOPE_REQUIRED):
            log.info("ws.token_scope_missing", prefix=token.prefix, client=_client(scope))
            scope.update(user=AnonymousUser(), auth_error="scope_missing")
        else:
            scope.update(
                user=token.user, auth_error=None, api_token_prefix=token.prefix, api_token_id=token.pk
            )
        return await self._inner(scope, receive, send)


class _ConnectRateLimit:
    """At most ``per_minute`` connects from one client IP to this process, counted in memory.

    ``limits`` (moving window) rather than a counter of ours; in memory because the point is
    to spare this process's database and CPU, and a shared store would cost a round trip on
    every connect.
    """

    def __init__(self, inner, *, per_minute: int) -> None:
        self._inner = inner
        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        ip = client[0] if client else "unknown"
        if not await self._limiter.hit(self._item, "ws-connect", ip):
            log.warning("ws.connect_rate_limited", client=ip)
            # Refused before accept: the client sees an HTTP 403 to its upgrade request.
            await send({"type": "websocket.close", "code": 1008})
            return None
        return await self._inner(scope, receive, send)


class ApiTokenOrSessionAuth:
    """ASGI middleware for WebSockets: token-authenticated or session-authenticated ``inner``.

    Sets ``scope["user"]`` (AnonymousUser when a presented token is invalid or absent and no
    session), ``scope["auth_method"]`` (``token`` / ``session``), ``scope["auth_error"]``
    (``invalid_token``, ``scope_missing`` or None), ``scope["token_via_subprotocol"]`` and,
    for tokens, ``scope["api_token_id"]``.
    """

    def __init__(self, inner, *, connects_per_ip_per_minute: int | None = None) -> None:
        allowed_hosts = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not allowed_hosts:
            allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
        self._token_app = _OriginOptionalValidator(_TokenAuth(inner), allowed_hosts)
        self._session_app = AllowedHostsOriginValidator(AuthMiddlewareStack(inner))
        per_minute = connects_per_ip_per_minute or settings.WS_MAX_CONNECTS_PER_IP_PER_MINUTE
        self._entry = _ConnectRateLimit(self._route, per_minute=per_minute)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError(f"ApiTokenOrSessionAuth serves WebSockets only, got {scope['type']}")
        return await self._entry(scope, receive, send)

    async def _route(self, scope, receive, send):
        key, via = extract_token(scope)
        scope = _without_secrets(scope)
        if via is None:
            scope.update(auth_method="session", auth_error=None, token_via_subprotocol=False)
            return await self._session_app(scope, receive, send)
        scope.update(
            auth_method="token", token_via_subprotocol=via == "subprotocol", token_via=via,
            _api_key=key or "",
        )
        return await self._token_app(scope, receive, send)


def _client(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None
