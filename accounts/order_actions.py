"""Order actions: place (idempotent), modify, cancel, exit, cancel all, square off; resolving
orders whose placement's answer was lost.

An order is placed once or not at all, whatever fails in between:

- the placement and its orders are stored (PENDING, each with its unique tag) before
  anything is sent; the same ``Idempotency-Key`` returns the stored answer forever after;
- an ambiguous failure leaves the order UNKNOWN; only Kite's order book (or an order update
  carrying the tag) settles it, and it is re-sent only once Kite has shown no order with its
  tag for ``unknown_grace_s`` after the last send (a conditional UPDATE claims each send, so
  two resolvers never both re-send);
- every refusal (checks, limits, kill switches) happens before the order is stored and
  sends nothing.

Collaborators (broker factory, order rate limiter, limits, the resolution scheduler) come in
an :class:`OrderDesk` built at the edge. Every action is audited (``OrderAudit``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

import orjson
import structlog
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field, model_validator

from accounts.brokers import (
    Broker,
    BrokerAmbiguousError,
    BrokerError,
    BrokerNotSentError,
    BrokerRejectedError,
)
from accounts.models import KiteAccount
from accounts.order_checks import (
    DayPnl,
    InstrumentFacts,
    OrderRefused,
    kill_switches_check,
    order_check,
    slice_quantities,
)
from accounts.order_models import (
    OPEN_STATUSES,
    TAG_MAX_LENGTH,
    Order,
    OrderAudit,
    OrderPlacement,
    OrderStatus,
    PositionSnapshot,
    TradingSwitch,
)
from accounts.order_services import order_apply_update
from streaming.greeks import IST
from streaming.kite.rest import KiteOrderRateLimiter, KiteRateLimiterUnavailable, OrderWindow
from subscriptions.models import Instrument

log = structlog.get_logger(__name__)

_TAG_ALPHABET: Final = string.ascii_letters + string.digits
TAG_PREFIX: Final = "tp"
"""Our tags start with this, so an operator tells our orders from others' at Kite."""


def new_tag() -> str:
    """A fresh Kite order tag: alphanumeric, 20 characters, unguessable and unique in practice."""
    body = "".join(secrets.choice(_TAG_ALPHABET) for _ in range(TAG_MAX_LENGTH - len(TAG_PREFIX)))
    return TAG_PREFIX + body


# --- inputs ------------------------------------------------------------------------------------


class OrderParams(BaseModel):
    """A new order, as a client asks for it (Kite's field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account_id: int
    variety: Literal["regular", "amo", "co", "iceberg", "auction"] = "regular"
    exchange: Literal["NSE", "BSE", "NFO", "BFO", "CDS", "BCD", "MCX"]
    tradingsymbol: Annotated[str, Field(min_length=1, max_length=64)]
    transaction_type: Literal["BUY", "SELL"]
    order_type: Literal["MARKET", "LIMIT", "SL", "SL-M"]
    quantity: Annotated[int, Field(gt=0, le=10_000_000)]
    product: Literal["CNC", "NRML", "MIS", "MTF"]
    price: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    trigger_price: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    validity: Literal["DAY", "IOC", "TTL"] = "DAY"
    disclosed_quantity: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _prices_match_the_type(self) -> OrderParams:
        if self.order_type in ("LIMIT", "SL") and self.price is None:
            raise ValueError(f"price is required for {self.order_type} orders")
        if self.order_type in ("SL", "SL-M") and self.trigger_price is None:
            raise ValueError(f"trigger_price is required for {self.order_type} orders")
        if self.order_type in ("MARKET", "SL-M") and self.price is not None:
            raise ValueError(f"{self.order_type} orders take no price")
        return self


class ModifyParams(BaseModel):
    """What may change on an open order; at least one field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quantity: Annotated[int, Field(gt=0, le=10_000_000)] | None = None
    price: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    trigger_price: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    order_type: Literal["MARKET", "LIMIT", "SL", "SL-M"] | None = None
    validity: Literal["DAY", "IOC", "TTL"] | None = None
    disclosed_quantity: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _something_changes(self) -> ModifyParams:
        if not self.model_dump(exclude_none=True):
            raise ValueError("nothing to modify: give quantity, price, trigger_price, order_type or validity")
        return self


# --- collaborators -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderActor:
    """Who acts and from where, for the audit."""

    user: Any
    token_prefix: str = ""
    origin: Literal["api", "admin", "task"] = "api"
    remote_addr: str | None = None


