"""HTTP API v1: stored 1-minute underlying bars and the service's status (tickerproj/api.py)."""

import datetime as dt

import structlog
from django.db.models import Count
from django.utils import timezone
from ninja import Field, Query, Router, Schema
from ninja.pagination import CursorPagination, paginate
from pydantic import field_validator

from accounts.models import ApiToken, KiteAccount
from streaming.kite.limits import MAX_INSTRUMENTS_PER_API_KEY
from streaming.models import AccountLease, EngineHeartbeat, UnderlyingBar
from streaming.status import parse_heartbeats
from tickerproj.api_support import ApiError, require_scope, require_staff_or_scope

log = structlog.get_logger(__name__)

router = Router(tags=["bars and status"])

BARS_MAX_DAYS = 31
"""One request reads at most a month of minutes (about 11,000 bars per instrument)."""


class BarOut(Schema):
    instrument_token: int = Field(alias="instrument_id")
    start: dt.datetime
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    volume: int
    tick_count: int
    is_gap: bool = Field(
        description="No tick arrived in this minute and no historical candle filled it (yet, "
        "or Kite lacks it): prices are null."
    )
    is_mock: bool
    backfilled: bool = Field(
        description="No tick arrived in this minute; prices are Kite's historical minute candle."
    )


BARS_EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
BARS_LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
"""Times outside these are refused with 400: PostgreSQL refuses far dates and extreme UTC
offsets with an error, which must not become a 500."""


class BarFilters(Schema):
    instrument_token: int = Field(ge=0, le=2**32 - 1, description="Kite's instrument_token.")
    start: dt.datetime = Field(alias="from")
    end: dt.datetime = Field(alias="to")

    @field_validator("start", "end", mode="after")
    @classmethod
    def _in_range(cls, value: dt.datetime) -> dt.datetime:
        # Naive times are in TIME_ZONE (as Django reads them); sent to PostgreSQL as UTC.
        value = timezone.make_aware(value) if value.tzinfo is None else value
        try:
            value = value.astimezone(dt.UTC)
        except OverflowError:
            raise ValueError("out of range") from None
        if not BARS_EARLIEST <= value < BARS_LATEST:
            raise ValueError(f"must be between {BARS_EARLIEST:%Y} and {BARS_LATEST:%Y}")
        return value


@router.get("/bars", response=list[BarOut], summary="Stored 1-minute underlying bars, gaps marked")
@paginate(CursorPagination, ordering=("start",), page_size=500, max_page_size=2000)
def bar_list(request, filters: Query[BarFilters]):
    require_scope(request, ApiToken.Scope.READ)
    if filters.end < filters.start:
        raise ApiError(400, "invalid_range", "'from' is after 'to'", field="from")
    if filters.end - filters.start > dt.timedelta(days=BARS_MAX_DAYS):
        raise ApiError(400, "range_too_long", f"at most {BARS_MAX_DAYS} days per request", field="to")
    return UnderlyingBar.objects.filter(
        instrument_id=filters.instrument_token, start__gte=filters.start, start__lte=filters.end
    )


class AccountStatusOut(Schema):
    id: int
    label: str
    status: str
    engine: str | None = Field(description="The runticker holding this account's lease.")
    instruments: int = Field(description="Active subscriptions the engine assigned to it.")
    capacity: int
    last_tick_age_s: float | None
    token_expires_at: dt.datetime | None


class EngineStatusOut(Schema):
    engine_id: str
    mode: str | None
    heartbeat_age_s: float
    streamed_count: int | None


class StatusOut(Schema):
    accounts: list[AccountStatusOut]
    engines: list[EngineStatusOut]


@router.get("/status", response=StatusOut, summary="Accounts and engines (staff or 'read')")
def status(request):
    require_staff_or_scope(request, ApiToken.Scope.READ)
    now = timezone.now()
    held = dict(
        KiteAccount.objects.annotate(n=Count("assigned_subscriptions")).values_list("pk", "n")
    )
    leases = {
        lease.account_id: lease.owner
        for lease in AccountLease.objects.filter(expires_at__gt=now)
    }
    # Read through the one parser: an unreadable document is an error, never a silent gap.
    parsed = parse_heartbeats(EngineHeartbeat.objects.order_by("engine_id"))
    for exc in parsed.errors:
        log.error("api.engine_status_invalid", engine=exc.engine_id, error=exc.error)
    tick_age: dict[int, float | None] = {}
    for st, _ in parsed.statuses:
        for acc in st.accounts.values():
            tick_age[acc.account_id] = acc.last_tick_age_s
    return {
        "accounts": [
            {
                "id": a.pk, "label": a.label, "status": a.status, "engine": leases.get(a.pk),
                "instruments": held.get(a.pk, 0), "capacity": MAX_INSTRUMENTS_PER_API_KEY,
                "last_tick_age_s": tick_age.get(a.pk), "token_expires_at": a.token_expires_at,
            }
            for a in KiteAccount.objects.order_by("label")
        ],
        "engines": [
            {
                "engine_id": st.engine_id, "mode": st.mode,
                "heartbeat_age_s": round(now.timestamp() - written_at_s, 1),
                "streamed_count": st.streamed_count,
            }
            for st, written_at_s in parsed.statuses
        ],
    }  # fmt: skip
