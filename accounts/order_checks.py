"""Pre-trade checks: what an account's settings allow, decided before anything is sent.

Plain functions on plain values (the account's settings, the instrument, the day's P&L):
the services gather them and call :func:`order_check`; a refusal is an :class:`OrderRefused`
with its own code, and nothing reaches the broker. docs/orders.md lists the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from accounts.models import KiteAccount


class OrderRefused(Exception):
    """An order action refused by us; ``code`` is stable, ``status`` the HTTP status."""

    def __init__(
        self, code: str, message: str, *, status: int = 403, field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.field = field
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class InstrumentFacts:
    """What the checks need to know of the instrument an order is for."""

    exchange: str
    tradingsymbol: str
    underlying: str
    lot_size: int


@dataclass(frozen=True, slots=True)
class DayPnl:
    """The account's P&L today (rupees): realised plus mark-to-market of open positions."""

    realised: Decimal
    unrealised: Decimal
    as_of: str

    @property
    def total(self) -> Decimal:
        return self.realised + self.unrealised


def kill_switches_check(*, account: KiteAccount, global_halted: bool, global_reason: str) -> None:
    """Refuse new orders while the global or the account's kill switch is on."""
    if global_halted:
        raise OrderRefused(
            "kill_switch_global", f"trading is halted for every account: {global_reason or 'no reason given'}"
        )
    if account.kill_switch:
        raise OrderRefused(
            "kill_switch_account",
            f"trading is halted on account {account.label}: {account.kill_switch_reason or 'no reason given'}",
        )


def order_check(
    *,
    account: KiteAccount,
    instrument: InstrumentFacts,
    product: str,
    quantity: int,
    reference_price: float | None,
    day_pnl: DayPnl | None,
) -> None:
    """Refuse an order the account's pre-trade limits do not allow (the first limit crossed)."""
    if instrument.exchange not in account.allowed_exchanges:
        raise OrderRefused(
            "exchange_not_allowed",
            f"account {account.label} may not trade on {instrument.exchange}; "
            f"allowed: {', '.join(account.allowed_exchanges) or 'none'}",
            field="exchange",
        )
    if product not in account.allowed_products:
        raise OrderRefused(
            "product_not_allowed",
            f"account {account.label} may not use product {product}; "
            f"allowed: {', '.join(account.allowed_products) or 'none'}",
            field="product",
        )
    lot = max(1, instrument.lot_size)
    if quantity % lot:
        raise OrderRefused(
            "quantity_not_lot_multiple",
            f"quantity {quantity} of {instrument.tradingsymbol} is not a multiple of its lot size {lot}",
            status=400, field="quantity",
        )
    lots = quantity // lot
    if account.max_lots_per_order is not None and lots > account.max_lots_per_order:
        raise OrderRefused(
            "max_lots_exceeded",
            f"{lots} lots of {instrument.tradingsymbol} exceed account {account.label}'s "
            f"{account.max_lots_per_order} lots per order",
            field="quantity",
        )
    if account.max_notional_per_order is not None:
        if reference_price is None or not math.isfinite(reference_price):
            raise OrderRefused(
                "notional_unknown",
                f"account {account.label} caps notional per order, and no price of "
                f"{instrument.tradingsymbol} is known to value this order: send a LIMIT order",
                field="price",
            )
        notional = Decimal(str(reference_price)) * quantity
        if notional > account.max_notional_per_order:
            raise OrderRefused(
                "max_notional_exceeded",
                f"notional {notional:.2f} exceeds account {account.label}'s "
                f"{account.max_notional_per_order} per order",
                field="quantity",
            )
    if account.daily_loss_cap is not None and day_pnl is not None and -day_pnl.total >= account.daily_loss_cap:
        raise OrderRefused(
            "daily_loss_cap_reached",
            f"account {account.label} lost {-day_pnl.total:.2f} today (realised {day_pnl.realised:.2f}, "
            f"mark-to-market {day_pnl.unrealised:.2f}, as of {day_pnl.as_of}), at or over its cap "
            f"{account.daily_loss_cap}: new orders are halted",
        )


def slice_quantities(*, quantity: int, freeze_quantity: int | None, lot_size: int, max_slices: int) -> list[int]:
    """Split ``quantity`` into orders within the freeze quantity, whole lots each.

    Refused when it would need more than ``max_slices`` orders.
    """
    if freeze_quantity is None or quantity <= freeze_quantity:
        return [quantity]
    lot = max(1, lot_size)
    per_slice = (freeze_quantity // lot) * lot
    if per_slice <= 0:
        raise OrderRefused(
            "freeze_quantity_below_lot",
            f"the freeze quantity {freeze_quantity} is smaller than one lot ({lot})", status=400,
        )
    count = math.ceil(quantity / per_slice)
    if count > max_slices:
        raise OrderRefused(
            "too_many_slices",
            f"quantity {quantity} needs {count} orders of at most {per_slice} (freeze quantity "
            f"{freeze_quantity}), more than the {max_slices} slices allowed",
            status=400, field="quantity",
        )
    slices = [per_slice] * (quantity // per_slice)
    if quantity % per_slice:
        slices.append(quantity % per_slice)
    return slices
