"""Writes to subscriptions. Every write tells the running engines to reload after commit."""

from collections.abc import Iterable

import structlog
from django.db import transaction
from django.utils import timezone

from streaming.control import notify_engines_on_commit
from subscriptions.models import Instrument, RebalanceRule, Subscription

log = structlog.get_logger(__name__)


@transaction.atomic
def subscription_activate(
    *,
    instrument: Instrument,
    mode: str = Subscription.Mode.FULL,
    source: str = Subscription.Source.MANUAL,
    pinned_account=None,
    rule: RebalanceRule | None = None,
) -> Subscription:
    """Subscribe an instrument (create or reactivate its one subscription)."""
    subscription, created = Subscription.objects.select_for_update().get_or_create(
        instrument=instrument,
        defaults={
            "mode": mode,
            "source": source,
            "pinned_account": pinned_account,
            "rebalance_rule": rule,
            "status": Subscription.Status.ACTIVE,
        },
    )
    if not created:
        subscription.mode = mode
        subscription.status = Subscription.Status.ACTIVE
        subscription.status_reason = ""
        subscription.source = source
        subscription.rebalance_rule = rule
        subscription.pinned_account = pinned_account
        subscription.save()
    notify_engines_on_commit()
    log.info("subscription.activated", instrument_token=instrument.pk, mode=mode, source=source)
    return subscription


def subscriptions_set_status(*, subscription_ids: Iterable[int], status: str, reason: str = "") -> int:
    """Activate or deactivate many subscriptions in one UPDATE; returns how many changed."""
    with transaction.atomic():
        changed = (
            Subscription.objects.filter(pk__in=list(subscription_ids))
            .exclude(status=status)
            .update(status=status, status_reason=reason, updated_at=timezone.now())
        )
        if changed:
            notify_engines_on_commit()
    log.info("subscriptions.status_set", status=status, count=changed, reason=reason)
    return changed


def subscription_deactivate(*, subscription: Subscription, reason: str) -> bool:
    return bool(
        subscriptions_set_status(
            subscription_ids=[subscription.pk], status=Subscription.Status.INACTIVE, reason=reason
        )
    )


def subscription_set_mode(*, subscription: Subscription, mode: str) -> None:
    with transaction.atomic():
        Subscription.objects.filter(pk=subscription.pk).update(mode=mode, updated_at=timezone.now())
        notify_engines_on_commit()
