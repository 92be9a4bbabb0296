"""Historical Greeks: an option's candles with IV and Greeks, computed once, served from storage.

For one option and one range the service makes exactly two historical requests (each split by
the REST client into the spans Kite allows): the option's candles with open interest, and the
candles of its underlying source, which is the future of the same expiry when the instrument
dump lists one (Black-76 on that future's price as the forward) and otherwise the index or
stock (Black-Scholes on spot, ``compute_greeks_spot``, flagged ``spot_fallback``). Underlying
candles are matched to option candles by timestamp with one ``searchsorted``; an option
candle whose latest underlying candle is older than one interval gets no Greeks and the flag
``stale_underlying`` (``no_forward`` when there is no underlying candle at all), never a
borrowed price. Greeks are computed by ``streaming.greeks`` over the whole range at once (the
old service fetched the underlying per candle: defect 10).

Results are upserted into ``CandleGreeks``; ``HistoryCoverage`` records which spans are
complete, so a request inside a stored span is served from PostgreSQL without calling Kite,
and a later request computes only the span it is missing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import structlog
from django.db import connection, transaction
from django.utils import timezone

from streaming.greeks import (
    IST,
    Flag,
    compute_greeks,
    compute_greeks_spot,
    expiry_close_epoch_s,
    flag_names,
    years_to_expiry,
)
from streaming.kite.limits import HISTORICAL_MAX_DAYS_PER_INTERVAL
from streaming.kite.rest import KiteError
from subscriptions.models import CandleGreeks, HistoryCoverage, HistoryRange, Instrument
from subscriptions.underlyings import underlying_future, underlying_spot

log = structlog.get_logger(__name__)

INTERVALS: Final = tuple(HISTORICAL_MAX_DAYS_PER_INTERVAL)

INTERVAL_SECONDS: Final[dict[str, int]] = {
    "minute": 60,
    "3minute": 180,
    "5minute": 300,
    "10minute": 600,
    "15minute": 900,
    "30minute": 1800,
    "60minute": 3600,
    "day": 86_400,
}

#: NSE's cash-market close: a day candle's price is the close at this time.
SESSION_CLOSE_IST: Final = dt.time(15, 30)

# The CandleGreeks columns the service writes, in the order of its arrays.
_VALUE_FIELDS: Final = (
    "open", "high", "low", "close", "volume", "oi", "underlying_price", "forward",
    "iv", "delta", "gamma", "theta", "vega", "rho", "flags",
)  # fmt: skip


class HistoryError(Exception):
    """A history request that cannot be served; ``code`` says why (mapped to HTTP by the view)."""

    def __init__(self, message: str, *, code: str, instrument_token: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.instrument_token = instrument_token


class CandleSource(Protocol):
    """What the service needs from the REST client: ``KiteRestClient.historical``."""

    def historical(
        self, instrument_token: int, from_, to, interval: str, *, oi: bool = False,
        continuous: bool = False,
    ): ...


@dataclass(frozen=True, slots=True)
class Underlying:
    instrument: Instrument
    is_future: bool


@dataclass
class HistoryTable:
    """Candles and Greeks of one option as columns, oldest first (NaN where unknown)."""

    ts_s: np.ndarray  # int64 epoch seconds of the candle start
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.ts_s.size)

    def slice(self, start_s: int, end_s: int) -> HistoryTable:
        keep = (self.ts_s >= start_s) & (self.ts_s <= end_s)
        return HistoryTable(self.ts_s[keep], {k: v[keep] for k, v in self.columns.items()})


@dataclass
class HistoryResult:
    instrument: Instrument
    underlying: Underlying | None
    interval: str
    start: dt.datetime
    end: dt.datetime
    source: str  # "stored" or "computed"
    table: HistoryTable


# --------------------------------------------------------------------------------------------
# Selectors


def history_underlying(*, option: Instrument) -> Underlying | None:
    """The future of the option's expiry if listed, else its index (or stock) on the cash market."""
    future = underlying_future(name=option.name, expiry=option.expiry, exchange=option.exchange)
    if future is not None:
        return Underlying(future, is_future=True)
    spot = underlying_spot(name=option.name)
    return Underlying(spot, is_future=False) if spot is not None else None


