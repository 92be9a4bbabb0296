"""Closing the WebSockets of a credential that goes away: a revoked token, a user, a session.

Every authenticated WebSocket joins the channel-layer groups named by :func:`ws_auth_groups`
(its user, its token or its session). Revoking a token, deactivating or deleting a user and
logging out send ``auth.revoked`` to the matching group after commit, and the consumer closes
with 4401 at once, so a revoked credential streams for milliseconds, not until the client
disconnects.
"""

from __future__ import annotations

import hashlib
from typing import Any

import structlog
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

WS_REVOKED_MESSAGE_TYPE = "auth.revoked"


def ws_user_group(user_id: int) -> str:
    return f"auth.user.{user_id}"


def ws_token_group(token_id: int) -> str:
    return f"auth.token.{token_id}"


def ws_session_group(session_key: str) -> str:
    # A digest, so that the session key itself is never written to Redis.
    return f"auth.session.{hashlib.sha256(session_key.encode()).hexdigest()[:32]}"


def ws_auth_groups(scope: dict[str, Any]) -> list[str]:
    """The groups an authenticated WebSocket joins so that a revocation reaches it."""
    user = scope["user"]
    groups = [ws_user_group(user.pk)]
    if scope.get("api_token_id") is not None:
        groups.append(ws_token_group(scope["api_token_id"]))
    session = scope.get("session")
    if scope.get("auth_method") == "session" and session is not None and session.session_key:
        groups.append(ws_session_group(session.session_key))
    return groups


def ws_close_on_commit(*, group: str, reason: str) -> None:
    """After the current transaction commits, close every WebSocket in ``group`` (4401)."""
    transaction.on_commit(lambda: _ws_close_now(group=group, reason=reason))


def _ws_close_now(*, group: str, reason: str) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": WS_REVOKED_MESSAGE_TYPE, "reason": reason})
    except (OSError, RedisError) as exc:
        # The credential is refused at the next connect anyway; open sockets are the loss.
        log.error("ws.revoke_notice_failed", group=group, reason=reason, error=str(exc)[:200])
