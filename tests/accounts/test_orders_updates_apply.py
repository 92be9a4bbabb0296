"""order_apply_update and trade_record: idempotent, and never backwards."""

from __future__ import annotations

import pytest

from accounts.models import KiteAccount, Order, OrderPlacement, OrderStatus, Trade
from accounts.order_services import OrderUpdateError, order_apply_update, trade_record

pytestmark = pytest.mark.django_db


@pytest.fixture
def account():
    return KiteAccount.objects.create(label="upd", api_key="upd-key")


@pytest.fixture
def placed(account, django_user_model):
    """One of our orders, sent, whose answer was lost: known only by its tag."""
    user = django_user_model.objects.create_user("trader")
    placement = OrderPlacement.objects.create(
        user=user, account=account, idempotency_key="k1", fingerprint="f", request={}
    )
    return Order.objects.create(
        account=account, placement=placement, tag="T1abc", status=OrderStatus.UNKNOWN,
        exchange="NFO", tradingsymbol="NIFTY26DEC24000CE", quantity=75,
    )


def kite(order_id="250000000000001", status="OPEN", filled=0, pending=75, at="2026-12-04 10:00:00",
         **extra):
    return {
        "order_id": order_id, "tag": "T1abc", "status": status, "filled_quantity": filled,
        "pending_quantity": pending, "cancelled_quantity": 0, "average_price": 0,
        "order_timestamp": "2026-12-04 10:00:00", "exchange_update_timestamp": at,
        "exchange": "NFO", "tradingsymbol": "NIFTY26DEC24000CE", "quantity": 75, **extra,
    }


def test_an_unknown_order_is_found_by_its_tag_and_learns_its_order_id(account, placed):
    order = order_apply_update(account=account, update=kite(), source="orderbook")
    assert order.pk == placed.pk
    assert order.kite_order_id == "250000000000001" and order.status == "OPEN"
    assert [h["status"] for h in order.status_history] == ["OPEN"]


def test_a_duplicate_update_is_skipped_and_history_keeps_one_entry(account, placed):
    assert order_apply_update(account=account, update=kite(), source="ticker") is not None
    assert order_apply_update(account=account, update=kite(), source="postback") is None
    placed.refresh_from_db()
    assert len(placed.status_history) == 1


def test_an_update_older_than_the_stored_one_is_skipped(account, placed):
    order_apply_update(
        account=account, update=kite(status="MODIFY PENDING", at="2026-12-04 10:00:05"), source="ticker"
    )
    assert order_apply_update(account=account, update=kite(at="2026-12-04 10:00:01"), source="postback") is None
    placed.refresh_from_db()
    assert placed.status == "MODIFY PENDING"


def test_filled_quantity_never_decreases(account, placed):
    order_apply_update(account=account, update=kite(filled=50, pending=25, at="2026-12-04 10:00:02"),
                       source="ticker")
    # A late update with a newer stamp but less filled is older news.
    assert order_apply_update(account=account, update=kite(filled=25, pending=50, at="2026-12-04 10:00:09"),
                              source="postback") is None
    placed.refresh_from_db()
    assert (placed.filled_quantity, placed.pending_quantity) == (50, 25)


def test_more_filled_applies_even_with_an_earlier_stamp(account, placed):
    order_apply_update(account=account, update=kite(at="2026-12-04 10:00:05"), source="ticker")
    order = order_apply_update(account=account, update=kite(filled=25, pending=50, at="2026-12-04 10:00:04"),
                               source="orderbook")
    assert order is not None and order.filled_quantity == 25


def test_a_terminal_status_is_final(account, placed):
    done = kite(status="COMPLETE", filled=75, pending=0, average_price=101.5, at="2026-12-04 10:00:03")
    order_apply_update(account=account, update=done, source="postback")
    for late in (kite(at="2026-12-04 10:00:09"), kite(status="CANCELLED", at="2026-12-04 10:00:10"), done):
        assert order_apply_update(account=account, update=late, source="ticker") is None
    placed.refresh_from_db()
    assert placed.status == "COMPLETE" and placed.filled_quantity == 75
    assert str(placed.average_price) == "101.5000"


def test_out_of_order_updates_end_in_the_latest_state_whatever_their_order(account, placed):
    updates = [
        kite(status="PUT ORDER REQ RECEIVED", at="2026-12-04 10:00:00"),
        kite(status="OPEN", at="2026-12-04 10:00:01"),
        kite(status="OPEN", filled=25, pending=50, at="2026-12-04 10:00:02"),
        kite(status="COMPLETE", filled=75, pending=0, at="2026-12-04 10:00:03"),
    ]
    for update in reversed(updates):
        order_apply_update(account=account, update=update, source="replay")
    placed.refresh_from_db()
    assert placed.status == "COMPLETE" and placed.filled_quantity == 75
    assert [h["status"] for h in placed.status_history] == ["COMPLETE"]


def test_a_status_of_lower_rank_is_skipped(account, placed):
    order_apply_update(account=account, update=kite(status="OPEN"), source="ticker")
    assert order_apply_update(
        account=account, update=kite(status="PUT ORDER REQ RECEIVED", at="2026-12-04 10:00:07"), source="ticker"
    ) is None


def test_an_order_placed_elsewhere_is_recorded_without_a_placement(account):
    order = order_apply_update(
        account=account, update=kite(order_id="999", tag="webapp", status="OPEN"), source="sync"
    )
    assert order.placement is None and order.kite_order_id == "999" and order.tag == "webapp"
    # Another app reusing its tag is another order, not a conflict.
    again = order_apply_update(account=account, update=kite(order_id="1000", tag="webapp"), source="sync")
    assert again.pk != order.pk


def test_a_tag_only_update_for_no_order_of_ours_is_skipped(account):
    assert order_apply_update(account=account, update={"tag": "nope", "status": "OPEN"}, source="x") is None
    assert not Order.objects.exists()


@pytest.mark.parametrize(
    ("update", "field"),
    [({"status": "OPEN"}, "order_id"), ({"order_id": "1"}, "status"),
     ({"order_id": "1", "status": "OPEN", "filled_quantity": -1}, "filled_quantity"), ([], "update")],
)
def test_a_malformed_update_names_its_field(account, update, field):
    with pytest.raises(OrderUpdateError) as raised:
        order_apply_update(account=account, update=update, source="postback")
    assert raised.value.field == field and "postback" in str(raised.value)


def test_trade_record_is_idempotent_on_the_trade_id(account, placed):
    order_apply_update(account=account, update=kite(), source="ticker")
    fill = {
        "trade_id": "50000001", "order_id": "250000000000001", "exchange": "NFO",
        "tradingsymbol": "NIFTY26DEC24000CE", "product": "NRML", "transaction_type": "BUY",
        "quantity": 75, "average_price": 101.5, "fill_timestamp": "2026-12-04 10:00:03",
    }
    first = trade_record(account=account, trade=fill, source="sync")
    assert first is not None and first.order_id == placed.pk
    assert trade_record(account=account, trade=fill, source="postback") is None
    assert Trade.objects.count() == 1
