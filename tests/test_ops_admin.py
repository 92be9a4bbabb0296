"""The admin as ops use it: engines and leases read-only, accounts with the engine streaming
them, and the instrument list's expiry filter offering the upcoming expiries."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from accounts.models import KiteAccount
from streaming.models import AccountLease, EngineHeartbeat
from subscriptions.models import Instrument
from tests.conftest import make_option

pytestmark = pytest.mark.django_db


def engine_with(label: str, *, instruments: int, last_tick_age_s: float, engine_id: str) -> None:
    now = timezone.now()
    EngineHeartbeat.objects.create(
        engine_id=engine_id, hostname="h", pid=1, started_at=now, updated_at=now,
        state={"mode": "live", "streamed_count": instruments,
               "accounts": {label: {"instruments": instruments, "last_tick_age_s": last_tick_age_s}}},
    )


def leased(account: KiteAccount, owner: str, *, expires_in_s: float = 15) -> None:
    now = timezone.now()
    AccountLease.objects.create(account=account, owner=owner, acquired_at=now, renewed_at=now,
                                expires_at=now + dt.timedelta(seconds=expires_in_s))


def test_engines_and_leases_are_listed_read_only(admin_client):
    account = KiteAccount.objects.create(label="acc1", api_key="k1")
    engine_with("acc1", instruments=120, last_tick_age_s=0.4, engine_id="host:1:aaaa")
    leased(account, "host:1:aaaa")
    html = admin_client.get("/admin/streaming/engineheartbeat/").content.decode()
    assert "host:1:aaaa" in html and "live" in html and "acc1" in html
    html = admin_client.get("/admin/streaming/accountlease/").content.decode()
    assert "host:1:aaaa" in html
    assert admin_client.get("/admin/streaming/engineheartbeat/add/").status_code == 403
    assert admin_client.get("/admin/streaming/accountlease/add/").status_code == 403
    change = admin_client.get(f"/admin/streaming/accountlease/{account.pk}/change/")
    assert change.status_code == 200 and 'type="submit" value="Save"' not in change.content.decode()
    delete = admin_client.post(f"/admin/streaming/accountlease/{account.pk}/delete/", {"post": "yes"})
    assert delete.status_code == 403 and AccountLease.objects.count() == 1


def test_the_account_list_shows_engine_tick_age_capacity_and_expiry(
    admin_client, django_assert_max_num_queries
):
    expires = timezone.now() + dt.timedelta(hours=3)
    for n in range(1, 6):
        account = KiteAccount.objects.create(
            label=f"acc{n}", api_key=f"k{n}", access_token="tok", token_expires_at=expires
        )
        if n <= 3:
            engine_with(f"acc{n}", instruments=100 * n, last_tick_age_s=2.0, engine_id=f"host:{n}:e")
            leased(account, f"host:{n}:e", expires_in_s=15 if n < 3 else -1)  # acc3's lease lapsed
    with django_assert_max_num_queries(12):
        response = admin_client.get("/admin/accounts/kiteaccount/")
    rows = {obj.label: obj for obj in response.context["cl"].result_list}
    model_admin = response.context["cl"].model_admin
    assert model_admin.engine_display(rows["acc1"]) == "host:1:e"
    assert model_admin.last_tick_display(rows["acc1"]) in ("2 s ago", "3 s ago")
    assert model_admin.capacity_display(rows["acc2"]) == "200 / 9000"
    assert model_admin.engine_display(rows["acc3"]) == "-"  # no live lease: nobody streams it
    assert model_admin.capacity_display(rows["acc3"]) == "0 / 9000"
    assert model_admin.last_tick_display(rows["acc5"]) == "-"
    html = response.content.decode().lower()
    assert "streamed by" in html and "instruments / capacity" in html and "host:2:e" in html


def test_the_expiry_filter_offers_upcoming_expiries_and_expired(admin_client):
    today = timezone.localdate()
    dates = [today - dt.timedelta(days=7), today, today + dt.timedelta(days=7), today + dt.timedelta(days=35)]
    Instrument.objects.bulk_create([
        make_option(token=100 + i, name="NIFTY", expiry=d, strike=24000 + 50 * i, kind="CE") for i, d in enumerate(dates)
    ])
    response = admin_client.get("/admin/subscriptions/instrument/")
    (expiry_filter,) = [f for f in response.context["cl"].filter_specs if f.title == "expiry"]
    offered = [value for value, _ in expiry_filter.lookup_choices]
    assert offered == [d.isoformat() for d in dates[1:]] + ["expired"]
    chosen = admin_client.get(f"/admin/subscriptions/instrument/?expiry={dates[2].isoformat()}")
    assert [i.expiry for i in chosen.context["cl"].result_list] == [dates[2]]
    expired = admin_client.get("/admin/subscriptions/instrument/?expiry=expired")
    assert [i.expiry for i in expired.context["cl"].result_list] == [dates[0]]
    assert admin_client.get("/admin/subscriptions/instrument/?expiry=garbage").status_code == 200


def chain_of(expiry: dt.date, *, token0: int) -> list[Instrument]:
    rows = [
        make_option(token=token0 + 2 * k + (kind == "PE"), name="NIFTY", expiry=expiry,
                    strike=23500 + 100 * k, kind=kind)
        for k in range(11) for kind in ("CE", "PE")
    ]
    return Instrument.objects.bulk_create(rows)


def test_subscribe_chain_from_the_instrument_list(admin_client):
    from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME

    from subscriptions.models import Subscription

    today = timezone.localdate()
    near, far = today + dt.timedelta(days=7), today + dt.timedelta(days=35)
    first = chain_of(near, token0=1000)
    chain_of(far, token0=2000)
    url = "/admin/subscriptions/instrument/"
    selected = {"action": "subscribe_chain", ACTION_CHECKBOX_NAME: [first[0].pk]}
    form_page = admin_client.post(url, selected)
    assert form_page.status_code == 200
    assert form_page.context["form"].fields["expiries"].choices == [
        (near.isoformat(), f"{near:%d %b %Y}"), (far.isoformat(), f"{far:%d %b %Y}")
    ]
    # No price in the registry and none entered: the form says so, nothing is subscribed.
    apply = {**selected, "apply": "1", "underlying": "NIFTY", "expiries": [near.isoformat(), far.isoformat()],
             "strikes_each_side": "2", "mode": "quote"}
    assert "no price known for NIFTY" in admin_client.post(url, apply).content.decode()
    assert Subscription.objects.count() == 0

    response = admin_client.post(url, {**apply, "around_price": "24020"}, follow=True)
    assert "Subscribed 20 NIFTY option(s) around 24020" in response.content.decode()
    subs = Subscription.objects.select_related("instrument")
    assert {s.instrument.strike for s in subs} == {23800, 23900, 24000, 24100, 24200}
    assert {s.instrument.expiry for s in subs} == {near, far}
    assert {(s.mode, s.status) for s in subs} == {("quote", "active")}


def test_subscribe_chain_needs_one_underlying_and_the_add_permission(admin_client, client):
    from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
    from django.contrib.auth.models import Permission, User

    today = timezone.localdate()
    nifty = chain_of(today + dt.timedelta(days=7), token0=1000)
    other = Instrument.objects.bulk_create([
        make_option(token=5000, name="BANKNIFTY", expiry=today + dt.timedelta(days=7), strike=50000, kind="CE")
    ])
    both = {"action": "subscribe_chain", ACTION_CHECKBOX_NAME: [nifty[0].pk, other[0].pk]}
    response = admin_client.post("/admin/subscriptions/instrument/", both, follow=True)
    assert "Select instruments of one underlying (got BANKNIFTY, NIFTY)" in response.content.decode()

    viewer = User.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_instrument"))
    client.force_login(viewer)
    page = client.get("/admin/subscriptions/instrument/")
    assert "Subscribe chain" not in page.content.decode()
