"""The validated Kite Connect REST client.

``KiteRestClient`` wraps ``kiteconnect.KiteConnect`` (its HTTP session, auth header, routes and
error-type mapping) and adds what the service needs on real money:

- every response is validated with the pydantic models of streaming/kite/schemas.py; a bad
  one raises one ``KiteResponseError`` naming the endpoint, the instrument and the field, and
  nothing half-valid is returned;
- kiteconnect's exceptions become a small hierarchy (``KiteApiError`` and subclasses) that
  keeps Kite's ``error_type`` and HTTP status; transport failures become
  ``KiteTransportError``;
- transient failures (NetworkException, HTTP 429 and 5xx, timeouts, connection errors) are
  retried with tenacity, exponential backoff and jitter; token, input, permission and order
  errors never are. Writes (placing an order, exchanging a request token) are retried only
  when Kite cannot have processed them (429, connect timeout);
- every request first takes a slot from ``KiteRateLimiter``: Kite's per-api-key limits per
  endpoint class, shared by every process through Redis;
- the access token, api secret and request token never appear in an error or a log.

kiteconnect's public methods post-process responses without checking them (``int(row[...])``
on the CSV, ``dateutil.parse`` on timestamps, ``resp["login_time"]``), which raises
context-free errors before validation could name the field. So the client calls
``KiteConnect._request`` with kiteconnect's own route names and validates the raw ``data``
itself; tests/streaming/kite/test_rest_conformance.py pins the private surface it uses.

A client holds one ``requests`` session: use one client per thread.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import hashlib
import io
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import kiteconnect.exceptions as kex
import numpy as np
import redis
import requests
import structlog
from kiteconnect import KiteConnect
from pydantic import BaseModel, TypeAdapter, ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from streaming.kite.limits import (
    HISTORICAL_MAX_DAYS_PER_INTERVAL,
    HISTORICAL_REQUESTS_PER_S,
    OTHER_REQUESTS_PER_S,
    QUOTE_MAX_INSTRUMENTS_PER_CALL,
    QUOTE_REQUESTS_PER_S,
)
from streaming.kite.redaction import redact
from streaming.kite.schemas import (
    INSTRUMENT_CSV_COLUMNS,
    IST,
    SECRET_FIELDS,
    Candle,
    InstrumentRow,
    KiteDateTime,
    LtpQuote,
    OhlcQuote,
    Order,
    OrderPlaced,
    Price,
    Profile,
    Quantity,
    Quote,
    Session,
    Trade,
)
from tickerproj.redis_connection import redis_client

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)

RateClass = Literal["quote", "historical", "other"]
REQUESTS_PER_S: Final[dict[str, int]] = {
    "quote": QUOTE_REQUESTS_PER_S,
    "historical": HISTORICAL_REQUESTS_PER_S,
    "other": OTHER_REQUESTS_PER_S,
}

ERROR_TEXT_MAX_CHARS: Final = 300
"""Kite's messages (and kiteconnect's, which can embed a whole response body) are cut here."""

_KITE_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"


# --- errors -------------------------------------------------------------------------------


class KiteError(Exception):
    """Base of every error the REST client raises; ``endpoint`` names the call."""

    retryable: bool = False

    def __init__(self, message: str, *, endpoint: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class KiteResponseError(KiteError):
    """Kite answered, but the response is not what the endpoint promises."""

    def __init__(
        self,
        *,
        endpoint: str,
        field: str,
        got: Any,
        instrument: str | None = None,
        reason: str = "invalid",
    ) -> None:
        self.instrument = instrument
        self.field = field
        self.got = got
        self.reason = reason
        where = f" for {instrument}" if instrument else ""
        got_text = _short(repr(got))
        super().__init__(
            f"kite {endpoint} response{where}: field {field!r}: {reason} (got {got_text})",
            endpoint=endpoint,
        )


class KiteApiError(KiteError):
    """Kite (or kiteconnect) reported an error; keeps Kite's error_type and the HTTP status."""

    never_retried: bool = False

    def __init__(
        self, message: str, *, endpoint: str, error_type: str, status: int | None,
        instrument: str | None = None,
    ) -> None:
        self.error_type = error_type
        self.status = status
        self.instrument = instrument
        where = f" for {instrument}" if instrument else ""
        super().__init__(
            f"kite {endpoint}{where}: {error_type} (HTTP {status}): {message}", endpoint=endpoint
        )

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        if self.never_retried:
            return False
        status = self.status or 0
        return self.error_type == "NetworkException" or status == 429 or status >= 500


class KiteTokenError(KiteApiError):
    """The access token (or request token, or api key) is invalid or expired: log in again."""

    never_retried = True


class KiteInputError(KiteApiError):
    never_retried = True


class KitePermissionError(KiteApiError):
    never_retried = True


class KiteOrderError(KiteApiError):
    never_retried = True


class KiteNetworkError(KiteApiError):
    """Kite could not reach its order management system; transient."""


class KiteDataError(KiteApiError):
    """Kite's backend sent a bad response (kiteconnect's DataException)."""


class KiteGeneralError(KiteApiError):
    pass