@dataclass(frozen=True, slots=True)
class OrderLimits:
    """Kite's order limits and our resolution timings (settings, read at the edge)."""

    per_s: int = 10
    per_minute: int = 400
    per_day: int = 5000
    max_modifications: int = 25
    max_slices: int = 10
    freeze_quantities: dict[str, int] = field(default_factory=dict)
    unknown_grace_s: float = 60.0
    unknown_check_interval_s: float = 5.0
    max_send_attempts: int = 3

    @classmethod
    def from_settings(cls) -> OrderLimits:
        from django.conf import settings

        return cls(
            per_s=settings.ORDERS_PER_S, per_minute=settings.ORDERS_PER_MINUTE,
            per_day=settings.ORDERS_PER_DAY, max_modifications=settings.ORDERS_MAX_MODIFICATIONS,
            max_slices=settings.ORDERS_MAX_SLICES, freeze_quantities=settings.ORDERS_FREEZE_QUANTITIES,
            unknown_grace_s=settings.ORDERS_UNKNOWN_GRACE_S,
            unknown_check_interval_s=settings.ORDERS_UNKNOWN_CHECK_INTERVAL_S,
            max_send_attempts=settings.ORDERS_MAX_SEND_ATTEMPTS,
        )  # fmt: skip

    def windows(self) -> list[OrderWindow]:
        return [
            OrderWindow("second", self.per_s, 1.0),
            OrderWindow("minute", self.per_minute, 60.0),
            OrderWindow("day", self.per_day, 86_400.0),
        ]


@dataclass(frozen=True, slots=True)
class OrderDesk:
    """What the order actions act through; tests build one on the simulator."""

    broker_for: Callable[[KiteAccount], Broker]
    rate_limiter: KiteOrderRateLimiter
    limits: OrderLimits
    schedule_resolution: Callable[[int, float], None]
    now: Callable[[], dt.datetime] = timezone.now


@dataclass(frozen=True, slots=True)
class ActionResult:
    """An action's answer for the API: HTTP status and JSON body."""

    status: int
    body: dict[str, Any]


# --- audit -------------------------------------------------------------------------------------


def order_audit_record(
    *, actor: OrderActor, action: str, outcome: str, account: KiteAccount | None = None,
    order: Order | None = None, error_code: str = "", request: dict | None = None,
    response: dict | None = None,
) -> OrderAudit:
    """Record one order action; ``request``/``response`` hold no secret (validated params, Kite's redacted answer)."""
    user = actor.user if getattr(actor.user, "pk", None) else None
    audit = OrderAudit.objects.create(
        account=account, order=order, user=user, token_prefix=actor.token_prefix,
        origin=actor.origin, remote_addr=actor.remote_addr, action=action, outcome=outcome,
        error_code=error_code, request=request or {}, response=response or {},
    )  # fmt: skip
    log.info("order.audit", action=action, outcome=outcome, code=error_code or None,
             account_id=getattr(account, "pk", None), order=getattr(order, "pk", None),
             user=getattr(user, "pk", None), token_prefix=actor.token_prefix or None)
    return audit


# --- views of orders ---------------------------------------------------------------------------


def order_view(order: Order) -> dict[str, Any]:
    """An order as the API shows it."""
    return {
        "id": order.pk, "account_id": order.account_id, "kite_order_id": order.kite_order_id,
        "tag": order.tag, "slice_index": order.slice_index, "variety": order.variety,
        "exchange": order.exchange, "tradingsymbol": order.tradingsymbol,
        "transaction_type": order.transaction_type, "order_type": order.order_type,
        "product": order.product, "quantity": order.quantity, "price": float(order.price),
        "trigger_price": float(order.trigger_price), "status": order.status,
        "status_message": order.status_message, "filled_quantity": order.filled_quantity,
        "pending_quantity": order.pending_quantity, "cancelled_quantity": order.cancelled_quantity,
        "average_price": float(order.average_price),
        "order_timestamp": order.order_timestamp.isoformat() if order.order_timestamp else None,
        "exchange_timestamp": order.exchange_timestamp.isoformat() if order.exchange_timestamp else None,
        "modification_count": order.modification_count, "send_attempts": order.send_attempts,
        "status_history": order.status_history, "created_at": order.created_at.isoformat(),
        "updated_at": order.updated_at.isoformat(),
    }  # fmt: skip


# --- inputs to the checks ----------------------------------------------------------------------


def instrument_facts(*, exchange: str, tradingsymbol: str) -> tuple[InstrumentFacts, Instrument]:
    row = Instrument.objects.filter(exchange=exchange, tradingsymbol=tradingsymbol).first()
    if row is None:
        raise OrderRefused(
            "unknown_instrument", f"{exchange}:{tradingsymbol} is not in the instrument list",
            status=400, field="tradingsymbol",
        )
    underlying = row.name or row.tradingsymbol
    return InstrumentFacts(exchange=row.exchange, tradingsymbol=row.tradingsymbol,
                           underlying=underlying, lot_size=row.lot_size), row


