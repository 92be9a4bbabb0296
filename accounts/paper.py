"""Paper trading: a paper account's orders fill against the engine's live snapshots.

Nothing of a paper account reaches Kite. :class:`PaperBroker` is the account's
:class:`accounts.brokers.Broker` (``broker_for`` returns it when ``account.is_paper``); it
hands every call to a :class:`PaperExchange`, which decides with the pure
:class:`accounts.paper_matching.PaperMatcher` and writes only through the order services
(``order_apply_update``, ``trade_record``), exactly as Kite's answers and updates are written
for a live account: so the order book, trades, positions, P&L and the WebSocket order updates
of a paper account are those of a live one.

- Placing: checked like Kite checks (the instrument exists, the fields fit the order type);
  then REJECTED with a clear ``status_message`` when the market is closed (the NSE calendar,
  at the exchange's injected clock) or when the engines have no live snapshot of the
  instrument; else OPEN (TRIGGER PENDING for stops) and matched at once against the live
  snapshot just read: a market order fills at the best ask/bid up to the quantity shown.
- What is left rests and fills on later snapshots: :class:`accounts.paper_desk.PaperDesk`
  (``manage.py runpaper``) listens to the instruments of the open paper orders.
- Every fill locks the order row and fills at most its pending quantity, so the placing call
  and the desk never fill one order twice.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

from asgiref.sync import async_to_sync
from django.db import transaction
from redis.exceptions import RedisError

from accounts.brokers import BrokerNotSentError, BrokerRejectedError
from accounts.order_models import Order, OrderStatus, Trade
from accounts.order_services import order_apply_update, trade_record
from accounts.paper_matching import STOP_TYPES, MatchResult, PaperMatcher, PaperOrder
from streaming.engine.market_hours import MarketHours
from streaming.greeks import IST
from streaming.nse_calendar import parse_holidays
from streaming.snapshots import LiveSnapshot, SnapshotReader
from subscriptions.selectors import instrument_list_by_symbols, subscription_tokens_active

SOURCE = "paper"
ORDER_TYPES = ("MARKET", "LIMIT", "SL", "SL-M")

Quotes = Callable[[Sequence[int]], dict[int, LiveSnapshot]]
"""The latest live snapshots of some tokens (a :class:`SnapshotReader`, made synchronous)."""


def kite_time(epoch_s: float) -> str:
    """Kite's timestamp format: IST wall-clock time, to the second."""
    return dt.datetime.fromtimestamp(epoch_s, IST).strftime("%Y-%m-%d %H:%M:%S")


def _rejected(message: str) -> BrokerRejectedError:
    return BrokerRejectedError(message, error_type="InputException", status=400)


def paper_order_of(order: Order) -> PaperOrder:
    """The matcher's view of a stored paper order."""
    return PaperOrder(
        order_id=order.kite_order_id or "", token=order.instrument_token or 0,
        side=order.transaction_type, order_type=order.order_type, quantity=order.quantity,  # type: ignore[arg-type]
        filled_quantity=order.filled_quantity,
        price=float(order.price) if order.price else None,
        trigger_price=float(order.trigger_price) if order.trigger_price else None,
        triggered=order.status != OrderStatus.TRIGGER_PENDING,
    )  # fmt: skip