_ERROR_CLASSES: Final[dict[type[kex.KiteException], type[KiteApiError]]] = {
    kex.TokenException: KiteTokenError,
    kex.InputException: KiteInputError,
    kex.PermissionException: KitePermissionError,
    kex.OrderException: KiteOrderError,
    kex.NetworkException: KiteNetworkError,
    kex.DataException: KiteDataError,
    kex.GeneralException: KiteGeneralError,
}


class KiteTransportError(KiteError):
    """The HTTP request failed (timeout, refused or broken connection)."""

    def __init__(
        self, message: str, *, endpoint: str, retryable: bool, request_sent: bool
    ) -> None:
        super().__init__(f"kite {endpoint}: {message}", endpoint=endpoint)
        self.retryable = retryable
        self.request_sent = request_sent
        """False only when the request certainly never reached Kite (connect timeout)."""


class KiteRateLimitTimeout(KiteError):
    """No rate-limit slot became free within the limiter's maximum wait."""


class KiteRateLimiterUnavailable(KiteError):
    """The shared limiter's Redis failed; requests are refused rather than sent unthrottled."""


# --- rate limits --------------------------------------------------------------------------

RATE_MARGIN: Final = 0.05
"""Requests are paced 5% slower than Kite's limit: Kite counts them on arrival, and network
jitter can bring two requests sent exactly one interval apart closer together."""