def _todays_snapshot(account: KiteAccount, now: dt.datetime) -> PositionSnapshot | None:
    midnight_ist = dt.datetime.combine(now.astimezone(IST).date(), dt.time(0), tzinfo=IST)
    return (
        PositionSnapshot.objects.filter(account=account, taken_at__gte=midnight_ist)
        .order_by("-taken_at").first()
    )


def account_day_pnl(*, account: KiteAccount, now: dt.datetime) -> DayPnl:
    """Today's P&L from the latest positions stored today (Kite's ``pnl`` and ``realised`` at
    its last price); zero when none was stored today (docs/orders.md: daily loss cap)."""
    snapshot = _todays_snapshot(account, now)
    if snapshot is None:
        return DayPnl(realised=Decimal(0), unrealised=Decimal(0), as_of="no positions stored today")
    realised = sum((Decimal(str(p.get("realised") or 0)) for p in snapshot.net), Decimal(0))
    total = sum((Decimal(str(p.get("pnl") or 0)) for p in snapshot.net), Decimal(0))
    return DayPnl(realised=realised, unrealised=total - realised, as_of=snapshot.taken_at.isoformat())


def reference_price(*, account: KiteAccount, params: OrderParams, instrument: Instrument,
                    now: dt.datetime) -> float | None:
    """The price an order is valued at for the notional cap: its limit (or trigger) price, else
    the last price stored with today's positions, else the instrument list's last price."""
    if params.price is not None:
        return params.price
    if params.trigger_price is not None:
        return params.trigger_price
    snapshot = _todays_snapshot(account, now)
    for row in snapshot.net if snapshot else ():
        if row.get("instrument_token") == instrument.instrument_token and row.get("last_price"):
            return float(row["last_price"])
    return instrument.last_price or None


def account_tradable_check(account: KiteAccount) -> None:
    if account.is_paper:
        return
    if account.status != KiteAccount.Status.ACTIVE or account.needs_login:
        raise OrderRefused(
            "account_not_active",
            f"account {account.label} is {account.get_status_display().lower()}"
            f"{' and needs a Kite login' if account.needs_login else ''}: no orders can be sent",
            status=409,
        )


def _global_switch() -> TradingSwitch:
    switch, _ = TradingSwitch.objects.get_or_create(pk=TradingSwitch.SINGLETON_PK)
    return switch


def _rate_check(*, desk: OrderDesk, account: KiteAccount, cost: int) -> None:
    if account.is_paper:
        return
    if cost > desk.rate_limiter.largest_cost():
        raise OrderRefused(
            "too_many_slices", f"{cost} orders at once exceed Kite's {desk.rate_limiter.largest_cost()} per second",
            status=400, field="quantity",
        )
    try:
        wait_s = desk.rate_limiter.try_acquire(api_key=account.api_key, cost=cost)
    except KiteRateLimiterUnavailable:
        raise OrderRefused(
            "order_limiter_unavailable", "the shared order rate limiter (Redis) is unavailable; nothing was sent",
            status=503,
        ) from None
    if wait_s > 0:
        raise OrderRefused(
            "order_rate_limited",
            f"Kite's order limits for account {account.label} ({desk.limits.per_s}/s, "
            f"{desk.limits.per_minute}/min, {desk.limits.per_day}/day) are used up; retry in {wait_s:.1f} s",
            status=429, retry_after_s=wait_s,
        )


# --- placing -----------------------------------------------------------------------------------