def history_missing_start(
    *, instrument: Instrument, interval: str, start: dt.datetime, end: dt.datetime
) -> dt.datetime | None:
    """Where the stored Greeks of ``[start, end]`` stop being complete; None if all stored."""
    span = (
        HistoryCoverage.objects.filter(
            instrument=instrument, interval=interval, start__lte=start, end__gte=start
        )
        .order_by("-end")
        .first()
    )
    if span is None:
        return start
    if span.end >= end:
        return None
    return span.end + dt.timedelta(seconds=1)


def history_read_stored(
    *, instrument: Instrument, interval: str, start: dt.datetime, end: dt.datetime
) -> HistoryTable:
    rows = list(
        CandleGreeks.objects.filter(
            instrument=instrument, interval=interval, ts__gte=start, ts__lte=end
        )
        .order_by("ts")
        .values_list("ts", *_VALUE_FIELDS)
    )
    n = len(rows)
    ts_s = np.fromiter((int(r[0].timestamp()) for r in rows), dtype=np.int64, count=n)
    columns: dict[str, np.ndarray] = {}
    for i, name in enumerate(_VALUE_FIELDS, start=1):
        if name in ("volume", "flags"):
            columns[name] = np.fromiter((r[i] for r in rows), dtype=np.int64, count=n)
        else:
            columns[name] = np.fromiter(
                (math.nan if r[i] is None else r[i] for r in rows), dtype=np.float64, count=n
            )
    return HistoryTable(ts_s, columns)


# --------------------------------------------------------------------------------------------
# The computation (no database)


def candle_close_epoch_s(ts_s: np.ndarray, interval: str) -> np.ndarray:
    """When each candle's close price was struck: its end, or 15:30 IST for day candles."""
    ts_s = np.asarray(ts_s, dtype=np.int64)
    if interval == "day":
        ist_midnight = (ts_s + 19_800) // 86_400 * 86_400 - 19_800
        return (ist_midnight + (15 * 3600 + 30 * 60)).astype(np.float64)
    return (ts_s + INTERVAL_SECONDS[interval]).astype(np.float64)


