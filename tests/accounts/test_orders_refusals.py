"""Every refusal has its own code, is audited, and sends nothing to Kite (the simulator's log)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.models import KiteAccount, Order, OrderAudit, PositionSnapshot, TradingSwitch
from accounts.order_actions import OrderActor, trading_switch_set
from accounts.services import apitoken_create
from tests.accounts.orderkit import (  # noqa: F401  (fixtures, used by name)
    API_KEY,
    OrdersClient,
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


def sent(sim) -> int:
    requests = sim.call(lambda: dict(sim.sim.rest_requests))
    return sum(n for route, n in requests.items() if route in ("order.place", "order.modify", "order.cancel"))


def refused(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code


def test_a_token_without_the_trade_scope_is_refused(order_settings, sim, account, instruments, trader):
    reader = OrdersClient(apitoken_create(user=trader, name="r", scopes=["read"])[1])
    refused(reader.place(market_order(account, future(instruments))), 403, "scope_required")
    assert sent(sim) == 0
    assert OrderAudit.objects.get().error_code == "scope_required"


def test_an_account_not_granted_is_refused(order_settings, sim, account, instruments, django_user_model):
    stranger = django_user_model.objects.create_user("stranger")
    client = OrdersClient(apitoken_create(user=stranger, name="s", scopes=["trade"])[1])
    refused(client.place(market_order(account, future(instruments))), 403, "account_not_granted")
    assert sent(sim) == 0
    audit = OrderAudit.objects.get()
    assert (audit.error_code, audit.account_id, audit.user.username) == ("account_not_granted", account.pk, "stranger")


def test_kill_switches_refuse_new_orders_with_their_reason(order_settings, sim, account, instruments, api, trader):
    actor = OrderActor(user=trader, origin="admin")
    trading_switch_set(actor=actor, halted=True, reason="desk review", account=account)
    response = api.place(market_order(account, future(instruments)), key="a")
    refused(response, 403, "kill_switch_account")
    assert "desk review" in response.json()["error"]["message"]
    trading_switch_set(actor=actor, halted=False, reason="", account=account)
    trading_switch_set(actor=actor, halted=True, reason="exchange outage")
    refused(api.place(market_order(account, future(instruments)), key="a"), 403, "kill_switch_global")
    assert sent(sim) == 0
    assert TradingSwitch.objects.get().halted
    assert OrderAudit.objects.filter(action="kill_switch").count() == 3


def test_pre_trade_limits_refuse_with_their_own_codes(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    KiteAccount.objects.filter(pk=account.pk).update(allowed_exchanges=["NSE"])
    refused(api.place(market_order(account, fut), key="1"), 403, "exchange_not_allowed")
    KiteAccount.objects.filter(pk=account.pk).update(allowed_exchanges=["NFO"], allowed_products=["MIS"])
    refused(api.place(market_order(account, fut), key="2"), 403, "product_not_allowed")
    KiteAccount.objects.filter(pk=account.pk).update(allowed_products=["NRML"], max_lots_per_order=1)
    refused(api.place(market_order(account, fut, quantity=2 * fut.lot_size), key="3"), 403, "max_lots_exceeded")
    KiteAccount.objects.filter(pk=account.pk).update(max_lots_per_order=None, max_notional_per_order=Decimal(1000))
    limit = market_order(account, fut, order_type="LIMIT", price=100.0)
    refused(api.place(limit, key="4"), 403, "max_notional_exceeded")
    # A MARKET order with no known price cannot be valued: refused rather than guessed.
    fut.last_price = 0
    fut.save()
    refused(api.place(market_order(account, fut), key="5"), 403, "notional_unknown")
    assert sent(sim) == 0
    assert not Order.objects.exists()
    assert set(OrderAudit.objects.values_list("error_code", flat=True)) == {
        "exchange_not_allowed", "product_not_allowed", "max_lots_exceeded", "max_notional_exceeded",
        "notional_unknown",
    }


def test_the_daily_loss_cap_halts_new_orders(order_settings, sim, account, instruments, api):
    KiteAccount.objects.filter(pk=account.pk).update(daily_loss_cap=Decimal(5000))
    PositionSnapshot.objects.create(
        account=account, taken_at=timezone.now(), source="sync",
        net=[{"instrument_token": 1, "quantity": 75, "pnl": -5200.5, "realised": -1000.0, "last_price": 10}],
    )
    response = api.place(market_order(account, future(instruments)), key="loss")
    refused(response, 403, "daily_loss_cap_reached")
    assert "realised -1000.00" in response.json()["error"]["message"]
    assert sent(sim) == 0


def test_over_kites_order_limits_is_a_429_with_retry_after(order_settings, sim, account, instruments, api):
    # The minute's window, not the second's: a loaded machine may take longer than a second
    # over three placements, never a minute (the windows share one code path).
    order_settings.ORDERS_PER_MINUTE = 2
    fut = future(instruments)
    assert api.place(market_order(account, fut), key="r1").status_code == 201
    assert api.place(market_order(account, fut), key="r2").status_code == 201
    response = api.place(market_order(account, fut), key="r3")
    refused(response, 429, "order_rate_limited")
    assert 1 <= int(response["Retry-After"]) <= 61  # the minute stretched by its 1 s margin
    assert sent(sim) == 2
    # Nothing was stored for the refused key: the same key may be sent again once there is room.
    assert not Order.objects.filter(placement__idempotency_key="r3").exists()


def test_the_modification_limit_is_enforced_before_kite_is_asked(order_settings, sim, account, instruments, api):
    order_settings.ORDERS_MAX_MODIFICATIONS = 2
    fut = future(instruments)
    placed = api.place(market_order(account, fut, order_type="LIMIT", price=round(fut.last_price / 2, 1)), key="m")
    order_id = placed.json()["orders"][0]["id"]
    Order.objects.filter(pk=order_id).update(status="OPEN")
    for n in range(2):
        assert api.patch(f"/api/v1/orders/{order_id}", {"price": 100.0 + n}).status_code == 200
    before = sent(sim)
    refused(api.patch(f"/api/v1/orders/{order_id}", {"price": 200.0}), 409, "modification_limit_reached")
    assert sent(sim) == before


def test_a_disabled_account_is_refused(order_settings, sim, account, instruments, api):
    KiteAccount.objects.filter(pk=account.pk).update(status=KiteAccount.Status.DISABLED)
    refused(api.place(market_order(account, future(instruments)), key="d"), 409, "account_not_active")
    assert sent(sim) == 0


def test_orders_of_an_account_not_granted_are_invisible(order_settings, sim, account, instruments, api,
                                                        django_user_model):
    placed = api.place(market_order(account, future(instruments)), key="v").json()["orders"][0]
    other = django_user_model.objects.create_user("other")
    client = OrdersClient(apitoken_create(user=other, name="o", scopes=["trade"])[1])
    refused(client.get(f"/api/v1/orders/{placed['id']}"), 404, "unknown_order")
    refused(client.delete(f"/api/v1/orders/{placed['id']}"), 404, "unknown_order")
    assert client.get("/api/v1/orders").json() == {"orders": []}
    assert [o["id"] for o in api.get("/api/v1/orders").json()["orders"]] == [placed["id"]]
