"""``POST /api/v1/kite/postback``: verified by Kite's checksum, idempotent, never backwards.

In-process through Django's test client on the real PostgreSQL; the end-to-end path (the
simulator posting to a real daphne) is in test_order_updates_e2e.py.
"""

from __future__ import annotations

import logging

import orjson
import pytest

from accounts.models import KiteAccount, Order, OrderStatus
from streaming.kite.postback import MAX_POSTBACK_BYTES, postback_checksum

pytestmark = pytest.mark.django_db

URL = "/api/v1/kite/postback"
SECRET = "postback-secret-9f2c"
OTHER_SECRET = "other-secret-71aa"


@pytest.fixture
def account():
    return KiteAccount.objects.create(
        label="pb", api_key="pb-key", api_secret=SECRET, kite_user_id="ZS0001"
    )


def postback(order_id="250000000000001", *, status="OPEN", filled=0, at="2026-12-04 10:00:00",
             secret=SECRET, user_id="ZS0001", **extra) -> dict:
    body = {
        "user_id": user_id, "unfilled_quantity": 75 - filled, "app_id": 1234,
        "placed_by": user_id, "order_id": order_id, "exchange_order_id": None,
        "parent_order_id": None, "status": status, "status_message": None,
        "status_message_raw": None, "order_timestamp": "2026-12-04 10:00:00",
        "exchange_update_timestamp": at, "exchange_timestamp": at, "variety": "regular",
        "exchange": "NFO", "tradingsymbol": "NIFTY26DEC24000CE", "instrument_token": 10240001,
        "order_type": "LIMIT", "transaction_type": "BUY", "validity": "DAY", "product": "NRML",
        "quantity": 75, "disclosed_quantity": 0, "price": 120.5, "trigger_price": 0,
        "average_price": 120.5 if filled else 0, "filled_quantity": filled,
        "pending_quantity": 75 - filled, "cancelled_quantity": 0, "market_protection": 0,
        "meta": {}, "tag": None, "guid": "abc",
        **extra,
    }  # fmt: skip
    body["checksum"] = postback_checksum(
        order_id=order_id, order_timestamp=body["order_timestamp"], api_secret=secret
    )
    return body


def post(client, body: dict | bytes):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(URL, data=data, content_type="application/json")


def logged_text(caplog) -> str:
    return "\n".join(f"{r.getMessage()} {r.msg!r}" for r in caplog.records)


def test_a_verified_postback_updates_the_order_and_a_replay_changes_nothing(client, account):
    response = post(client, postback(status="COMPLETE", filled=75))
    assert response.status_code == 200, response.content
    assert response.json() == {"order_id": "250000000000001", "account": account.pk, "applied": True}
    order = Order.objects.get(account=account, kite_order_id="250000000000001")
    assert (order.status, order.filled_quantity) == ("COMPLETE", 75)
    assert [h["source"] for h in order.status_history] == ["postback"]

    replay = post(client, postback(status="COMPLETE", filled=75))
    assert replay.status_code == 200 and replay.json()["applied"] is False
    order.refresh_from_db()
    assert len(order.status_history) == 1


def test_a_wrong_checksum_is_403_changes_nothing_and_logs_no_secret(client, account, caplog):
    post(client, postback(status="OPEN"))
    forged = postback(status="CANCELLED", secret=OTHER_SECRET)
    with caplog.at_level(logging.INFO):
        response = post(client, forged)
        tampered = postback(status="OPEN", filled=0)
        tampered["status"] = "REJECTED"  # the checksum covers the id and stamp only, not this
        tampered["order_timestamp"] = "2026-12-04 10:00:09"
        also = post(client, tampered)
        missing = post(client, {k: v for k, v in postback().items() if k != "checksum"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "invalid_checksum"
    assert also.status_code == 403
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "checksum"
    order = Order.objects.get(account=account, kite_order_id="250000000000001")
    assert order.status == "OPEN" and len(order.status_history) == 1
    text = logged_text(caplog) + response.content.decode() + also.content.decode()
    assert "postback.refused" in text
    for secret in (SECRET, OTHER_SECRET, forged["checksum"], tampered["checksum"]):
        assert secret not in text


def test_out_of_order_postbacks_never_move_an_order_backwards(client, account):
    for status, filled, at in [
        ("COMPLETE", 75, "2026-12-04 10:00:05"),
        ("OPEN", 25, "2026-12-04 10:00:02"),  # a partial fill overtaken by the completion
        ("OPEN", 0, "2026-12-04 10:00:00"),
    ]:
        assert post(client, postback(status=status, filled=filled, at=at)).status_code == 200
    order = Order.objects.get(account=account, kite_order_id="250000000000001")
    assert (order.status, order.filled_quantity, order.pending_quantity) == ("COMPLETE", 75, 0)
    assert [h["status"] for h in order.status_history] == ["COMPLETE"]


def test_the_account_is_the_one_whose_secret_signed_it(client, account):
    # Same Kite user on another app (api_key): only its own secret verifies its postbacks.
    other = KiteAccount.objects.create(
        label="pb2", api_key="pb2-key", api_secret=OTHER_SECRET, kite_user_id="ZS0001"
    )
    fresh = KiteAccount.objects.create(label="pb3", api_key="pb3-key", api_secret="fresh-secret")
    assert post(client, postback("1", secret=OTHER_SECRET)).json()["account"] == other.pk
    assert post(client, postback("2", secret=SECRET)).json()["account"] == account.pk
    # An account not logged in yet (no Kite user id known) is tried after those of the user.
    assert post(client, postback("3", secret="fresh-secret")).json()["account"] == fresh.pk
    assert Order.objects.filter(account=account).count() == 1


def test_bad_bodies_get_precise_errors_never_a_500(client, account):
    too_big = post(client, b'{"pad": "' + b"x" * MAX_POSTBACK_BYTES + b'"}')
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    not_json = post(client, b"{not json")
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_request"
    not_object = post(client, b"[1, 2]")
    assert not_object.status_code == 400
    bad_quantity = post(client, postback(filled=-5))
    assert bad_quantity.status_code == 400
    assert bad_quantity.json()["error"]["code"] == "invalid_update"
    assert not Order.objects.filter(account=account).exclude(status=OrderStatus.PENDING).exists()