# GCRA ("generic cell rate algorithm") by reservation, atomically on Redis's own clock.
# KEYS[1]: the api key's bucket of one endpoint class. ARGV[1]: interval between requests
# (ms), ARGV[2]: longest acceptable wait (ms). The bucket holds the "theoretical arrival time"
# (ms) of the next free slot. Returns {wait_ms, slot_ms}, or {-1, slot_ms} without booking
# when the wait would exceed the maximum.
_GCRA_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local slot = tonumber(redis.call('GET', KEYS[1]) or now)
if slot < now then slot = now end
local wait = slot - now
if wait > tonumber(ARGV[2]) then return {-1, slot} end
redis.call('SET', KEYS[1], slot + interval, 'PX', wait + interval + 1000)
return {wait, slot}
"""


@dataclass(frozen=True, slots=True)
class RateSlot:
    """A booked request slot: when it may be sent (the limiter's clock, ms) and the wait."""

    send_at_ms: float
    waited_s: float


class KiteRateLimiter:
    """Kite's REST rate limits per api key and endpoint class, shared by every process.

    Each request books the next free send time of its (api key, endpoint class) and sleeps
    until then: requests are paced one interval apart (1 s / limit, plus ``RATE_MARGIN``), so
    no window of one second ever holds more than the limit, and waiting callers are served
    in the order they asked, without polling. With a Redis URL the bookings live in Redis
    (one Lua script, Redis's clock, so hosts' clock skew does not matter); without one they
    live in this process (the embedded single-process set-up).

    Hand-written rather than the ``limits`` or ``pyrate-limiter`` packages: both count hits in
    windows stamped with each client's own clock and make a blocked caller poll until a slot
    frees, and ``limits`` has whole-second windows only, so it cannot leave the margin for
    network jitter that Kite's arrival-side counting needs. Booking by GCRA is a dozen lines.
    """

    KEY_PREFIX: Final = "tickerproj:kite:rate"

    def __init__(
        self,
        *,
        redis_client: redis.Redis | None = None,
        requests_per_s: dict[str, float] | None = None,
        margin: float = RATE_MARGIN,
        max_wait_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        rates = {**REQUESTS_PER_S, **(requests_per_s or {})}
        self.interval_ms = {name: 1000.0 * (1 + margin) / n for name, n in rates.items()}
        self._redis = redis_client
        self._script = redis_client.register_script(_GCRA_LUA) if redis_client is not None else None
        self._local_slots: dict[str, float] = {}
        self._local_lock = threading.Lock()
        self._max_wait_s = max_wait_s
        self._sleep = sleep

    @classmethod
    def from_redis_url(cls, redis_url: str, **kwargs: Any) -> KiteRateLimiter:
        """The deployment's limiter: shared through Redis when a URL is given, else in-process."""
        client = redis_client(redis_url) if redis_url else None
        return cls(redis_client=client, **kwargs)

    def _key(self, api_key: str, rate_class: str) -> str:
        return f"{self.KEY_PREFIX}:{api_key}:{rate_class}"

    def _book(self, key: str, interval_ms: float, max_wait_ms: float) -> tuple[float, float]:
        if self._script is not None:
            # Redis keeps integers; rounding the interval up keeps the margin.
            wait_ms, slot_ms = self._script(keys=[key], args=[math.ceil(interval_ms), int(max_wait_ms)])
            return float(wait_ms), float(slot_ms)
        with self._local_lock:
            now_ms = time.monotonic() * 1000.0
            slot_ms = max(self._local_slots.get(key, now_ms), now_ms)
            wait_ms = slot_ms - now_ms
            if wait_ms > max_wait_ms:
                return -1.0, slot_ms
            self._local_slots[key] = slot_ms + interval_ms
            return wait_ms, slot_ms

    def acquire(self, *, api_key: str, rate_class: RateClass, endpoint: str = "") -> RateSlot:
        """Book the next slot for one request of ``rate_class`` and sleep until it."""
        key = self._key(api_key, rate_class)
        try:
            wait_ms, slot_ms = self._book(key, self.interval_ms[rate_class], self._max_wait_s * 1000)
        except redis.RedisError as exc:
            raise KiteRateLimiterUnavailable(
                f"rate limiter storage failed: {type(exc).__name__}: {_short(str(exc))}",
                endpoint=endpoint or rate_class,
            ) from None
        if wait_ms < 0:
            raise KiteRateLimitTimeout(
                f"no {rate_class} rate-limit slot for {api_key} within {self._max_wait_s}s",
                endpoint=endpoint or rate_class,
            )
        if wait_ms > 0:
            self._sleep(wait_ms / 1000.0)
        return RateSlot(send_at_ms=slot_ms, waited_s=wait_ms / 1000.0)

    def clear(self, *, api_key: str) -> None:
        """Forget an api key's bookings (tests, and after replacing a key)."""
        keys = [self._key(api_key, name) for name in self.interval_ms]
        if self._redis is not None:
            self._redis.delete(*keys)
        with self._local_lock:
            for key in keys:
                self._local_slots.pop(key, None)


# Orders per sliding window, several windows at once (per second, minute, day). KEYS: one
# sorted set per window, then a sequence counter. ARGV[1]: the request's cost (orders); then
# per window its period (ms) and limit. Books every window or none; returns 0 when booked,
# else how long (ms) until the cost would fit.
_ORDER_WINDOWS_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cost = tonumber(ARGV[1])
local windows = #KEYS - 1
local wait = 0
for i = 1, windows do
  local period = tonumber(ARGV[2 * i])
  local limit = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - period)
  local over = redis.call('ZCARD', KEYS[i]) + cost - limit
  if over > 0 then
    local oldest = redis.call('ZRANGE', KEYS[i], over - 1, over - 1, 'WITHSCORES')
    local w = tonumber(oldest[2]) + period - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return wait end
for i = 1, windows do
  local period = tonumber(ARGV[2 * i])
  for _ = 1, cost do
    local seq = redis.call('INCR', KEYS[windows + 1])
    redis.call('ZADD', KEYS[i], now, now .. ':' .. seq)
  end
  redis.call('PEXPIRE', KEYS[i], period + 1000)
end
return 0
"""


@dataclass(frozen=True, slots=True)
class OrderWindow:
    """At most ``limit`` orders in any ``period_s`` (a sliding window, as GCRA counts)."""

    name: str
    limit: int
    period_s: float


class KiteOrderRateLimiter:
    """Kite's order limits per api key (10/s, 400/min, 5000/day), shared through Redis.

    Unlike :class:`KiteRateLimiter`, which paces requests by making callers wait, this one
    never waits: an order over budget is refused with the time until it would fit, so the
    API answers 429 with ``Retry-After`` rather than holding a trader's order in a queue.
    All windows are booked together in one script on Redis's clock, so a refusal books
    nothing. Windows are exact sliding logs rather than GCRA: a GCRA bucket that allows a
    burst of N also lets N more through during the next window's length (burst plus rate),
    up to twice what Kite counts in one window, and one that allows no burst would refuse
    the slices of one large order sent together.
    """

    KEY_PREFIX: Final = "tickerproj:kite:orders"

    def __init__(
        self, *, redis_client: redis.Redis, windows: Sequence[OrderWindow], margin: float = RATE_MARGIN
    ) -> None:
        if not windows:
            raise ValueError("at least one order window is required")
        self.windows = tuple(windows)
        self._margin = margin
        self._redis = redis_client
        self._script = redis_client.register_script(_ORDER_WINDOWS_LUA)

    def largest_cost(self) -> int:
        """The most orders one request may book at once (the tightest window's limit)."""
        return min(w.limit for w in self.windows)

    def _keys(self, api_key: str) -> list[str]:
        keys = [f"{self.KEY_PREFIX}:{api_key}:{w.name}" for w in self.windows]
        return [*keys, f"{self.KEY_PREFIX}:{api_key}:seq"]

    def try_acquire(self, *, api_key: str, cost: int = 1) -> float:
        """Book ``cost`` orders; 0.0 if booked, else the seconds to wait (nothing booked)."""
        if not 1 <= cost <= self.largest_cost():
            raise ValueError(f"cost must be in [1, {self.largest_cost()}], got {cost}")
        args: list[int] = [cost]
        for w in self.windows:
            # Windows are stretched by the margin (at most a second): Kite counts on arrival.
            period_ms = 1000.0 * w.period_s
            args += [math.ceil(period_ms + min(self._margin * period_ms, 1000.0)), w.limit]
        try:
            wait_ms = self._script(keys=self._keys(api_key), args=args)
        except redis.RedisError as exc:
            raise KiteRateLimiterUnavailable(
                f"order rate limiter storage failed: {type(exc).__name__}: {_short(str(exc))}",
                endpoint="place_order",
            ) from None
        return float(wait_ms) / 1000.0

    def clear(self, *, api_key: str) -> None:
        self._redis.delete(*self._keys(api_key))


# --- historical candles -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CandleSeries:
    """Validated historical candles as numpy columns, oldest first.

    ``ts`` is UTC ``datetime64[s]``; ``oi`` is None unless open interest was requested.
    """

    instrument_token: int
    interval: str
    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    oi: np.ndarray | None

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def from_candles(
        cls, candles: Sequence[Candle], *, instrument_token: int, interval: str, oi: bool
    ) -> CandleSeries:
        epoch_s = np.fromiter((int(c.date.timestamp()) for c in candles), np.int64, len(candles))
        return cls(
            instrument_token=instrument_token,
            interval=interval,
            ts=epoch_s.astype("datetime64[s]"),
            open=np.fromiter((c.open for c in candles), np.float64, len(candles)),
            high=np.fromiter((c.high for c in candles), np.float64, len(candles)),
            low=np.fromiter((c.low for c in candles), np.float64, len(candles)),
            close=np.fromiter((c.close for c in candles), np.float64, len(candles)),
            volume=np.fromiter((c.volume for c in candles), np.int64, len(candles)),
            oi=np.fromiter((c.oi or 0 for c in candles), np.int64, len(candles)) if oi else None,
        )


CANDLE_INTERVAL_S: Final[dict[str, int]] = {
    "minute": 60, "3minute": 180, "5minute": 300, "10minute": 600, "15minute": 900,
    "30minute": 1800, "60minute": 3600, "day": 86400,
}
"""How long one candle of each interval lasts; Kite stamps a candle with its start (a day
candle with midnight IST), so a candle that began before the requested start can overlap it."""


def historical_chunks(
    start: dt.datetime, end: dt.datetime, *, interval: str
) -> list[tuple[dt.datetime, dt.datetime]]:
    """Split ``[start, end]`` into inclusive ranges no longer than Kite allows for ``interval``.

    Ranges do not overlap: each starts one second after the previous one ends.
    """
    try:
        max_days = HISTORICAL_MAX_DAYS_PER_INTERVAL[interval]
    except KeyError:
        raise ValueError(
            f"invalid candle interval: got={interval!r} "
            f"expected one of {sorted(HISTORICAL_MAX_DAYS_PER_INTERVAL)}"
        ) from None
    if end < start:
        raise ValueError(f"from after to: from={start.isoformat()} to={end.isoformat()}")
    span = dt.timedelta(days=max_days) - dt.timedelta(seconds=1)
    chunks = []
    chunk_start = start
    while chunk_start <= end:
        chunk_end = min(chunk_start + span, end)
        chunks.append((chunk_start, chunk_end))
        chunk_start = chunk_end + dt.timedelta(seconds=1)
    return chunks


def _to_ist(value: dt.datetime | dt.date, *, end_of_day: bool) -> dt.datetime:
    """A request bound as an aware IST datetime; naive datetimes are IST already (Kite's way)."""
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time(23, 59, 59) if end_of_day else dt.time(0, 0))
    if value.tzinfo is None:
        return value.replace(tzinfo=IST)
    return value.astimezone(IST)


# --- validation glue ----------------------------------------------------------------------


def _short(text: str) -> str:
    return text if len(text) <= ERROR_TEXT_MAX_CHARS else text[:ERROR_TEXT_MAX_CHARS] + "…"


def _pydantic_reason(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start: start + size])


