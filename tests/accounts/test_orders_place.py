"""Placing through the API against the simulator: idempotency, slicing, market protection."""

from __future__ import annotations

import pytest

from accounts.models import KiteAccount, Order, OrderAudit, OrderPlacement
from tests.accounts.orderkit import (  # noqa: F401  (fixtures, used by name)
    API_KEY,
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


def test_a_market_order_is_placed_once_and_the_same_key_returns_the_same_answer(
    order_settings, sim, account, instruments, api
):
    body = market_order(account, future(instruments))
    first = api.place(body, key="abc-1")
    assert first.status_code == 201, first.content
    [order] = first.json()["orders"]
    assert order["kite_order_id"] and order["tag"].startswith("tp") and len(order["tag"]) == 20
    again = api.place(body, key="abc-1")
    assert (again.status_code, again.content) == (first.status_code, first.content)
    assert sim.call(lambda: sim.sim.rest_requests.get("order.place")) == 1
    assert Order.objects.count() == 1
    [kite] = sim.call(sim.sim.orders, API_KEY)
    assert kite["tag"] == order["tag"] and kite["status"] == "COMPLETE"
    # Kite's 2026 rule: a MARKET order carries market protection (the account's default: auto).
    assert kite["market_protection"] == -1
    audit = OrderAudit.objects.get(action="place")
    assert audit.outcome == "ok" and audit.response == {"order_id": order["kite_order_id"]}
    assert audit.token_prefix and audit.user.username == "trader"


def test_a_reused_key_with_another_body_is_refused(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    assert api.place(market_order(account, fut), key="same").status_code == 201
    other = api.place(market_order(account, fut, transaction_type="SELL"), key="same")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert sim.call(lambda: sim.sim.rest_requests.get("order.place")) == 1


def test_post_without_an_idempotency_key_is_refused(order_settings, sim, account, instruments, api):
    response = api.place(market_order(account, future(instruments)), key=None)
    assert response.status_code == 400 and response.json()["error"]["code"] == "idempotency_key_required"
    assert sim.call(lambda: sim.sim.rest_requests.get("order.place")) is None


def test_a_large_order_is_sliced_within_the_freeze_quantity(order_settings, sim, account, instruments, api):
    order_settings.ORDERS_FREEZE_QUANTITIES = {"NIFTY": 150}
    fut = future(instruments)
    response = api.place(market_order(account, fut, quantity=5 * fut.lot_size), key="big")
    assert response.status_code == 201, response.content
    quantities = [o["quantity"] for o in response.json()["orders"]]
    assert quantities == [150, 150, 75]
    assert len({o["tag"] for o in response.json()["orders"]}) == 3
    assert sorted(o["quantity"] for o in sim.call(sim.sim.orders, API_KEY)) == [75, 150, 150]
    assert OrderPlacement.objects.get().orders.count() == 3


def test_too_many_slices_are_refused_before_anything_is_sent(order_settings, sim, account, instruments, api):
    order_settings.ORDERS_FREEZE_QUANTITIES = {"NIFTY": 75}
    order_settings.ORDERS_MAX_SLICES = 2
    fut = future(instruments)
    response = api.place(market_order(account, fut, quantity=3 * fut.lot_size), key="huge")
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_slices"
    assert sim.call(lambda: sim.sim.rest_requests.get("order.place")) is None


def test_kite_rejecting_the_order_is_its_final_state_and_the_answer(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    response = api.place(market_order(account, fut, quantity=fut.lot_size + 1, product="MIS"), key="odd")
    # Our own lot check refuses first: nothing sent.
    assert response.json()["error"]["code"] == "quantity_not_lot_multiple"
    sim.call(sim.sim.fail_next, "order.place", 400, "InputException", message="Markets are closed right now.")
    rejected = api.place(market_order(account, fut), key="closed")
    assert rejected.status_code == 422
    error = rejected.json()["error"]
    assert error["code"] == "kite_rejected" and error["message"].endswith("Markets are closed right now.")
    assert error["orders"][0]["status"] == "REJECTED"
    assert api.place(market_order(account, fut), key="closed").content == rejected.content


def test_an_rms_rejection_after_acceptance_is_recorded_from_the_order_book(
    order_settings, sim, account, instruments, api
):
    sim.call(sim.sim.reject_next_orders)
    response = api.place(market_order(account, future(instruments)), key="rms")
    assert response.status_code == 201
    order = Order.objects.get()
    from accounts.order_actions import orders_refresh_from_broker
    from accounts.order_desk import order_desk_from_settings

    orders_refresh_from_broker(account=account, broker=order_desk_from_settings().broker_for(account))
    order.refresh_from_db()
    assert order.status == "REJECTED" and order.status_message.startswith("Insufficient funds")


def test_limit_orders_modify_and_cancel(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    body = market_order(account, fut, order_type="LIMIT", price=round(fut.last_price * 0.5, 1))
    placed = api.place(body, key="lim")
    assert placed.status_code == 201
    order_id = placed.json()["orders"][0]["id"]
    modified = api.patch(f"/api/v1/orders/{order_id}", {"price": round(fut.last_price * 0.6, 1)})
    assert modified.status_code == 200 and modified.json()["outcome"] == "sent"
    cancelled = api.delete(f"/api/v1/orders/{order_id}")
    assert cancelled.status_code == 200
    [kite] = sim.call(sim.sim.orders, API_KEY)
    assert kite["status"] == "CANCELLED"
    again = api.delete(f"/api/v1/orders/{order_id}")
    # Our copy learns of the cancel from the updates; until then Kite's refusal is the answer.
    assert again.status_code in (409, 422)
    assert {a.action for a in OrderAudit.objects.all()} >= {"place", "modify", "cancel"}


def test_market_protection_follows_the_account_setting(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    KiteAccount.objects.filter(pk=account.pk).update(market_protection=3)
    api.place(market_order(account, fut), key="mp3")
    api.place(market_order(account, fut, order_type="LIMIT", price=1.0), key="limit")
    KiteAccount.objects.filter(pk=account.pk).update(market_protection=0)
    api.place(market_order(account, fut), key="mp0")
    sent = [o["market_protection"] for o in sim.call(sim.sim.orders, API_KEY)]
    # 3% on the MARKET order; a LIMIT order carries none; 0 sends none (the simulator's 0).
    assert sent == [3, 0, 0]
    assert "market_protection" not in Order.objects.get(placement__idempotency_key="mp0").request