def _fingerprint(params: OrderParams) -> str:
    return hashlib.sha256(orjson.dumps(params.model_dump(), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _replay(placement: OrderPlacement, fingerprint: str) -> ActionResult:
    if placement.fingerprint != fingerprint:
        raise OrderRefused(
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different order; use a new key for a new order",
            status=422,
        )
    if placement.response_status is None:
        raise OrderRefused(
            "idempotency_key_in_progress", "an order with this Idempotency-Key is being placed; retry shortly",
            status=409, retry_after_s=1.0,
        )
    return ActionResult(status=placement.response_status, body=placement.response_body)


def _kite_params(params: OrderParams, *, account: KiteAccount, quantity: int, tag: str) -> dict[str, Any]:
    kite = {
        "variety": params.variety, "exchange": params.exchange,
        "tradingsymbol": params.tradingsymbol, "transaction_type": params.transaction_type,
        "quantity": quantity, "product": params.product, "order_type": params.order_type,
        "price": params.price, "trigger_price": params.trigger_price, "validity": params.validity,
        "disclosed_quantity": params.disclosed_quantity, "tag": tag,
    }  # fmt: skip
    if params.order_type in ("MARKET", "SL-M") and account.market_protection != 0:
        kite["market_protection"] = account.market_protection
    return {k: v for k, v in kite.items() if v is not None}


def _store_placement(
    *, actor: OrderActor, account: KiteAccount, idempotency_key: str, params: OrderParams,
    fingerprint: str, slices: list[int], instrument: Instrument,
) -> tuple[OrderPlacement, list[Order]]:
    orders = []
    with transaction.atomic():
        placement = OrderPlacement.objects.create(
            user=actor.user, account=account, idempotency_key=idempotency_key,
            fingerprint=fingerprint, request=params.model_dump(),
        )  # fmt: skip
        for index, quantity in enumerate(slices):
            tag = new_tag()
            orders.append(Order.objects.create(
                account=account, placement=placement, slice_index=index, tag=tag,
                request=_kite_params(params, account=account, quantity=quantity, tag=tag),
                variety=params.variety, exchange=params.exchange,
                tradingsymbol=params.tradingsymbol, instrument_token=instrument.instrument_token,
                transaction_type=params.transaction_type, order_type=params.order_type,
                product=params.product, quantity=quantity, price=Decimal(str(params.price or 0)),
                trigger_price=Decimal(str(params.trigger_price or 0)), pending_quantity=quantity,
            ))  # fmt: skip
    return placement, orders


def order_place(
    *, actor: OrderActor, account: KiteAccount, idempotency_key: str, params: OrderParams,
    desk: OrderDesk, risk_reducing: bool = False,
) -> ActionResult:
    """Place an order once: replay the stored answer for a known key, else check, store, send.

    ``risk_reducing`` (square off) skips the kill switches and the pre-trade limits, never
    Kite's order limits. Raises :class:`OrderRefused` when refused (audited, nothing sent).
    """
    fingerprint = _fingerprint(params)
    existing = OrderPlacement.objects.filter(user=actor.user, idempotency_key=idempotency_key).first()
    if existing is not None:
        return _replay(existing, fingerprint)
    request = params.model_dump()
    try:
        facts, instrument = instrument_facts(exchange=params.exchange, tradingsymbol=params.tradingsymbol)
        account_tradable_check(account)
        now = desk.now()
        if not risk_reducing:
            switch = _global_switch()
            kill_switches_check(account=account, global_halted=switch.halted, global_reason=switch.reason)
            order_check(
                account=account, instrument=facts, product=params.product, quantity=params.quantity,
                reference_price=reference_price(account=account, params=params, instrument=instrument, now=now),
                day_pnl=account_day_pnl(account=account, now=now) if account.daily_loss_cap is not None else None,
            )  # fmt: skip
        slices = slice_quantities(
            quantity=params.quantity, freeze_quantity=desk.limits.freeze_quantities.get(facts.underlying),
            lot_size=facts.lot_size, max_slices=desk.limits.max_slices,
        )  # fmt: skip
        _rate_check(desk=desk, account=account, cost=len(slices))
        placement, orders = _store_placement(
            actor=actor, account=account, idempotency_key=idempotency_key, params=params,
            fingerprint=fingerprint, slices=slices, instrument=instrument,
        )  # fmt: skip
    except OrderRefused as refused:
        order_audit_record(actor=actor, action=OrderAudit.Action.PLACE, outcome=OrderAudit.Outcome.REFUSED,
                           account=account, error_code=refused.code, request=request,
                           response={"message": refused.message})
        raise
    except IntegrityError:
        # The same key raced in from another request: that one places the order.
        existing = OrderPlacement.objects.get(user=actor.user, idempotency_key=idempotency_key)
        return _replay(existing, fingerprint)
    broker = desk.broker_for(account)
    sent: list[Order] = []
    answers: list[ActionResult] = []

    def store_answer(last: Order) -> None:
        answers.append(_placement_answer(placement, orders=[*sent, last]))

    for order in orders:
        last = order is orders[-1]
        sent.append(order_send(order=order, broker=broker, actor=actor, desk=desk, action=OrderAudit.Action.PLACE,
                               also=store_answer if last else None))
    # The answer is stored with the last order's outcome, in its transaction; on its own only
    # when that order was not sent here (another resolver had claimed it).
    return answers[0] if answers else _placement_answer(placement, orders=sent)


def _placement_answer(placement: OrderPlacement, *, orders: list[Order] | None = None) -> ActionResult:
    """Store the placement's answer once; every later POST with its key gets this."""
    orders = orders if orders is not None else list(placement.orders.order_by("slice_index"))
    statuses = {o.status for o in orders}
    body: dict[str, Any] = {
        "placement": {"id": placement.pk, "idempotency_key": placement.idempotency_key,
                      "account_id": placement.account_id, "request": placement.request},
        "orders": [order_view(o) for o in orders],
    }
    if statuses == {OrderStatus.REJECTED}:
        status = 422
        body = {"error": {"code": "kite_rejected", "message": orders[0].status_message, **body}}
    elif OrderStatus.UNKNOWN in statuses:
        status = 202
    else:
        status = 201
    # Stored only if no answer is yet, and read back in the same statement, so the first
    # answer is byte for byte what every replay returns (jsonb's key order), and a resolver
    # that stored it first wins.
    body_field = OrderPlacement._meta.get_field("response_body")
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE accounts_orderplacement SET response_status = %s, response_body = %s "
            "WHERE id = %s AND response_status IS NULL RETURNING response_status, response_body",
            [status, body_field.get_db_prep_save(body, connection), placement.pk],
        )
        row = cursor.fetchone()
    if row is None:
        placement.refresh_from_db(fields=["response_status", "response_body"])
        return ActionResult(status=placement.response_status, body=placement.response_body)
    placement.response_status = row[0]
    placement.response_body = body_field.from_db_value(row[1], None, connection)
    return ActionResult(status=placement.response_status, body=placement.response_body)


def _claim_send(order: Order, *, now: dt.datetime) -> bool:
    """Take the right to send ``order`` (one more attempt); False if another resolver has it."""
    return bool(
        Order.objects.filter(
            pk=order.pk, status__in=[OrderStatus.PENDING, OrderStatus.UNKNOWN],
            send_attempts=order.send_attempts,
        ).update(send_attempts=F("send_attempts") + 1, sent_at=now)
    )


def order_send(
    *, order: Order, broker: Broker, actor: OrderActor, desk: OrderDesk, action: str,
    also: Callable[[Order], None] | None = None,
) -> Order:
    """Send one stored order to the broker and record what came back.

    The send is claimed (committed) first; Kite's answer, its audit and ``also`` (called with
    the order's new state: the placement's answer) are written in one transaction. ``also``
    is not called when the order was not sent here.
    """
    if not _claim_send(order, now=desk.now()):
        order.refresh_from_db()
        return order
    outcome: str | BrokerError
    try:
        outcome = broker.place_order(params=order.request)
    except (BrokerAmbiguousError, BrokerRejectedError, BrokerNotSentError) as exc:
        outcome = exc
    with transaction.atomic():
        updated = _record_send(order, outcome=outcome, actor=actor, desk=desk, action=action)
        if updated is None:  # an update from the feed got there first and is newer
            order.refresh_from_db()
            updated = order
        if also is not None:
            also(updated)
    return updated


def _record_send(order: Order, *, outcome: str | BrokerError, actor: OrderActor, desk: OrderDesk,
                 action: str) -> Order | None:
    """Apply and audit a send's outcome: Kite's order_id, or the broker's error."""
    account = order.account
    source = "place"
    updated: Order | None
    if isinstance(outcome, BrokerAmbiguousError):
        updated = order_apply_update(account=account, source=source, update={
            "tag": order.tag, "status": OrderStatus.UNKNOWN,
            "status_message": f"Kite's answer was lost ({outcome.message}); resolving from its order book",
        })  # fmt: skip
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.UNKNOWN, account=account,
                           order=order, error_code="kite_answer_lost", request=order.request,
                           response={"error": outcome.message})
        transaction.on_commit(
            lambda: desk.schedule_resolution(order.pk, desk.limits.unknown_check_interval_s)
        )
    elif isinstance(outcome, BrokerError):
        sent = isinstance(outcome, BrokerRejectedError)
        message = outcome.message if sent else f"not sent to Kite: {outcome.message}"
        updated = order_apply_update(account=account, source=source,
                                     update={"tag": order.tag, "status": OrderStatus.REJECTED,
                                             "status_message": message})
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.REJECTED, account=account,
                           order=order, error_code="kite_rejected" if sent else "kite_unreachable",
                           request=order.request, response={"error": message, "error_type": outcome.error_type})
    else:
        updated = order_apply_update(account=account, source=source, update={
            "order_id": outcome, "tag": order.tag, "status": OrderStatus.PUT_ORDER_REQ_RECEIVED,
        })  # fmt: skip
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.OK, account=account,
                           order=order, request=order.request, response={"order_id": outcome})
    return updated


