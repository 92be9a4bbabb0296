"""The admin's CSV import of subscriptions: a dry-run preview, then confirm; a file with bad rows
imports nothing and names every bad row and why."""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile

from subscriptions.models import Instrument, Subscription
from tests.conftest import make_option
from tests.subscriptions.conftest import make_account

IMPORT_URL = "/admin/subscriptions/subscription/import/"
CONFIRM_URL = "/admin/subscriptions/subscription/process_import/"
EXPIRY = dt.date(2031, 1, 30)


@pytest.fixture
def instruments(db):
    rows = [
        make_option(token=1000 + i, name="NIFTY", expiry=EXPIRY, strike=24000 + 50 * i, kind="CE")
        for i in range(3)
    ]
    Instrument.objects.bulk_create(rows)
    return rows


def upload(client, text: str):
    csv = SimpleUploadedFile("subs.csv", text.encode(), content_type="text/csv")
    return client.post(IMPORT_URL, {"import_file": csv, "format": "0"})


@pytest.mark.django_db
def test_a_good_file_is_previewed_then_imported_on_confirm(admin_client, instruments):
    make_account("main")
    a, b, c = (i.tradingsymbol for i in instruments)
    text = (
        "exchange,tradingsymbol,mode,pinned_account\n"
        f"NFO,{a},ltp,\n"
        f"nfo,{b.lower()},,main\n"
        f"NFO,{c},quote,\n"
    )
    preview = upload(admin_client, text)
    assert preview.status_code == 200
    html = preview.content.decode()
    assert "Confirm import" in html and a in html
    assert Subscription.objects.count() == 0  # the preview is a dry run

    confirm = preview.context["confirm_form"]
    response = admin_client.post(CONFIRM_URL, {**confirm.initial})
    assert response.status_code == 302
    subs = {s.instrument.tradingsymbol: s for s in Subscription.objects.select_related("pinned_account")}
    assert {k: (s.mode, s.status, s.source) for k, s in subs.items()} == {
        a: ("ltp", "active", "manual"), b: ("full", "active", "manual"), c: ("quote", "active", "manual"),
    }
    assert subs[b].pinned_account.label == "main"


@pytest.mark.django_db
def test_a_file_with_bad_rows_imports_nothing_and_lists_every_bad_row(admin_client, instruments):
    a = instruments[0].tradingsymbol
    text = (
        "exchange,tradingsymbol,mode,pinned_account\n"
        f"NFO,{a},full,\n"                         # line 1: good
        "NFO,NIFTY31JAN99999CE,full,\n"            # line 2: no such instrument
        f"NFO,{instruments[1].tradingsymbol},tick,\n"  # line 3: bad mode
        f"NFO,{instruments[2].tradingsymbol},full,nobody\n"  # line 4: no such account
        ",,full,\n"                                # line 5: no symbol
    )
    response = upload(admin_client, text)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Confirm import" not in html
    result = response.context["result"]
    invalid = {row.number: row.error_dict for row in result.invalid_rows}
    assert sorted(invalid) == [2, 3, 4, 5]
    assert "no instrument NFO:NIFTY31JAN99999CE in the registry" in str(invalid[2]["tradingsymbol"])
    assert "'tick' is not one of ltp, quote, full" in str(invalid[3]["mode"])
    assert "no account labelled 'nobody'" in str(invalid[4]["pinned_account"])
    assert "exchange and tradingsymbol are both required" in str(invalid[5]["tradingsymbol"])
    for reason in ("NIFTY31JAN99999CE", "tick", "nobody"):
        assert reason in html
    assert Subscription.objects.count() == 0


@pytest.mark.django_db
def test_a_file_without_the_symbol_columns_is_refused_clearly(admin_client, instruments):
    response = upload(admin_client, "symbol,mode\nX,full\n")
    assert response.status_code == 200
    assert "missing column(s) exchange, tradingsymbol" in response.content.decode()
    assert Subscription.objects.count() == 0


@pytest.mark.django_db
def test_view_only_staff_cannot_import(client, instruments):
    user = User.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_subscription"))
    client.force_login(user)
    assert client.get(IMPORT_URL).status_code == 403
