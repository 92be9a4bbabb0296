"""The order desk is built once per process and settings; its Kite clients are reused per api key."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.auth import apitoken_authenticate
from accounts.brokers import BrokerConfig, KiteClients
from accounts.models import KiteAccount
from accounts.order_desk import order_desk_from_settings
from accounts.services import apitoken_create
from streaming.kite.rest import KiteRateLimiter
from tests.accounts.orderkit import (  # noqa: F401  (fixtures, used by name)
    fixture_account,
    fixture_api,
    fixture_instruments,
    fixture_market,
    fixture_order_settings,
    fixture_sim,
    fixture_trade_key,
    fixture_trader,
    future,
    market_order,
)

pytestmark = pytest.mark.django_db


def test_the_desk_is_built_once_per_settings(order_settings):
    desk = order_desk_from_settings()
    assert order_desk_from_settings() is desk
    order_settings.ORDERS_PER_MINUTE = 399
    changed = order_desk_from_settings()
    assert changed is not desk and changed.limits.per_minute == 399


def test_one_client_per_account_until_its_access_token_changes():
    clients = KiteClients(config=BrokerConfig(
        api_root="http://127.0.0.1:1", redis_url="", timeout_s=1.0, rate_limiter=KiteRateLimiter(),
    ))  # fmt: skip
    account = KiteAccount(pk=1, label="a", api_key="app-key", access_token="token-1")
    first = clients.client_for(account)
    assert clients.client_for(KiteAccount(pk=1, label="a", api_key="app-key", access_token="token-1")) is first
    # Another user of the same Kite app: same api key, own token, own client; the first stays.
    other = clients.client_for(KiteAccount(pk=2, label="b", api_key="app-key", access_token="token-9"))
    assert other is not first and other._kite.access_token == "token-9"
    assert clients.client_for(account) is first
    account.access_token = "token-2"  # a new login
    renewed = clients.client_for(account)
    assert renewed is not first and renewed._kite.access_token == "token-2"


def test_orders_reuse_one_http_connection_to_kite(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    for n in range(3):
        assert api.place(market_order(account, fut), key=f"reuse-{n}").status_code == 201
    session = order_desk_from_settings().broker_for(account)._client._kite.reqsession
    pools = session.get_adapter(sim.http_url).poolmanager.pools
    [pool] = [pools[key] for key in pools.keys()]  # noqa: SIM118 (urllib3 refuses iteration)
    assert pool.num_connections == 1 and pool.num_requests == 3


def test_a_recently_used_token_is_not_written_again(trader):
    _, key = apitoken_create(user=trader, name="bot", scopes=["read"])
    first = apitoken_authenticate(key=key)
    assert first is not None and first.last_used_at is None
    with CaptureQueriesContext(connection) as queries:
        again = apitoken_authenticate(key=key)
    assert again is not None and again.last_used_at is not None
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["SELECT"]
