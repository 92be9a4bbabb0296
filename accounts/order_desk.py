"""The deployment's :class:`~accounts.order_actions.OrderDesk`, built from settings at the edge
(the API's endpoints, the admin's actions, the resolution task)."""

from __future__ import annotations

import dataclasses

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from accounts.brokers import BrokerConfig, broker_for
from accounts.order_actions import OrderDesk, OrderLimits
from streaming.kite.rest import KiteOrderRateLimiter, KiteRateLimiter
from tickerproj.redis_connection import redis_client


def _schedule_resolution(order_id: int, countdown_s: float) -> None:
    from accounts.tasks import resolve_unknown_order

    resolve_unknown_order.apply_async(args=[order_id], countdown=countdown_s)


def order_desk_from_settings() -> OrderDesk:
    if not settings.REDIS_URL:
        raise ImproperlyConfigured("orders need REDIS_URL: Kite's order limits are shared through Redis")
    limits = OrderLimits.from_settings()
    redis = redis_client(settings.REDIS_URL)
    config = dataclasses.replace(BrokerConfig.from_settings(), rate_limiter=KiteRateLimiter(redis_client=redis))
    return OrderDesk(
        broker_for=lambda account: broker_for(account=account, config=config),
        rate_limiter=KiteOrderRateLimiter(redis_client=redis, windows=limits.windows()),
        limits=limits,
        schedule_resolution=_schedule_resolution,
    )
