"""Bars (gap rows marked), status (staff or 'read'), and the request id in the request's logs."""

import datetime as dt

import orjson
import pytest
from django.utils import timezone

from accounts.models import KiteAccount
from streaming.greeks import IST
from streaming.models import AccountLease, EngineHeartbeat, UnderlyingBar
from subscriptions.models import Subscription
from tests.api.conftest import auth
from tests.helpers import engine_status
from tests.streaming.wsutil import NIFTY_INDEX

pytestmark = pytest.mark.django_db

DAY = dt.datetime(2030, 1, 7, 9, 15, tzinfo=IST)


def test_bars_are_oldest_first_with_gaps_marked_and_a_bounded_range(client, read_key, universe):
    for minute in range(5):
        gap = minute == 2
        UnderlyingBar.objects.create(
            instrument_id=NIFTY_INDEX, start=DAY + dt.timedelta(minutes=minute), is_gap=gap,
            **({} if gap else {"open": 100.0, "high": 101.0, "low": 99.0, "close": 100.5, "tick_count": 3}),
        )  # fmt: skip
    query = {"instrument_token": NIFTY_INDEX, "from": DAY.isoformat(),
             "to": (DAY + dt.timedelta(minutes=3)).isoformat()}  # fmt: skip
    bars = orjson.loads(client.get("/api/v1/bars", query, **auth(read_key)).content)["results"]
    assert [b["is_gap"] for b in bars] == [False, False, True, False]
    assert bars[2]["close"] is None and bars[1]["close"] == 100.5
    too_long = {**query, "to": (DAY + dt.timedelta(days=40)).isoformat()}
    response = client.get("/api/v1/bars", too_long, **auth(read_key))
    assert response.status_code == 400
    assert orjson.loads(response.content)["error"]["code"] == "range_too_long"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("from", "0190-08-18T01:09:55.493-23:26"),  # an offset PostgreSQL refuses (fuzz find)
        ("from", "9999-12-31T23:59:59+00:00"),
        ("instrument_token", "-3542708000"),
        ("instrument_token", str(2**40)),
    ],
)
def test_bars_refuse_out_of_range_input_with_400_naming_the_field(client, read_key, name, value):
    query = {"instrument_token": NIFTY_INDEX, "from": DAY.isoformat(), "to": DAY.isoformat(),
             name: value}  # fmt: skip
    if name == "from":
        query["to"] = value
    response = client.get("/api/v1/bars", query, **auth(read_key))
    assert response.status_code == 400, response.content
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "invalid_request" and error["field"] in {name, "to"}


def test_status_shows_accounts_against_capacity_and_engines(client, read_key, universe, trader):
    account = KiteAccount.objects.create(label="main", api_key="k1", access_token="t")
    Subscription.objects.create(instrument_id=NIFTY_INDEX, assigned_account=account)
    now = timezone.now()
    AccountLease.objects.create(account=account, owner="engine-1", acquired_at=now,
                                renewed_at=now, expires_at=now + dt.timedelta(seconds=15))  # fmt: skip
    EngineHeartbeat.objects.create(
        engine_id="engine-1", hostname="h", pid=1, started_at=now, updated_at=now,
        state=engine_status(engine_id="engine-1", streamed_count=1,
                            accounts={"main": {"account_id": account.pk, "last_tick_age_s": 0.4}}),
    )  # fmt: skip
    status = orjson.loads(client.get("/api/v1/status", **auth(read_key)).content)
    [acc] = status["accounts"]
    assert (acc["label"], acc["engine"], acc["instruments"], acc["capacity"]) == ("main", "engine-1", 1, 9000)
    assert acc["last_tick_age_s"] == 0.4
    [engine] = status["engines"]
    assert engine["mode"] == "live" and engine["heartbeat_age_s"] < 60
    # A trader's session (not staff) may not see operations data; a staff session may.
    client.force_login(trader)
    response = client.get("/api/v1/status")
    assert response.status_code == 403
    assert orjson.loads(response.content)["error"]["code"] == "staff_required"
    trader.is_staff = True
    trader.save()
    assert client.get("/api/v1/status").status_code == 200


def test_the_request_id_is_in_the_requests_log_lines(client, subscribe_key, universe, caplog):
    KiteAccount.objects.create(label="main", api_key="k1", access_token="t")
    caplog.set_level("INFO")
    client.post(
        "/api/v1/subscriptions", orjson.dumps({"instrument_token": NIFTY_INDEX}),
        content_type="application/json", HTTP_X_REQUEST_ID="trace-me-42", **auth(subscribe_key),
    )  # fmt: skip
    lines = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    activated = [m for m in lines if m.get("event") == "subscriptions.activated_many"]
    assert activated and activated[0]["request_id"] == "trace-me-42"
