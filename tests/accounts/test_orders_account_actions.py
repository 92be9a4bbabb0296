"""Cancel all open orders and square off all positions, from the API and the admin; audited."""

from __future__ import annotations

import pytest
from django.urls import reverse

from accounts.models import OrderAudit, PositionSnapshot, TradingSwitch
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


def net_quantity(sim) -> int:
    return sum(t["quantity"] * (1 if t["transaction_type"] == "BUY" else -1)
               for t in sim.call(lambda: list(sim.sim._accounts[API_KEY].trades)))


def test_cancel_all_cancels_every_open_order_at_kite(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    for n in range(2):
        resting = market_order(account, fut, order_type="LIMIT", price=round(fut.last_price / 2, 1))
        assert api.place(resting, key=f"rest-{n}").status_code == 201
    response = api.post(f"/api/v1/accounts/{account.pk}/orders/cancel-all")
    assert response.status_code == 200
    assert [o["outcome"] for o in response.json()["orders"]] == ["sent", "sent"]
    assert {o["status"] for o in sim.call(sim.sim.orders, API_KEY)} == {"CANCELLED"}
    audit = OrderAudit.objects.get(action="cancel_all")
    assert audit.outcome == "ok" and len(audit.response["orders"]) == 2


def test_square_off_closes_positions_even_with_the_kill_switch_on(order_settings, sim, account, instruments, api):
    fut = future(instruments)
    assert api.place(market_order(account, fut, quantity=2 * fut.lot_size), key="long").status_code == 201
    assert net_quantity(sim) == 2 * fut.lot_size
    TradingSwitch.objects.update_or_create(pk=TradingSwitch.SINGLETON_PK, defaults={"halted": True, "reason": "x"})
    response = api.post(f"/api/v1/accounts/{account.pk}/positions/square-off")
    assert response.status_code == 200, response.content
    [closed] = response.json()["positions"]
    assert closed["quantity"] == 2 * fut.lot_size and closed["status"] == 201
    assert net_quantity(sim) == 0
    assert PositionSnapshot.objects.get().source == "square_off"
    assert OrderAudit.objects.filter(action="square_off", outcome="ok").count() == 1


def test_the_admin_actions_need_a_grant_and_are_audited(order_settings, sim, account, instruments, api,
                                                        admin_client, admin_user):
    fut = future(instruments)
    api.place(market_order(account, fut, order_type="LIMIT", price=round(fut.last_price / 2, 1)), key="adm")
    url = reverse("admin:accounts_kiteaccount_changelist")
    action = {"action": "cancel_all_orders", "_selected_action": [account.pk]}
    admin_client.post(url, action)
    assert not OrderAudit.objects.filter(action="cancel_all").exists()  # the superuser is not a trader here
    account.traders.add(admin_user)
    admin_client.post(url, action)
    audit = OrderAudit.objects.get(action="cancel_all")
    assert (audit.origin, audit.user_id) == ("admin", admin_user.pk)
    assert {o["status"] for o in sim.call(sim.sim.orders, API_KEY)} == {"CANCELLED"}
    admin_client.post(url, {"action": "kill_switch_on", "_selected_action": [account.pk]})
    account.refresh_from_db()
    assert account.kill_switch and "admin" in account.kill_switch_reason
