"""The order sync: Kite's order book, trades and positions, reconciled with what we stored.

Live updates (ticker socket, postbacks) can be missed: runticker was disconnected, a
postback did not reach us, the database blinked. :func:`order_sync_run` pulls the account's
books through its broker and feeds every order through ``order_apply_update`` and every fill
through ``trade_record``, the same services the live updates use, so a sync can only move an
order forwards and never duplicates a trade. Whatever those services changed is what the
live updates had missed; each such correction is recorded on the run's ``OrderSyncRun``
(visible in the admin) and the changed orders reach WebSocket clients like any update.
The Celery task ``accounts.sync_orders`` runs it on its schedule (django-celery-beat) and on
every runticker connect of an account.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import structlog
from django.utils import timezone

from accounts.brokers import Broker, BrokerError, broker_for
from accounts.models import KiteAccount, Order, OrderSyncRun, PositionSnapshot
from accounts.order_services import OrderUpdateError, order_apply_update, trade_record
from accounts.selectors import account_list_streamable

log = structlog.get_logger(__name__)

SYNC_SOURCE: Final = "sync"
MAX_CORRECTIONS_RECORDED: Final = 500
"""A run lists at most this many corrections (and counts them all)."""


def order_sync_accounts() -> list[KiteAccount]:
    """The accounts a scheduled sync covers: live (not paper) accounts with a usable session."""
    return list(account_list_streamable().filter(is_paper=False))


def _order_state(order: Order | None) -> dict[str, Any] | None:
    if order is None:
        return None
    return {"status": order.status, "filled_quantity": order.filled_quantity}


def order_sync_run(
    *, account: KiteAccount, trigger: str, broker: Broker | None = None,
    now: dt.datetime | None = None,
) -> OrderSyncRun:
    """Pull the account's orders, trades and positions; apply what the live updates missed."""
    run = OrderSyncRun.objects.create(
        account=account, trigger=trigger, started_at=now or timezone.now()
    )
    broker = broker or broker_for(account=account)
    try:
        orders, trades, positions = broker.orders(), broker.trades(), broker.positions()
    except BrokerError as exc:
        run.status = OrderSyncRun.Status.FAILED
        run.error = exc.message[:500]
        run.finished_at = timezone.now()
        run.save(update_fields=["status", "error", "finished_at"])
        log.warning("order_sync.failed", account=account.label, trigger=trigger, error=exc.message[:200])
        return run
    corrections: list[dict[str, Any]] = []
    count = 0

    def correction(item: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        if len(corrections) < MAX_CORRECTIONS_RECORDED:
            corrections.append(item)

    known = {
        o.kite_order_id: o
        for o in Order.objects.filter(
            account=account, kite_order_id__in=[str(u.get("order_id")) for u in orders]
        )
    }
    for update in orders:
        order_id = str(update.get("order_id"))
        before = _order_state(known.get(order_id))
        try:
            order = order_apply_update(account=account, update=update, source=SYNC_SOURCE)
        except OrderUpdateError as exc:
            correction({"kind": "invalid_order", "order_id": order_id, "error": str(exc)[:200]})
            continue
        if order is not None:
            correction({"kind": "order", "order_id": order_id, "before": before,
                        "after": _order_state(order)})
    for trade in trades:
        try:
            recorded = trade_record(account=account, trade=trade, source=SYNC_SOURCE)
        except OrderUpdateError as exc:
            correction({"kind": "invalid_trade", "trade_id": str(trade.get("trade_id")),
                        "error": str(exc)[:200]})
            continue
        if recorded is not None:
            correction({"kind": "trade", "trade_id": recorded.trade_id,
                        "order_id": recorded.kite_order_id, "quantity": recorded.quantity})
    finished = timezone.now()
    PositionSnapshot.objects.create(
        account=account, taken_at=finished, net=positions.get("net", []),
        day=positions.get("day", []), source=SYNC_SOURCE,
    )  # fmt: skip
    run.status = OrderSyncRun.Status.OK
    run.orders_seen = len(orders)
    run.trades_seen = len(trades)
    run.corrections = corrections
    run.finished_at = finished
    run.save(update_fields=["status", "orders_seen", "trades_seen", "corrections", "finished_at"])
    log.info("order_sync.done", account=account.label, trigger=trigger, orders=len(orders),
             trades=len(trades), corrections=count)
    return run