def match_underlying(
    option_ts_s: np.ndarray, underlying_ts_s: np.ndarray, *, max_age_s: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each option candle, the latest underlying candle at or before it.

    Returns (index into the underlying, has one at all, is it within ``max_age_s``). Indices
    where the second mask is False are 0 and must not be used.
    """
    idx = np.searchsorted(underlying_ts_s, option_ts_s, side="right") - 1
    found = idx >= 0
    idx = np.where(found, idx, 0)
    age = option_ts_s - (underlying_ts_s[idx] if underlying_ts_s.size else 0)
    fresh = found & (age < max_age_s)
    return idx, found, fresh


def greeks_for_candles(
    *,
    option: Instrument,
    option_ts_s: np.ndarray,
    option_close: np.ndarray,
    underlying_ts_s: np.ndarray,
    underlying_close: np.ndarray,
    underlying_is_future: bool,
    interval: str,
    r: float,
    q: float,
) -> dict[str, np.ndarray]:
    """IV, Greeks, underlying and forward for every option candle, vectorised over the range."""
    n = option_ts_s.size
    if underlying_ts_s.size:
        idx, found, fresh = match_underlying(
            option_ts_s, underlying_ts_s, max_age_s=INTERVAL_SECONDS[interval]
        )
        und = np.where(found, underlying_close[idx], np.nan)
    else:
        found = fresh = np.zeros(n, dtype=bool)
        und = np.full(n, np.nan)
    t_years = years_to_expiry(
        now_epoch_s=candle_close_epoch_s(option_ts_s, interval),
        expiry_epoch_s=expiry_close_epoch_s(option.expiry),
    )
    common = {
        "price": option_close,
        "strike": option.strike,
        "t_years": t_years,
        "is_call": option.instrument_type == Instrument.Type.CALL,
        "r": r,
        "stale": found & ~fresh,
    }
    if underlying_is_future:
        batch = compute_greeks(forward=und, **common)
        forward = und
    else:
        batch = compute_greeks_spot(spot=und, q=q, **common)
        forward = und * np.exp((r - q) * np.maximum(t_years, 0.0))
    # Only a price from this candle's own interval is reported: no invented numbers.
    und = np.where(fresh, und, np.nan)
    forward = np.where(fresh, forward, np.nan)
    return {
        "underlying_price": und,
        "forward": forward,
        "iv": batch.iv,
        "delta": batch.delta,
        "gamma": batch.gamma,
        "theta": batch.theta,
        "vega": batch.vega,
        "rho": batch.rho,
        "flags": batch.flags.astype(np.int64),
    }


def _epoch_s(ts: np.ndarray) -> np.ndarray:
    return np.asarray(ts, dtype="datetime64[s]").astype(np.int64)


def history_compute(
    *,
    option: Instrument,
    underlying: Underlying | None,
    interval: str,
    start: dt.datetime,
    end: dt.datetime,
    client: CandleSource,
    r: float,
    q: float,
) -> HistoryTable:
    """Fetch the option's and the underlying's candles (one request each) and add Greeks."""
    candles = client.historical(option.instrument_token, start, end, interval, oi=True)
    ts_s = _epoch_s(candles.ts)
    if underlying is not None and len(candles):
        # The underlying only where the option traded: from its first candle on.
        und_start = dt.datetime.fromtimestamp(int(ts_s[0]) - INTERVAL_SECONDS[interval], tz=IST)
        und = client.historical(
            underlying.instrument.instrument_token, max(start, und_start), end, interval
        )
        und_ts_s, und_close = _epoch_s(und.ts), und.close
    else:
        und_ts_s, und_close = np.empty(0, dtype=np.int64), np.empty(0)
    greeks = greeks_for_candles(
        option=option,
        option_ts_s=ts_s,
        option_close=candles.close,
        underlying_ts_s=und_ts_s,
        underlying_close=und_close,
        underlying_is_future=bool(underlying and underlying.is_future),
        interval=interval,
        r=r,
        q=q,
    )
    columns = {
        "open": candles.open,
        "high": candles.high,
        "low": candles.low,
        "close": candles.close,
        "volume": candles.volume,
        "oi": candles.oi.astype(np.float64) if candles.oi is not None else np.full(len(ts_s), np.nan),
        **greeks,
    }
    if underlying is None:
        columns["flags"] = columns["flags"] | int(Flag.NO_FORWARD)
    return HistoryTable(ts_s, columns)


# --------------------------------------------------------------------------------------------
# Storage


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if v != v else v for v in values.tolist()]  # v != v: NaN


def history_store(*, instrument: Instrument, interval: str, table: HistoryTable) -> int:
    """Store the table as the complete set of the option's candles between its first and last.

    Rows already stored in that span are replaced (a candle Kite revised, a forming candle
    that has since closed); rows outside it are kept. Returns the rows written.
    """
    n = len(table)
    if n == 0:
        return 0
    first = dt.datetime.fromtimestamp(int(table.ts_s[0]), tz=dt.UTC)
    last = dt.datetime.fromtimestamp(int(table.ts_s[-1]), tz=dt.UTC)
    with transaction.atomic():
        # Two computations of the same option and interval take turns: DELETE + COPY is an
        # upsert only when no one else inserts into the span meanwhile.
        _lock_history(instrument.pk, interval)
        CandleGreeks.objects.filter(
            instrument=instrument, interval=interval, ts__gte=first, ts__lte=last
        ).delete()
        if connection.vendor == "postgresql":
            _copy_postgresql(instrument.instrument_token, interval, table)
        else:
            _insert_orm(instrument.instrument_token, interval, table)
    return n


def _lock_history(token: int, interval: str) -> None:
    """Hold a transaction-scoped lock on (option, interval) (PostgreSQL; SQLite has one writer)."""
    if connection.vendor != "postgresql":
        return
    digest = hashlib.blake2b(f"history:{token}:{interval}".encode(), digest_size=8).digest()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [int.from_bytes(digest, "big", signed=True)])


# psycopg's binary type names for the column types Django creates.
_BINARY_TYPES: Final[dict[str, str]] = {
    "bigint": "int8",
    "integer": "int4",
    "double precision": "float8",
    "timestamp with time zone": "timestamptz",
}


def _copy_postgresql(token: int, interval: str, table: HistoryTable) -> None:
    """COPY the rows in binary: one streamed statement, no per-row SQL, no model instances.

    Measured on a month of minutes: about 0.06 s, against 0.17 s for text COPY, 0.4 s for
    INSERT ... SELECT FROM unnest(arrays) and over 1 s for bulk_create, which builds a model
    and 18 bound parameters per row.
    """
    cols = table.columns
    meta = CandleGreeks._meta
    fields = {f.attname: f for f in meta.concrete_fields}
    names = ["instrument_id", "interval", "ts", *_VALUE_FIELDS]
    types = [
        _BINARY_TYPES.get(fields[n].db_type(connection).split("(")[0].strip(), "text") for n in names
    ]
    ts = [dt.datetime.fromtimestamp(s, tz=dt.UTC) for s in table.ts_s.tolist()]
    values = []
    for name in _VALUE_FIELDS:
        if name in ("volume", "flags"):
            values.append(cols[name].tolist())
        elif name == "oi":
            values.append([None if v != v else int(v) for v in cols[name].tolist()])
        else:
            values.append(_nullable(cols[name]))
    target = ", ".join(f'"{fields[n].column}"' for n in names)
    sql = f'COPY "{meta.db_table}" ({target}) FROM STDIN (FORMAT BINARY)'
    connection.ensure_connection()
    raw = connection.connection  # the psycopg connection under Django's wrapper, same transaction
    with raw.cursor() as cursor, cursor.copy(sql) as copy:
        copy.set_types(types)
        for i, row in enumerate(zip(*values, strict=True)):
            copy.write_row((token, interval, ts[i], *row))


def _insert_orm(token: int, interval: str, table: HistoryTable) -> None:
    """The same rows through the ORM (SQLite, the embedded demo)."""
    cols = table.columns
    ts = [dt.datetime.fromtimestamp(s, tz=dt.UTC) for s in table.ts_s.tolist()]
    values = {name: _nullable(cols[name]) for name in _VALUE_FIELDS if name not in ("volume", "flags")}
    volume = cols["volume"].tolist()
    flags = cols["flags"].tolist()
    CandleGreeks.objects.bulk_create(
        [
            CandleGreeks(
                instrument_id=token,
                interval=interval,
                ts=ts[i],
                volume=volume[i],
                flags=flags[i],
                **{name: column[i] for name, column in values.items()},
            )
            for i in range(len(table))
        ],
        batch_size=500,
    )


def history_cover(
    *,
    instrument: Instrument,
    interval: str,
    start: dt.datetime,
    end: dt.datetime,
    underlying_token: int,
    now: dt.datetime,
) -> None:
    """Record ``[start, end]`` as complete, merged with the spans it touches."""
    if end < start:
        return
    with transaction.atomic():
        _lock_history(instrument.pk, interval)  # spans of one option merge one at a time
        touching = list(
            HistoryCoverage.objects.select_for_update()
            .filter(
                instrument=instrument,
                interval=interval,
                start__lte=end + dt.timedelta(seconds=1),
                end__gte=start - dt.timedelta(seconds=1),
            )
            .values_list("pk", "start", "end")
        )
        merged_start = min([start, *(s for _, s, _ in touching)])
        merged_end = max([end, *(e for _, _, e in touching)])
        HistoryCoverage.objects.filter(pk__in=[pk for pk, _, _ in touching]).delete()
        HistoryCoverage.objects.create(
            instrument=instrument,
            interval=interval,
            start=merged_start,
            end=merged_end,
            underlying_token=underlying_token,
            computed_at=now,
        )


def coverage_end(
    *, table: HistoryTable, end: dt.datetime, interval: str, now: dt.datetime
) -> dt.datetime:
    """How far a fetch may be recorded complete: up to the last candle Kite returned.

    Not up to the wall clock: Kite publishes a candle some time after it closes, so a candle
    missing from the answer may still come, and a coverage past it would make it a permanent
    hole. Only a session's closing candle vouches for the rest of its day (nothing trades
    after the close). An answer with no candles covers nothing.
    """
    if not len(table):
        return dt.datetime.min.replace(tzinfo=dt.UTC)
    last_candle = dt.datetime.fromtimestamp(int(table.ts_s[-1]), tz=IST)
    covered = last_candle
    if interval != "day":
        closes = dt.datetime.combine(last_candle.date(), SESSION_CLOSE_IST, tzinfo=IST)
        if last_candle + dt.timedelta(seconds=INTERVAL_SECONDS[interval]) >= closes:
            covered = dt.datetime.combine(last_candle.date(), dt.time(23, 59, 59), tzinfo=IST)
    return min(end, final_until(interval=interval, now=now), covered)


def final_until(*, interval: str, now: dt.datetime) -> dt.datetime:
    """The latest candle start whose candle has closed at ``now``: later ones may still change."""
    if interval == "day":
        today = now.astimezone(IST)
        closed_today = today.time() >= SESSION_CLOSE_IST
        day = today.date() if closed_today else today.date() - dt.timedelta(days=1)
        return dt.datetime.combine(day, dt.time(0, 0), tzinfo=IST)
    return now - dt.timedelta(seconds=INTERVAL_SECONDS[interval])


# --------------------------------------------------------------------------------------------
# The service


def history_get(
    *,
    instrument: Instrument,
    interval: str,
    start: dt.datetime,
    end: dt.datetime,
    client_factory: Callable[[], CandleSource],
    r: float,
    q: float,
    now: dt.datetime | None = None,
) -> HistoryResult:
    """An option's candles with Greeks over ``[start, end]``: stored if complete, else computed.

    Only the span not yet stored is fetched from Kite; ``client_factory`` is called only then.
    """
    if not instrument.is_option or instrument.expiry is None:
        raise HistoryError(
            f"instrument {instrument.pk} ({instrument}) is not an option",
            code="not_an_option",
            instrument_token=instrument.pk,
        )
    if interval not in INTERVAL_SECONDS:
        raise HistoryError(f"invalid interval {interval!r}; expected one of {list(INTERVALS)}",
                           code="invalid_interval")  # fmt: skip
    now = now or timezone.now()
    underlying = history_underlying(option=instrument)
    missing_from = history_missing_start(instrument=instrument, interval=interval, start=start, end=end)
    if missing_from is None:
        table = history_read_stored(instrument=instrument, interval=interval, start=start, end=end)
        return HistoryResult(instrument, underlying, interval, start, end, "stored", table)
    computed = history_compute(
        option=instrument,
        underlying=underlying,
        interval=interval,
        start=missing_from,
        end=end,
        client=client_factory(),
        r=r,
        q=q,
    )
    history_store(instrument=instrument, interval=interval, table=computed)
    covered_end = coverage_end(table=computed, end=end, interval=interval, now=now)
    history_cover(
        instrument=instrument,
        interval=interval,
        start=missing_from,
        end=covered_end,
        underlying_token=underlying.instrument.instrument_token if underlying else 0,
        now=now,
    )
    log.info(
        "history.computed", instrument_token=instrument.pk, interval=interval,
        start=missing_from.isoformat(), end=end.isoformat(), candles=len(computed),
        underlying=underlying.instrument.instrument_token if underlying else None,
    )  # fmt: skip
    if missing_from == start:
        table = computed
    else:
        table = history_read_stored(instrument=instrument, interval=interval, start=start, end=end)
    return HistoryResult(instrument, underlying, interval, start, end, "computed", table)


# --------------------------------------------------------------------------------------------
# Output


def _ts_text(ts_s: np.ndarray) -> list[str]:
    """ISO timestamps in IST with an offset (what Kite's candles carry), vectorised."""
    local = (ts_s + 19_800).astype("datetime64[s]")
    return [f"{s}+05:30" for s in np.datetime_as_string(local, unit="s").tolist()]


def history_rows(table: HistoryTable) -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per candle: NaN as None, flags as names."""
    cols = table.columns
    ts = _ts_text(table.ts_s)
    lists = {
        name: _nullable(cols[name])
        for name in ("open", "high", "low", "close", "iv", "delta", "gamma", "theta", "vega",
                     "rho", "forward", "underlying_price")
    }  # fmt: skip
    oi = [None if v != v else int(v) for v in cols["oi"].tolist()]
    volume = cols["volume"].tolist()
    flags = cols["flags"].tolist()
    names_cache: dict[int, list[str]] = {}
    for i in range(len(table)):
        f = flags[i]
        names = names_cache.get(f)
        if names is None:
            names = names_cache[f] = flag_names(f)
        yield {
            "ts": ts[i],
            "open": lists["open"][i],
            "high": lists["high"][i],
            "low": lists["low"][i],
            "close": lists["close"][i],
            "volume": volume[i],
            "oi": oi[i],
            "underlying": lists["underlying_price"][i],
            "forward": lists["forward"][i],
            "iv": lists["iv"][i],
            "delta": lists["delta"][i],
            "gamma": lists["gamma"][i],
            "theta": lists["theta"][i],
            "vega": lists["vega"][i],
            "rho": lists["rho"][i],
            "flags": names,
        }


def history_payload(result: HistoryResult) -> dict[str, Any]:
    inst = result.instrument
    und = result.underlying
    return {
        "instrument_token": inst.instrument_token,
        "tradingsymbol": inst.tradingsymbol,
        "exchange": inst.exchange,
        "kind": inst.instrument_type,
        "strike": inst.strike,
        "expiry": inst.expiry.isoformat() if inst.expiry else None,
        "interval": result.interval,
        "from": result.start.isoformat(),
        "to": result.end.isoformat(),
        "source": result.source,
        "underlying": None
        if und is None
        else {
            "instrument_token": und.instrument.instrument_token,
            "tradingsymbol": und.instrument.tradingsymbol,
            "kind": "future" if und.is_future else "spot",
        },
        "units": {"iv": "fraction", "theta": "per calendar day", "vega": "per vol point",
                  "rho": "per 1% rate", "delta": "dV/dF (future) or dV/dS (spot)"},
        "candles": list(history_rows(result.table)),
    }


def history_candles(
    *,
    instrument: Instrument,
    interval: str,
    start: dt.datetime,
    end: dt.datetime,
    client: CandleSource,
    oi: bool,
    continuous: bool,
) -> dict[str, Any]:
    """Candles of any instrument (index, equity, future, option) as Kite gives them, no Greeks."""
    if continuous and instrument.instrument_type != Instrument.Type.FUTURE:
        raise HistoryError(
            f"continuous candles exist for futures only; {instrument} is {instrument.instrument_type}",
            code="continuous_needs_future", instrument_token=instrument.pk,
        )  # fmt: skip
    series = client.historical(
        instrument.instrument_token, start, end, interval, oi=oi, continuous=continuous
    )
    ts = _ts_text(_epoch_s(series.ts))
    oi_values = series.oi.tolist() if series.oi is not None else [None] * len(ts)
    columns = zip(
        ts, series.open.tolist(), series.high.tolist(), series.low.tolist(),
        series.close.tolist(), series.volume.tolist(), oi_values, strict=True,
    )  # fmt: skip
    return {
        "instrument_token": instrument.instrument_token,
        "tradingsymbol": instrument.tradingsymbol,
        "exchange": instrument.exchange,
        "kind": instrument.instrument_type,
        "interval": interval,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "source": "kite",
        "candles": [
            {"ts": t, "open": o, "high": h, "low": lo, "close": c, "volume": v, "oi": i}
            for t, o, h, lo, c, v, i in columns
        ],
    }


def history_ranges_enrich(
    *, client_factory: Callable[[], CandleSource], r: float, q: float, now: dt.datetime | None = None
) -> list[str]:
    """Compute what is missing of every enabled HistoryRange; returns one line per range.

    A range Kite refuses is recorded on the range and the others go on; a transient Kite
    error ends the run so the task's retry picks it up.
    """
    now = now or timezone.now()
    lines: list[str] = []
    client: CandleSource | None = None

    def shared_client() -> CandleSource:
        nonlocal client
        if client is None:
            client = client_factory()
        return client

    for rng in HistoryRange.objects.filter(enabled=True).select_related("instrument").order_by("pk"):
        start = (now - dt.timedelta(days=rng.days_back)).astimezone(IST)
        end = now.astimezone(IST)
        try:
            result = history_get(instrument=rng.instrument, interval=rng.interval, start=start,
                                 end=end, client_factory=shared_client, r=r, q=q, now=now)  # fmt: skip
        except HistoryError as exc:
            text = f"{rng.instrument}: {exc}"
        except KiteError as exc:
            if exc.retryable:
                raise  # the whole job is retried later; ranges already stored are kept
            # This range is refused (e.g. a contract Kite no longer serves): say so, go on.
            text = f"{rng.instrument}: Kite refused: {exc}"
        else:
            text = f"{rng.instrument}: {result.source}, {len(result.table)} candles"
        HistoryRange.objects.filter(pk=rng.pk).update(last_run_at=now, last_result=text[:2000])
        lines.append(text)
    return lines
