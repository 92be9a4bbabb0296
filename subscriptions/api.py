"""HTTP API v1: instruments, subscriptions and history (mounted by tickerproj/api.py).

Endpoints stay thin: parse with the schemas below, check the scope, call a selector or a
service, render. Lists filter in SQL and page with ninja's cursor pagination on the primary
key, so the order is stable while rows are added.
"""

import datetime as dt
from collections import defaultdict
from contextlib import ExitStack
from typing import Annotated, Any, Literal

import numpy as np
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import F, Q
from ninja import Field, Query, Router, Schema, Status
from ninja.pagination import paginate
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from accounts.models import ApiToken, KiteAccount
from streaming.greeks import IST
from streaming.kite.rest import KiteError
from subscriptions import selectors, services
from subscriptions.clients import NoKiteSessionError, rest_client_for_service
from subscriptions.history import (
    INTERVAL_SECONDS,
    HistoryError,
    history_candles,
    history_get,
    history_payload,
)
from subscriptions.models import Instrument, Subscription
from subscriptions.rebalancer import band_strikes, nearest_strike
from tickerproj.api_support import ApiError, CallerRateThrottle, RowCursorPagination, require_scope

log = structlog.get_logger(__name__)

router = Router(tags=["instruments and subscriptions"])

PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
Mode = Literal["ltp", "quote", "full"]
Interval = Literal["minute", "3minute", "5minute", "10minute", "15minute", "30minute", "60minute", "day"]
Symbol = Annotated[str, Field(max_length=64)]


def _instrument_or_404(token: int) -> Instrument:
    instrument = Instrument.objects.filter(pk=token).first()
    if instrument is None:
        raise ApiError(404, "unknown_instrument", f"unknown instrument_token {token}", field="instrument_token")
    return instrument


# --- instruments -------------------------------------------------------------------------------


INSTRUMENT_FIELDS = (
    "instrument_token", "exchange", "tradingsymbol", "name", "instrument_type", "segment",
    "expiry", "strike", "lot_size", "tick_size",
)  # fmt: skip


class InstrumentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    instrument_token: int
    exchange: str
    tradingsymbol: str
    name: str
    instrument_type: str
    segment: str
    expiry: dt.date | None
    strike: float
    lot_size: int
    tick_size: float


class InstrumentFilters(Schema):
    q: Symbol | None = Field(None, description="Part of the trading symbol or the name.")
    exchange: Annotated[str, Field(max_length=8)] | None = None
    segment: Annotated[str, Field(max_length=16)] | None = None
    type: Literal["EQ", "FUT", "CE", "PE"] | None = None
    underlying: Symbol | None = Field(None, description="The instrument name, e.g. NIFTY.")
    expiry_from: dt.date | None = None
    expiry_to: dt.date | None = None


@router.get("/instruments", response=list[InstrumentOut], summary="Search instruments")
@paginate(RowCursorPagination, ordering=("instrument_token",), page_size=PAGE_SIZE, max_page_size=MAX_PAGE_SIZE)
def instrument_search(request, filters: Query[InstrumentFilters]):
    require_scope(request, ApiToken.Scope.READ)
    qs = Instrument.objects.all()
    if filters.q:
        qs = qs.filter(Q(tradingsymbol__icontains=filters.q) | Q(name__icontains=filters.q))
    for field, value in (
        ("exchange", filters.exchange), ("segment", filters.segment),
        ("instrument_type", filters.type), ("name", filters.underlying),
        ("expiry__gte", filters.expiry_from), ("expiry__lte", filters.expiry_to),
    ):  # fmt: skip
        if value is not None:
            qs = qs.filter(**{field: value})
    return qs.values(*INSTRUMENT_FIELDS)


@router.get("/instruments/{instrument_token}", response=InstrumentOut, summary="One instrument")
def instrument_detail(request, instrument_token: int):
    require_scope(request, ApiToken.Scope.READ)
    return InstrumentOut.model_validate(_instrument_or_404(instrument_token))


@router.get("/underlyings", response=list[str], summary="Underlyings that have options")
def underlying_list(request):
    require_scope(request, ApiToken.Scope.READ)
    return selectors.instrument_list_underlyings()


def _today() -> dt.date:
    return dt.datetime.now(IST).date()


@router.get("/underlyings/{name}/expiries", response=list[dt.date], summary="Option expiries")
def underlying_expiries(request, name: str):
    require_scope(request, ApiToken.Scope.READ)
    return selectors.instrument_list_expiries(underlying=name, on_or_after=_today())


