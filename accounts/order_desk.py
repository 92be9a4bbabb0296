"""The deployment's :class:`~accounts.order_actions.OrderDesk`, built from settings at the edge
(the API's endpoints, the admin's actions, the resolution task)."""

from __future__ import annotations

import dataclasses
import functools

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from accounts.brokers import BrokerConfig, KiteClients, broker_for
from accounts.order_actions import OrderDesk, OrderLimits
from streaming.kite.rest import KiteOrderRateLimiter, KiteRateLimiter
from tickerproj.redis_connection import redis_client


def _schedule_resolution(order_id: int, countdown_s: float) -> None:
    from accounts.tasks import resolve_unknown_order

    resolve_unknown_order.apply_async(args=[order_id], countdown=countdown_s)


def order_desk_from_settings() -> OrderDesk:
    """The desk for the current settings; the same one for as long as they do not change."""
    if not settings.REDIS_URL:
        raise ImproperlyConfigured("orders need REDIS_URL: Kite's order limits are shared through Redis")
    return _desk(settings.REDIS_URL, BrokerConfig.from_settings(), repr(OrderLimits.from_settings()))


@functools.lru_cache(maxsize=4)
def _desk(redis_url: str, config: BrokerConfig, limits_key: str) -> OrderDesk:
    """A desk per process and settings, kept (the one module-level cache of the order path) so
    that every order reuses its Redis connection pool, its registered Lua scripts and one Kite
    HTTP session per account instead of opening them per order (``benchmarks/orders``). Keyed
    by the settings it is built from (``limits_key``: the limits' repr, as they hold a dict),
    so changed settings get a new desk."""
    limits = OrderLimits.from_settings()
    redis = redis_client(redis_url)
    config = dataclasses.replace(config, rate_limiter=KiteRateLimiter(redis_client=redis))
    clients = KiteClients(config=config)
    return OrderDesk(
        broker_for=lambda account: broker_for(account=account, clients=clients),
        rate_limiter=KiteOrderRateLimiter(redis_client=redis, windows=limits.windows()),
        limits=limits,
        schedule_resolution=_schedule_resolution,
    )
