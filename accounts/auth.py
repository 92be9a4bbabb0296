"""API-token authentication, one way for HTTP and WebSocket.

:func:`apitoken_authenticate` is the only place that turns a presented key into a token: the
HTTP API (``tickerproj/api.py``) and the WebSocket middleware (``streaming/ws_auth.py``) both
call it, so both refuse the same keys and both record ``last_used_at``.
"""

from __future__ import annotations

from accounts.models import ApiToken
from accounts.selectors import apitoken_get_active
from accounts.services import apitoken_mark_used

MAX_KEY_LENGTH = 128
"""Keys are 43 characters; anything much longer is refused without hashing it."""

TOKEN_SCHEME = "token"  # noqa: S105 (a scheme name, not a secret)
"""``Authorization: Token <key>`` (``Bearer`` is accepted too, for tools that only know it)."""

def key_from_authorization(value: str) -> str | None:
    """The key of an ``Authorization: Token <key>`` (or ``Bearer <key>``) header, if it is one."""
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() not in (TOKEN_SCHEME, "bearer"):
        return None
    return key.strip()


def apitoken_authenticate(*, key: str) -> ApiToken | None:
    """The active token (of an active user) this key belongs to, its use recorded; else None.

    The user is joined in (``token.user``), so callers need no second query.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        return None
    token = apitoken_get_active(key=key)
    if token is None:
        return None
    apitoken_mark_used(token_id=token.pk, last_used_at=token.last_used_at)
    return token
