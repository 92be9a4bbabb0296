"""Notices that Redis has forgotten the channel layer's groups, so connections re-join at once.

channels-redis keeps every group membership in Redis. A Redis restart without persistence
forgets them all, and the WebSocket connections that lived through it keep waiting for
snapshots that no longer reach them: they would re-join only at their next periodic refresh
(``group_refresh_s``, minutes). A marker key, set once with ``SET NX``, is gone after such a
restart: the first process to look sets a new one, and every process that reads a value it
did not know tells its connections to re-join now. It costs one pipelined round trip per
web process every ``check_s``, however many connections the process holds.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from tickerproj.redis_connection import async_redis_client

log = structlog.get_logger(__name__)

#: Short: a check that waits on a frozen Redis delays only the re-joins of this check.
_TIMEOUT_S = 1.0


def layer_marker_key(prefix: str) -> str:
    """The marker of one installation's channel layer (its CHANNEL_LAYER_PREFIX)."""
    return f"{prefix}:layer-marker"


class LayerRestartWatch:
    """``generation()`` goes up each time this process sees Redis lose the layer's groups."""

    def __init__(
        self,
        *,
        redis_url: str,
        key: str,
        check_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = redis_url
        self._key = key
        self._check_s = check_s
        self._clock = clock
        self._known: bytes | None = None
        self._generation = 0
        self._checked_at = float("-inf")
        self._client = None
        self._lock: asyncio.Lock | None = None

    async def generation(self) -> int:
        """The current generation; Redis is asked at most every ``check_s`` (a Redis that
        does not answer leaves it unchanged: its loss shows once it answers again)."""
        if not self._url or self._clock() - self._checked_at < self._check_s:
            return self._generation
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._clock() - self._checked_at >= self._check_s:
                self._checked_at = self._clock()
                await self._check()
        return self._generation

    async def _check(self) -> None:
        if self._client is None:
            self._client = async_redis_client(
                self._url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S,
                client_name="tickerproj.layer_watch",
            )
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                # A fresh value each time: a marker that was gone is always a new value.
                pipe.set(self._key, secrets.token_hex(8), nx=True)
                pipe.get(self._key)
                _, value = await pipe.execute()
        except (RedisError, OSError):
            return
        if self._known is not None and value != self._known:
            self._generation += 1
            log.warning("ws.layer_groups_lost", generation=self._generation)
        self._known = value
