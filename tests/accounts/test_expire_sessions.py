"""expire_sessions at 06:00 IST: expired tokens are marked, the admin and /health show who must log in."""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings
from django.utils import timezone

from accounts.models import KiteAccount
from accounts.tasks import expire_sessions
from streaming.control import RELOAD_MESSAGE, control_channel

TASK_TIMEOUT_S = 60


def account(label: str, *, expires_in_h: float | None, status=KiteAccount.Status.ACTIVE, token="tok"):  # noqa: S107
    now = timezone.now()
    return KiteAccount.objects.create(
        label=label,
        api_key=f"key-{label}",
        access_token=token,
        token_issued_at=now - dt.timedelta(hours=20),
        token_expires_at=None if expires_in_h is None else now + dt.timedelta(hours=expires_in_h),
        status=status,
    )


def test_expired_tokens_are_marked_on_a_real_worker(celery_worker, redis_client):
    expired = account("expired", expires_in_h=-0.1)
    fresh = account("fresh", expires_in_h=5)
    disabled = account("disabled", expires_in_h=-3, status=KiteAccount.Status.DISABLED)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(control_channel(settings.CHANNEL_LAYER_PREFIX))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    result = expire_sessions.apply_async().get(timeout=TASK_TIMEOUT_S)

    assert result == {"expired": ["expired"]}
    statuses = dict(KiteAccount.objects.values_list("label", "status"))
    assert statuses == {"expired": "session_expired", "fresh": "active", "disabled": "disabled"}
    assert "log in to Kite again" in KiteAccount.objects.get(pk=expired.pk).last_error
    message = pubsub.get_message(timeout=5)
    assert message is not None and message["data"] == RELOAD_MESSAGE
    pubsub.close()
    # Safe to run twice: nothing left to expire, the others untouched.
    assert expire_sessions.apply_async().get(timeout=TASK_TIMEOUT_S) == {"expired": []}
    assert KiteAccount.objects.get(pk=fresh.pk).status == "active"
    assert KiteAccount.objects.get(pk=disabled.pk).status == "disabled"


@pytest.mark.django_db
def test_the_admin_shows_who_needs_a_login(admin_client):
    account("expired", expires_in_h=-1)
    account("fresh", expires_in_h=5)
    account("never-logged-in", expires_in_h=None, token="")
    expire_sessions.apply().get()
    response = admin_client.get("/admin/accounts/kiteaccount/")
    assert response.status_code == 200
    cl = response.context["cl"]
    needs = {obj.label: cl.model_admin.needs_login_display(obj) for obj in cl.result_list}
    assert needs == {"expired": True, "fresh": False, "never-logged-in": True}


@pytest.mark.django_db
def test_health_reports_the_accounts_that_need_a_login(client):
    account("expired", expires_in_h=-1)
    account("stale-token", expires_in_h=-0.5)
    account("fresh", expires_in_h=5)
    account("never-logged-in", expires_in_h=None, token="")
    expire_sessions.apply(kwargs={}).get()
    # A token that lapsed after the job ran is reported too, before anyone marks it.
    KiteAccount.objects.filter(label="fresh").update(token_expires_at=timezone.now() - dt.timedelta(minutes=1))

    response = client.get("/health", HTTP_AUTHORIZATION=f"Bearer {settings.OPS_TOKEN}")
    assert response.status_code == 503
    reasons = response.json()["reasons"]
    assert {"code": "session_expired", "account": "expired"} in reasons
    assert {"code": "session_expired", "account": "stale-token"} in reasons
    assert {"code": "needs_login", "account": "fresh", "why": "token_expired"} in reasons
    assert {"code": "needs_login", "account": "never-logged-in", "why": "no_token"} in reasons
    assert not any(r.get("account") == "expired" and r["code"] == "needs_login" for r in reasons)


@pytest.mark.django_db
def test_a_late_403_for_an_old_token_does_not_expire_a_fresh_login():
    from accounts.services import account_mark_session_expired, account_set_session

    acc = account("relogged", expires_in_h=5, token="tok-old")
    old_issued_at = acc.token_issued_at
    account_set_session(account=acc, access_token="tok-new")
    # The engine reports the 403 it got with the old token after the new login landed.
    assert not account_mark_session_expired(
        account_id=acc.pk, reason="HTTP 403", token_issued_at=old_issued_at
    )
    acc.refresh_from_db()
    assert acc.status == KiteAccount.Status.ACTIVE and acc.last_error == ""
    # A 403 for the token in use does expire it.
    assert account_mark_session_expired(
        account_id=acc.pk, reason="HTTP 403", token_issued_at=acc.token_issued_at
    )
    acc.refresh_from_db()
    assert acc.status == KiteAccount.Status.SESSION_EXPIRED and acc.last_error == "HTTP 403"
