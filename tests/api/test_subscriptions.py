"""Instruments and subscriptions over HTTP: filters, cursor pages, bulk and chain subscribes
through the services, admission against the accounts' capacity, one engine notice."""

import orjson
import pytest
from django.apps import apps

from accounts.models import KiteAccount
from streaming.kite.limits import MAX_INSTRUMENTS_PER_API_KEY
from subscriptions.models import Instrument, Subscription
from tests.api.conftest import auth
from tests.conftest import make_option
from tests.streaming.wsutil import EXPIRY, EXPIRY2, NIFTY_INDEX, STRIKES, option_token

pytestmark = pytest.mark.django_db


def body(response) -> dict:
    return orjson.loads(response.content)


def post(client, path, payload, key):
    return client.post(path, orjson.dumps(payload), content_type="application/json", **auth(key))


@pytest.fixture
def account(db):
    return KiteAccount.objects.create(label="main", api_key="k1", access_token="t")


def engine_notices(callbacks) -> int:
    notify = apps.get_app_config("streaming").change_notifier.notify
    return sum(1 for cb in callbacks if cb == notify)


def test_instrument_search_filters_in_sql_and_pages_by_cursor(client, read_key, universe):
    seen, url, params = [], "/api/v1/instruments", {"underlying": "NIFTY", "type": "CE", "page_size": 4}
    while url:
        page = body(client.get(url, params, **auth(read_key)))
        seen.extend(r["instrument_token"] for r in page["results"])
        url, params = page["next"], {}
    assert seen == sorted(option_token(s, "CE", e) for s in STRIKES for e in (EXPIRY, EXPIRY2))
    found = body(client.get("/api/v1/instruments", {"q": "nifty 5"}, **auth(read_key)))["results"]
    assert [r["instrument_token"] for r in found] == [NIFTY_INDEX]


def test_unknown_instrument_is_404_naming_it(client, read_key, universe):
    response = client.get("/api/v1/instruments/42", **auth(read_key))
    assert response.status_code == 404 and "42" in body(response)["error"]["message"]


def test_underlyings_expiries_and_chain(client, read_key, universe, settings):
    assert body(client.get("/api/v1/underlyings", **auth(read_key))) == ["NIFTY"]
    chain = body(client.get("/api/v1/underlyings/NIFTY/chain", {"expiry": EXPIRY.isoformat()},
                            **auth(read_key)))  # fmt: skip
    assert [row["strike"] for row in chain] == STRIKES
    assert chain[0] == {"strike": STRIKES[0], "ce": option_token(STRIKES[0], "CE"),
                        "pe": option_token(STRIKES[0], "PE")}  # fmt: skip


def test_create_one_sets_source_api_and_notifies_once(
    client, subscribe_key, universe, account, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, "/api/v1/subscriptions",
                        {"exchange": "NSE", "tradingsymbol": "NIFTY 50", "mode": "ltp"}, subscribe_key)  # fmt: skip
    assert response.status_code == 201, response.content
    sub = Subscription.objects.get(instrument_id=NIFTY_INDEX)
    assert (sub.source, sub.mode, sub.status) == ("api", "ltp", "active")
    assert engine_notices(callbacks) == 1


def test_bulk_is_atomic_and_names_unknown_instruments(client, subscribe_key, universe, account):
    items = [{"instrument_token": t} for t in list(universe)[:5]] + [{"instrument_token": 7}]
    response = post(client, "/api/v1/subscriptions/bulk", {"items": items}, subscribe_key)
    assert response.status_code == 404 and "7" in body(response)["error"]["message"]
    assert not Subscription.objects.exists()


def test_bulk_of_5000_in_one_request_and_one_notice(
    client, subscribe_key, account, django_capture_on_commit_callbacks, settings
):
    Instrument.objects.bulk_create(
        make_option(token=50_000_000 + i, name="BIG", expiry=EXPIRY, strike=1000.0 + i, kind="CE")
        for i in range(settings.API_BULK_MAX_ITEMS)
    )
    items = [{"instrument_token": 50_000_000 + i} for i in range(settings.API_BULK_MAX_ITEMS)]
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, "/api/v1/subscriptions/bulk", {"items": items, "mode": "quote"}, subscribe_key)
    assert response.status_code == 201, response.content[:500]
    assert body(response)["count"] == settings.API_BULK_MAX_ITEMS
    assert Subscription.objects.filter(source="api", mode="quote").count() == settings.API_BULK_MAX_ITEMS
    assert engine_notices(callbacks) == 1
    too_many = post(client, "/api/v1/subscriptions/bulk", {"items": [*items, items[0]]}, subscribe_key)
    assert too_many.status_code == 400 and body(too_many)["error"]["field"] == "items"


