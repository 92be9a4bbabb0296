"""Fixtures of the orders tests: the simulator as Kite, its instruments, an account granted
to a trader with a ``trade`` token, and an API client.

Test modules import the ``fixture_*`` functions they use; pytest knows them by their
``name``, so a test's parameter never shadows an import.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import KiteAccount
from accounts.services import apitoken_create
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from subscriptions.models import Instrument
from tests.conftest import instrument_rows_from_market

API_KEY = "orderkey"
API_SECRET = "ordersecretAPIsecretvalue0123"  # scanned for in logs and answers
ACCESS_TOKEN = "orderaccesstokenSECRET0123456789"


@pytest.fixture(name="market")
def fixture_market() -> SyntheticMarket:
    return SyntheticMarket(seed=7, expiries=1, strikes_each_side=2)


@pytest.fixture(name="sim")
def fixture_sim(market):
    simulator = KiteSimulator(market=market, step_market=False, tick_interval_ms=1000)
    simulator.register_account(api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    with SimulatorThread(simulator) as thread:
        yield thread


@pytest.fixture(name="order_settings")
def fixture_order_settings(settings, sim, redis_client):
    """The service's Kite and order settings on the simulator; fast resolution timings."""
    settings.KITE_API_ROOT = sim.http_url
    settings.ORDERS_KITE_TIMEOUT_S = 5.0
    settings.ORDERS_UNKNOWN_CHECK_INTERVAL_S = 0.2
    settings.ORDERS_UNKNOWN_GRACE_S = 1.0
    return settings


@pytest.fixture(name="instruments")
def fixture_instruments(db, market) -> list[Instrument]:
    return Instrument.objects.bulk_create(instrument_rows_from_market(market))


def future(instruments) -> Instrument:
    return next(i for i in instruments if i.instrument_type == "FUT")


@pytest.fixture(name="trader")
def fixture_trader(django_user_model):
    return django_user_model.objects.create_user(username="trader", password="pw-123456")


@pytest.fixture(name="account")
def fixture_account(db, trader) -> KiteAccount:
    now = timezone.now()
    account = KiteAccount.objects.create(
        label="desk", api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN,
        token_issued_at=now, token_expires_at=now + dt.timedelta(hours=12),
    )  # fmt: skip
    account.traders.add(trader)
    return account


@pytest.fixture(name="trade_key")
def fixture_trade_key(trader) -> str:
    return apitoken_create(user=trader, name="bot", scopes=["read", "trade"])[1]


class OrdersClient:
    """The API as a program calls it: token header, JSON bodies."""

    def __init__(self, key: str) -> None:
        self._client = Client()
        self._headers = {"HTTP_AUTHORIZATION": f"Token {key}"}

    def place(self, body: dict[str, Any], *, key: str | None = "k-1"):
        headers = dict(self._headers)
        if key is not None:
            headers["HTTP_IDEMPOTENCY_KEY"] = key
        return self._client.post("/api/v1/orders", orjson.dumps(body), content_type="application/json", **headers)

    def get(self, path: str):
        return self._client.get(path, **self._headers)

    def patch(self, path: str, body: dict[str, Any]):
        return self._client.patch(path, orjson.dumps(body), content_type="application/json", **self._headers)

    def delete(self, path: str):
        return self._client.delete(path, **self._headers)

    def post(self, path: str):
        return self._client.post(path, b"{}", content_type="application/json", **self._headers)


@pytest.fixture(name="api")
def fixture_api(trade_key) -> OrdersClient:
    return OrdersClient(trade_key)


def market_order(account: KiteAccount, instrument: Instrument, **extra) -> dict[str, Any]:
    return {
        "account_id": account.pk, "exchange": instrument.exchange, "tradingsymbol": instrument.tradingsymbol,
        "transaction_type": "BUY", "order_type": "MARKET", "quantity": instrument.lot_size,
        "product": "NRML", **extra,
    }
