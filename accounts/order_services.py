"""Writes to orders and trades: the one path by which an order's state changes.

Every source of news about an order (the placing call's answer, Kite's order book, the
ticker's order messages, postbacks, the paper engine) goes through :func:`order_apply_update`,
which applies an update idempotently and never moves an order backwards. docs/orders.md.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any, Final

import structlog
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from accounts.order_events import order_event_publish
from accounts.order_models import TERMINAL_STATUSES, Order, OrderStatus, Trade
from streaming.kite.schemas import OptionalKiteDateTime, OptionalStr

log = structlog.get_logger(__name__)

_Quantity = Annotated[int, Field(ge=0)]
_Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]

_ACCEPTED_STATUSES: Final = frozenset(
    {
        OrderStatus.PUT_ORDER_REQ_RECEIVED, OrderStatus.VALIDATION_PENDING,
        OrderStatus.OPEN_PENDING, OrderStatus.AMO_REQ_RECEIVED,
    }
)  # fmt: skip

STATUS_RANK: Final[dict[str, int]] = {
    OrderStatus.PENDING: 0,
    OrderStatus.UNKNOWN: 1,
    **dict.fromkeys(_ACCEPTED_STATUSES, 2),
    **dict.fromkeys(TERMINAL_STATUSES, 4),
}
"""How far along an order is; every other Kite status (OPEN, TRIGGER PENDING, MODIFY ...)
is 3: a live order moves between those freely, ordered by their timestamps."""
LIVE_RANK: Final = 3


def status_rank(status: str) -> int:
    return STATUS_RANK.get(status, LIVE_RANK)


class OrderUpdateError(ValueError):
    """An order update that cannot be applied: not Kite's shape, or naming no order."""

    def __init__(self, *, source: str, field: str, got: Any, reason: str) -> None:
        super().__init__(f"order update from {source}: field {field!r}: {reason} (got {got!r:.80})")
        self.source = source
        self.field = field


