"""The NSE F&O calendar: trading days, the 09:15-15:30 IST session and contract expiries.

One pure module (no Django, no numpy, no clock of its own: every function takes the moment
or the day it is asked about), shared by the live engine's market hours and by the synthetic
market, so the two agree on when a session opens, when it closes and which contracts are
listed on any given day.

Expiries (NSE rules in force for 2025-26)
    Index options expire on Tuesdays; the last Tuesday of a month is the monthly expiry, the
    one that also has a future. An expiry that falls on a holiday moves to the previous
    trading day. NIFTY lists weekly expiries and, among them, the current monthly one:
    :func:`weekly_option_expiries` keeps that monthly listed whatever the date, as NSE does.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from typing import Final

from streaming.greeks import IST, expiry_close_epoch_s

__all__ = [
    "MARKET_CLOSE_MINUTE_IST",
    "MARKET_OPEN_MINUTE_IST",
    "MINUTES_PER_SESSION",
    "is_trading_day",
    "ist_date",
    "monthly_expiries",
    "parse_holidays",
    "previous_trading_day_on_or_before",
    "session_close_epoch_s",
    "session_open_epoch_s",
    "weekly_expiries",
    "weekly_option_expiries",
]

MARKET_OPEN_MINUTE_IST: Final = 9 * 60 + 15
MARKET_CLOSE_MINUTE_IST: Final = 15 * 60 + 30
MINUTES_PER_SESSION: Final = MARKET_CLOSE_MINUTE_IST - MARKET_OPEN_MINUTE_IST  # 375

_TUESDAY: Final = 1


def parse_holidays(values: Iterable[str | date]) -> frozenset[date]:
    """MARKET_HOLIDAYS as dates; a malformed entry raises with the value that failed."""
    out = set()
    for value in values:
        if isinstance(value, date):
            out.add(value)
            continue
        try:
            out.add(date.fromisoformat(value.strip()))
        except ValueError as exc:
            raise ValueError(f"MARKET_HOLIDAYS: expected ISO date, got {value!r}") from exc
    return frozenset(out)


def ist_date(epoch_s: float) -> date:
    """The IST calendar date of an epoch time."""
    return datetime.fromtimestamp(epoch_s, IST).date()


def session_close_epoch_s(day: date) -> float:
    """Epoch seconds of 15:30 IST on ``day``: the close, when that day's contracts expire."""
    return expiry_close_epoch_s(day)


def session_open_epoch_s(day: date) -> float:
    """Epoch seconds of 09:15 IST on ``day``."""
    return datetime(day.year, day.month, day.day, 9, 15, tzinfo=IST).timestamp()


def is_trading_day(day: date, holidays: frozenset[date]) -> bool:
    return day.weekday() < 5 and day not in holidays


def previous_trading_day_on_or_before(day: date, holidays: frozenset[date]) -> date:
    while not is_trading_day(day, holidays):
        day -= timedelta(days=1)
    return day


def _last_tuesday(year: int, month: int) -> date:
    first_next = date(year + month // 12, month % 12 + 1, 1)
    last = first_next - timedelta(days=1)
    return last - timedelta(days=(last.weekday() - _TUESDAY) % 7)


def monthly_expiry_of(year: int, month: int, holidays: frozenset[date] = frozenset()) -> date:
    """The monthly expiry of a calendar month: its last Tuesday, holiday-adjusted."""
    return previous_trading_day_on_or_before(_last_tuesday(year, month), holidays)


def monthly_expiries(
    *, now_epoch_s: float, count: int, holidays: frozenset[date] = frozenset()
) -> list[date]:
    """The next ``count`` monthly expiries (last Tuesday, holiday-adjusted) not yet closed."""
    today = ist_date(now_epoch_s)
    out: list[date] = []
    year, month = today.year, today.month
    while len(out) < count:
        expiry = monthly_expiry_of(year, month, holidays)
        if session_close_epoch_s(expiry) > now_epoch_s:
            out.append(expiry)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def weekly_expiries(
    *, now_epoch_s: float, count: int, holidays: frozenset[date] = frozenset()
) -> list[date]:
    """The next ``count`` weekly expiries (Tuesdays, holiday-adjusted) not yet closed."""
    today = ist_date(now_epoch_s)
    tuesday = today + timedelta(days=(_TUESDAY - today.weekday()) % 7)
    out: list[date] = []
    while len(out) < count:
        expiry = previous_trading_day_on_or_before(tuesday, holidays)
        if session_close_epoch_s(expiry) > now_epoch_s:
            out.append(expiry)
        tuesday += timedelta(days=7)
    return out


def weekly_option_expiries(
    *, now_epoch_s: float, count: int, holidays: frozenset[date] = frozenset()
) -> list[date]:
    """The ``count`` listed expiries of a weekly index: the nearest weeklies and the monthly.

    NSE lists the current monthly expiry (the one with a future) beside the weeklies, however
    far it is: from the day after one monthly expiry until the next, the nearest three weeklies
    may all fall before it. With ``count >= 2`` the nearest monthly is always listed (it takes
    the place of the farthest weekly when it lies beyond them); ``count == 1`` is the nearest
    expiry only.
    """
    weeklies = weekly_expiries(now_epoch_s=now_epoch_s, count=count, holidays=holidays)
    if count < 2:
        return weeklies
    (monthly,) = monthly_expiries(now_epoch_s=now_epoch_s, count=1, holidays=holidays)
    if monthly in weeklies:
        return weeklies
    return [*weeklies[: count - 1], monthly]
