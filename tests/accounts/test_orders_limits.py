"""Kite's order limits on Redis, slicing, and one order per key under concurrent requests."""

from __future__ import annotations

import pytest

from accounts.models import Order
from accounts.order_checks import OrderRefused, slice_quantities
from streaming.kite.rest import KiteOrderRateLimiter, OrderWindow
from tests.accounts.orderkit import (  # noqa: F401  (fixtures, used by name)
    API_KEY,
    OrdersClient,
    fixture_account,
    fixture_instruments,
    fixture_market,
    fixture_order_settings,
    fixture_sim,
    fixture_trade_key,
    fixture_trader,
    future,
    market_order,
)
from tests.subscriptions.conftest import run_in_threads


def test_a_window_takes_its_limit_at_once_and_refuses_the_next_without_booking(redis_client):
    limiter = KiteOrderRateLimiter(
        redis_client=redis_client, windows=[OrderWindow("second", 10, 1.0), OrderWindow("minute", 12, 60.0)]
    )
    assert limiter.try_acquire(api_key="k", cost=10) == 0.0
    wait_s = limiter.try_acquire(api_key="k", cost=1)
    assert 0 < wait_s <= 1.05
    # The refusal booked nothing: the minute window still holds 10, so 2 fit once the second frees.
    assert redis_client.zcard("tickerproj:kite:orders:k:minute") == 10
    assert limiter.try_acquire(api_key="other", cost=1) == 0.0  # per api key


def test_the_tightest_window_decides(redis_client):
    limiter = KiteOrderRateLimiter(
        redis_client=redis_client, windows=[OrderWindow("second", 10, 1.0), OrderWindow("minute", 3, 60.0)]
    )
    assert limiter.try_acquire(api_key="k", cost=3) == 0.0
    assert limiter.try_acquire(api_key="k", cost=1) > 50  # the minute window: about a minute
    with pytest.raises(ValueError, match="cost must be in"):
        limiter.try_acquire(api_key="k", cost=4)


def test_slices_are_whole_lots_within_the_freeze_quantity():
    assert slice_quantities(quantity=1875, freeze_quantity=1800, lot_size=75, max_slices=10) == [1800, 75]
    assert slice_quantities(quantity=75, freeze_quantity=None, lot_size=75, max_slices=1) == [75]
    # A freeze quantity that is not a whole number of lots slices at the lots below it.
    assert slice_quantities(quantity=300, freeze_quantity=200, lot_size=75, max_slices=3) == [150, 150]
    with pytest.raises(OrderRefused) as refused:
        slice_quantities(quantity=750, freeze_quantity=75, lot_size=75, max_slices=9)
    assert refused.value.code == "too_many_slices"


@pytest.mark.django_db(transaction=True)
def test_concurrent_posts_with_one_key_place_one_order(order_settings, sim, account, instruments, trade_key):
    body = market_order(account, future(instruments))

    def post():
        response = OrdersClient(trade_key).place(body, key="race")
        return response.status_code, response.content

    results = run_in_threads(post, count=6)
    statuses = sorted(status for status, _ in results)
    assert set(statuses) <= {201, 409}
    placed = {content for status, content in results if status == 201}
    assert len(placed) == 1  # every 201 is the one stored answer
    assert Order.objects.count() == 1
    assert sim.call(lambda: sim.sim.rest_requests["order.place"]) == 1
    assert len(sim.call(sim.sim.orders, API_KEY)) == 1
