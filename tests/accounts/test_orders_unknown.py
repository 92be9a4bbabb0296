"""Orders whose answer is lost: UNKNOWN until Kite's order book settles them, never duplicated.

Against the simulator, with a real Celery worker running the resolution task.
"""

from __future__ import annotations

from collections import Counter

import pytest

from accounts.models import Order, OrderAudit, OrderPlacement
from accounts.order_actions import OrderActor, OrderParams, _fingerprint, _store_placement
from accounts.order_desk import order_desk_from_settings
from accounts.tasks import resolve_stale_orders
from subscriptions.models import Instrument
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
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

ORDERS = 100


def test_a_hundred_dropped_answers_in_a_row_give_exactly_a_hundred_orders(
    order_settings, sim, account, instruments, api, celery_worker
):
    order_settings.ORDERS_PER_S = order_settings.ORDERS_PER_MINUTE = 1000
    sim.call(sim.sim.drop_response_next, "order.place", times=ORDERS)
    fut = future(instruments)
    answers = {}
    for n in range(ORDERS):
        response = api.place(market_order(account, fut), key=f"drop-{n}")
        assert response.status_code == 202, response.content
        [order] = response.json()["orders"]
        assert order["status"] == "UNKNOWN" and order["kite_order_id"] is None
        answers[f"drop-{n}"] = response.content
    assert sim.call(lambda: sim.sim.responses_dropped) == ORDERS

    wait_until(lambda: not Order.objects.exclude(status="COMPLETE").exists(), timeout_s=240)

    at_kite = sim.call(sim.sim.orders, API_KEY)
    ours = list(Order.objects.all())
    assert len(at_kite) == len(ours) == ORDERS
    assert sim.call(lambda: sim.sim.rest_requests["order.place"]) == ORDERS  # nothing re-sent
    assert Counter(o["tag"] for o in at_kite).most_common(1)[0][1] == 1
    assert {o["tag"]: o["order_id"] for o in at_kite} == {o.tag: o.kite_order_id for o in ours}
    assert all(o.status == "COMPLETE" and o.filled_quantity == fut.lot_size for o in ours)
    assert all(o.send_attempts == 1 for o in ours)
    # The same key keeps its first answer forever, and sends nothing.
    assert api.place(market_order(account, fut), key="drop-7").content == answers["drop-7"]
    assert sim.call(lambda: sim.sim.rest_requests["order.place"]) == ORDERS
    assert OrderAudit.objects.filter(action="resolve", outcome="ok").count() == ORDERS


def test_an_order_kite_never_received_is_resent_once_after_the_grace_period(
    order_settings, sim, account, instruments, api, celery_worker
):
    # The connection drops before Kite handles the call: Kite has no order with the tag.
    sim.call(sim.sim.drop_next, "order.place")
    response = api.place(market_order(account, future(instruments)), key="lost")
    assert response.status_code == 202
    # The re-send's own answer arrives: Kite accepted it (its fills come with the order updates).
    wait_until(lambda: Order.objects.get().status == "PUT ORDER REQ RECEIVED", timeout_s=60)
    order = Order.objects.get()
    [at_kite] = sim.call(sim.sim.orders, API_KEY)
    assert at_kite["tag"] == order.tag and at_kite["order_id"] == order.kite_order_id
    assert order.send_attempts == 2
    assert OrderAudit.objects.filter(action="resend", outcome="ok").count() == 1
    # Kite's order book was read at least once for the grace period before the re-send.
    assert sim.call(lambda: sim.sim.rest_requests["orders"]) >= 2


def test_an_order_never_found_is_given_up_after_the_last_send(
    order_settings, sim, account, instruments, api, celery_worker
):
    order_settings.ORDERS_MAX_SEND_ATTEMPTS = 2
    sim.call(sim.sim.drop_next, "order.place", times=2)
    api.place(market_order(account, future(instruments)), key="gone")
    wait_until(lambda: Order.objects.get().status == "REJECTED", timeout_s=60)
    order = Order.objects.get()
    assert order.send_attempts == 2 and order.status_message.startswith("not placed")
    assert sim.call(sim.sim.orders, API_KEY) == []


def test_orders_whose_placing_process_stopped_are_settled_by_the_sweep(order_settings, sim, account, instruments,
                                                                        api, trader, celery_worker):
    fut = future(instruments)
    params = OrderParams(**market_order(account, fut))
    instrument = Instrument.objects.get(pk=fut.instrument_token)

    def stored(key: str) -> Order:
        placement, orders = _store_placement(actor=OrderActor(user=trader), account=account, idempotency_key=key,
                                             params=params, fingerprint=_fingerprint(params), slices=[fut.lot_size],
                                             instrument=instrument)
        assert [o.pk for o in orders] == [placement.orders.get().pk]
        return orders[0]

    never_sent = stored("died-before-send")
    sent = stored("died-while-sending")
    # The second one's process claimed the send and Kite took the order; then the process died.
    Order.objects.filter(pk=sent.pk).update(send_attempts=1, sent_at=sent.created_at)
    order_desk_from_settings().broker_for(account).place_order(params=sent.request)
    order_settings.ORDERS_UNKNOWN_GRACE_S = 0.0
    assert resolve_stale_orders.delay().get(timeout=60) == {"resolved": {"given_up": 1, "resolved": 1}}
    never_sent.refresh_from_db()
    sent.refresh_from_db()
    assert never_sent.status == "REJECTED" and never_sent.status_message.startswith("not sent")
    assert sent.status == "COMPLETE" and sent.kite_order_id
    assert len(sim.call(sim.sim.orders, API_KEY)) == 1  # the never-sent one was not sent late
    # Each key now has its answer.
    assert api.place(market_order(account, fut), key="died-while-sending").status_code == 201
    assert OrderPlacement.objects.filter(response_status__isnull=True).count() == 0
