"""The paper exchange's order life on PostgreSQL, the book given as snapshots (its quotes
collaborator): modify, cancel, stops, the lock on fills, refusals; all written through the
order services."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from accounts.brokers import BrokerRejectedError
from accounts.models import KiteAccount, Order, OrderPlacement, OrderStatus, Trade
from accounts.paper import PaperBroker, PaperExchange
from accounts.paper_matching import Fill, MatchResult, PaperOrder
from streaming.engine.market_hours import MarketHours
from streaming.snapshots import LiveSnapshot
from tests.helpers import epoch_at_ist, next_trading_day
from tests.streaming.wsutil import create_universe, option_token

pytestmark = pytest.mark.django_db

CALL = option_token(24000, "CE")
SYMBOL = "NIFTY30JAN24000CE"


def session_open() -> float:
    return epoch_at_ist(next_trading_day(dt.date.today()), 11, 0)


class Book:
    """The live book the exchange reads; a test moves it."""

    def __init__(self) -> None:
        self.snapshot = self.at(ask=110.0, ask_qty=75, bid=109.5, bid_qty=75, ltp=110.0)

    @staticmethod
    def at(**fields) -> LiveSnapshot:
        return LiveSnapshot(v=1, token=CALL, symbol=SYMBOL, exchange="NFO", name="NIFTY",
                            kind="CE", is_mock=False, **fields)

    def __call__(self, tokens):
        return {CALL: self.snapshot} if CALL in tokens else {}


@pytest.fixture
def desk(django_user_model):
    create_universe()  # subscribed, so the exchange asks the engines for its snapshot
    account = KiteAccount.objects.create(label="paper", api_key="pk", is_paper=True)
    user = django_user_model.objects.create_user("trader")
    book = Book()
    exchange = PaperExchange(quotes=book, hours=MarketHours(), clock=session_open)
    return {"account": account, "user": user, "book": book, "exchange": exchange,
            "broker": PaperBroker(account=account, exchange=exchange)}


def place(desk, **fields) -> Order:
    params = {"variety": "regular", "exchange": "NFO", "tradingsymbol": SYMBOL, "transaction_type": "BUY",
              "order_type": "LIMIT", "price": 100.0, "quantity": 150, "product": "NRML", **fields}
    tag = uuid.uuid4().hex[:20]
    placement = OrderPlacement.objects.create(user=desk["user"], account=desk["account"],
                                              idempotency_key=tag, fingerprint=tag, request=params)
    Order.objects.create(account=desk["account"], placement=placement, tag=tag, request=params)
    order_id = desk["broker"].place_order(params={**params, "tag": tag})
    return Order.objects.get(kite_order_id=order_id)


def test_a_resting_limit_is_modified_to_a_marketable_price_and_fills_at_once(desk):
    order = place(desk)
    assert order.status == OrderStatus.OPEN and order.filled_quantity == 0
    desk["broker"].modify_order(order_id=order.kite_order_id, params={"price": 111.0})
    order.refresh_from_db()
    assert order.status == OrderStatus.OPEN and float(order.price) == 111.0
    assert order.filled_quantity == 75 and float(order.average_price) == 110.0  # the ask shown
    statuses = [h["status"] for h in order.status_history]
    assert statuses == ["OPEN", "MODIFIED", "OPEN", "OPEN"]


def test_cancel_cancels_what_is_pending_and_a_final_order_cannot_change(desk):
    order = place(desk, order_type="MARKET", price=None)
    assert order.filled_quantity == 75  # half of it, the quantity shown
    desk["broker"].cancel_order(order_id=order.kite_order_id, variety="regular")
    order.refresh_from_db()
    assert (order.status, order.cancelled_quantity, order.pending_quantity) == ("CANCELLED", 75, 0)
    with pytest.raises(BrokerRejectedError, match="is CANCELLED and cannot be cancelled"):
        desk["broker"].cancel_order(order_id=order.kite_order_id, variety="regular")
    with pytest.raises(BrokerRejectedError, match="cannot be modified"):
        desk["broker"].modify_order(order_id=order.kite_order_id, params={"price": 1.0})
    assert desk["broker"].positions()["net"][0]["quantity"] == 75


def test_a_stop_waits_for_its_trigger_then_fills(desk):
    order = place(desk, order_type="SL-M", price=None, trigger_price=115.0, quantity=75)
    assert order.status == OrderStatus.TRIGGER_PENDING
    desk["book"].snapshot = Book.at(ask=115.5, ask_qty=300, bid=115.0, bid_qty=75, ltp=115.2)
    (changed,) = desk["exchange"].match(orders=[order], snapshot=desk["book"].snapshot)
    assert changed.status == OrderStatus.COMPLETE and float(changed.average_price) == 115.5


def test_a_fill_never_exceeds_what_is_pending(desk):
    order = place(desk, quantity=75)
    stale = MatchResult(order=PaperOrder(order_id=order.kite_order_id, token=CALL, side="BUY",
                                         order_type="LIMIT", quantity=75, price=100.0),
                        fill=Fill(quantity=75, price=99.0))
    desk["exchange"].apply(account=desk["account"], result=stale)
    # The same match seen twice (placing and the desk): the second finds nothing pending.
    assert desk["exchange"].apply(account=desk["account"], result=stale) is None
    assert sum(t.quantity for t in Trade.objects.filter(order=order)) == 75


def test_bad_orders_are_refused_with_the_field(desk):
    with pytest.raises(BrokerRejectedError, match="`price` is required for LIMIT"):
        place(desk, price=None)
    with pytest.raises(BrokerRejectedError, match="`quantity` must be a whole number"):
        place(desk, quantity="1.5")
    with pytest.raises(BrokerRejectedError, match="order_type 'GTT'"):
        place(desk, order_type="GTT")


def test_only_live_prices_fill(desk):
    desk["book"].snapshot = desk["book"].snapshot.model_copy(update={"is_mock": True})
    order = place(desk, order_type="MARKET", price=None)
    assert order.status == OrderStatus.REJECTED and "only synthetic prices" in order.status_message
