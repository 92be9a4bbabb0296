"""The WebSocket ``positions`` subscription: the positions document pushed at the configured
cadence to an authenticated client, only for accounts it may see, stopped on request. The
channel layer is the real channels-redis; a stand-in engine answers the snapshot requests."""

from __future__ import annotations

import uuid

import orjson
import pytest

from accounts.models import KiteAccount
from accounts.order_services import trade_record
from tests.streaming.wsutil import (
    ORIGIN,
    FakeEngine,
    create_universe,
    make_app,
    make_config,
    option_token,
    recv_until,
    send,
    session_cookie_for,
    ws_connect,
)
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import redis_layer as redis_layer
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]

CALL = option_token(24000, "CE")
GREEKS = {"delta": 0.5, "gamma": 0.001, "theta": -12.0, "vega": 9.0}


@pytest.fixture
def desk(user):
    create_universe()
    paper = KiteAccount.objects.create(label="paper1", api_key="p1", is_paper=True)
    other = KiteAccount.objects.create(label="paper2", api_key="p2", is_paper=True)
    paper.traders.add(user)
    for account in (paper, other):
        trade_record(account=account, source="paper", trade={
            "trade_id": uuid.uuid4().hex[:20], "order_id": uuid.uuid4().hex[:20], "exchange": "NFO",
            "tradingsymbol": "NIFTY30JAN24000CE", "instrument_token": CALL, "product": "NRML",
            "transaction_type": "BUY", "quantity": 150, "average_price": 100.0})
    return {"paper": paper, "other": other, "cookie": session_cookie_for(user)}


def live_item(token: int, **extra) -> bytes:
    return orjson.dumps({"v": 1, "token": token, "symbol": "NIFTY30JAN24000CE", "exchange": "NFO",
                         "name": "NIFTY", "kind": "CE", "ltp": 110.0, "is_mock": False, **extra})


async def test_positions_are_pushed_at_the_cadence_for_visible_accounts_only(redis_layer, desk):
    app, _ = make_app(make_config(positions_push_interval_s=0.2))
    async with FakeEngine(redis_layer, {CALL: live_item(CALL, **GREEKS)}):
        comm, _ = await ws_connect(app, headers=[ORIGIN, desk["cookie"]])
        await send(comm, {"action": "positions", "id": "p"})
        first = await recv_until(comm, lambda m: m["type"] == "positions")
        second = await recv_until(comm, lambda m: m["type"] == "positions")
        assert (first["id"], first["seq"], second["seq"]) == ("p", 1, 2)
        doc = first["data"]
        assert [a["label"] for a in doc["accounts"]] == ["paper1"]
        (row,) = doc["accounts"][0]["positions"]
        assert row["quantity"] == 150 and row["lots"] == 2.0
        assert row["greeks_rs"] == {g: pytest.approx(150 * v) for g, v in GREEKS.items()}
        assert doc["total"]["delta_rs"] == pytest.approx(75.0) and doc["total"]["complete"]
        assert row["pnl"] == pytest.approx(150 * (110.0 - 100.0))

        await send(comm, {"action": "positions", "id": "q", "account_id": desk["other"].pk})
        error = await recv_until(comm, lambda m: m["type"] == "error")
        assert (error["code"], error["id"]) == ("account_not_visible", "q")

        await send(comm, {"action": "positions", "id": "s", "enabled": False})
        stopped = await recv_until(comm, lambda m: m["type"] == "positions_stopped")
        assert stopped["id"] == "s"
        assert await comm.receive_nothing(timeout=0.6)
        await comm.disconnect()


async def test_an_option_without_greeks_is_flagged_over_the_websocket(redis_layer, desk):
    app, _ = make_app(make_config(positions_push_interval_s=5.0))
    stale = live_item(CALL, delta=None, gamma=None, theta=None, vega=None, flags=["stale_underlying"])
    async with FakeEngine(redis_layer, {CALL: stale}):
        comm, _ = await ws_connect(app, headers=[ORIGIN, desk["cookie"]])
        await send(comm, {"action": "positions", "account_id": desk["paper"].pk})
        doc = (await recv_until(comm, lambda m: m["type"] == "positions"))["data"]
        assert doc["missing"] == [{"account_id": desk["paper"].pk, "token": CALL,
                                   "tradingsymbol": "NIFTY30JAN24000CE", "reason": "stale_underlying"}]
        assert doc["total"]["complete"] is False and doc["total"]["delta_rs"] == 0.0
        await comm.disconnect()


async def test_an_invalid_positions_request_is_an_error(redis_layer, desk):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=[ORIGIN, desk["cookie"]])
    await send(comm, {"action": "positions", "account_id": "one"})
    error = await recv_until(comm, lambda m: m["type"] == "error")
    assert error["code"] == "invalid_message" and "account_id" in error["message"]
    await comm.disconnect()