# --- resolving UNKNOWN orders ------------------------------------------------------------------

Resolution = Literal["settled", "resolved", "waiting", "resent", "given_up"]


def order_resolve_unknown(*, order_id: int, desk: OrderDesk) -> Resolution:
    """Settle an UNKNOWN order from Kite's order book; re-send only once Kite has shown none.

    A PENDING order (its placing process stopped) is settled too: one whose send was claimed
    is looked for like an UNKNOWN one; one never sent is given up after the grace period
    rather than sent late. Once every order of a placement is settled, the placement's
    answer is stored (a key whose first request died gets an answer). "waiting" (and
    "resent", when the re-send's answer was lost too) mean: ask again later.
    """
    order = Order.objects.select_related("account", "placement").filter(pk=order_id).first()
    if order is None or order.status not in (OrderStatus.UNKNOWN, OrderStatus.PENDING):
        return "settled"
    actor = OrderActor(user=None, origin="task")
    if order.status == OrderStatus.PENDING and order.sent_at is None:
        return _pending_never_sent(order, actor=actor, desk=desk)
    # UNKNOWN, or PENDING with a send claimed: the placing process stopped while sending.
    outcome = _resolve_from_book(order, actor=actor, desk=desk)
    if order.placement is not None and outcome in ("resolved", "given_up"):
        _placement_answer(order.placement)
    return outcome


