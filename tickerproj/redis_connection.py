"""How the project's own Redis clients reach Redis: a plain URL, or through Redis Sentinel.

With ``REDIS_SENTINELS`` set, settings.REDIS_URL is a ``redis+sentinel://`` URL built by
:func:`sentinel_url`, and every client made by :func:`redis_client` or
:func:`async_redis_client` (engine notices, the Kite rate limiter, the health probe) asks the
sentinels for the current master on each (re)connect, so a failover needs no restart.
channels-redis and Celery get their own Sentinel settings (tickerproj/settings.py); redis-py
has no URL form for Sentinel, which is why this one exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import redis
import redis.asyncio as aioredis
from django.core.exceptions import ImproperlyConfigured
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import MasterNotFoundError, Sentinel

SENTINEL_SCHEME = "redis+sentinel://"


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    password: str = ""

    @property
    def described(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"master {self.master_name!r} at sentinels {hosts}"


def parse_sentinels(values: Sequence[str], *, setting: str = "REDIS_SENTINELS") -> tuple[tuple[str, int], ...]:
    """``host:port`` entries as pairs; a bad entry is a start-up error naming it."""
    pairs = []
    for value in values:
        host, sep, port = value.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ImproperlyConfigured(f"{setting}: {value!r} is not host:port")
        pairs.append((host.strip("[]"), int(port)))
    if not pairs:
        raise ImproperlyConfigured(f"{setting} is empty")
    return tuple(pairs)


def sentinel_url(target: SentinelTarget) -> str:
    auth = f":{quote(target.password, safe='')}@" if target.password else ""
    hosts = ",".join(f"{h}:{p}" for h, p in target.sentinels)
    return f"{SENTINEL_SCHEME}{auth}{hosts}/{quote(target.master_name, safe='')}/{target.db}"


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The target of a ``redis+sentinel://`` URL; None for any other URL."""
    if not url.startswith(SENTINEL_SCHEME):
        return None
    rest = url[len(SENTINEL_SCHEME):]
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    master, _, db = path.partition("/")
    return SentinelTarget(
        sentinels=parse_sentinels(hosts.split(","), setting="Redis Sentinel URL"),
        master_name=unquote(master),
        db=int(db or 0),
        password=unquote(auth[1:]) if auth.startswith(":") else "",
    )


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A client on ``url``, or on the current Sentinel master of a ``redis+sentinel://`` URL."""
    target = parse_sentinel_url(url)
    if target is None:
        return redis.Redis.from_url(url, **kwargs)
    sentinel = Sentinel(target.sentinels, socket_timeout=kwargs.get("socket_timeout", 5))
    return sentinel.master_for(
        target.master_name, db=target.db, password=target.password or None, **kwargs
    )


def async_redis_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """The asyncio twin of :func:`redis_client`."""
    target = parse_sentinel_url(url)
    if target is None:
        return aioredis.Redis.from_url(url, **kwargs)
    sentinel = AsyncSentinel(target.sentinels, socket_timeout=kwargs.get("socket_timeout", 5))
    return sentinel.master_for(
        target.master_name, db=target.db, password=target.password or None, **kwargs
    )


def sentinel_master_check(target: SentinelTarget, *, timeout_s: float = 2.0) -> tuple[str, int]:
    """The master's address; a clear start-up error when no sentinel knows that master."""
    sentinel = Sentinel(target.sentinels, socket_timeout=timeout_s)
    try:
        return sentinel.discover_master(target.master_name)
    except MasterNotFoundError as exc:
        raise ImproperlyConfigured(
            f"Redis Sentinel: no sentinel knows a reachable {target.described} "
            f"(REDIS_SENTINELS, REDIS_SENTINEL_MASTER): {exc}"
        ) from exc
    finally:
        for client in sentinel.sentinels:
            client.close()
