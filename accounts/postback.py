"""``POST /api/v1/kite/postback``: Kite's order postbacks (webhooks), verified, then applied.

Kite posts the order document to the app's registered postback URL with ``checksum`` =
SHA-256 of ``order_id + order_timestamp + api_secret``. The body names the Kite user, not
the app: the accounts of that user (those not yet logged in, whose user id is unknown, after
them) are tried until one's API secret gives the checksum. Anything else is a 403, logged
with the order id, the user and the caller's address, never the body or its checksum. A
verified postback goes through ``order_apply_update`` like every other update (idempotent,
never backwards), so a replay changes nothing. No session, no token: the checksum is the
credential; the body is bounded before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.db.models import Case, IntegerField, Value, When
from django.http import HttpRequest
from ninja import Router
from ninja.throttling import AnonRateThrottle
from pydantic import ValidationError

from accounts.fields import DecryptionError
from accounts.models import KiteAccount
from accounts.order_services import OrderUpdateError, order_apply_update
from streaming.kite.postback import MAX_POSTBACK_BYTES, Postback, postback_checksum_valid
from tickerproj.api_support import ApiError

log = structlog.get_logger(__name__)

router = Router(tags=["kite"])

POSTBACK_SOURCE = "postback"


@dataclass(frozen=True, slots=True)
class PostbackOutcome:
    account_id: int
    order_id: str
    applied: bool


def postback_account(*, postback: Postback) -> KiteAccount | None:
    """The account whose API secret signed ``postback``, or None."""
    user_id = postback.user_id or ""
    candidates = (
        KiteAccount.objects.filter(kite_user_id__in=[user_id, ""])
        .annotate(
            unknown_user=Case(
                When(kite_user_id="", then=Value(1)), default=Value(0), output_field=IntegerField()
            )
        )
        .order_by("unknown_user", "pk")
    )
    for account in candidates:
        try:
            secret = account.api_secret
        except DecryptionError:
            log.warning("postback.secret_unreadable", account=account.label)
            continue
        if secret and postback_checksum_valid(postback=postback, api_secret=secret):
            return account
    return None


def postback_receive(*, body: bytes, remote_addr: str | None) -> PostbackOutcome:
    """Verify one postback body and apply it; raises ApiError (400, 403, 413, 503) otherwise."""
    if len(body) > MAX_POSTBACK_BYTES:
        raise ApiError(413, "payload_too_large", f"a postback is at most {MAX_POSTBACK_BYTES} bytes")
    try:
        postback = Postback.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p)[:40] for p in first["loc"]) or None
        log.warning("postback.refused", reason="invalid_body", field=field, remote_addr=remote_addr)
        raise ApiError(400, "invalid_request", f"not a Kite postback: {first['msg']}",
                       field=field) from None
    try:
        account = postback_account(postback=postback)
        if account is None:
            log.warning(
                "postback.refused", reason="checksum_mismatch", order_id=postback.order_id,
                user_id=postback.user_id, remote_addr=remote_addr,
            )  # fmt: skip
            raise ApiError(403, "invalid_checksum",
                           "the checksum matches no account's API secret; nothing was applied")
        update = postback.model_dump(mode="json", exclude={"checksum"})
        try:
            order = order_apply_update(account=account, update=update, source=POSTBACK_SOURCE)
        except OrderUpdateError as exc:
            log.warning("postback.refused", reason="invalid_update", account=account.label,
                        order_id=postback.order_id, field=exc.field)
            raise ApiError(400, "invalid_update", str(exc), field=exc.field) from None
    except DatabaseError as exc:
        log.warning("postback.unavailable", order_id=postback.order_id, error=str(exc)[:200])
        raise ApiError(503, "unavailable",
                       "the database is unavailable; the order sync will catch up") from None
    log.info("postback.received", account=account.label, order_id=postback.order_id,
             status=postback.status, applied=order is not None)
    return PostbackOutcome(account_id=account.pk, order_id=postback.order_id,
                           applied=order is not None)


@router.post(
    "/kite/postback",
    auth=None,
    throttle=[AnonRateThrottle(settings.KITE_POSTBACK_RATE_LIMIT)],
    summary="Kite order postback (webhook)",
    response={200: dict},
)
def kite_postback(request: HttpRequest):
    """Kite's postback: verified by its checksum, applied idempotently; 403 if unverified."""
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_POSTBACK_BYTES:
        raise ApiError(413, "payload_too_large", f"a postback is at most {MAX_POSTBACK_BYTES} bytes")
    try:
        body = request.body
    except RequestDataTooBig:
        raise ApiError(413, "payload_too_large",
                       f"a postback is at most {MAX_POSTBACK_BYTES} bytes") from None
    outcome = postback_receive(body=body, remote_addr=request.META.get("REMOTE_ADDR"))
    return {"order_id": outcome.order_id, "account": outcome.account_id, "applied": outcome.applied}