def _pending_never_sent(order: Order, *, actor: OrderActor, desk: OrderDesk) -> Resolution:
    """An order stored but never sent (its process stopped first): given up, not sent late."""
    if (desk.now() - order.created_at).total_seconds() < desk.limits.unknown_grace_s:
        return "waiting"
    message = "not sent: the placing process stopped before sending it; place it again with a new key"
    order_apply_update(account=order.account, source="resolve",
                       update={"tag": order.tag, "status": OrderStatus.REJECTED, "status_message": message})
    order_audit_record(actor=actor, action=OrderAudit.Action.RESOLVE, outcome=OrderAudit.Outcome.REJECTED,
                       account=order.account, order=order, error_code="not_sent", response={"message": message})
    if order.placement is not None and not order.placement.orders.filter(status=OrderStatus.PENDING).exists():
        _placement_answer(order.placement)
    return "given_up"


def _resolve_from_book(order: Order, *, actor: OrderActor, desk: OrderDesk) -> Resolution:
    broker = desk.broker_for(order.account)
    try:
        book = broker.orders()
    except BrokerError as exc:
        log.warning("order.resolve_book_unavailable", order=order.pk, error=exc.message)
        return "waiting"
    matches = sorted(
        (o for o in book if o.get("tag") == order.tag),
        key=lambda o: str(o.get("order_timestamp") or ""),
    )
    if matches:
        for match in matches:
            order_apply_update(account=order.account, update=match, source="orderbook")
        order.refresh_from_db()
        order_audit_record(actor=actor, action=OrderAudit.Action.RESOLVE, outcome=OrderAudit.Outcome.OK,
                           account=order.account, order=order,
                           response={"order_id": order.kite_order_id, "status": order.status})
        return "resolved" if order.status != OrderStatus.UNKNOWN else "waiting"
    waited_s = (desk.now() - order.sent_at).total_seconds() if order.sent_at else desk.limits.unknown_grace_s
    if waited_s < desk.limits.unknown_grace_s:
        return "waiting"
    if order.send_attempts >= desk.limits.max_send_attempts:
        message = (f"not placed: Kite had no order with tag {order.tag} {desk.limits.unknown_grace_s:.0f} s "
                   f"after each of {order.send_attempts} sends; given up")
        order_apply_update(account=order.account, source="orderbook",
                           update={"tag": order.tag, "status": OrderStatus.REJECTED, "status_message": message})
        order_audit_record(actor=actor, action=OrderAudit.Action.RESOLVE, outcome=OrderAudit.Outcome.REJECTED,
                           account=order.account, order=order, error_code="not_placed",
                           response={"message": message})
        return "given_up"
    order = order_send(order=order, broker=broker, actor=actor, desk=desk, action=OrderAudit.Action.RESEND)
    return "resent" if order.status == OrderStatus.UNKNOWN else "resolved"


# --- modifying, cancelling ---------------------------------------------------------------------


def _require_open(order: Order, what: str) -> None:
    if order.status not in OPEN_STATUSES or not order.kite_order_id:
        raise OrderRefused(
            "order_not_open", f"order {order.pk} is {order.status}: it cannot be {what}", status=409
        )


def _kite_failure(exc: BrokerError) -> OrderRefused:
    if isinstance(exc, BrokerRejectedError):
        return OrderRefused("kite_rejected", exc.message, status=422)
    return OrderRefused("kite_unreachable", f"not sent to Kite: {exc.message}", status=503)


