"""Reads of instruments and subscriptions; every filter runs in SQL, never in Python."""

import datetime as dt

from django.db.models import Q, QuerySet

from subscriptions.models import Instrument, RebalanceRule, Subscription


def subscription_list(
    *,
    status: str | None = None,
    mode: str | None = None,
    source: str | None = None,
    account_id: int | None = None,
    segment: str | None = None,
    underlying: str | None = None,
    rule_id: int | None = None,
) -> QuerySet[Subscription]:
    """Subscriptions filtered by the given criteria, with their instrument joined.

    ``account_id`` matches the pinned account or, for unpinned ones, the assigned account.
    """
    qs = Subscription.objects.select_related("instrument")
    if status is not None:
        qs = qs.filter(status=status)
    if mode is not None:
        qs = qs.filter(mode=mode)
    if source is not None:
        qs = qs.filter(source=source)
    if account_id is not None:
        qs = qs.filter(
            Q(pinned_account_id=account_id)
            | Q(pinned_account__isnull=True, assigned_account_id=account_id)
        )
    if segment is not None:
        qs = qs.filter(instrument__segment=segment)
    if underlying is not None:
        qs = qs.filter(instrument__name=underlying)
    if rule_id is not None:
        qs = qs.filter(rebalance_rule_id=rule_id)
    return qs.order_by("instrument_id")


def subscription_list_active() -> QuerySet[Subscription]:
    return subscription_list(status=Subscription.Status.ACTIVE)


def instrument_get_by_symbol(*, exchange: str, tradingsymbol: str) -> Instrument | None:
    return Instrument.objects.filter(exchange=exchange, tradingsymbol=tradingsymbol).first()


def instrument_list_chain(
    *, underlying: str, expiry: dt.date, strike_min: float | None = None, strike_max: float | None = None
) -> QuerySet[Instrument]:
    """The CE and PE instruments of one underlying and expiry, ordered by strike."""
    qs = Instrument.objects.filter(
        name=underlying,
        expiry=expiry,
        instrument_type__in=[Instrument.Type.CALL, Instrument.Type.PUT],
    )
    if strike_min is not None:
        qs = qs.filter(strike__gte=strike_min)
    if strike_max is not None:
        qs = qs.filter(strike__lte=strike_max)
    return qs.order_by("strike", "instrument_type")


def instrument_list_expiries(*, underlying: str, on_or_after: dt.date) -> list[dt.date]:
    """Option expiries of an underlying from a date on, nearest first."""
    return list(
        Instrument.objects.filter(
            name=underlying,
            instrument_type__in=[Instrument.Type.CALL, Instrument.Type.PUT],
            expiry__gte=on_or_after,
        )
        .values_list("expiry", flat=True)
        .distinct()
        .order_by("expiry")
    )


def instrument_list_upcoming_expiries(*, on_or_after: dt.date, limit: int) -> list[dt.date]:
    """The next ``limit`` expiry dates of any instrument, nearest first."""
    return list(
        Instrument.objects.filter(expiry__gte=on_or_after)
        .values_list("expiry", flat=True)
        .distinct()
        .order_by("expiry")[:limit]
    )


def instrument_list_underlyings() -> list[str]:
    """Names that have options, for the chain page's picker."""
    return list(
        Instrument.objects.filter(instrument_type__in=[Instrument.Type.CALL, Instrument.Type.PUT])
        .values_list("name", flat=True)
        .distinct()
        .order_by("name")
    )


def rebalance_rule_list_enabled() -> QuerySet[RebalanceRule]:
    return RebalanceRule.objects.filter(enabled=True).select_related("pinned_account").order_by("pk")


# Lookups for the WebSocket API, chunked so that a large subscribe stays under the databases'
# bound-parameter limits (SQLite's is 32 766).
_LOOKUP_CHUNK = 2000


def instrument_list_by_tokens(*, tokens: list[int]) -> list[Instrument]:
    """The instruments among ``tokens`` that exist, in no particular order."""
    found: list[Instrument] = []
    for i in range(0, len(tokens), _LOOKUP_CHUNK):
        found.extend(Instrument.objects.filter(instrument_token__in=tokens[i : i + _LOOKUP_CHUNK]))
    return found


def instrument_list_by_symbols(*, keys: list[tuple[str, str]]) -> list[Instrument]:
    """The instruments among ``(exchange, tradingsymbol)`` pairs that exist."""
    by_exchange: dict[str, list[str]] = {}
    for exchange, symbol in keys:
        by_exchange.setdefault(exchange, []).append(symbol)
    found: list[Instrument] = []
    for exchange, symbols in by_exchange.items():
        for i in range(0, len(symbols), _LOOKUP_CHUNK):
            found.extend(
                Instrument.objects.filter(
                    exchange=exchange, tradingsymbol__in=symbols[i : i + _LOOKUP_CHUNK]
                )
            )
    return found


def instrument_nearest_future_price(*, underlying: str, on_or_after: dt.date) -> float | None:
    """The stored last price of an underlying's nearest future, if known (non-zero)."""
    price = (
        Instrument.objects.filter(
            name=underlying,
            instrument_type=Instrument.Type.FUTURE,
            expiry__gte=on_or_after,
            last_price__gt=0,
        )
        .order_by("expiry")
        .values_list("last_price", flat=True)
        .first()
    )
    return float(price) if price is not None else None


def subscription_tokens_active(*, tokens: list[int]) -> set[int]:
    """Which of ``tokens`` have an active subscription (are streamed, or meant to be)."""
    active: set[int] = set()
    for i in range(0, len(tokens), _LOOKUP_CHUNK):
        active.update(
            Subscription.objects.filter(
                instrument_id__in=tokens[i : i + _LOOKUP_CHUNK], status=Subscription.Status.ACTIVE
            ).values_list("instrument_id", flat=True)
        )
    return active
