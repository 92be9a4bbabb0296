"""Reads of what the engine stored: gap minutes worth backfilling, recent bars, a chain's minutes."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from streaming.greeks import IST
from streaming.models import ChainMinute, UnderlyingBar

MINUTE_S = 60


def bar_gaps_list(*, since: dt.datetime, until: dt.datetime) -> dict[int, list[int]]:
    """Per instrument, the start (epoch s) of each live-data minute in ``[since, until]`` with no
    tick that Kite's history has not yet been asked for, oldest first.

    Two kinds: gap bars the engine stored (``is_gap``, never checked), and minutes with no row
    at all between two stored live bars of the same IST day (the engine that held them died, or
    another took over). Mock bars are never backfilled: the synthetic market has no history
    at Kite, and minutes next to them are not counted as holes.
    """
    rows = (
        UnderlyingBar.objects.filter(start__gte=since, start__lte=until)
        .order_by("instrument_id", "start")
        .values_list("instrument_id", "start", "is_gap", "is_mock", "backfill_checked_at")
    )
    gaps: dict[int, list[int]] = defaultdict(list)
    previous: dict[int, tuple[int, bool]] = {}  # instrument -> (last minute seen, its is_mock)
    for instrument_id, start, is_gap, is_mock, checked_at in rows.iterator(chunk_size=5000):
        minute = int(start.timestamp())
        last = previous.get(instrument_id)
        if (
            last is not None
            and not is_mock
            and not last[1]
            and start.astimezone(IST).date() == dt.datetime.fromtimestamp(last[0], IST).date()
        ):
            gaps[instrument_id].extend(range(last[0] + MINUTE_S, minute, MINUTE_S))
        if is_gap and not is_mock and checked_at is None:
            gaps[instrument_id].append(minute)
        previous[instrument_id] = (minute, is_mock)
    return {token: sorted(minutes) for token, minutes in gaps.items() if minutes}


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
