"""Fixtures for the periodic jobs: the Kite simulator, its instruments, an account, a worker."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

import pytest
from celery.contrib.testing.worker import start_worker
from django.db import connections
from django.utils import timezone

from accounts.models import KiteAccount
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from subscriptions.models import Instrument
from tests.conftest import instrument_rows_from_market as instruments_from_market
from tickerproj.celery import app

SIM_API_KEY = "celerykey"
SIM_API_SECRET = "celerysecret"
SIM_ACCESS_TOKEN = "celerytoken"




@pytest.fixture
def market() -> SyntheticMarket:
    """NIFTY and BANKNIFTY, three expiries of 15 strikes each side, prices moved only by tests."""
    return SyntheticMarket(seed=7, expiries=3, strikes_each_side=15)


@pytest.fixture
def sim(market):
    """The loopback Kite simulator on ``market`` (no random walk: tests move the spot)."""
    simulator = KiteSimulator(market=market, step_market=False, tick_interval_ms=1000)
    simulator.register_account(
        api_key=SIM_API_KEY, api_secret=SIM_API_SECRET, access_token=SIM_ACCESS_TOKEN
    )
    with SimulatorThread(simulator) as thread:
        yield thread


@pytest.fixture
def kite_settings(settings, sim):
    """Point the service's Kite settings at the simulator."""
    settings.KITE_API_ROOT = sim.http_url
    settings.KITE_WS_URL = sim.ws_url
    return settings


def make_account(label: str = "main", **extra) -> KiteAccount:
    now = timezone.now()
    fields = {
        "label": label,
        "api_key": SIM_API_KEY if label == "main" else f"key-{label}",
        "access_token": SIM_ACCESS_TOKEN,
        "token_issued_at": now,
        "token_expires_at": now + dt.timedelta(hours=12),
        "status": KiteAccount.Status.ACTIVE,
    }
    fields.update(extra)
    return KiteAccount.objects.create(**fields)


@pytest.fixture
def sim_account(db) -> KiteAccount:
    """An account logged in to the simulator."""
    return make_account()


@pytest.fixture
def sim_instruments(db, market) -> list[Instrument]:
    rows = instruments_from_market(market)
    Instrument.objects.bulk_create(rows)
    return rows


@pytest.fixture
def celery_worker(transactional_db, redis_client):
    """A real Celery worker (the project's app, Redis broker) running tasks in a thread.

    transactional_db: the worker's own database connection must see committed rows.
    """
    app.loader.import_default_modules()
    with start_worker(
        app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30.0,
    ) as worker:
        yield worker
    # The worker thread's connections would otherwise keep the test database busy.
    connections.close_all()


def run_in_threads(fn: Callable[[], object], *, count: int, timeout_s: float = 60.0) -> list:
    """Run ``fn`` in ``count`` threads released together at a barrier; results or exceptions."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def target(i: int) -> None:
        try:
            barrier.wait(timeout=timeout_s)
            results[i] = fn()
        except BaseException as exc:  # reported to the test, which asserts on it
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
        assert not t.is_alive(), "a thread did not finish in time"
    return results
