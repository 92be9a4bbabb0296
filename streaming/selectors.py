"""Reads of what the engine stored, for the WebSocket consumer: recent bars, a chain's minutes."""

from __future__ import annotations

import datetime as dt

from streaming.greeks import IST
from streaming.models import ChainMinute, UnderlyingBar


def bar_list_recent(*, instrument_token: int, limit: int) -> list[UnderlyingBar]:
    """The latest ``limit`` stored bars of an instrument, oldest first."""
    bars = list(
        UnderlyingBar.objects.filter(instrument_id=instrument_token).order_by("-start")[:limit]
    )
    bars.reverse()
    return bars


def chain_minute_list_day(*, underlying: str, expiry: dt.date, day: dt.date) -> list[ChainMinute]:
    """One chain's stored minutes of a trading day (IST), oldest first, of one source: the
    source (live or mock) of the day's latest minute, so the two never mix in one series."""
    start = dt.datetime.combine(day, dt.time(0), tzinfo=IST)
    rows = ChainMinute.objects.filter(
        underlying=underlying,
        expiry=expiry,
        minute__gte=start,
        minute__lt=start + dt.timedelta(days=1),
    )
    latest = rows.order_by("-minute").values_list("is_mock", flat=True).first()
    if latest is None:
        return []
    return list(rows.filter(is_mock=latest).order_by("minute"))
