"""Reads of broker accounts and API tokens."""

import datetime as dt
from dataclasses import dataclass

from django.db.models import JSONField, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from accounts.models import ApiToken, KiteAccount
from streaming.kite.limits import MAX_INSTRUMENTS_PER_API_KEY
from streaming.models import AccountLease, EngineHeartbeat


def account_list_streamable() -> QuerySet[KiteAccount]:
    """Accounts the engine may stream: active, with a token that has not expired."""
    now = timezone.now()
    return (
        KiteAccount.objects.filter(status=KiteAccount.Status.ACTIVE)
        .exclude(access_token="")
        .filter(Q(token_expires_at__isnull=True) | Q(token_expires_at__gt=now))
        .order_by("pk")
    )


def account_list_needing_login() -> QuerySet[KiteAccount]:
    """Accounts that are not disabled but have no usable session."""
    now = timezone.now()
    return (
        KiteAccount.objects.exclude(status=KiteAccount.Status.DISABLED)
        .filter(
            Q(status=KiteAccount.Status.SESSION_EXPIRED)
            | Q(access_token="")
            | Q(token_expires_at__lte=now)
        )
        .order_by("label")
    )


def apitoken_get_active(*, key: str) -> ApiToken | None:
    """The unrevoked token whose key hashes to the stored hash, if any."""
    return (
        ApiToken.objects.select_related("user")
        .filter(key_hash=ApiToken.hash_key(key), revoked_at__isnull=True, user__is_active=True)
        .first()
    )


def account_list_with_engine(queryset: QuerySet[KiteAccount], *, now: dt.datetime) -> QuerySet[KiteAccount]:
    """``queryset`` annotated with the engine holding each account's lease and its heartbeat.

    Three subqueries in the one SELECT: the admin's account list costs no query per row.
    """
    lease = AccountLease.objects.filter(account=OuterRef("pk"), expires_at__gt=now)
    heartbeat = EngineHeartbeat.objects.filter(engine_id=OuterRef("lease_owner"))
    return queryset.annotate(
        lease_owner=Subquery(lease.values("owner")[:1]),
        engine_state=Subquery(heartbeat.values("state")[:1], output_field=JSONField()),
        engine_seen_at=Subquery(heartbeat.values("updated_at")[:1]),
    )


@dataclass(frozen=True)
class AccountStreaming:
    """What the engine holding an account last said about it."""

    engine_id: str | None
    last_tick_age_s: float | None
    instruments: int
    capacity: int = MAX_INSTRUMENTS_PER_API_KEY


def account_streaming(account: KiteAccount, *, now: dt.datetime) -> AccountStreaming:
    """From an account of :func:`account_list_with_engine`; the tick age counts from now."""
    engine_id = getattr(account, "lease_owner", None)
    state = getattr(account, "engine_state", None)
    accounts = state.get("accounts") if isinstance(state, dict) else None
    entry = accounts.get(account.label) if isinstance(accounts, dict) else None
    if engine_id is None or not isinstance(entry, dict):
        return AccountStreaming(engine_id=engine_id, last_tick_age_s=None, instruments=0)
    age_s = entry.get("last_tick_age_s")
    seen_at = getattr(account, "engine_seen_at", None)
    if isinstance(age_s, int | float) and seen_at is not None:
        age_s = age_s + max(0.0, (now - seen_at).total_seconds())
    return AccountStreaming(
        engine_id=engine_id,
        last_tick_age_s=age_s if isinstance(age_s, int | float) else None,
        instruments=int(entry.get("instruments") or 0),
    )
