"""HTTP API v1: orders (place, list, modify, cancel/exit) and the account-wide emergency actions.

Every endpoint needs the ``trade`` scope (a session: the ``accounts.trade`` permission) and
acts only on accounts granted to the caller; every action is audited. Thin: parse, check,
call ``accounts/order_actions.py``, render. docs/orders.md and docs/http-api.md.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

import orjson
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from ninja import Header, Query, Router, Schema

from accounts.models import ApiToken, KiteAccount, OrderAudit
from accounts.order_actions import (
    ActionResult,
    ModifyParams,
    OrderActor,
    OrderDesk,
    OrderParams,
    account_cancel_all,
    account_square_off,
    order_audit_record,
    order_cancel,
    order_modify,
    order_place,
    order_view,
)
from accounts.order_checks import OrderRefused
from accounts.order_desk import order_desk_from_settings
from accounts.order_models import IDEMPOTENCY_KEY_MAX_LENGTH, OrderStatus
from accounts.order_selectors import accounts_tradable_by, order_get_visible, orders_list
from tickerproj.api_support import ApiError, caller_user, error_response, require_scope

router = Router(tags=["orders"])

IDEMPOTENCY_KEY_PATTERN = re.compile(rf"^[\x21-\x7e]{{1,{IDEMPOTENCY_KEY_MAX_LENGTH}}}$")
ORDERS_PAGE_MAX = 500


def _actor(request: HttpRequest) -> OrderActor:
    principal = request.auth
    return OrderActor(
        user=caller_user(request),
        token_prefix=principal.prefix if isinstance(principal, ApiToken) else "",
        origin="api", remote_addr=request.META.get("REMOTE_ADDR"),
    )  # fmt: skip


def _require_trade(request: HttpRequest, *, action: str, request_body: dict) -> OrderActor:
    """The trade scope, or a refusal that is audited like every other."""
    actor = _actor(request)
    try:
        require_scope(request, ApiToken.Scope.TRADE)
    except ApiError as exc:
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.REFUSED,
                           error_code=exc.code, request=request_body, response={"message": exc.message})
        raise
    return actor


def _granted_account(actor: OrderActor, *, account_id: int, action: str, request_body: dict) -> KiteAccount:
    account = accounts_tradable_by(user=actor.user).filter(pk=account_id).first()
    if account is None:
        message = f"account {account_id} is not granted to you for trading"
        order_audit_record(actor=actor, action=action, outcome=OrderAudit.Outcome.REFUSED,
                           account=KiteAccount.objects.filter(pk=account_id).first(),
                           error_code="account_not_granted", request=request_body, response={"message": message})
        raise ApiError(403, "account_not_granted", message, field="account_id")
    return account


def _desk() -> OrderDesk:
    try:
        return order_desk_from_settings()
    except ImproperlyConfigured as exc:
        raise ApiError(503, "orders_unavailable", str(exc)) from None


def _json(result: ActionResult) -> HttpResponse:
    return HttpResponse(orjson.dumps(result.body), status=result.status, content_type="application/json")


def _refusal(request: HttpRequest, refused: OrderRefused) -> HttpResponse:
    response = error_response(request, status=refused.status, code=refused.code, message=refused.message,
                              field=refused.field)
    if refused.retry_after_s is not None:
        response["Retry-After"] = str(max(1, math.ceil(refused.retry_after_s)))
    return response


@router.post("/orders", summary="Place an order (Idempotency-Key required)")
def order_create(
    request, payload: OrderParams,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
):
    body = payload.model_dump()
    actor = _require_trade(request, action=OrderAudit.Action.PLACE, request_body=body)
    if not idempotency_key:
        raise ApiError(400, "idempotency_key_required",
                       "send an Idempotency-Key header (a new unique value per order)", field="Idempotency-Key")
    if not IDEMPOTENCY_KEY_PATTERN.match(idempotency_key):
        raise ApiError(400, "idempotency_key_invalid",
                       f"the Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX_LENGTH} visible ASCII characters",
                       field="Idempotency-Key")
    account = _granted_account(actor, account_id=payload.account_id, action=OrderAudit.Action.PLACE,
                               request_body=body)
    try:
        result = order_place(actor=actor, account=account, idempotency_key=idempotency_key, params=payload,
                             desk=_desk())
    except OrderRefused as refused:
        return _refusal(request, refused)
    return _json(result)


class OrderFilters(Schema):
    account_id: int | None = None
    status: list[str] | None = None
    limit: int = 100


@router.get("/orders", summary="Orders on the accounts you may trade, newest first")
def order_list(request, filters: Query[OrderFilters]):
    require_scope(request, ApiToken.Scope.TRADE)
    if not 1 <= filters.limit <= ORDERS_PAGE_MAX:
        raise ApiError(400, "invalid_request", f"limit must be in [1, {ORDERS_PAGE_MAX}]", field="limit")
    unknown = sorted(set(filters.status or ()) - set(OrderStatus.values))
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown status {unknown}; expected some of {OrderStatus.values}",
                       field="status")
    orders = orders_list(
        user=caller_user(request),
        account_ids=[filters.account_id] if filters.account_id is not None else None,
        statuses=filters.status,
    )[: filters.limit]
    return HttpResponse(orjson.dumps({"orders": [order_view(o) for o in orders]}), content_type="application/json")


def _visible_order(request, order_id: int):
    order = order_get_visible(user=caller_user(request), order_id=order_id)
    if order is None:
        raise ApiError(404, "unknown_order", f"no order {order_id} on an account you may see", field="order_id")
    return order


@router.get("/orders/{order_id}", summary="One order, with its status history")
def order_detail(request, order_id: int):
    require_scope(request, ApiToken.Scope.TRADE)
    return HttpResponse(orjson.dumps(order_view(_visible_order(request, order_id))), content_type="application/json")


@router.patch("/orders/{order_id}", summary="Modify an open order")
def order_update(request, order_id: int, payload: ModifyParams):
    body = {"order_id": order_id, **payload.model_dump(exclude_none=True)}
    actor = _require_trade(request, action=OrderAudit.Action.MODIFY, request_body=body)
    order = _visible_order(request, order_id)
    _granted_account(actor, account_id=order.account_id, action=OrderAudit.Action.MODIFY, request_body=body)
    try:
        return _json(order_modify(actor=actor, order=order, changes=payload, desk=_desk()))
    except OrderRefused as refused:
        return _refusal(request, refused)


@router.delete("/orders/{order_id}", summary="Cancel an open order (exit a cover order)")
def order_delete(request, order_id: int):
    body = {"order_id": order_id}
    actor = _require_trade(request, action=OrderAudit.Action.CANCEL, request_body=body)
    order = _visible_order(request, order_id)
    _granted_account(actor, account_id=order.account_id, action=OrderAudit.Action.CANCEL, request_body=body)
    try:
        return _json(order_cancel(actor=actor, order=order, desk=_desk()))
    except OrderRefused as refused:
        return _refusal(request, refused)


@router.post("/accounts/{account_id}/orders/cancel-all", summary="Cancel every open order of an account")
def account_orders_cancel_all(request, account_id: int):
    body = {"account_id": account_id}
    actor = _require_trade(request, action=OrderAudit.Action.CANCEL_ALL, request_body=body)
    account = _granted_account(actor, account_id=account_id, action=OrderAudit.Action.CANCEL_ALL, request_body=body)
    return _json(account_cancel_all(actor=actor, account=account, desk=_desk()))


@router.post("/accounts/{account_id}/positions/square-off", summary="Close every open position of an account")
def account_positions_square_off(request, account_id: int):
    body = {"account_id": account_id}
    actor = _require_trade(request, action=OrderAudit.Action.SQUARE_OFF, request_body=body)
    account = _granted_account(actor, account_id=account_id, action=OrderAudit.Action.SQUARE_OFF, request_body=body)
    try:
        return _json(account_square_off(actor=actor, account=account, desk=_desk()))
    except OrderRefused as refused:
        return _refusal(request, refused)