class ChainStrikeOut(Schema):
    strike: float
    ce: int | None
    pe: int | None


@router.get(
    "/underlyings/{name}/chain", response=list[ChainStrikeOut], summary="The strikes of a chain"
)
def underlying_chain(request, name: str, expiry: dt.date):
    require_scope(request, ApiToken.Scope.READ)
    rows: dict[float, dict[str, Any]] = {}
    for inst in selectors.instrument_list_chain(underlying=name, expiry=expiry):
        row = rows.setdefault(inst.strike, {"strike": inst.strike, "ce": None, "pe": None})
        row["ce" if inst.instrument_type == Instrument.Type.CALL else "pe"] = inst.instrument_token
    if not rows:
        raise ApiError(404, "unknown_chain", f"no options of {name} expiring {expiry.isoformat()}")
    return list(rows.values())


# --- subscriptions -----------------------------------------------------------------------------


class SubscriptionOut(BaseModel):
    instrument_token: int
    exchange: str
    tradingsymbol: str
    mode: str
    status: str
    status_reason: str
    source: str
    pinned_account_id: int | None
    assigned_account_id: int | None
    streamed_mode: str
    unassigned_reason: str
    rebalance_rule_id: int | None
    updated_at: dt.datetime


def subscription_rows(queryset):
    """Subscriptions as the plain rows ``SubscriptionOut`` reads (one query, no model objects)."""
    return queryset.values(
        "mode", "status", "status_reason", "source", "pinned_account_id", "assigned_account_id",
        "streamed_mode", "unassigned_reason", "rebalance_rule_id", "updated_at",
        instrument_token=F("instrument_id"), exchange=F("instrument__exchange"),
        tradingsymbol=F("instrument__tradingsymbol"),
    )  # fmt: skip


class SubscriptionFilters(Schema):
    status: Literal["active", "inactive"] | None = None
    mode: Mode | None = None
    source: Literal["manual", "rebalancer", "api"] | None = None
    account: int | None = Field(None, description="Pinned to, or (unpinned) assigned to.")
    segment: Annotated[str, Field(max_length=16)] | None = None
    underlying: Symbol | None = None
    rule: int | None = None


@router.get("/subscriptions", response=list[SubscriptionOut], summary="List subscriptions")
@paginate(RowCursorPagination, ordering=("instrument_token",), page_size=PAGE_SIZE, max_page_size=MAX_PAGE_SIZE)
def subscription_list(request, filters: Query[SubscriptionFilters]):
    require_scope(request, ApiToken.Scope.READ)
    return subscription_rows(selectors.subscription_list(
        status=filters.status, mode=filters.mode, source=filters.source,
        account_id=filters.account, segment=filters.segment, underlying=filters.underlying,
        rule_id=filters.rule,
    ).order_by())  # fmt: skip


class InstrumentRefIn(Schema):
    """An instrument by ``instrument_token`` or by ``exchange`` + ``tradingsymbol``."""

    instrument_token: int | None = Field(None, ge=0)
    exchange: Annotated[str, Field(max_length=8)] | None = None
    tradingsymbol: Symbol | None = None

    @model_validator(mode="after")
    def _one_way(self) -> "InstrumentRefIn":
        by_symbol = self.exchange is not None and self.tradingsymbol is not None
        if (self.instrument_token is None) == (not by_symbol):
            raise ValueError("give instrument_token, or exchange and tradingsymbol")
        return self

    def label(self) -> str:
        return str(self.instrument_token) if self.instrument_token is not None else (
            f"{self.exchange}:{self.tradingsymbol}"
        )


class SubscriptionIn(InstrumentRefIn):
    mode: Mode = "full"
    pinned_account: int | None = Field(None, description="Stream on this account only.")


class BulkSubscriptionIn(Schema):
    items: list[InstrumentRefIn] = Field(..., min_length=1, max_length=settings.API_BULK_MAX_ITEMS)
    mode: Mode = "full"
    pinned_account: int | None = None


class ChainSubscriptionIn(Schema):
    underlying: Symbol
    expiries: list[dt.date] = Field(..., min_length=1, max_length=12)
    strikes_around_atm: int | None = Field(
        None, ge=0, le=200, description="Strikes each side of the money; all strikes if omitted."
    )
    mode: Mode = "full"
    pinned_account: int | None = None


class SubscriptionChangeIn(Schema):
    mode: Mode | None = None
    status: Literal["active", "inactive"] | None = None


