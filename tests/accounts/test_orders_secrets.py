"""The access token and API secret never appear in logs, audits, orders, answers or errors."""

from __future__ import annotations

import logging

import orjson
import pytest

from accounts.models import Order, OrderAudit, OrderPlacement
from tests.accounts.orderkit import (  # noqa: F401  (fixtures, used by name)
    ACCESS_TOKEN,
    API_SECRET,
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


def test_no_secret_in_logs_audits_orders_or_answers(order_settings, sim, account, instruments, api, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    fut = future(instruments)
    leaky = f"token {ACCESS_TOKEN} secret {API_SECRET}"
    answers = [api.place(market_order(account, fut), key="ok")]
    sim.call(sim.sim.fail_next, "order.place", 400, "InputException", message=leaky)
    answers.append(api.place(market_order(account, fut), key="rejected"))
    sim.call(sim.sim.fail_next, "order.place", 503, "NetworkException", message=leaky)
    answers.append(api.place(market_order(account, fut), key="ambiguous"))
    sim.call(sim.sim.drop_response_next, "order.place")
    answers.append(api.place(market_order(account, fut), key="dropped"))
    limit = api.place(market_order(account, fut, order_type="LIMIT", price=1.0), key="lim").json()["orders"][0]
    Order.objects.filter(pk=limit["id"]).update(status="OPEN")
    sim.call(sim.sim.fail_next, "order.modify", 400, "InputException", message=leaky)
    answers.append(api.patch(f"/api/v1/orders/{limit['id']}", {"price": 2.0}))
    sim.call(sim.sim.fail_next, "order.cancel", 500, "GeneralException", message=leaky)
    answers.append(api.delete(f"/api/v1/orders/{limit['id']}"))
    answers.append(api.get("/api/v1/orders"))

    assert [a.status_code for a in answers] == [201, 422, 202, 202, 422, 202, 200]
    rejected = answers[1].json()["error"]
    assert "***" in rejected["message"]  # Kite's words kept, the secrets replaced

    stored = orjson.dumps([
        list(Order.objects.values()), list(OrderAudit.objects.values()), list(OrderPlacement.objects.values()),
    ], default=str).decode()  # fmt: skip
    out, err = capfd.readouterr()
    texts = {
        "answers": "".join(a.content.decode() for a in answers),
        "stored": stored,
        "logs": caplog.text + out + err,
    }
    for where, text in texts.items():
        assert ACCESS_TOKEN not in text, where
        assert API_SECRET not in text, where
    assert len(texts["logs"]) > 1000  # the logs were really captured
