"""Shared fixtures. Tests run on the real PostgreSQL and Redis (see [tool.pytest_env])."""

import datetime as dt
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from django.conf import settings

from streaming.kite.schemas import INSTRUMENT_CSV_COLUMNS
from subscriptions.models import Instrument

REDIS_DATABASES = 16  # redis-server's default `databases`


def worker_redis_url(base_url: str, index: int) -> str:
    """``base_url`` on its database + ``index``; a clear error past Redis's last database."""
    parts = urlsplit(base_url)
    db = int(parts.path.strip("/") or 0) + index
    if db >= REDIS_DATABASES:
        raise pytest.UsageError(
            f"xdist worker {index} would use Redis database {db} ({base_url} + {index}), past "
            f"the last one ({REDIS_DATABASES - 1}): lower -n or REDIS_URL's database"
        )
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config, specs):
    """Give each pytest-xdist worker a Redis database, a channel-layer prefix and a var/ of its own.

    Set in the workers' environment at their start, before Django reads its settings, so the
    subprocesses the tests start (runticker, daphne, Celery, honcho) inherit them too.
    pytest-django already gives each worker its own test database (``<name>_gw<N>``). Worker N
    is on REDIS_URL's database + N: suites sharing the machine pick bases ``-n`` apart. The
    prefix matters beyond the database: the engines' control channel is a Redis PUBLISH, which
    reaches every database.
    """
    base_url = os.environ["REDIS_URL"]  # set by [tool.pytest_env] when not given
    prefix = os.environ.get("CHANNEL_LAYER_PREFIX", "test")
    var_dir = Path(os.environ.get("TICKERPROJ_VAR_DIR", Path(__file__).resolve().parents[1] / "var"))
    for index, spec in enumerate(specs):
        spec.env.update(
            REDIS_URL=worker_redis_url(base_url, index),
            CHANNEL_LAYER_PREFIX=f"{prefix}_{spec.id}",
            TICKERPROJ_VAR_DIR=str(var_dir / "xdist" / spec.id),
        )


def pytest_collection_modifyitems(config, items):
    """On xdist workers, the heavy tests first (in collection order otherwise): the workers take
    tests in this order, so none of them starts last and leaves the others idle at the end."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


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