def _pinned(account_id: int | None) -> KiteAccount | None:
    if account_id is None:
        return None
    account = KiteAccount.objects.filter(pk=account_id).first()
    if account is None:
        raise ApiError(404, "unknown_account", f"unknown account {account_id}", field="pinned_account")
    return account


def _resolve(refs: list[InstrumentRefIn]) -> list[Instrument]:
    """The instruments named, in the order given; 404 naming the ones that do not exist."""
    by_token = {
        i.pk: i for i in selectors.instrument_list_by_tokens(
            tokens=[r.instrument_token for r in refs if r.instrument_token is not None]
        )
    }  # fmt: skip
    by_symbol = {
        (i.exchange, i.tradingsymbol): i for i in selectors.instrument_list_by_symbols(
            keys=[(r.exchange, r.tradingsymbol) for r in refs if r.instrument_token is None]
        )
    }  # fmt: skip
    found, missing = [], []
    for ref in refs:
        inst = (
            by_token.get(ref.instrument_token) if ref.instrument_token is not None
            else by_symbol.get((ref.exchange, ref.tradingsymbol))
        )  # fmt: skip
        (found.append(inst) if inst is not None else missing.append(ref.label()))
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ApiError(404, "unknown_instrument", f"unknown instruments: {shown}", field="items")
    return found


def _activate(instruments: list[Instrument], *, mode: str, pinned: KiteAccount | None) -> list[dict]:
    try:
        subs = services.subscriptions_activate_many(
            instruments=instruments, mode=mode, source=Subscription.Source.API, pinned_account=pinned
        )
    except services.SubscriptionAdmissionError as exc:
        raise ApiError(
            409, "admission_refused", exc.summary,
            details={"refusals": [
                {"instrument_token": r.instrument_token, "reason": r.reason} for r in exc.refusals
            ]},
        ) from None
    return list(subscription_rows(Subscription.objects.filter(pk__in=[s.pk for s in subs])))


class ActivatedOut(Schema):
    count: int
    subscriptions: list[SubscriptionOut]


@router.post(
    "/subscriptions", response={201: SubscriptionOut}, summary="Subscribe one instrument"
)
def subscription_create(request, payload: SubscriptionIn):
    require_scope(request, ApiToken.Scope.SUBSCRIBE)
    [instrument] = _resolve([payload])
    [subscription] = _activate([instrument], mode=payload.mode, pinned=_pinned(payload.pinned_account))
    return Status(201, subscription)


@router.post(
    "/subscriptions/bulk", response={201: ActivatedOut},
    summary=f"Subscribe up to {settings.API_BULK_MAX_ITEMS} instruments, all or none",
)  # fmt: skip
def subscription_create_many(request, payload: BulkSubscriptionIn):
    require_scope(request, ApiToken.Scope.SUBSCRIBE)
    instruments = _resolve(payload.items)
    subs = _activate(instruments, mode=payload.mode, pinned=_pinned(payload.pinned_account))
    return Status(201, {"count": len(subs), "subscriptions": subs})


