"""Celery tasks for broker accounts."""

from __future__ import annotations

from typing import Any, Final

from celery import Task, shared_task

from accounts.services import accounts_expire_sessions
from streaming.locks import run_locked
from subscriptions.tasks import DATABASE_BLIPS, RETRY_BACKOFF

EXPIRE_SESSIONS_TIME_LIMIT_S: Final = 60


@shared_task(
    name="accounts.expire_sessions",
    bind=True,
    soft_time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S - 10,
    time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S,
    # A daily job: a database blip at 06:00 must not leave expired sessions unmarked all day.
    autoretry_for=DATABASE_BLIPS,
    **RETRY_BACKOFF,
)
def expire_sessions(self: Task) -> dict[str, Any]:
    """At 06:00 IST: mark accounts whose access token has expired; the admin shows who must log in."""

    def run() -> dict[str, Any]:
        return {"expired": accounts_expire_sessions()}

    return run_locked(
        name="expire_sessions", time_limit_s=EXPIRE_SESSIONS_TIME_LIMIT_S,
        task_id=self.request.id or "", fn=run,
    )


RESOLVE_TIME_LIMIT_S: Final = 60


@shared_task(
    name="accounts.resolve_unknown_order",
    soft_time_limit=RESOLVE_TIME_LIMIT_S - 10,
    time_limit=RESOLVE_TIME_LIMIT_S,
    autoretry_for=DATABASE_BLIPS,
    **RETRY_BACKOFF,
)
def resolve_unknown_order(order_id: int) -> str:
    """Settle one UNKNOWN order from Kite's order book; asks again later until it is settled.

    The next run is a countdown task (``ORDERS_UNKNOWN_CHECK_INTERVAL_S``): with late acks a
    worker lost while holding it has it delivered again, so the chain does not break.
    """
    from accounts.order_actions import order_resolve_unknown
    from accounts.order_desk import order_desk_from_settings

    desk = order_desk_from_settings()
    outcome = order_resolve_unknown(order_id=order_id, desk=desk)
    if outcome in ("waiting", "resent"):
        desk.schedule_resolution(order_id, desk.limits.unknown_check_interval_s)
    return outcome


@shared_task(
    name="accounts.resolve_stale_orders",
    soft_time_limit=RESOLVE_TIME_LIMIT_S - 10,
    time_limit=RESOLVE_TIME_LIMIT_S,
    autoretry_for=DATABASE_BLIPS,
    **RETRY_BACKOFF,
)
def resolve_stale_orders() -> dict[str, Any]:
    """The beat's safety net: UNKNOWN orders, and PENDING ones whose placing process stopped
    before it sent them or recorded Kite's answer, get a resolution run."""
    from accounts.order_actions import order_resolve_unknown, orders_stale
    from accounts.order_desk import order_desk_from_settings
    from accounts.order_models import Order, OrderStatus

    stale = Order.objects.filter(status__in=[OrderStatus.UNKNOWN, OrderStatus.PENDING]).exists()
    if not stale:
        return {"resolved": {}}
    desk = order_desk_from_settings()
    outcomes: dict[str, int] = {}
    for order_id in orders_stale(desk=desk):
        outcome = order_resolve_unknown(order_id=order_id, desk=desk)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {"resolved": outcomes}
