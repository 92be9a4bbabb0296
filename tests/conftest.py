"""Shared fixtures. Tests run on the real PostgreSQL and Redis (see [tool.pytest_env])."""

import datetime as dt

import pytest
import redis
from django.conf import settings

from streaming.kite.schemas import INSTRUMENT_CSV_COLUMNS
from subscriptions.models import Instrument


def pytest_configure(config):
    # A clear failure instead of confusing errors when someone runs the suite on SQLite.
    if not settings.DATABASES["default"]["ENGINE"].endswith(".backends.postgresql"):
        raise pytest.UsageError("the test suite runs on PostgreSQL: set DATABASE_URL (see README)")


@pytest.fixture
def redis_client():
    """A client on the test Redis database, emptied before and after the test."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def make_option(*, token: int, name: str, expiry: dt.date, strike: float, kind: str, **extra) -> Instrument:
    """An unsaved NFO option instrument with Kite-like fields."""
    symbol = f"{name}{expiry:%y%b}{int(strike)}{kind}".upper()
    return Instrument(
        instrument_token=token,
        exchange_token=token >> 8,
        tradingsymbol=symbol,
        name=name,
        expiry=expiry,
        strike=strike,
        tick_size=0.05,
        lot_size=75,
        instrument_type=kind,
        segment="NFO-OPT",
        exchange="NFO",
        **extra,
    )


def instrument_rows_from_market(market) -> list[Instrument]:
    """A SyntheticMarket's instrument dump as unsaved Instrument rows.

    The dump carries exchange_token as text, as Kite's CSV does.
    """
    return [
        Instrument(**{**{c: row[c] for c in INSTRUMENT_CSV_COLUMNS}, "exchange_token": int(row["exchange_token"])})
        for row in market.instruments
    ]
