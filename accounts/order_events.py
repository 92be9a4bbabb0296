"""Who is told when an order changes: the one typed document and its publisher.

``order_apply_update`` (accounts/order_services.py) calls :func:`order_event_publish` after
its transaction commits, once per applied update. The document crosses a process boundary
(to the WebSocket clients of ``orders.<account_id>``), so it has one typed model here.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Literal

import structlog
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from accounts.order_models import Order

log = structlog.get_logger(__name__)


def orders_group(account_id: int) -> str:
    """The channel-layer group of one account's order updates."""
    return f"orders.{account_id}"


class OrderEvent(BaseModel):
    """An order's state after an update, as clients see it."""

    model_config = ConfigDict(frozen=True)

    type: Literal["order"] = "order"
    id: int
    account_id: int
    kite_order_id: str | None
    tag: str | None
    status: str
    status_message: str
    exchange: str
    tradingsymbol: str
    transaction_type: str
    order_type: str
    product: str
    quantity: int
    price: float
    trigger_price: float
    filled_quantity: int
    pending_quantity: int
    cancelled_quantity: int
    average_price: float
    order_timestamp: dt.datetime | None
    exchange_timestamp: dt.datetime | None
    updated_at: dt.datetime

    @classmethod
    def from_order(cls, order: Order) -> OrderEvent:
        return cls(
            id=order.pk, account_id=order.account_id, kite_order_id=order.kite_order_id,
            tag=order.tag, status=order.status, status_message=order.status_message,
            exchange=order.exchange, tradingsymbol=order.tradingsymbol,
            transaction_type=order.transaction_type, order_type=order.order_type,
            product=order.product, quantity=order.quantity, price=float(order.price),
            trigger_price=float(order.trigger_price), filled_quantity=order.filled_quantity,
            pending_quantity=order.pending_quantity, cancelled_quantity=order.cancelled_quantity,
            average_price=float(order.average_price), order_timestamp=order.order_timestamp,
            exchange_timestamp=order.exchange_timestamp, updated_at=order.updated_at,
        )  # fmt: skip


def order_event_publish(*, order: Order) -> None:
    """Tell the listeners of ``orders_group(order.account_id)`` about the order's new state.

    Called after commit by ``order_apply_update``. The WebSocket push lives with the
    ``orders`` subscription (docs/websocket-protocol.md); here the event is built and logged.
    """
    event = OrderEvent.from_order(order)
    log.info(
        "order.changed", account_id=event.account_id, order=event.id,
        kite_order_id=event.kite_order_id, status=event.status,
        filled_quantity=event.filled_quantity,
    )  # fmt: skip
