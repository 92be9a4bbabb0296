"""Who is on the other end of a WebSocket: an API token for programs, else the Django session.

A connection that presents an API token (header ``Authorization: Token <key>`` or subprotocol
``tickerproj.token.<key>``) is authenticated by that token alone: a token is never sent by a
browser on its own, so cross-site WebSocket hijacking does not apply and programs may omit the
Origin header (an Origin they do send must still be an allowed host). Every other connection
is authenticated by its session cookie behind ``AllowedHostsOriginValidator``.

The key never travels further than this module: it is removed from the scope's headers and
subprotocols before the consumer sees them, and it is never logged (only its 8-character
prefix, which the admin shows too). The consumer refuses anonymous connections.
"""

from __future__ import annotations

from typing import Any

import structlog
from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator, OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from accounts.selectors import apitoken_get_active
from accounts.services import apitoken_mark_used
from streaming.protocol import TOKEN_SUBPROTOCOL_PREFIX

log = structlog.get_logger(__name__)

MAX_KEY_LENGTH = 128
"""Keys are 43 characters; anything much longer is refused without hashing it."""


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
def _authenticate(key: str):
    """The user owning an active token with this key, and the token's prefix (or None)."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    token = apitoken_get_active(key=key)
    if token is None:
        return None
    apitoken_mark_used(token_id=token.pk)
    return token.user, token.prefix


class _OriginOptionalValidator(OriginValidator):
    """Like AllowedHostsOriginValidator, but a missing Origin is fine (programs send none)."""

    def valid_origin(self, parsed_origin) -> bool:
        return parsed_origin is None or self.validate_origin(parsed_origin)


class ApiTokenOrSessionAuth:
    """ASGI middleware for WebSockets: token-authenticated or session-authenticated ``inner``.

    Sets ``scope["user"]`` (AnonymousUser when a presented token is invalid or absent and no
    session), ``scope["auth_method"]`` (``token`` / ``session``), ``scope["auth_error"]``
    (``invalid_token`` or None) and ``scope["token_via_subprotocol"]``.
    """

    def __init__(self, inner) -> None:
        allowed_hosts = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not allowed_hosts:
            allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
        self._token_app = _OriginOptionalValidator(inner, allowed_hosts)
        self._session_app = AllowedHostsOriginValidator(AuthMiddlewareStack(inner))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError(f"ApiTokenOrSessionAuth serves WebSockets only, got {scope['type']}")
        key, via = extract_token(scope)
        if via is None:
            scope = _without_secrets(scope)
            scope.update(auth_method="session", auth_error=None, token_via_subprotocol=False)
            return await self._session_app(scope, receive, send)
        found = await _authenticate(key or "")
        scope = _without_secrets(scope)
        scope.update(auth_method="token", token_via_subprotocol=via == "subprotocol")
        if found is None:
            log.info("ws.token_rejected", via=via, client=_client(scope))
            scope.update(user=AnonymousUser(), auth_error="invalid_token")
        else:
            user, prefix = found
            scope.update(user=user, auth_error=None, api_token_prefix=prefix)
        return await self._token_app(scope, receive, send)


def _client(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None
