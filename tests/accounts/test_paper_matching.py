"""The paper matcher's rules, one snapshot at a time (pure: no database, no engine)."""

from accounts.paper_matching import Fill, PaperMatcher, PaperOrder
from streaming.snapshots import LiveSnapshot

TOKEN = 2693634


def snap(**fields) -> LiveSnapshot:
    base = {"v": 1, "token": TOKEN, "symbol": "NIFTY26NOV2426100CE", "exchange": "NFO",
            "name": "NIFTY", "kind": "CE", "ltp": 110.0, "bid": 109.95, "ask": 110.1,
            "bid_qty": 75, "ask_qty": 300, "is_mock": False}
    return LiveSnapshot(**{**base, **fields})


def order(**fields) -> PaperOrder:
    base = {"order_id": "P1", "token": TOKEN, "side": "BUY", "order_type": "MARKET", "quantity": 75}
    return PaperOrder(**{**base, **fields})


def fills(results):
    return [(r.order.order_id, r.fill) for r in results]


def test_a_market_buy_fills_at_the_ask_up_to_the_quantity_shown():
    results = PaperMatcher().match([order(quantity=450)], snap())
    assert fills(results) == [("P1", Fill(quantity=300, price=110.1))]


def test_a_market_sell_fills_at_the_bid():
    results = PaperMatcher().match([order(side="SELL", quantity=150)], snap())
    assert fills(results) == [("P1", Fill(quantity=75, price=109.95))]


def test_only_the_pending_quantity_fills():
    results = PaperMatcher().match([order(quantity=150, filled_quantity=100)], snap())
    assert fills(results) == [("P1", Fill(quantity=50, price=110.1))]


def test_orders_share_the_quantity_shown_oldest_first():
    older, newer, third = order(order_id="A", quantity=225), order(order_id="B", quantity=150), order(order_id="C")
    results = PaperMatcher().match([older, newer, third], snap())
    assert fills(results) == [("A", Fill(225, 110.1)), ("B", Fill(75, 110.1))]


def test_a_limit_rests_until_the_book_crosses_then_fills_at_the_book_price():
    buy = order(order_type="LIMIT", price=110.0)
    assert PaperMatcher().match([buy], snap()) == []
    assert fills(PaperMatcher().match([buy], snap(ask=109.5))) == [("P1", Fill(75, 109.5))]
    sell = order(side="SELL", order_type="LIMIT", price=110.0)
    assert PaperMatcher().match([sell], snap()) == []
    assert fills(PaperMatcher().match([sell], snap(bid=110.0))) == [("P1", Fill(75, 110.0))]


def test_an_empty_side_or_a_mock_snapshot_fills_nothing():
    assert PaperMatcher().match([order()], snap(ask_qty=0)) == []
    assert PaperMatcher().match([order()], snap(ask=None, ask_qty=None)) == []
    assert PaperMatcher().match([order()], snap(is_mock=True)) == []


def test_another_instruments_order_is_not_matched():
    assert PaperMatcher().match([order(token=1)], snap()) == []


def test_a_stop_triggers_at_its_price_then_matches_as_its_kind():
    stop = order(order_type="SL-M", trigger_price=115.0)
    assert PaperMatcher().match([stop], snap()) == []
    (result,) = PaperMatcher().match([stop], snap(ltp=115.0, ask=115.1))
    assert result.triggered_now and result.order.triggered and result.fill == Fill(75, 115.1)
    stop_limit = order(side="SELL", order_type="SL", trigger_price=100.0, price=99.0)
    (result,) = PaperMatcher().match([stop_limit], snap(ltp=100.0, bid=98.5))
    assert result.triggered_now and result.fill is None  # triggered, the limit is not met
    (result,) = PaperMatcher().match([result.order], snap(ltp=99.5, bid=99.0))
    assert not result.triggered_now and result.fill == Fill(75, 99.0)
