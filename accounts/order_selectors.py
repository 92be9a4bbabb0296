"""Reads of orders, trades and positions, and of who may trade or see which account."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django.db.models import QuerySet

from accounts.models import KiteAccount
from accounts.order_models import (
    OPEN_STATUSES,
    Order,
    OrderAudit,
    OrderStatus,
    PositionSnapshot,
    Trade,
)


def accounts_tradable_by(*, user) -> QuerySet[KiteAccount]:
    """Accounts ``user`` may place orders on: those granted to them in the admin.

    Superusers are no exception: trading is granted per account, explicitly.
    """
    if not user.is_active:
        return KiteAccount.objects.none()
    return KiteAccount.objects.filter(traders=user).order_by("pk")


def accounts_visible_to(*, user) -> QuerySet[KiteAccount]:
    """Accounts whose orders and positions ``user`` may see: those they trade; superusers all."""
    if not user.is_active:
        return KiteAccount.objects.none()
    if user.is_superuser:
        return KiteAccount.objects.order_by("pk")
    return accounts_tradable_by(user=user)


def orders_list(
    *,
    user,
    account_ids: Iterable[int] | None = None,
    statuses: Iterable[str] | None = None,
    since: dt.datetime | None = None,
) -> QuerySet[Order]:
    """Orders on the accounts ``user`` may see, newest first, optionally filtered."""
    orders = Order.objects.filter(account__in=accounts_visible_to(user=user))
    if account_ids is not None:
        orders = orders.filter(account_id__in=list(account_ids))
    if statuses is not None:
        orders = orders.filter(status__in=list(statuses))
    if since is not None:
        orders = orders.filter(created_at__gte=since)
    return orders.order_by("-pk")


def order_get_visible(*, user, order_id: int) -> Order | None:
    return orders_list(user=user).filter(pk=order_id).first()


def orders_open(*, account: KiteAccount) -> QuerySet[Order]:
    """The account's orders that are still working at Kite, oldest first."""
    return Order.objects.filter(account=account, status__in=OPEN_STATUSES).order_by("pk")


def orders_unresolved(*, account: KiteAccount | None = None) -> QuerySet[Order]:
    """Orders whose placement's outcome is unknown, oldest first."""
    orders = Order.objects.filter(status=OrderStatus.UNKNOWN)
    if account is not None:
        orders = orders.filter(account=account)
    return orders.order_by("pk")


def trades_list(*, account: KiteAccount) -> QuerySet[Trade]:
    return Trade.objects.filter(account=account).order_by("pk")


def position_snapshot_latest(*, account: KiteAccount) -> PositionSnapshot | None:
    return PositionSnapshot.objects.filter(account=account).order_by("-taken_at").first()


def order_audits_for(*, account: KiteAccount) -> QuerySet[OrderAudit]:
    return OrderAudit.objects.filter(account=account).order_by("-pk")
