"""Writes of the streaming side's tables outside the engine: the gap backfill of bars.

A minute of an underlying's 1-minute bars that got no tick (a disconnect, a stall, an
engine takeover) is filled from Kite's historical minute candles and marked ``backfilled``;
a minute Kite lacks too stays a gap, marked as checked so it is not asked for again. One
historical request per instrument and IST day covers all of that day's gap minutes (the
REST client takes each request's slot from the shared rate limiter, so the engine's own
REST calls and every worker share Kite's 3 requests/s per api_key).

Idempotent, and never over a live bar: a gap row is updated only while it is still an
unfilled gap (a conditional UPDATE), a missing minute is inserted only if it is still
missing (``ON CONFLICT DO NOTHING``); the engine's later live bar for a minute replaces a
backfilled one, and its gap bar never replaces anything (``streaming.engine.store.bars_save``).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from django.db import transaction

from streaming.greeks import IST
from streaming.kite.instruments import KITE_INDEX_UNDERLYINGS
from streaming.kite.rest import CandleSeries, KiteError
from streaming.models import UnderlyingBar
from streaming.selectors import MINUTE_S, bar_gaps_list
from subscriptions.models import Instrument

log = structlog.get_logger(__name__)


class HistoricalClient(Protocol):
    """What the backfill needs of ``streaming.kite.rest.KiteRestClient``."""

    def historical(
        self, instrument_token: int, from_: dt.datetime, to: dt.datetime, interval: str
    ) -> CandleSeries: ...


@dataclass(frozen=True, slots=True)
class FilledBar:
    """A minute filled from Kite's candles, for the ``bars.<NAME>`` group."""

    token: int
    name: str
    start_epoch_s: int
    open: float
    high: float
    low: float
    close: float
    volume: int


@dataclass
class BackfillResult:
    """What one backfill run did: requests made and failed, minutes filled and left as gaps."""

    requests: int = 0
    failed_requests: int = 0
    filled: list[FilledBar] = field(default_factory=list)
    lacked: int = 0

    def summary(self) -> dict[str, int]:
        return {"requests": self.requests, "failed_requests": self.failed_requests,
                "filled": len(self.filled), "lacked": self.lacked}


def _underlying_name(token: int) -> str:
    symbol = Instrument.objects.filter(instrument_token=token).values_list(
        "tradingsymbol", flat=True
    ).first() or str(token)
    return KITE_INDEX_UNDERLYINGS.get(symbol, symbol)


def bars_backfill(
    *,
    client: HistoricalClient,
    since: dt.datetime,
    until: dt.datetime,
    now: Callable[[], dt.datetime],
) -> BackfillResult:
    """Fill the gap minutes in ``[since, until]`` from Kite's minute candles.

    Errors of one request are logged and counted; its minutes stay unchecked for the next run.
    """
    result = BackfillResult()
    for token, minutes in bar_gaps_list(since=since, until=until).items():
        by_day: dict[dt.date, list[int]] = defaultdict(list)
        for minute in minutes:
            by_day[dt.datetime.fromtimestamp(minute, IST).date()].append(minute)
        name = _underlying_name(token)
        for day_minutes in by_day.values():
            result.requests += 1
            first, last = day_minutes[0], day_minutes[-1]
            try:
                series = client.historical(
                    token,
                    dt.datetime.fromtimestamp(first, IST),
                    dt.datetime.fromtimestamp(last + MINUTE_S - 1, IST),
                    "minute",
                )
            except KiteError as exc:
                result.failed_requests += 1
                log.warning("backfill.historical_failed", instrument_token=token,
                            start=first, end=last, error=str(exc)[:300])
                continue
            filled = _bars_fill(token=token, name=name, minutes=day_minutes, series=series,
                                checked_at=now())
            result.filled.extend(filled)
            result.lacked += len(day_minutes) - len(filled)
    log.info("backfill.done", **result.summary())
    return result


def _bars_fill(
    *, token: int, name: str, minutes: list[int], series: CandleSeries, checked_at: dt.datetime
) -> list[FilledBar]:
    """Write one instrument-day's answer: candles into the gaps, the rest marked checked."""
    epoch = series.ts.astype("int64").tolist()
    candles = {
        ts: FilledBar(token, name, ts, o, h, lo, c, v)
        for ts, o, h, lo, c, v in zip(
            epoch, series.open.tolist(), series.high.tolist(), series.low.tolist(),
            series.close.tolist(), series.volume.tolist(), strict=True,
        )
    }
    filled: list[FilledBar] = []
    lacked: list[dt.datetime] = []
    with transaction.atomic():
        existing = set(
            UnderlyingBar.objects.filter(
                instrument_id=token, start__in=[_utc(m) for m in minutes]
            ).values_list("start", flat=True)
        )
        inserts: list[UnderlyingBar] = []
        for minute in minutes:
            start = _utc(minute)
            bar = candles.get(minute)
            if bar is None:
                lacked.append(start)
                if start not in existing:
                    inserts.append(UnderlyingBar(instrument_id=token, start=start, is_gap=True,
                                                 backfill_checked_at=checked_at))
                continue
            values = {"open": bar.open, "high": bar.high, "low": bar.low, "close": bar.close,
                      "volume": bar.volume, "tick_count": 0, "is_gap": False, "backfilled": True}
            if start in existing:
                # Only while it is still an unfilled gap: a live bar written meanwhile stays.
                updated = UnderlyingBar.objects.filter(
                    instrument_id=token, start=start, is_gap=True, backfilled=False
                ).update(**values)
                if updated:
                    filled.append(bar)
            else:
                inserts.append(UnderlyingBar(instrument_id=token, start=start, **values))
                filled.append(bar)
        UnderlyingBar.objects.filter(
            instrument_id=token, start__in=lacked, is_gap=True
        ).update(backfill_checked_at=checked_at)
        UnderlyingBar.objects.bulk_create(inserts, ignore_conflicts=True)
        # An insert the engine's live bar beat to the minute was skipped: report only the rows
        # that really hold Kite's candle now.
        kept = set(
            UnderlyingBar.objects.filter(
                instrument_id=token, start__in=[_utc(b.start_epoch_s) for b in filled],
                backfilled=True,
            ).values_list("start", flat=True)
        )
    return [b for b in filled if _utc(b.start_epoch_s) in kept]


def _utc(epoch_s: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC)