def test_admission_refuses_what_does_not_fit_with_a_reason_each(client, subscribe_key, account):
    extra = 5
    Instrument.objects.bulk_create(
        make_option(token=60_000_000 + i, name="CAP", expiry=EXPIRY, strike=1000.0 + i, kind="PE")
        for i in range(MAX_INSTRUMENTS_PER_API_KEY + extra)
    )
    tokens = [60_000_000 + i for i in range(MAX_INSTRUMENTS_PER_API_KEY + extra)]
    Subscription.objects.bulk_create(
        Subscription(instrument_id=t) for t in tokens[: MAX_INSTRUMENTS_PER_API_KEY - 2]
    )
    response = post(client, "/api/v1/subscriptions/bulk",
                    {"items": [{"instrument_token": t} for t in tokens[-(extra + 2):]]}, subscribe_key)  # fmt: skip
    assert response.status_code == 409, response.content
    error = body(response)["error"]
    assert error["code"] == "admission_refused"
    assert [r["instrument_token"] for r in error["refusals"]] == tokens[-extra:]
    assert all("9000" in r["reason"] for r in error["refusals"])
    assert Subscription.objects.count() == MAX_INSTRUMENTS_PER_API_KEY - 2  # nothing taken


def test_a_disabled_pinned_account_admits_nothing(client, subscribe_key, universe, account):
    account.status = KiteAccount.Status.DISABLED
    account.save()
    response = post(client, "/api/v1/subscriptions",
                    {"instrument_token": NIFTY_INDEX, "pinned_account": account.pk}, subscribe_key)  # fmt: skip
    assert response.status_code == 409
    assert "disabled" in body(response)["error"]["refusals"][0]["reason"]


def test_chain_subscribe_around_the_money(
    client, subscribe_key, universe, account, django_capture_on_commit_callbacks
):
    # The future's stored price is 24105: the money is the 24100 strike.
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, "/api/v1/subscriptions/chain", {
            "underlying": "NIFTY", "expiries": [EXPIRY.isoformat(), EXPIRY2.isoformat()],
            "strikes_around_atm": 2, "mode": "full",
        }, subscribe_key)  # fmt: skip
    assert response.status_code == 201, response.content
    strikes = {24000.0, 24050.0, 24100.0, 24150.0, 24200.0}
    expected = {option_token(s, k, e) for s in strikes for k in ("CE", "PE") for e in (EXPIRY, EXPIRY2)}
    assert set(Subscription.objects.values_list("instrument_id", flat=True)) == expected
    assert engine_notices(callbacks) == 1
    unknown = post(client, "/api/v1/subscriptions/chain",
                   {"underlying": "NOPE", "expiries": [EXPIRY.isoformat()]}, subscribe_key)  # fmt: skip
    assert unknown.status_code == 404


def test_list_filters_change_and_soft_delete(client, subscribe_key, universe, account):
    post(client, "/api/v1/subscriptions/chain",
         {"underlying": "NIFTY", "expiries": [EXPIRY.isoformat()], "mode": "quote"}, subscribe_key)  # fmt: skip
    token = option_token(24000, "CE")
    listed = body(client.get("/api/v1/subscriptions", {"source": "api", "page_size": 500},
                             **auth(subscribe_key)))["results"]  # fmt: skip
    assert len(listed) == 2 * len(STRIKES)
    assert [r["instrument_token"] for r in listed] == sorted(r["instrument_token"] for r in listed)
    response = client.patch(f"/api/v1/subscriptions/{token}", orjson.dumps({"mode": "ltp"}),
                            content_type="application/json", **auth(subscribe_key))  # fmt: skip
    assert body(response)["mode"] == "ltp"
    response = client.delete(f"/api/v1/subscriptions/{token}", **auth(subscribe_key))
    assert body(response)["status"] == "inactive"
    assert Subscription.objects.filter(instrument_id=token, status="inactive").exists()
    active = body(client.get("/api/v1/subscriptions", {"status": "active", "page_size": 500},
                             **auth(subscribe_key)))["results"]  # fmt: skip
    assert token not in [r["instrument_token"] for r in active]
    response = client.patch(f"/api/v1/subscriptions/{token}", orjson.dumps({"status": "active"}),
                            content_type="application/json", **auth(subscribe_key))  # fmt: skip
    assert body(response)["status"] == "active"
    both = client.patch(f"/api/v1/subscriptions/{token}", orjson.dumps({"status": "active", "mode": "full"}),
                        content_type="application/json", **auth(subscribe_key))  # fmt: skip
    assert (body(both)["status"], body(both)["mode"]) == ("active", "full")