def _field_path(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _response_error(
    exc: ValidationError, *, endpoint: str, instrument: str | None, loc_offset: int = 0
) -> KiteResponseError:
    """The first problem of a ValidationError as a KiteResponseError; secrets redacted."""
    first = exc.errors(include_url=False)[0]
    loc = first["loc"][loc_offset:]
    got = first.get("input", "<hidden>")  # models of secrets hide their inputs
    if any(part in SECRET_FIELDS for part in loc):
        got = "<redacted>"
    return KiteResponseError(
        endpoint=endpoint,
        instrument=instrument,
        field=_field_path(loc),
        got=got,
        reason=_pydantic_reason(first["msg"]),
    )


def validate_item(model: type[M], raw: Any, *, endpoint: str, instrument: str | None = None) -> M:
    """Validate one response item, raising KiteResponseError with the failing field."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _response_error(exc, endpoint=endpoint, instrument=instrument) from None


def validate_list(
    model: type[M], raw: Any, *, endpoint: str, describe: Callable[[int, Any], str]
) -> list[M]:
    """Validate a list response; ``describe(index, raw_item)`` names the failing item."""
    if not isinstance(raw, list):
        raise KiteResponseError(endpoint=endpoint, field="data", got=type(raw).__name__,
                                reason="not a list")
    try:
        return _list_adapter(model).validate_python(raw)
    except ValidationError as exc:
        index = exc.errors(include_url=False)[0]["loc"][0]
        item = raw[index] if isinstance(index, int) and index < len(raw) else None
        raise _response_error(
            exc, endpoint=endpoint, instrument=describe(index, item), loc_offset=1
        ) from None


_LIST_ADAPTERS: dict[type, TypeAdapter] = {}


def _list_adapter(model: type[M]) -> TypeAdapter[list[M]]:
    adapter = _LIST_ADAPTERS.get(model)
    if adapter is None:
        adapter = _LIST_ADAPTERS[model] = TypeAdapter(list[model])  # type: ignore[valid-type]
    return adapter


def _describe_order(index: int, item: Any) -> str:
    if isinstance(item, dict):
        return f"order {item.get('order_id')} ({item.get('exchange')}:{item.get('tradingsymbol')})"
    return f"item {index}"


def _describe_trade(index: int, item: Any) -> str:
    if isinstance(item, dict):
        return f"trade {item.get('trade_id')} ({item.get('exchange')}:{item.get('tradingsymbol')})"
    return f"item {index}"


def parse_instruments_csv(raw: Any, *, endpoint: str = "instruments") -> list[InstrumentRow]:
    """Kite's instrument dump (CSV bytes) as validated rows; all or nothing.

    Besides each row's types, the dump must not repeat an instrument_token or an
    (exchange, tradingsymbol) pair: the registry is keyed by both.
    """
    if not isinstance(raw, bytes | str):
        raise KiteResponseError(endpoint=endpoint, field="body", got=type(raw).__name__,
                                reason="not CSV")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise KiteResponseError(endpoint=endpoint, field="body", got=raw[exc.start: exc.start + 20],
                                reason="not UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    for column in INSTRUMENT_CSV_COLUMNS:
        if column not in header:
            raise KiteResponseError(endpoint=endpoint, field=column, got=header,
                                    reason="missing from the CSV header")
    rows = list(reader)
    if not rows:
        raise KiteResponseError(endpoint=endpoint, field="body", got=_short(text),
                                reason="no instrument rows")

    def describe(index: int, row: Any) -> str:
        line = index + 2  # header is line 1
        if isinstance(row, dict):
            return f"{row.get('exchange')}:{row.get('tradingsymbol')} (CSV line {line})"
        return f"CSV line {line}"

    for index, row in enumerate(rows):
        if None in row:
            raise KiteResponseError(endpoint=endpoint, instrument=describe(index, row),
                                    field="row", got=row[None], reason="more values than the header")
    parsed = validate_list(InstrumentRow, rows, endpoint=endpoint, describe=describe)

    seen_tokens: dict[int, int] = {}
    seen_symbols: dict[tuple[str, str], int] = {}
    for index, item in enumerate(parsed):
        if (first := seen_tokens.setdefault(item.instrument_token, index)) != index:
            raise KiteResponseError(
                endpoint=endpoint, instrument=describe(index, rows[index]), field="instrument_token",
                got=item.instrument_token, reason=f"repeats CSV line {first + 2}",
            )
        key = (item.exchange, item.tradingsymbol)
        if (first := seen_symbols.setdefault(key, index)) != index:
            raise KiteResponseError(
                endpoint=endpoint, instrument=describe(index, rows[index]), field="tradingsymbol",
                got=item.tradingsymbol, reason=f"repeats CSV line {first + 2} on {item.exchange}",
            )
    return parsed


def parse_candles(
    raw: Any, *, instrument_token: int, interval: str, oi: bool,
    start: dt.datetime | None = None, end: dt.datetime | None = None,
    endpoint: str = "historical",
) -> list[Candle]:
    """The ``data`` of one historical request as validated candles, strictly ascending."""
    instrument = str(instrument_token)
    if not isinstance(raw, dict) or not isinstance(raw.get("candles"), list):
        raise KiteResponseError(endpoint=endpoint, instrument=instrument, field="candles",
                                got=_short(repr(raw)), reason="not a list of candles")
    items = raw["candles"]

    def describe(index: int, item: Any) -> str:
        when = item[0] if isinstance(item, list) and item else "?"
        return f"{instrument} candle {index} ({when})"

    candles = validate_list(Candle, items, endpoint=endpoint, describe=describe)
    candle_length = dt.timedelta(seconds=CANDLE_INTERVAL_S[interval])
    previous: dt.datetime | None = None
    for index, candle in enumerate(candles):
        if oi and candle.oi is None:
            raise KiteResponseError(endpoint=endpoint, instrument=describe(index, items[index]),
                                    field="oi", got=None, reason="missing though oi was requested")
        if previous is not None and candle.date <= previous:
            raise KiteResponseError(endpoint=endpoint, instrument=describe(index, items[index]),
                                    field="date", got=candle.date.isoformat(),
                                    reason=f"not after the previous candle ({previous.isoformat()})")
        began_before = start is not None and candle.date + candle_length <= start
        if began_before or (end is not None and candle.date > end):
            raise KiteResponseError(endpoint=endpoint, instrument=describe(index, items[index]),
                                    field="date", got=candle.date.isoformat(),
                                    reason="outside the requested range")
        previous = candle.date
    return candles


# The usual shape of Kite's candles, validated in pydantic-core without a Python call per
# candle (``Candle`` needs two); the checks between fields run on numpy columns.
_CANDLE_ROWS: Final = TypeAdapter(
    list[
        tuple[KiteDateTime, Price, Price, Price, Price, Quantity, Quantity]
        | tuple[KiteDateTime, Price, Price, Price, Price, Quantity]
    ]
)
_PRICE_COLUMNS: Final = ("open", "high", "low", "close")


def _candle_columns(
    raw: Any, *, interval: str, oi: bool, start: dt.datetime | None, end: dt.datetime | None
) -> dict[str, np.ndarray] | None:
    """parse_candles's checks, vectorised, for candles sent as arrays; None if any fails.

    A month of minute candles validates about ten times faster than through ``Candle``
    models. On None the caller runs parse_candles, which names the problem (or accepts a
    form this path leaves to it, such as candles sent as objects).
    """
    items = raw.get("candles") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        return None
    try:
        rows = _CANDLE_ROWS.validate_python(items)
    except ValidationError:
        return None
    n = len(rows)
    if oi and any(len(row) != 7 for row in rows):
        return None
    cols = {"ts": np.fromiter((int(row[0].timestamp()) for row in rows), np.int64, n)}
    for i, name in enumerate(_PRICE_COLUMNS, start=1):
        cols[name] = np.fromiter((row[i] for row in rows), np.float64, n)
    cols["volume"] = np.fromiter((row[5] for row in rows), np.int64, n)
    if oi:
        cols["oi"] = np.fromiter((row[6] for row in rows), np.int64, n)
    ts = cols["ts"]
    if np.any(cols["low"] > cols["high"]) or np.any(np.diff(ts) <= 0):
        return None
    if n and start is not None and ts[0] + CANDLE_INTERVAL_S[interval] <= start.timestamp():
        return None
    if n and end is not None and ts[-1] > end.timestamp():
        return None
    return cols


def _columns_of(candles: Sequence[Candle], *, oi: bool) -> dict[str, np.ndarray]:
    n = len(candles)
    cols = {"ts": np.fromiter((int(c.date.timestamp()) for c in candles), np.int64, n)}
    for name in _PRICE_COLUMNS:
        cols[name] = np.fromiter((getattr(c, name) for c in candles), np.float64, n)
    cols["volume"] = np.fromiter((c.volume for c in candles), np.int64, n)
    if oi:
        cols["oi"] = np.fromiter((c.oi or 0 for c in candles), np.int64, n)
    return cols


# --- the client ---------------------------------------------------------------------------


class RetryPolicy(enum.Enum):
    READ = "read"
    """Idempotent: retry every transient failure."""
    WRITE = "write"
    """Not idempotent: retry only what Kite cannot have processed (429, connect timeout)."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, KiteError) and exc.retryable


def _is_unprocessed(exc: BaseException) -> bool:
    if isinstance(exc, KiteApiError):
        return exc.status == 429 and not exc.never_retried
    return isinstance(exc, KiteTransportError) and exc.retryable and not exc.request_sent


class KiteRestClient:
    """Kite Connect REST for one api key (and, after login, one access token)."""

    def __init__(
        self,
        *,
        api_key: str,
        access_token: str = "",
        api_root: str,
        rate_limiter: KiteRateLimiter,
        timeout_s: float = 7.0,
        retry_attempts: int = 4,
        retry_multiplier_s: float = 0.5,
        retry_max_wait_s: float = 8.0,
        retry_jitter_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        self.api_key = api_key
        self._kite = KiteConnect(api_key, access_token=access_token or None, root=api_root,
                                 timeout=timeout_s)
        self._secrets: list[str] = [access_token] if access_token else []
        self._limiter = rate_limiter
        self._retry_attempts = retry_attempts
        self._wait = wait_exponential_jitter(
            multiplier=retry_multiplier_s, max=retry_max_wait_s, jitter=retry_jitter_s
        )
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"<KiteRestClient api_key={self.api_key} root={self._kite.root}>"

    def close(self) -> None:
        self._kite.reqsession.close()

    def __enter__(self) -> KiteRestClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- transport ---

    def _redact(self, text: str, extra_secrets: Iterable[str] = ()) -> str:
        return _short(redact(text, *self._secrets, *extra_secrets))

    def _request(
        self,
        *,
        endpoint: str,
        rate_class: RateClass,
        method: str,
        route: str,
        url_args: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        policy: RetryPolicy = RetryPolicy.READ,
        instrument: str | None = None,
        secrets: Sequence[str] = (),
    ) -> Any:
        """One logical request: rate-limited attempts, retried by policy; returns Kite's data."""

        def attempt() -> Any:
            self._limiter.acquire(api_key=self.api_key, rate_class=rate_class, endpoint=endpoint)
            return self._send(endpoint=endpoint, method=method, route=route, url_args=url_args,
                              params=params, instrument=instrument, secrets=secrets)

        retrying = Retrying(
            stop=stop_after_attempt(self._retry_attempts),
            wait=self._wait,
            retry=retry_if_exception(
                _is_transient if policy is RetryPolicy.READ else _is_unprocessed
            ),
            before_sleep=self._log_retry,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(attempt)

    def _send(
        self, *, endpoint: str, method: str, route: str, url_args: dict[str, Any] | None,
        params: dict[str, Any] | None, instrument: str | None, secrets: Sequence[str],
    ) -> Any:
        try:
            return self._kite._request(route, method, url_args=url_args, params=params)
        except kex.KiteException as exc:
            error_class = _ERROR_CLASSES.get(type(exc), KiteGeneralError)
            error_type = type(exc).__name__
            raise error_class(
                self._redact(str(exc), secrets), endpoint=endpoint, error_type=error_type,
                status=getattr(exc, "code", None), instrument=instrument,
            ) from None
        except requests.ConnectTimeout as exc:
            raise KiteTransportError(
                f"connect timeout: {self._redact(str(exc), secrets)}", endpoint=endpoint,
                retryable=True, request_sent=False,
            ) from None
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise KiteTransportError(
                f"{type(exc).__name__}: {self._redact(str(exc), secrets)}", endpoint=endpoint,
                retryable=True, request_sent=True,
            ) from None
        except requests.RequestException as exc:
            raise KiteTransportError(
                f"{type(exc).__name__}: {self._redact(str(exc), secrets)}", endpoint=endpoint,
                retryable=False, request_sent=True,
            ) from None
        except (KeyError, AttributeError, TypeError) as exc:
            # kiteconnect reads the envelope unchecked: a missing content-type header or
            # "data" key (KeyError), a JSON body that is not an object (AttributeError), an
            # error without error_type (TypeError). All mean a malformed response.
            raise KiteResponseError(
                endpoint=endpoint, instrument=instrument, field="envelope",
                got=f"{type(exc).__name__}: {self._redact(str(exc), secrets)}",
                reason="malformed",
            ) from None

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "kite.rest.retry",
            endpoint=getattr(exc, "endpoint", None),
            attempt=state.attempt_number,
            error=type(exc).__name__,
            error_type=getattr(exc, "error_type", None),
            status=getattr(exc, "status", None),
            delay_s=round(state.next_action.sleep, 3) if state.next_action else None,
        )

    # --- market data ---

    def instruments(self, exchange: str | None = None) -> list[InstrumentRow]:
        """The instrument dump (one exchange or all), validated row by row."""
        endpoint = f"instruments/{exchange}" if exchange else "instruments"
        raw = self._request(
            endpoint=endpoint, rate_class="other", method="GET",
            route="market.instruments" if exchange else "market.instruments.all",
            url_args={"exchange": exchange} if exchange else None,
        )
        return parse_instruments_csv(raw, endpoint=endpoint)

    def quote(self, instruments: Iterable[str | int]) -> dict[str, Quote]:
        """Full quotes keyed as requested ("NSE:INFY" or a token); Kite omits unknown ones."""
        return self._quotes("quote", "market.quote", Quote, instruments)

    def ltp(self, instruments: Iterable[str | int]) -> dict[str, LtpQuote]:
        return self._quotes("ltp", "market.quote.ltp", LtpQuote, instruments)

    def ohlc(self, instruments: Iterable[str | int]) -> dict[str, OhlcQuote]:
        return self._quotes("ohlc", "market.quote.ohlc", OhlcQuote, instruments)

    def _quotes(
        self, endpoint: str, route: str, model: type[M], instruments: Iterable[str | int]
    ) -> dict[str, M]:
        keys = list(dict.fromkeys(str(i) for i in instruments))
        out: dict[str, M] = {}
        for chunk in _chunks(keys, QUOTE_MAX_INSTRUMENTS_PER_CALL):
            data = self._request(endpoint=endpoint, rate_class="quote", method="GET", route=route,
                                 params={"i": chunk})
            if not isinstance(data, dict):
                raise KiteResponseError(endpoint=endpoint, field="data", got=type(data).__name__,
                                        reason="not an object keyed by instrument")
            requested = set(chunk)
            for key, item in data.items():
                if key not in requested:
                    raise KiteResponseError(endpoint=endpoint, field="data", got=key,
                                            reason="holds an instrument that was not requested")
                out[key] = validate_item(model, item, endpoint=endpoint, instrument=key)
        return out

    def historical(
        self,
        instrument_token: int,
        from_: dt.datetime | dt.date,
        to: dt.datetime | dt.date,
        interval: str,
        *,
        oi: bool = False,
        continuous: bool = False,
    ) -> CandleSeries:
        """Candles of ``[from_, to]`` (naive = IST), split into the spans Kite allows."""
        start = _to_ist(from_, end_of_day=False)
        end = _to_ist(to, end_of_day=True)
        parts: list[dict[str, np.ndarray]] = []
        for chunk_start, chunk_end in historical_chunks(start, end, interval=interval):
            data = self._request(
                endpoint="historical", rate_class="historical", method="GET",
                route="market.historical", instrument=str(instrument_token),
                url_args={"instrument_token": instrument_token, "interval": interval},
                params={
                    "from": chunk_start.strftime(_KITE_TIME_FORMAT),
                    "to": chunk_end.strftime(_KITE_TIME_FORMAT),
                    "interval": interval,
                    "continuous": 1 if continuous else 0,
                    "oi": 1 if oi else 0,
                },
            )
            cols = _candle_columns(data, interval=interval, oi=oi, start=chunk_start, end=chunk_end)
            if cols is None:
                cols = _columns_of(
                    parse_candles(data, instrument_token=instrument_token, interval=interval,
                                  oi=oi, start=chunk_start, end=chunk_end),
                    oi=oi,
                )
            if parts and len(parts[-1]["ts"]):
                # A candle that straddles a chunk boundary (a day candle, when the range
                # starts mid-day) comes back with both chunks: keep the first copy.
                keep = cols["ts"] > parts[-1]["ts"][-1]
                cols = {name: column[keep] for name, column in cols.items()}
            parts.append(cols)
        return CandleSeries(
            instrument_token=instrument_token,
            interval=interval,
            ts=np.concatenate([p["ts"] for p in parts]).astype("datetime64[s]"),
            **{name: np.concatenate([p[name] for p in parts])
               for name in (*_PRICE_COLUMNS, "volume")},
            oi=np.concatenate([p["oi"] for p in parts]) if oi else None,
        )

    # --- user, session, orders ---

    def profile(self) -> Profile:
        data = self._request(endpoint="profile", rate_class="other", method="GET",
                             route="user.profile")
        return validate_item(Profile, data, endpoint="profile")

    def generate_session(self, *, request_token: str, api_secret: str) -> Session:
        """Exchange a login's request token for a session (access token and user).

        The checksum is Kite's sha256(api_key + request_token + api_secret). A request token
        is single-use, so this is retried only when Kite cannot have seen it.
        """
        checksum = hashlib.sha256(
            (self.api_key + request_token + api_secret).encode("utf-8")
        ).hexdigest()
        data = self._request(
            endpoint="session", rate_class="other", method="POST", route="api.token",
            params={"api_key": self.api_key, "request_token": request_token, "checksum": checksum},
            policy=RetryPolicy.WRITE, secrets=(api_secret, request_token, checksum),
        )
        session = validate_item(Session, data, endpoint="session")
        if session.api_key != self.api_key:
            raise KiteResponseError(endpoint="session", field="api_key", got=session.api_key,
                                    reason=f"not the key that logged in ({self.api_key})")
        return session

    def orders(self) -> list[Order]:
        data = self._request(endpoint="orders", rate_class="other", method="GET", route="orders")
        return validate_list(Order, data, endpoint="orders", describe=_describe_order)

    def trades(self) -> list[Trade]:
        data = self._request(endpoint="trades", rate_class="other", method="GET", route="trades")
        return validate_list(Trade, data, endpoint="trades", describe=_describe_trade)

    def order_trades(self, order_id: str) -> list[Trade]:
        data = self._request(endpoint="order_trades", rate_class="other", method="GET",
                             route="order.trades", url_args={"order_id": order_id},
                             instrument=f"order {order_id}")
        trades = validate_list(Trade, data, endpoint="order_trades", describe=_describe_trade)
        for trade in trades:
            if trade.order_id != order_id:
                raise KiteResponseError(endpoint="order_trades", instrument=f"trade {trade.trade_id}",
                                        field="order_id", got=trade.order_id,
                                        reason=f"not the requested order {order_id}")
        return trades

    def place_order(
        self,
        *,
        variety: str,
        exchange: str,
        tradingsymbol: str,
        transaction_type: Literal["BUY", "SELL"],
        quantity: int,
        product: str,
        order_type: str,
        price: float | None = None,
        trigger_price: float | None = None,
        validity: str | None = None,
        tag: str | None = None,
        market_protection: int | None = None,
        disclosed_quantity: int | None = None,
    ) -> str:
        """Place an order; returns Kite's order_id. Never retried once it may have been sent."""
        params = {
            "exchange": exchange, "tradingsymbol": tradingsymbol,
            "transaction_type": transaction_type, "quantity": quantity, "product": product,
            "order_type": order_type, "price": price, "trigger_price": trigger_price,
            "validity": validity, "tag": tag, "market_protection": market_protection,
            "disclosed_quantity": disclosed_quantity,
        }
        instrument = f"{exchange}:{tradingsymbol}"
        data = self._request(
            endpoint="place_order", rate_class="other", method="POST", route="order.place",
            url_args={"variety": variety}, instrument=instrument, policy=RetryPolicy.WRITE,
            params={k: v for k, v in params.items() if v is not None},
        )
        return validate_item(OrderPlaced, data, endpoint="place_order", instrument=instrument).order_id

    def modify_order(
        self,
        *,
        variety: str,
        order_id: str,
        quantity: int | None = None,
        price: float | None = None,
        order_type: str | None = None,
        trigger_price: float | None = None,
        validity: str | None = None,
        disclosed_quantity: int | None = None,
    ) -> str:
        """Modify an open order; returns its order_id. Retried only when Kite cannot have seen it."""
        params = {
            "quantity": quantity, "price": price, "order_type": order_type,
            "trigger_price": trigger_price, "validity": validity,
            "disclosed_quantity": disclosed_quantity,
        }
        data = self._request(
            endpoint="modify_order", rate_class="other", method="PUT", route="order.modify",
            url_args={"variety": variety, "order_id": order_id}, instrument=f"order {order_id}",
            policy=RetryPolicy.WRITE, params={k: v for k, v in params.items() if v is not None},
        )
        return validate_item(OrderPlaced, data, endpoint="modify_order",
                             instrument=f"order {order_id}").order_id

    def cancel_order(self, *, variety: str, order_id: str) -> str:
        """Cancel an open order; returns its order_id. Retried only when Kite cannot have seen it."""
        data = self._request(
            endpoint="cancel_order", rate_class="other", method="DELETE", route="order.cancel",
            url_args={"variety": variety, "order_id": order_id}, instrument=f"order {order_id}",
            policy=RetryPolicy.WRITE,
        )
        return validate_item(OrderPlaced, data, endpoint="cancel_order",
                             instrument=f"order {order_id}").order_id

    def positions(self) -> dict[str, list[dict[str, Any]]]:
        """Net and day positions, as Kite sends them (``{"net": [...], "day": [...]}``)."""
        data = self._request(endpoint="positions", rate_class="other", method="GET",
                             route="portfolio.positions")
        if not isinstance(data, dict):
            raise KiteResponseError(endpoint="positions", field="data", got=type(data).__name__,
                                    reason="not an object with net and day")
        for side in ("net", "day"):
            rows = data.get(side)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise KiteResponseError(endpoint="positions", field=side, got=rows,
                                        reason="not a list of positions")
        return {"net": data["net"], "day": data["day"]}