def order_modify(*, actor: OrderActor, order: Order, changes: ModifyParams, desk: OrderDesk) -> ActionResult:
    """Send a modification of an open order; its effect arrives through the order updates."""
    account = order.account
    request = {"order_id": order.pk, **changes.model_dump(exclude_none=True)}
    try:
        _require_open(order, "modified")
        account_tradable_check(account)
        switch = _global_switch()
        kill_switches_check(account=account, global_halted=switch.halted, global_reason=switch.reason)
        facts, _ = instrument_facts(exchange=order.exchange, tradingsymbol=order.tradingsymbol)
        price = changes.price or changes.trigger_price or float(order.price or order.trigger_price) or None
        order_check(account=account, instrument=facts, product=order.product,
                    quantity=changes.quantity or order.quantity, reference_price=price, day_pnl=None)
        if order.modification_count >= desk.limits.max_modifications:
            raise OrderRefused(
                "modification_limit_reached",
                f"order {order.pk} was modified {order.modification_count} times, Kite's limit is "
                f"{desk.limits.max_modifications}: cancel it and place a new one",
                status=409,
            )
        _rate_check(desk=desk, account=account, cost=1)
        claimed = Order.objects.filter(
            pk=order.pk, modification_count__lt=desk.limits.max_modifications
        ).update(modification_count=F("modification_count") + 1)
        if not claimed:
            raise OrderRefused("modification_limit_reached",
                               f"order {order.pk} reached Kite's {desk.limits.max_modifications} modifications",
                               status=409)
    except OrderRefused as refused:
        order_audit_record(actor=actor, action=OrderAudit.Action.MODIFY, outcome=OrderAudit.Outcome.REFUSED,
                           account=account, order=order, error_code=refused.code, request=request,
                           response={"message": refused.message})
        raise
    params = {"variety": order.variety, **changes.model_dump(exclude_none=True)}
    return _broker_call(
        actor=actor, order=order, action=OrderAudit.Action.MODIFY, request=request,
        call=lambda broker: broker.modify_order(order_id=order.kite_order_id, params=params), desk=desk,
    )  # fmt: skip


def order_cancel(*, actor: OrderActor, order: Order, desk: OrderDesk) -> ActionResult:
    """Cancel an open order (for a cover order, exit it); never refused by kill switches or limits."""
    action = OrderAudit.Action.EXIT if order.variety == "co" else OrderAudit.Action.CANCEL
    request = {"order_id": order.pk, "kite_order_id": order.kite_order_id, "variety": order.variety}
    try:
        _require_open(order, "cancelled")
    except OrderRefused as refused:
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.REFUSED, account=order.account,
                           order=order, error_code=refused.code, request=request,
                           response={"message": refused.message})
        raise
    return _broker_call(
        actor=actor, order=order, action=action, request=request, desk=desk,
        call=lambda broker: broker.cancel_order(order_id=order.kite_order_id, variety=order.variety),
    )  # fmt: skip


def _broker_call(*, actor: OrderActor, order: Order, action: str, request: dict,
                 call: Callable[[Broker], str], desk: OrderDesk) -> ActionResult:
    account = order.account
    try:
        kite_order_id = call(desk.broker_for(account))
    except BrokerAmbiguousError as exc:
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.UNKNOWN, account=account,
                           order=order, error_code="kite_answer_lost", request=request,
                           response={"error": exc.message})
        order.refresh_from_db()
        return ActionResult(status=202, body={
            "outcome": "unknown", "message": f"Kite's answer was lost ({exc.message}); the order updates will tell",
            "order": order_view(order),
        })  # fmt: skip
    except BrokerError as exc:
        refused = _kite_failure(exc)
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.REJECTED, account=account,
                           order=order, error_code=refused.code, request=request,
                           response={"error": exc.message, "error_type": exc.error_type})
        raise refused from None
    order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.OK, account=account, order=order,
                       request=request, response={"order_id": kite_order_id})
    order.refresh_from_db()
    return ActionResult(status=200, body={"outcome": "sent", "order": order_view(order)})


# --- account-wide actions ----------------------------------------------------------------------


def orders_stale(*, desk: OrderDesk) -> list[int]:
    """Orders to resolve: every UNKNOWN one, and PENDING ones older than the grace period."""
    before = desk.now() - dt.timedelta(seconds=desk.limits.unknown_grace_s)
    stale = Q(status=OrderStatus.UNKNOWN) | Q(status=OrderStatus.PENDING, created_at__lt=before)
    return list(Order.objects.filter(stale).order_by("pk").values_list("pk", flat=True)[:500])