def chain_instruments(
    *, underlying: str, expiries: list[dt.date], strikes_around_atm: int | None
) -> list[Instrument]:
    """The CE and PE of each expiry, all strikes or ``strikes_around_atm`` each side of the money.

    The money is the nearest future's stored price, else the index's (``last_price``).
    """
    price = selectors.instrument_nearest_future_price(underlying=underlying, on_or_after=_today())
    chosen: list[Instrument] = []
    for expiry in expiries:
        chain = list(selectors.instrument_list_chain(underlying=underlying, expiry=expiry))
        if not chain:
            raise ApiError(
                404, "unknown_chain", f"no options of {underlying} expiring {expiry.isoformat()}",
                field="expiries",
            )  # fmt: skip
        if strikes_around_atm is not None:
            strikes = np.unique([i.strike for i in chain])
            centre = nearest_strike(strikes, price) if price else float(strikes[len(strikes) // 2])
            band = set(band_strikes(strikes, centre, strikes_around_atm).tolist())
            chain = [i for i in chain if i.strike in band]
        chosen.extend(chain)
    return chosen


@router.post(
    "/subscriptions/chain", response={201: ActivatedOut}, summary="Subscribe a whole option chain"
)
def subscription_create_chain(request, payload: ChainSubscriptionIn):
    require_scope(request, ApiToken.Scope.SUBSCRIBE)
    instruments = chain_instruments(
        underlying=payload.underlying, expiries=payload.expiries,
        strikes_around_atm=payload.strikes_around_atm,
    )  # fmt: skip
    subs = _activate(instruments, mode=payload.mode, pinned=_pinned(payload.pinned_account))
    return Status(201, {"count": len(subs), "subscriptions": subs})


def _subscription_or_404(instrument_token: int) -> Subscription:
    sub = Subscription.objects.select_related("instrument").filter(instrument_id=instrument_token).first()
    if sub is None:
        raise ApiError(404, "unknown_subscription", f"no subscription of instrument {instrument_token}")
    return sub


def _subscription_row(instrument_token: int) -> dict:
    return subscription_rows(Subscription.objects.filter(instrument_id=instrument_token)).get()


@router.patch(
    "/subscriptions/{instrument_token}", response=SubscriptionOut, summary="Change mode or status"
)
def subscription_change(request, instrument_token: int, payload: SubscriptionChangeIn):
    require_scope(request, ApiToken.Scope.SUBSCRIBE)
    sub = _subscription_or_404(instrument_token)
    reactivate = payload.status == Subscription.Status.ACTIVE and sub.status != Subscription.Status.ACTIVE
    if reactivate:
        # Through admission: an inactive subscription holds no capacity.
        _activate([sub.instrument], mode=payload.mode or sub.mode, pinned=sub.pinned_account)
    elif payload.status == Subscription.Status.INACTIVE:
        services.subscription_deactivate(subscription=sub, reason="deactivated through the API")
    if payload.mode is not None and not reactivate:
        services.subscription_set_mode(subscription=sub, mode=payload.mode)
    return _subscription_row(instrument_token)


@router.delete(
    "/subscriptions/{instrument_token}", response=SubscriptionOut,
    summary="Unsubscribe (the row stays, inactive)",
)  # fmt: skip
def subscription_delete(request, instrument_token: int):
    require_scope(request, ApiToken.Scope.SUBSCRIBE)
    sub = _subscription_or_404(instrument_token)
    services.subscription_deactivate(subscription=sub, reason="unsubscribed through the API")
    return _subscription_row(instrument_token)


# --- history -----------------------------------------------------------------------------------

HISTORY_MAX_CANDLES_PER_REQUEST = 50_000
"""One request computes at most about this many candles (a quarter of minutes, two years of
hours); larger ranges are split by the caller."""
_SESSION_MINUTES = 375
HISTORY_EARLIEST = dt.datetime(2000, 1, 1, tzinfo=IST)
HISTORY_LATEST = dt.datetime(2100, 1, 1, tzinfo=IST)
"""Dates outside these are refused with 400 (Kite has nothing there; far dates overflow)."""


def _parse_bound(value: str, *, end: bool) -> dt.datetime:
    """An ISO date (the whole day, IST) or datetime (naive = IST, Kite's convention)."""
    value = value.strip()
    if len(value) == 10:
        day = dt.date.fromisoformat(value)
        return dt.datetime.combine(day, dt.time(23, 59, 59) if end else dt.time(0, 0), tzinfo=IST)
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=IST)
    try:
        return parsed.astimezone(IST)
    except OverflowError:
        raise ValueError(f"{value!r} is out of range") from None


class HistoryQuery(Schema):
    start: dt.datetime = Field(alias="from", description="ISO date or datetime (naive = IST).")
    end: dt.datetime = Field(alias="to", description="ISO date (whole day) or datetime.")
    interval: Interval = "minute"
    oi: bool = Field(True, description="Open interest where Kite has it (F&O).")
    continuous: bool = Field(False, description="Continuous candles across expiries (futures).")

    @field_validator("start", mode="before")
    @classmethod
    def _start(cls, value: Any) -> Any:
        return _parse_bound(value, end=False) if isinstance(value, str) else value

    @field_validator("end", mode="before")
    @classmethod
    def _end(cls, value: Any) -> Any:
        return _parse_bound(value, end=True) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _range(self) -> "HistoryQuery":
        for name, value in (("from", self.start), ("to", self.end)):
            if value.tzinfo is None:
                raise ValueError(f"{name!r} must carry a time zone or be naive IST")
            if not HISTORY_EARLIEST <= value <= HISTORY_LATEST:
                raise ValueError(
                    f"{name!r} {value.isoformat()} is outside {HISTORY_EARLIEST.date()} .. "
                    f"{HISTORY_LATEST.date()}"
                )
        if self.end < self.start:
            raise ValueError(f"'from' ({self.start.isoformat()}) is after 'to' ({self.end.isoformat()})")
        days = (self.end - self.start).total_seconds() / 86_400
        if self.interval == "day":
            candles = days
        else:
            candles = days * _SESSION_MINUTES * 60 / INTERVAL_SECONDS[self.interval]
        if candles > HISTORY_MAX_CANDLES_PER_REQUEST:
            raise ValueError(
                f"range too long: about {int(candles)} {self.interval} candles, at most "
                f"{HISTORY_MAX_CANDLES_PER_REQUEST} per request; split the range"
            )
        return self


class HistoryThrottle(CallerRateThrottle):
    scope = "history"


class CallerConcurrency:
    """At most ``limit`` requests in flight per caller in this process (a semaphore each).

    The history endpoint is async, so the count is on the event loop and needs no lock; a
    caller over the limit is refused at once (429) rather than queued, since each request may
    hold Kite calls and a database connection for seconds.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_flight: defaultdict[str, int] = defaultdict(int)

    def enter(self, caller: str) -> bool:
        if self._in_flight[caller] >= self._limit:
            return False
        self._in_flight[caller] += 1
        return True

    def leave(self, caller: str) -> None:
        self._in_flight[caller] -= 1
        if self._in_flight[caller] <= 0:
            del self._in_flight[caller]


history_concurrency = CallerConcurrency(settings.API_HISTORY_CONCURRENCY_PER_CALLER)
history_in_flight = CallerConcurrency(settings.API_HISTORY_CONCURRENCY_TOTAL)
"""Every caller together: many tokens at once must not take the whole database pool (a
request past the pool's wait was a 500; found by the fault suite, security.history_abuse)."""
ALL_CALLERS = "all"


def _caller_key(request) -> str:
    principal = request.auth
    return f"token:{principal.pk}" if isinstance(principal, ApiToken) else f"user:{principal.pk}"


def _history_sync(instrument_token: int, query: HistoryQuery) -> dict[str, Any]:
    instrument = _instrument_or_404(instrument_token)
    try:
        with ExitStack() as stack:
            def client_factory():
                return stack.enter_context(
                    rest_client_for_service(api_root=settings.KITE_API_ROOT, redis_url=settings.REDIS_URL)
                )

            if instrument.is_option and not query.continuous:
                result = history_get(
                    instrument=instrument, interval=query.interval, start=query.start,
                    end=query.end, client_factory=client_factory,
                    r=settings.RISK_FREE_RATE, q=settings.DIVIDEND_YIELD,
                )  # fmt: skip
                return history_payload(result)
            return history_candles(
                instrument=instrument, interval=query.interval, start=query.start,
                end=query.end, client=client_factory(), oi=query.oi, continuous=query.continuous,
            )  # fmt: skip
    except HistoryError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    except NoKiteSessionError as exc:
        raise ApiError(503, "no_kite_session", str(exc)) from None
    except KiteError as exc:
        log.warning("history.kite_failed", instrument_token=instrument_token, error=str(exc)[:300])
        raise ApiError(502, "kite_error", str(exc)[:300]) from None


@router.get(
    "/history/{instrument_token}", summary="Candles of any instrument (options with IV and Greeks)",
    throttle=[HistoryThrottle(settings.API_HISTORY_RATE_LIMIT)], url_name="history",
)  # fmt: skip
async def history(request, instrument_token: int, query: Query[HistoryQuery]):
    require_scope(request, ApiToken.Scope.READ)  # 'read' needs no query: safe on the loop
    caller = _caller_key(request)
    if not history_concurrency.enter(caller):
        raise ApiError(
            429, "too_many_concurrent",
            f"at most {settings.API_HISTORY_CONCURRENCY_PER_CALLER} history requests at once per caller",
        )  # fmt: skip
    try:
        if not history_in_flight.enter(ALL_CALLERS):
            raise ApiError(
                429, "server_busy",
                f"{settings.API_HISTORY_CONCURRENCY_TOTAL} history requests are in flight on this "
                "server; retry in a few seconds",
            )  # fmt: skip
        try:
            # Django's ASGI handler gives each request a sync thread of its own (thread-sensitive
            # context), so a long Kite fetch holds only this request's thread.
            return await sync_to_async(_history_sync)(instrument_token, query)
        finally:
            history_in_flight.leave(ALL_CALLERS)
    finally:
        history_concurrency.leave(caller)