class OrderUpdate(BaseModel):
    """One Kite order dict: order book entry, postback, or the ticker's ``data``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    order_id: OptionalStr = None
    tag: OptionalStr = None
    status: Annotated[str, Field(min_length=1, max_length=32)]
    status_message: OptionalStr = None
    exchange_order_id: OptionalStr = None
    parent_order_id: OptionalStr = None
    variety: OptionalStr = None
    exchange: OptionalStr = None
    tradingsymbol: OptionalStr = None
    instrument_token: Annotated[int, Field(ge=0)] | None = None
    transaction_type: OptionalStr = None
    order_type: OptionalStr = None
    product: OptionalStr = None
    quantity: _Quantity | None = None
    price: _Price | None = None
    trigger_price: _Price | None = None
    filled_quantity: _Quantity | None = None
    pending_quantity: _Quantity | None = None
    cancelled_quantity: _Quantity | None = None
    average_price: _Price | None = None
    order_timestamp: OptionalKiteDateTime = None
    exchange_timestamp: OptionalKiteDateTime = None
    exchange_update_timestamp: OptionalKiteDateTime = None

    @property
    def updated_at(self) -> dt.datetime | None:
        """When Kite last changed the order, by the most precise stamp the update carries."""
        return self.exchange_update_timestamp or self.exchange_timestamp or self.order_timestamp


def _parse_update(update: dict, *, source: str) -> OrderUpdate:
    if not isinstance(update, dict):
        raise OrderUpdateError(source=source, field="update", got=type(update).__name__,
                               reason="not an object")
    try:
        parsed = OrderUpdate.model_validate(update)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "update"
        raise OrderUpdateError(source=source, field=field, got=first.get("input"),
                               reason=first["msg"]) from None
    if not parsed.order_id and not parsed.tag:
        raise OrderUpdateError(source=source, field="order_id", got=None,
                               reason="neither order_id nor tag: no order to apply it to")
    return parsed


def _stored_updated_at(order: Order) -> dt.datetime | None:
    return order.exchange_update_timestamp or order.exchange_timestamp or order.order_timestamp


def order_update_skip_reason(order: Order, update: OrderUpdate) -> str | None:
    """Why ``update`` would move ``order`` backwards or change nothing; None to apply it."""
    if order.status in TERMINAL_STATUSES:
        return "terminal"
    filled = update.filled_quantity
    if filled is not None and filled < order.filled_quantity:
        return "filled_backwards"
    if filled is not None and filled > order.filled_quantity:
        return None  # more filled is news, whatever the stamps say
    if status_rank(update.status) < status_rank(order.status):
        return "status_backwards"
    stored_at, update_at = _stored_updated_at(order), update.updated_at
    if stored_at is not None and update_at is not None and update_at < stored_at:
        return "older"
    same = (
        update.status == order.status
        and (update.pending_quantity is None or update.pending_quantity == order.pending_quantity)
        and (update.cancelled_quantity is None or update.cancelled_quantity == order.cancelled_quantity)
        and (update.average_price is None or Decimal(str(update.average_price)) == order.average_price)
        and (update.status_message is None or update.status_message == order.status_message)
        and (update.order_id is None or update.order_id == order.kite_order_id)
        and (update_at is None or update_at == stored_at)
    )
    return "duplicate" if same else None


_DETAIL_FIELDS: Final = (
    "variety", "exchange", "tradingsymbol", "instrument_token", "transaction_type",
    "order_type", "product", "quantity", "price", "trigger_price",
)  # fmt: skip


def _apply(order: Order, update: OrderUpdate, *, source: str, now: dt.datetime) -> None:
    if update.order_id and not order.kite_order_id:
        order.kite_order_id = update.order_id
    order.status = update.status
    if update.status_message is not None or update.status in TERMINAL_STATUSES:
        order.status_message = update.status_message or ""
    for name in ("exchange_order_id", "parent_order_id"):
        value = getattr(update, name)
        if value:
            setattr(order, name, value)
    for name in ("filled_quantity", "pending_quantity", "cancelled_quantity"):
        value = getattr(update, name)
        if value is not None:
            setattr(order, name, value)
    if update.average_price is not None:
        order.average_price = Decimal(str(update.average_price))
    for name in ("order_timestamp", "exchange_timestamp", "exchange_update_timestamp"):
        value = getattr(update, name)
        if value is not None:
            setattr(order, name, value)
    for name in _DETAIL_FIELDS:
        # A modification changes quantity, price and type: Kite's word is the latest truth.
        value = getattr(update, name)
        if value is not None:
            setattr(order, name, Decimal(str(value)) if name.endswith("price") else value)
    order.status_history = [
        *order.status_history,
        {
            "status": update.status,
            "filled_quantity": order.filled_quantity,
            "at": update.updated_at.isoformat() if update.updated_at else None,
            "source": source,
            "recorded_at": now.isoformat(),
        },
    ]


def _locked_order(account, update: OrderUpdate) -> Order | None:
    """The order an update is for, locked; one SELECT for both ways of finding it."""
    wanted = []
    if update.order_id:
        wanted.append(Q(kite_order_id=update.order_id))
    if update.tag:
        # Only our own orders are found by tag (others' apps reuse tags); one we placed but
        # whose order_id was lost is found here, and learns its order_id.
        wanted.append(Q(tag=update.tag, placement__isnull=False))
    if not wanted:
        return None
    either = wanted[0] if len(wanted) == 1 else wanted[0] | wanted[1]
    candidates = list(Order.objects.select_for_update().filter(either, account=account).order_by("pk"))
    found = next((o for o in candidates if update.order_id and o.kite_order_id == update.order_id), None)
    if found is not None:
        return found
    found = next((o for o in candidates if update.tag and o.tag == update.tag and o.placement_id), None)
    if found is not None and (not found.kite_order_id or not update.order_id):
        return found
    if found is not None:
        log.error("order.tag_conflict", account_id=account.pk, tag=update.tag,
                  stored_order_id=found.kite_order_id, update_order_id=update.order_id)
    return None


def _external_order(account, update: OrderUpdate) -> Order:
    """An order we did not place (Kite's web, another app), first seen in an update."""
    return Order.objects.create(
        account=account, kite_order_id=update.order_id, tag=update.tag,
        status=OrderStatus.PENDING,
        **{name: getattr(update, name) for name in _DETAIL_FIELDS if getattr(update, name) is not None},
    )  # fmt: skip


def order_apply_update(*, account, update: dict, source: str) -> Order | None:
    """Apply one Kite order dict to its order; the order, or None if the update was skipped.

    Idempotent and monotonic: a duplicate, an update older than the stored one, a lower
    filled quantity, or anything after a terminal status is skipped. An order placed
    elsewhere is recorded on its first update. Listeners are told after commit.
    """
    parsed = _parse_update(update, source=source)
    for attempt in range(2):
        try:
            with transaction.atomic():
                order = _locked_order(account, parsed)
                if order is None:
                    if not parsed.order_id:
                        log.info("order.update_for_unknown_tag", account_id=account.pk,
                                 tag=parsed.tag, source=source)
                        return None
                    order = _external_order(account, parsed)
                reason = order_update_skip_reason(order, parsed)
                if reason is not None:
                    log.debug("order.update_skipped", order=order.pk, status=parsed.status,
                              reason=reason, source=source)
                    return None
                _apply(order, parsed, source=source, now=timezone.now())
                order.save()
                transaction.on_commit(lambda order=order: order_event_publish(order=order))
        except IntegrityError:
            # Two first updates of one external order raced to create it: the loser applies
            # its update to the winner's row.
            if attempt:
                raise
            continue
        log.info("order.updated", order=order.pk, kite_order_id=order.kite_order_id,
                 status=order.status, filled_quantity=order.filled_quantity, source=source)
        return order
    return None


class TradeUpdate(BaseModel):
    """One Kite trade dict (an entry of /trades)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    trade_id: Annotated[str, Field(min_length=1, max_length=32)]
    order_id: Annotated[str, Field(min_length=1, max_length=32)]
    exchange_order_id: OptionalStr = None
    exchange: Annotated[str, Field(min_length=1)]
    tradingsymbol: Annotated[str, Field(min_length=1)]
    instrument_token: Annotated[int, Field(ge=0)] | None = None
    product: OptionalStr = None
    transaction_type: Annotated[str, Field(pattern="^(BUY|SELL)$")]
    quantity: Annotated[int, Field(gt=0)]
    average_price: _Price
    fill_timestamp: OptionalKiteDateTime = None
    exchange_timestamp: OptionalKiteDateTime = None


def trade_record(*, account, trade: dict, source: str) -> Trade | None:
    """Record one fill; the new Trade, or None if (account, trade_id) is already recorded."""
    try:
        parsed = TradeUpdate.model_validate(trade)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "trade"
        raise OrderUpdateError(source=source, field=field, got=first.get("input"),
                               reason=first["msg"]) from None
    order = Order.objects.filter(account=account, kite_order_id=parsed.order_id).first()
    with transaction.atomic():
        row, created = Trade.objects.get_or_create(
            account=account, trade_id=parsed.trade_id,
            defaults={
                "order": order, "kite_order_id": parsed.order_id,
                "exchange_order_id": parsed.exchange_order_id or "", "exchange": parsed.exchange,
                "tradingsymbol": parsed.tradingsymbol, "instrument_token": parsed.instrument_token,
                "product": parsed.product or "", "transaction_type": parsed.transaction_type,
                "quantity": parsed.quantity, "average_price": Decimal(str(parsed.average_price)),
                "fill_timestamp": parsed.fill_timestamp,
                "exchange_timestamp": parsed.exchange_timestamp, "source": source,
            },
        )  # fmt: skip
    if not created:
        return None
    log.info("trade.recorded", account_id=account.pk, trade_id=row.trade_id,
             kite_order_id=row.kite_order_id, quantity=row.quantity, source=source)
    return row
