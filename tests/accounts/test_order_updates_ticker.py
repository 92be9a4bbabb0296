"""Order updates on the ticker socket: the simulator sends Kite's order text frames, the
engine (the app runticker runs, on this test's loop) hands them to the order service off
the event loop; every connect asks for a sync. Real PostgreSQL, Redis and simulator."""

from __future__ import annotations

import aiohttp
import pytest
from asgiref.sync import sync_to_async

from accounts.models import Order
from streaming.market import SyntheticMarket
from tests.helpers import async_wait_until
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)
from tests.streaming.wsutil import close_db_threads as close_db_threads

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]


@pytest.fixture
def world():
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    option = next(r for r in market.instruments
                  if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    subscribe([market.index_token("NIFTY"), option["instrument_token"]])
    account = make_account("acc1", api_key="k1", access_token="tok-acc1")
    return {"account": account, "option": option}


async def place_market_order(sim, option: dict, *, tag: str) -> str:
    """Place on the simulator's REST API as kiteconnect would; Kite's order_id."""
    async with aiohttp.ClientSession() as session, session.post(
        f"{sim.http_url}/orders/regular",
        headers={"X-Kite-Version": "3", "Authorization": "token k1:tok-acc1"},
        data={
            "exchange": option["exchange"], "tradingsymbol": option["tradingsymbol"],
            "transaction_type": "BUY", "order_type": "MARKET", "product": "NRML",
            "validity": "DAY", "quantity": str(option["lot_size"]), "tag": tag,
        },
    ) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["data"]["order_id"]


def stored(order_id: str):
    return sync_to_async(lambda: Order.objects.filter(kite_order_id=order_id).first())()


async def test_order_frames_update_the_order_and_replays_never_move_it_back(world):
    syncs: list[tuple[int, str]] = []

    async def request_sync(account_id: int, reason: str) -> None:
        syncs.append((account_id, reason))

    async with InProcessEngine(accounts={"acc1": "k1"}, request_order_sync=request_sync) as h:
        await async_wait_until(lambda: h.sim.connection_count("k1") > 0, timeout_s=60,
                               what="the engine connected")
        await async_wait_until(lambda: syncs, timeout_s=30, what="a sync asked for on connect")
        assert syncs[0] == (world["account"].pk, "connect")

        order_id = await place_market_order(h.sim, world["option"], tag="tick1")

        async def complete():
            order = await stored(order_id)
            return order if order is not None and order.status == "COMPLETE" else None

        order = await async_wait_until(complete, timeout_s=30, what="the order COMPLETE")
        assert order.filled_quantity == world["option"]["lot_size"] and order.pending_quantity == 0
        assert order.tag == "tick1"
        assert {h["source"] for h in order.status_history} == {"ticker"}
        assert [h["status"] for h in order.status_history] == ["OPEN", "COMPLETE"]

        # Kite sends the overtaken OPEN again, then the COMPLETE again: the engine knows the
        # copies and drops them (the order service would skip them too), nothing changes.
        def duplicates() -> float:
            registry = h.engine.metrics.registry
            return registry.get_sample_value(
                "tickerproj_engine_order_updates_total", {"outcome": "duplicate"}
            ) or 0.0

        seen = duplicates()
        h.sim.replay_order_update("k1", order_id, index=1)
        h.sim.replay_order_update("k1", order_id)
        await async_wait_until(lambda: duplicates() >= seen + 2, timeout_s=30,
                               what="the replays recognised as copies")
        again = await stored(order_id)
        assert (again.status, len(again.status_history)) == ("COMPLETE", 2)

        # A dropped socket reconnects; what it missed meanwhile is the sync's to find.
        await h.sim.drop_connections("k1")
        await async_wait_until(lambda: len(syncs) >= 2, timeout_s=60,
                               what="a sync asked for on reconnect")
        assert syncs[1] == (world["account"].pk, "reconnect")