class PaperExchange:
    """The paper account's venue: places, modifies, cancels and fills, through the services."""

    def __init__(
        self, *, quotes: Quotes, hours: MarketHours, matcher: PaperMatcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._quotes = quotes
        self._hours = hours
        self._matcher = matcher or PaperMatcher()
        self._clock = clock

    @classmethod
    def from_settings(cls) -> PaperExchange:
        """The web and worker processes' exchange: the engines' snapshots over the layer."""
        from channels.layers import get_channel_layer
        from django.conf import settings

        reader = SnapshotReader(get_channel_layer(), timeout_s=settings.PAPER_SNAPSHOT_TIMEOUT_S)
        return cls(
            quotes=async_to_sync(reader.latest),
            hours=MarketHours(holidays=parse_holidays(settings.MARKET_HOLIDAYS),
                              always_open=settings.MARKET_HOURS_ALWAYS_OPEN),
        )

    # --- placing, modifying, cancelling -----------------------------------------------------

    def place(self, *, account, params: dict[str, Any]) -> str:
        order_type = str(params.get("order_type", ""))
        side = str(params.get("transaction_type", ""))
        exchange, symbol = str(params.get("exchange", "")), str(params.get("tradingsymbol", ""))
        quantity = _positive_int(params.get("quantity"), field="quantity")
        price = _price(params.get("price"))
        trigger = _price(params.get("trigger_price"))
        if order_type not in ORDER_TYPES:
            raise _rejected(f"paper: order_type {order_type!r} is not one of {', '.join(ORDER_TYPES)}")
        if side not in ("BUY", "SELL"):
            raise _rejected(f"paper: transaction_type {side!r} is not BUY or SELL")
        if order_type in ("LIMIT", "SL") and price is None:
            raise _rejected(f"paper: `price` is required for {order_type} orders")
        if order_type in STOP_TYPES and trigger is None:
            raise _rejected(f"paper: `trigger_price` is required for {order_type} orders")
        found = instrument_list_by_symbols(keys=[(exchange, symbol)])
        if not found:
            raise _rejected(f"paper: no instrument {exchange}:{symbol}")
        instrument = found[0]
        lot = int(instrument.lot_size or 1)
        if lot > 1 and quantity % lot:
            raise _rejected(f"paper: quantity {quantity} is not a multiple of the lot size {lot} "
                            f"of {exchange}:{symbol}")  # fmt: skip
        now = self._clock()
        order_id = f"P{uuid.uuid4().hex[:20]}"
        accepted = {
            "order_id": order_id, "tag": params.get("tag"), "variety": params.get("variety", "regular"),
            "exchange": exchange, "tradingsymbol": symbol, "instrument_token": instrument.instrument_token,
            "transaction_type": side, "order_type": order_type, "product": params.get("product"),
            "quantity": quantity, "price": price or 0.0, "trigger_price": trigger or 0.0,
            "filled_quantity": 0, "pending_quantity": quantity, "cancelled_quantity": 0,
            "average_price": 0.0, "order_timestamp": kite_time(now),
            "exchange_update_timestamp": kite_time(now),
        }  # fmt: skip
        refusal = self._refusal(instrument.instrument_token, exchange, symbol, now)
        if isinstance(refusal, str):
            order_apply_update(
                account=account, source=SOURCE,
                update={**accepted, "status": OrderStatus.REJECTED, "pending_quantity": 0,
                        "status_message": refusal},
            )  # fmt: skip
            return order_id
        status = OrderStatus.TRIGGER_PENDING if order_type in STOP_TYPES else OrderStatus.OPEN
        order = order_apply_update(account=account, source=SOURCE, update={**accepted, "status": status})
        if order is not None:
            self.match(orders=[order], snapshot=refusal)
        return order_id

    def _refusal(self, token: int, exchange: str, symbol: str, now: float) -> str | LiveSnapshot:
        """Why the order is rejected, or the live snapshot it is matched against."""
        if not self._hours.is_open(now):
            return (f"paper: the market is closed at {kite_time(now)} IST (NSE session "
                    "09:15-15:30 on trading days)")  # fmt: skip
        try:
            snapshot = self._quotes([token]).get(token) if subscription_tokens_active(tokens=[token]) else None
        except (OSError, RedisError) as exc:
            # Nothing was accepted yet: the order is refused as never sent.
            raise BrokerNotSentError(f"paper: live prices are unavailable (channel layer): {exc}") from None
        if snapshot is None:
            return (f"paper: no live price for {exchange}:{symbol}: no engine streams it "
                    "(subscribe the instrument)")  # fmt: skip
        if snapshot.is_mock:
            return f"paper: no live price for {exchange}:{symbol}: only synthetic prices are streamed"
        return snapshot

    def modify(self, *, account, order_id: str, params: dict[str, Any]) -> str:
        order = self._open_order(account, order_id, action="modified")
        quantity = params.get("quantity")
        quantity = order.quantity if quantity is None else _positive_int(quantity, field="quantity")
        if quantity <= order.filled_quantity:
            raise _rejected(
                f"paper: quantity {quantity} is not above the {order.filled_quantity} already filled"
            )
        order_type = str(params.get("order_type") or order.order_type)
        if order_type not in ORDER_TYPES:
            raise _rejected(f"paper: order_type {order_type!r} is not one of {', '.join(ORDER_TYPES)}")
        now = self._clock()
        # MODIFIED, then the order's working status again, as Kite reports a modification:
        # two distinct statuses, so neither is taken for a repeat of the other.
        update = {
            "order_id": order_id, "status": OrderStatus.MODIFIED, "quantity": quantity,
            "order_type": order_type, "pending_quantity": quantity - order.filled_quantity,
            "exchange_update_timestamp": kite_time(now),
        }  # fmt: skip
        for name in ("price", "trigger_price"):
            if params.get(name) is not None:
                update[name] = _price(params[name]) or 0.0
        order_apply_update(account=account, source=SOURCE, update=update)
        changed = order_apply_update(
            account=account, source=SOURCE,
            update={"order_id": order_id, "status": order.status,
                    "exchange_update_timestamp": kite_time(now)},
        )  # fmt: skip
        if changed is not None and order.instrument_token:
            try:
                snapshot = self._quotes([order.instrument_token]).get(order.instrument_token)
            except (OSError, RedisError):
                snapshot = None  # modified; the desk matches it on the next snapshot
            if snapshot is not None:
                self.match(orders=[changed], snapshot=snapshot)
        return order_id

    def cancel(self, *, account, order_id: str) -> str:
        order = self._open_order(account, order_id, action="cancelled")
        pending = order.quantity - order.filled_quantity
        order_apply_update(
            account=account, source=SOURCE,
            update={"order_id": order_id, "status": OrderStatus.CANCELLED, "pending_quantity": 0,
                    "cancelled_quantity": pending, "status_message": "paper: cancelled by the user",
                    "exchange_update_timestamp": kite_time(self._clock())},
        )  # fmt: skip
        return order_id

    @staticmethod
    def _open_order(account, order_id: str, *, action: str) -> Order:
        order = Order.objects.filter(account=account, kite_order_id=order_id).first()
        if order is None:
            raise _rejected(f"paper: no order {order_id} on this account")
        if order.is_terminal:
            raise _rejected(f"paper: order {order_id} is {order.status} and cannot be {action}")
        return order

    # --- filling ----------------------------------------------------------------------------

    def match(self, *, orders: Iterable[Order], snapshot: LiveSnapshot) -> list[Order]:
        """Match ``orders`` (one instrument's, any accounts', oldest first) against
        ``snapshot`` and apply the fills; the orders that changed. Nothing while closed."""
        if not self._hours.is_open(self._clock()):
            return []
        by_id = {o.kite_order_id: o for o in orders}
        results = self._matcher.match([paper_order_of(o) for o in by_id.values()], snapshot)
        changed = []
        for result in results:
            account = by_id[result.order.order_id].account
            if (order := self.apply(account=account, result=result)) is not None:
                changed.append(order)
        return changed

    def apply(self, *, account, result: MatchResult) -> Order | None:
        """Write one match: the trigger, the trade and the order's new fill, under its row lock."""
        now = self._clock()
        with transaction.atomic():
            order = (
                Order.objects.select_for_update()
                .filter(account=account, kite_order_id=result.order.order_id)
                .first()
            )
            if order is None or order.is_terminal:
                return None
            pending = order.quantity - order.filled_quantity
            changed = None
            if result.triggered_now and order.status == OrderStatus.TRIGGER_PENDING:
                changed = order_apply_update(
                    account=account, source=SOURCE,
                    update={"order_id": order.kite_order_id, "status": OrderStatus.OPEN,
                            "exchange_update_timestamp": kite_time(now)},
                )  # fmt: skip
            fill = result.fill
            if fill is None or pending <= 0:
                return changed
            quantity = min(fill.quantity, pending)
            filled = order.filled_quantity + quantity
            average = (
                order.average_price * order.filled_quantity + Decimal(str(fill.price)) * quantity
            ) / filled
            stamp = kite_time(now)
            trade_record(
                account=account, source=SOURCE,
                trade={"trade_id": f"T{uuid.uuid4().hex[:20]}", "order_id": order.kite_order_id,
                       "exchange": order.exchange, "tradingsymbol": order.tradingsymbol,
                       "instrument_token": order.instrument_token, "product": order.product,
                       "transaction_type": order.transaction_type, "quantity": quantity,
                       "average_price": fill.price, "fill_timestamp": stamp,
                       "exchange_timestamp": stamp},
            )  # fmt: skip
            return order_apply_update(
                account=account, source=SOURCE,
                update={"order_id": order.kite_order_id,
                        "status": OrderStatus.COMPLETE if filled == order.quantity else OrderStatus.OPEN,
                        "filled_quantity": filled, "pending_quantity": order.quantity - filled,
                        "average_price": float(round(average, 4)), "exchange_timestamp": stamp,
                        "exchange_update_timestamp": stamp},
            )  # fmt: skip


def _positive_int(value: Any, *, field: str) -> int:
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole and not (isinstance(value, str) and value.isdigit()):
        raise _rejected(f"paper: `{field}` must be a whole number, got {value!r:.40}")
    if int(value) <= 0:
        raise _rejected(f"paper: `{field}` must be positive, got {value!r:.40}")
    return int(value)


def _price(value: Any) -> float | None:
    if value in (None, "", 0, 0.0):
        return None
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise _rejected(f"paper: a price must be a number, got {value!r:.40}") from None
    if not price > 0 or price == float("inf"):
        raise _rejected(f"paper: a price must be positive, got {value!r:.40}")
    return price


class PaperBroker:
    """The :class:`accounts.brokers.Broker` of a paper account: Kite's calls, on paper."""

    def __init__(self, *, account, exchange: PaperExchange | None = None) -> None:
        self._account = account
        self._exchange = exchange or PaperExchange.from_settings()

    def place_order(self, *, params: dict[str, Any]) -> str:
        return self._exchange.place(account=self._account, params=params)

    def modify_order(self, *, order_id: str, params: dict[str, Any]) -> str:
        return self._exchange.modify(account=self._account, order_id=order_id, params=params)

    def cancel_order(self, *, order_id: str, variety: str) -> str:
        return self._exchange.cancel(account=self._account, order_id=order_id)

    def orders(self) -> list[dict[str, Any]]:
        return [_kite_order(o) for o in Order.objects.filter(account=self._account).order_by("pk")]

    def trades(self) -> list[dict[str, Any]]:
        return [_kite_trade(t) for t in Trade.objects.filter(account=self._account).order_by("pk")]

    def positions(self) -> dict[str, list[dict[str, Any]]]:
        from accounts.positions import paper_positions_kite

        return paper_positions_kite(account=self._account)


def _stamp(value: dt.datetime | None) -> str | None:
    return value.astimezone(IST).strftime("%Y-%m-%d %H:%M:%S") if value else None


def _kite_order(order: Order) -> dict[str, Any]:
    return {
        "order_id": order.kite_order_id, "tag": order.tag, "status": order.status,
        "status_message": order.status_message or None, "variety": order.variety,
        "exchange": order.exchange, "tradingsymbol": order.tradingsymbol,
        "instrument_token": order.instrument_token, "transaction_type": order.transaction_type,
        "order_type": order.order_type, "product": order.product, "quantity": order.quantity,
        "price": float(order.price), "trigger_price": float(order.trigger_price),
        "filled_quantity": order.filled_quantity, "pending_quantity": order.pending_quantity,
        "cancelled_quantity": order.cancelled_quantity, "average_price": float(order.average_price),
        "order_timestamp": _stamp(order.order_timestamp),
        "exchange_timestamp": _stamp(order.exchange_timestamp),
        "exchange_update_timestamp": _stamp(order.exchange_update_timestamp),
    }  # fmt: skip


def _kite_trade(trade: Trade) -> dict[str, Any]:
    return {
        "trade_id": trade.trade_id, "order_id": trade.kite_order_id, "exchange": trade.exchange,
        "tradingsymbol": trade.tradingsymbol, "instrument_token": trade.instrument_token,
        "product": trade.product, "transaction_type": trade.transaction_type,
        "quantity": trade.quantity, "average_price": float(trade.average_price),
        "fill_timestamp": _stamp(trade.fill_timestamp),
        "exchange_timestamp": _stamp(trade.exchange_timestamp),
    }  # fmt: skip
