"""The paper matching engine: open paper orders against the engine's live book, pure.

No Django, no I/O: given the open orders of one instrument (oldest first) and one live
snapshot of it, :meth:`PaperMatcher.match` says what fills and what triggers. The rules
(docs/paper-trading.md, "Paper trading"):

- a buy takes the best ask, a sell the best bid, never more than the quantity shown there:
  a market order fills ``min(pending, ask_qty)`` at the ask and the rest waits for the next
  snapshot; a limit order fills the same way only while the book crosses its price (a buy
  when ``ask <= price``, a sell when ``bid >= price``), at the book's price, so a marketable
  limit gets the better price as on the exchange;
- the quantity shown is shared: the orders of one snapshot take it oldest first, so two
  orders never both fill against the same 75 lots;
- stop orders (SL, SL-M) trigger when the last price reaches the trigger (a buy at or above,
  a sell at or below), then match as limit (SL) or market (SL-M) orders from the same
  snapshot on;
- an empty side (``qty`` 0 or a null price) fills nothing; a snapshot from the synthetic
  market (``is_mock``) fills nothing: paper trades only against live prices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from streaming.snapshots import LiveSnapshot

Side = Literal["BUY", "SELL"]
OrderType = Literal["MARKET", "LIMIT", "SL", "SL-M"]

STOP_TYPES = frozenset({"SL", "SL-M"})


@dataclass(frozen=True, slots=True)
class PaperOrder:
    """What the matcher needs of one open paper order (quantities in units, as Kite's)."""

    order_id: str
    token: int
    side: Side
    order_type: OrderType
    quantity: int
    filled_quantity: int = 0
    price: float | None = None
    trigger_price: float | None = None
    triggered: bool = False

    @property
    def pending_quantity(self) -> int:
        return self.quantity - self.filled_quantity

    @property
    def limit(self) -> float | None:
        """The worst price it accepts once live: None for market (and triggered SL-M)."""
        return self.price if self.order_type in ("LIMIT", "SL") else None


@dataclass(frozen=True, slots=True)
class Fill:
    quantity: int
    price: float


@dataclass(frozen=True, slots=True)
class MatchResult:
    """One order's outcome against one snapshot: it triggered now, and/or it filled."""

    order: PaperOrder
    fill: Fill | None
    triggered_now: bool = False


class PaperMatcher:
    """Matches one instrument's open paper orders against one snapshot of its book."""

    def match(self, orders: Sequence[PaperOrder], snapshot: LiveSnapshot) -> list[MatchResult]:
        """Outcomes for the orders that changed (triggered or filled), oldest first."""
        if snapshot.is_mock:
            return []
        room = {"BUY": _side_qty(snapshot.ask, snapshot.ask_qty),
                "SELL": _side_qty(snapshot.bid, snapshot.bid_qty)}  # fmt: skip
        book = {"BUY": snapshot.ask, "SELL": snapshot.bid}
        results = []
        for order in orders:
            if order.token != snapshot.token or order.pending_quantity <= 0:
                continue
            triggered_now = False
            if order.order_type in STOP_TYPES and not order.triggered:
                if not _stop_reached(order, snapshot.ltp):
                    continue
                order, triggered_now = replace(order, triggered=True), True
            fill = None
            price = book[order.side]
            if room[order.side] > 0 and price is not None and _acceptable(order, price):
                quantity = min(order.pending_quantity, room[order.side])
                room[order.side] -= quantity
                fill = Fill(quantity=quantity, price=price)
            if fill is not None or triggered_now:
                results.append(MatchResult(order=order, fill=fill, triggered_now=triggered_now))
        return results


def _side_qty(price: float | None, qty: int | None) -> int:
    return qty if price is not None and qty is not None and qty > 0 else 0


def _stop_reached(order: PaperOrder, ltp: float) -> bool:
    if order.trigger_price is None:
        return False
    return ltp >= order.trigger_price if order.side == "BUY" else ltp <= order.trigger_price


def _acceptable(order: PaperOrder, book_price: float) -> bool:
    limit = order.limit
    if limit is None:
        return True
    return book_price <= limit if order.side == "BUY" else book_price >= limit
