"""The simulator's order side: partial fills, answers dropped after acceptance, Kite's refusals."""

from __future__ import annotations

import pytest
import requests
from kiteconnect import KiteConnect

from streaming.market import SyntheticMarket
from streaming.sim.simulator import MODIFICATIONS_ERROR_MESSAGE, KiteSimulator, SimulatorThread
from tests.helpers import wait_until

KEY, TOKEN = "simkey", "simtoken-0123456789"


@pytest.fixture
def market():
    return SyntheticMarket(seed=3, expiries=1, strikes_each_side=2)


def start(market, **options) -> SimulatorThread:
    sim = KiteSimulator(market=market, tick_interval_ms=50, **options)
    sim.register_account(api_key=KEY, api_secret="s" * 16, access_token=TOKEN)
    return SimulatorThread(sim)


def kite(thread) -> KiteConnect:
    return KiteConnect(KEY, access_token=TOKEN, root=thread.http_url, timeout=5)


def fut(market) -> dict:
    return next(r for r in market.instruments if r["segment"] == "NFO-FUT")


def test_orders_fill_in_parts_one_trade_each(market):
    row = fut(market)
    with start(market, max_fill_quantity=row["lot_size"]) as thread:
        client = kite(thread)
        order_id = client.place_order(
            variety="regular", exchange="NFO", tradingsymbol=row["tradingsymbol"], transaction_type="BUY",
            quantity=3 * row["lot_size"], product="NRML", order_type="MARKET",
        )
        wait_until(lambda: client.order_history(order_id)[-1]["status"] == "COMPLETE", timeout_s=30)
        history = client.order_history(order_id)
        assert [h["filled_quantity"] for h in history if h["status"] in ("OPEN", "COMPLETE")][:4] == [
            0, row["lot_size"], 2 * row["lot_size"], 3 * row["lot_size"]
        ]
        assert [t["quantity"] for t in client.order_trades(order_id)] == [row["lot_size"]] * 3


def test_an_accepted_order_whose_answer_is_dropped_is_in_the_order_book(market):
    row = fut(market)
    with start(market, step_market=False) as thread:
        thread.call(thread.sim.drop_response_next, "order.place")
        client = kite(thread)
        with pytest.raises(requests.ConnectionError):
            client.place_order(variety="regular", exchange="NFO", tradingsymbol=row["tradingsymbol"],
                               transaction_type="BUY", quantity=row["lot_size"], product="NRML",
                               order_type="MARKET", tag="lost1")
        [order] = client.orders()
        assert order["tag"] == "lost1" and order["status"] == "COMPLETE"
        assert thread.call(lambda: thread.sim.responses_dropped) == 1


def test_kites_refusals_use_kites_messages(market):
    row = fut(market)
    with start(market, step_market=False) as thread:
        client = kite(thread)
        thread.call(thread.sim.reject_next_orders)
        order_id = client.place_order(variety="regular", exchange="NFO", tradingsymbol=row["tradingsymbol"],
                                      transaction_type="BUY", quantity=row["lot_size"], product="NRML",
                                      order_type="MARKET")
        rejected = client.order_history(order_id)[-1]
        assert rejected["status"] == "REJECTED" and rejected["status_message"].startswith("Insufficient funds")
        resting = client.place_order(variety="regular", exchange="NFO", tradingsymbol=row["tradingsymbol"],
                                     transaction_type="BUY", quantity=row["lot_size"], product="NRML",
                                     order_type="LIMIT", price=1.0)
        for n in range(25):
            client.modify_order(variety="regular", order_id=resting, price=1.0 + n / 10)
        with pytest.raises(Exception, match=MODIFICATIONS_ERROR_MESSAGE):
            client.modify_order(variety="regular", order_id=resting, price=2.0)
