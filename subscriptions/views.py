"""HTTP API views: historical candles of an option with Greeks."""

from __future__ import annotations

import datetime as dt
from contextlib import ExitStack
from typing import Any, Literal

import orjson
import structlog
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from accounts.selectors import apitoken_get_active
from streaming.greeks import IST
from streaming.kite.rest import KiteError
from subscriptions.clients import NoKiteSessionError, rest_client_for_service
from subscriptions.history import INTERVAL_SECONDS, HistoryError, history_get, history_payload
from subscriptions.models import Instrument

log = structlog.get_logger(__name__)

#: One request computes at most about this many candles (a quarter of minutes, two years of
#: hours); larger ranges are split by the caller.
HISTORY_MAX_CANDLES_PER_REQUEST = 50_000
_SESSION_MINUTES = 375
MAX_KEY_LENGTH = 128

Interval = Literal["minute", "3minute", "5minute", "10minute", "15minute", "30minute", "60minute", "day"]


def _parse_bound(value: str, *, end: bool) -> dt.datetime:
    """An ISO date (the whole day, IST) or datetime (naive = IST, Kite's convention)."""
    value = value.strip()
    if len(value) == 10:
        day = dt.date.fromisoformat(value)
        return dt.datetime.combine(day, dt.time(23, 59, 59) if end else dt.time(0, 0), tzinfo=IST)
    parsed = dt.datetime.fromisoformat(value)
    return parsed.replace(tzinfo=IST) if parsed.tzinfo is None else parsed.astimezone(IST)


class HistoryQuery(BaseModel):
    """The query string of GET /api/history/<instrument_token>."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start: dt.datetime = Field(alias="from")
    end: dt.datetime = Field(alias="to")
    interval: Interval = "minute"

    @field_validator("start", mode="before")
    @classmethod
    def _start(cls, value: Any) -> Any:
        return _parse_bound(value, end=False) if isinstance(value, str) else value

    @field_validator("end", mode="before")
    @classmethod
    def _end(cls, value: Any) -> Any:
        return _parse_bound(value, end=True) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _range(self) -> HistoryQuery:
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


def _json(payload: Any, *, status: int = 200) -> HttpResponse:
    # orjson writes NaN as null, which is what the API promises for unknown values.
    return HttpResponse(orjson.dumps(payload), status=status, content_type="application/json")


def _api_user(request: HttpRequest):
    """A staff user logged in to the admin, or the owner of a valid ``Authorization: Token``."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() == "token":
        key = key.strip()
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        token = apitoken_get_active(key=key)
        return token.user if token is not None else None
    user = request.user
    return user if user.is_authenticated and user.is_active and user.is_staff else None


@never_cache
@require_GET
def history(request: HttpRequest, instrument_token: int) -> HttpResponse:
    """An option's candles with IV and Greeks: ``?from=&to=&interval=`` (ISO dates/datetimes)."""
    if _api_user(request) is None:
        response = _json(
            {"error": "authentication required: staff session or 'Authorization: Token <key>'"},
            status=401,
        )
        response["WWW-Authenticate"] = "Token"
        return response
    try:
        query = HistoryQuery.model_validate(request.GET.dict())
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "query", "error": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        return _json({"error": "invalid query", "details": errors}, status=400)
    instrument = Instrument.objects.filter(pk=instrument_token).first()
    if instrument is None:
        return _json({"error": f"unknown instrument_token {instrument_token}"}, status=404)

    try:
        with ExitStack() as stack:
            result = history_get(
                instrument=instrument,
                interval=query.interval,
                start=query.start,
                end=query.end,
                client_factory=lambda: stack.enter_context(
                    rest_client_for_service(
                        api_root=settings.KITE_API_ROOT, redis_url=settings.REDIS_URL
                    )
                ),
                r=settings.RISK_FREE_RATE,
                q=settings.DIVIDEND_YIELD,
            )
    except HistoryError as exc:
        return _json({"error": str(exc), "code": exc.code}, status=400)
    except NoKiteSessionError as exc:
        return _json({"error": str(exc), "code": "no_kite_session"}, status=503)
    except KiteError as exc:
        log.warning("history.kite_failed", instrument_token=instrument_token, error=str(exc))
        return _json({"error": str(exc), "code": "kite_error"}, status=502)
    return _json(history_payload(result))