def orders_refresh_from_broker(*, account: KiteAccount, broker: Broker) -> int:
    """Apply the broker's order book to our orders; how many changed."""
    changed = 0
    for entry in broker.orders():
        if order_apply_update(account=account, update=entry, source="orderbook") is not None:
            changed += 1
    return changed


def account_cancel_all(*, actor: OrderActor, account: KiteAccount, desk: OrderDesk) -> ActionResult:
    """Cancel every open order of the account, after reading Kite's order book for the truth."""
    broker = desk.broker_for(account)
    try:
        orders_refresh_from_broker(account=account, broker=broker)
    except BrokerError as exc:
        log.warning("orders.cancel_all_book_unavailable", account_id=account.pk, error=exc.message)
    results = []
    for order in Order.objects.filter(account=account, status__in=OPEN_STATUSES, kite_order_id__isnull=False):
        try:
            outcome = order_cancel(actor=actor, order=order, desk=desk).body.get("outcome", "sent")
        except OrderRefused as refused:
            outcome = refused.code
        results.append({"id": order.pk, "kite_order_id": order.kite_order_id, "outcome": outcome})
    order_audit_record(actor=actor, action=OrderAudit.Action.CANCEL_ALL, outcome=OrderAudit.Outcome.OK,
                       account=account, response={"orders": results})
    return ActionResult(status=200, body={"account_id": account.pk, "orders": results})


def account_square_off(*, actor: OrderActor, account: KiteAccount, desk: OrderDesk) -> ActionResult:
    """Close every open net position with an opposite MARKET order (kill switches do not stop it)."""
    broker = desk.broker_for(account)
    try:
        positions = broker.positions()
    except BrokerError as exc:
        refused = _kite_failure(exc)
        order_audit_record(actor=actor, action=OrderAudit.Action.SQUARE_OFF, outcome=OrderAudit.Outcome.REJECTED,
                           account=account, error_code=refused.code, response={"error": exc.message})
        raise refused from None
    PositionSnapshot.objects.create(account=account, taken_at=desk.now(), net=positions["net"],
                                    day=positions["day"], source="square_off")
    batch = uuid.uuid4().hex
    results = []
    for row in positions["net"]:
        quantity = int(row.get("quantity") or 0)
        if not quantity:
            continue
        params = OrderParams(
            account_id=account.pk, exchange=row["exchange"], tradingsymbol=row["tradingsymbol"],
            transaction_type="SELL" if quantity > 0 else "BUY", order_type="MARKET",
            quantity=abs(quantity), product=row["product"],
        )  # fmt: skip
        key = f"square-off:{batch}:{row['exchange']}:{row['tradingsymbol']}:{row['product']}"
        try:
            answer = order_place(actor=actor, account=account, idempotency_key=key, params=params,
                                 desk=desk, risk_reducing=True)
            outcome = {"status": answer.status, "orders": [
                {"id": o["id"], "status": o["status"]}
                for o in answer.body.get("orders", answer.body.get("error", {}).get("orders", []))
            ]}  # fmt: skip
        except OrderRefused as refused:
            outcome = {"status": refused.status, "code": refused.code, "message": refused.message}
        results.append({"exchange": row["exchange"], "tradingsymbol": row["tradingsymbol"],
                        "product": row["product"], "quantity": quantity, **outcome})
    order_audit_record(actor=actor, action=OrderAudit.Action.SQUARE_OFF, outcome=OrderAudit.Outcome.OK,
                       account=account, response={"positions": results})
    return ActionResult(status=200, body={"account_id": account.pk, "positions": results})


def trading_switch_set(*, actor: OrderActor, halted: bool, reason: str, account: KiteAccount | None = None) -> None:
    """Turn the global (no account) or an account's kill switch on or off; audited."""
    now = timezone.now()
    with transaction.atomic():
        if account is None:
            TradingSwitch.objects.update_or_create(
                pk=TradingSwitch.SINGLETON_PK,
                defaults={"halted": halted, "reason": reason, "changed_at": now,
                          "changed_by": actor.user if getattr(actor.user, "pk", None) else None},
            )
        else:
            KiteAccount.objects.filter(pk=account.pk).update(
                kill_switch=halted, kill_switch_reason=reason, updated_at=now
            )
        order_audit_record(actor=actor, action=OrderAudit.Action.KILL_SWITCH, outcome=OrderAudit.Outcome.OK,
                           account=account, request={"halted": halted, "reason": reason,
                                                     "scope": "account" if account else "global"})
    log.warning("orders.kill_switch", halted=halted, scope="account" if account else "global",
                account_id=getattr(account, "pk", None), reason=reason)
