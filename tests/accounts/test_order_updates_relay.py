"""The engine's OrderUpdateRelay on its own: copies from the account's other sockets are
dropped, a full queue never blocks the socket reader but asks for a sync, and syncs are
asked for at most once per interval per account."""

from __future__ import annotations

import asyncio
import contextlib

import orjson

from streaming.engine.metrics import EngineMetrics
from streaming.engine.orders import OrderUpdateRelay
from streaming.kite.codec import parse_text_message
from tests.helpers import async_wait_until


def frame(order_id: str, status: str = "OPEN"):
    return parse_text_message(orjson.dumps({"type": "order", "data": {
        "order_id": order_id, "status": status, "checksum": "", "filled_quantity": 0,
    }}))  # fmt: skip


def count(metrics: EngineMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "tickerproj_engine_order_updates_total", {"outcome": outcome}
    )
    return value or 0.0


async def never_applied(account_id: int, update: dict) -> None:
    raise AssertionError("nothing is applied in this test")


async def test_copies_are_dropped_and_a_full_queue_asks_for_a_sync_instead_of_blocking():
    syncs: list[tuple[int, str]] = []

    async def request_sync(account_id: int, reason: str) -> None:
        syncs.append((account_id, reason))

    metrics = EngineMetrics()
    relay = OrderUpdateRelay(apply=never_applied, metrics=metrics, request_sync=request_sync,
                             max_pending=2, workers=1, sync_min_interval_s=3600)
    relay.order_message(7, frame("1"))
    relay.order_message(7, frame("1"))  # the same change from a second socket
    relay.order_message(8, frame("1"))  # another account's order 1 is not a copy
    relay.order_message(7, frame("2"))  # no room: dropped, the sync will read it from Kite
    relay.order_message(7, frame("3"))
    assert relay.pending == 2
    assert (count(metrics, "duplicate"), count(metrics, "overflow")) == (1, 2)

    syncer = asyncio.create_task(relay.run_syncs())
    try:
        await async_wait_until(lambda: syncs, timeout_s=30, what="a sync asked for")
        relay.connected(7, 0, 2)  # a reconnect within the interval: the same account waits
        await asyncio.sleep(0.05)  # the syncer now waits for account 7's interval ...
        relay.connected(9, 1, 1)  # ... and still serves another account at once
        await async_wait_until(lambda: len(syncs) >= 2, timeout_s=30, what="account 9's sync")
    finally:
        syncer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await syncer
    assert syncs == [(7, "queue_full"), (9, "connect")]
