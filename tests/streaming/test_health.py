"""/health: 200 when everything is live, 503 with the right reasons when not, and back."""

import datetime as dt

import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.utils import timezone

from accounts.models import KiteAccount
from streaming.health import HealthContext, check_database, check_redis
from streaming.models import AccountLease, EngineHeartbeat
from tests.helpers import engine_status


def live_state(**account_overrides):
    account = {"instruments": 10, "ticks_per_s": 40.0, "last_tick_age_s": 0.3} | account_overrides
    flush = {"owner": "pipeline", "state": "running", "restarts": 0, "last_error": "",
             "last_crash_age_s": None}
    return engine_status(engine_id="host:1:abcd", accounts={"acc1": account}, tasks={"flush": flush})


def beat(state, *, age_s=0.0, engine_id="host:1:abcd"):
    now = timezone.now()
    EngineHeartbeat.objects.update_or_create(
        engine_id=engine_id,
        defaults={
            "hostname": "host",
            "pid": 1,
            "started_at": now - dt.timedelta(minutes=5),
            "updated_at": now - dt.timedelta(seconds=age_s),
            "state": state,
        },
    )


@pytest.fixture
def account():
    acc = KiteAccount.objects.create(
        label="acc1",
        api_key="key1",
        access_token="tok",
        token_expires_at=timezone.now() + dt.timedelta(hours=5),
    )
    AccountLease.objects.create(
        account=acc,
        owner="host:1:abcd",
        acquired_at=timezone.now(),
        renewed_at=timezone.now(),
        expires_at=timezone.now() + dt.timedelta(seconds=15),
    )
    return acc


@pytest.fixture
def health_settings(settings):
    settings.HEALTH_HEARTBEAT_MAX_AGE_S = 15.0
    settings.HEALTH_STREAM_STALL_S = 30.0
    return settings


def get(client):
    response = client.get("/health")
    assert response["Content-Type"] == "application/json"
    return response.status_code, response.json()


def codes(body):
    return [r["code"] for r in body["reasons"]]


@pytest.mark.django_db
def test_healthy_engine_is_200(client, account, health_settings):
    beat(live_state())
    status, body = get(client)
    assert (status, body["status"], body["reasons"]) == (200, "ok", [])
    assert body["engines"][0]["engine_id"] == "host:1:abcd"
    assert body["engines"][0]["accounts"] == ["acc1"]
    # The trailing-slash form answers too, without a redirect.
    assert client.get("/health/").status_code == 200


@pytest.mark.django_db
def test_no_heartbeat_then_back(client, account, health_settings):
    status, body = get(client)
    assert status == 503
    assert codes(body) == ["no_heartbeat"]
    beat(live_state(), age_s=20)  # too old
    assert codes(get(client)[1]) == ["no_heartbeat"]
    beat(live_state())
    assert get(client)[0] == 200


@pytest.mark.django_db
def test_session_expired_from_the_database_and_from_the_engine(client, account, health_settings):
    beat(live_state())
    KiteAccount.objects.filter(pk=account.pk).update(status=KiteAccount.Status.SESSION_EXPIRED)
    status, body = get(client)
    assert status == 503
    assert {"code": "session_expired", "account": "acc1"} in body["reasons"]

    KiteAccount.objects.filter(pk=account.pk).update(status=KiteAccount.Status.ACTIVE)
    beat(live_state(state="session_expired", session="expired"))
    status, body = get(client)
    assert status == 503
    assert codes(body) == ["session_expired"]

    beat(live_state())
    assert get(client)[0] == 200


@pytest.mark.django_db
def test_stream_stalled_then_flowing_again(client, account, health_settings):
    beat(live_state(last_tick_age_s=45.0))
    status, body = get(client)
    assert status == 503
    assert body["reasons"] == [
        {"code": "stream_stalled", "account": "acc1", "engine": "host:1:abcd", "last_tick_age_s": 45.0}
    ]
    # No instruments, or mock mode, is not a stall.
    beat(live_state(last_tick_age_s=45.0, instruments=0))
    assert get(client)[0] == 200
    beat({**live_state(last_tick_age_s=45.0), "mode": "mock"})
    assert get(client)[0] == 200
    # Live outside market hours (--no-mock): Kite is silent, that is not a stall.
    beat({**live_state(last_tick_age_s=45.0), "market_open": False})
    assert get(client)[0] == 200
    beat({**live_state(last_tick_age_s=45.0), "market_open": True})
    assert get(client)[0] == 503
    beat(live_state(last_tick_age_s=0.1))
    assert get(client)[0] == 200


@pytest.mark.django_db
def test_task_crash_shows_while_restarting_and_for_a_while_after(client, account, health_settings):
    state = live_state()
    state["tasks"]["flush"] = {
        "owner": "pipeline",
        "state": "restarting", "restarts": 0, "last_error": "ValueError: x", "last_crash_age_s": 0.1
    }
    beat(state)
    status, body = get(client)
    assert status == 503
    assert body["reasons"][0]["code"] == "task_failed"
    assert body["reasons"][0]["task"] == "flush"
    assert body["reasons"][0]["last_error"] == "ValueError: x"
    # Restarted and running, but crashed 2 s ago: still reported.
    state["tasks"]["flush"].update(state="running", restarts=1, last_crash_age_s=2.0)
    beat(state)
    assert codes(get(client)[1]) == ["task_failed"]
    # Long healed.
    state["tasks"]["flush"].update(last_crash_age_s=600.0)
    beat(state)
    assert get(client)[0] == 200


@pytest.mark.django_db
def test_streamable_account_no_engine_holds(client, account, health_settings):
    beat(live_state())
    AccountLease.objects.filter(account=account).update(
        expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    status, body = get(client)
    assert status == 503
    assert body["reasons"] == [{"code": "account_unleased", "account": "acc1"}]


@pytest.mark.django_db
def test_redis_down(client, account, health_settings):
    beat(live_state())
    health_settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    status, body = get(client)
    assert status == 503
    assert codes(body) == ["redis_down"]
    health_settings.REDIS_URL = "redis://127.0.0.1:6379/6"
    assert get(client)[0] == 200


def test_redis_check_is_skipped_without_redis():
    ctx = HealthContext(redis_url="", heartbeat_max_age_s=15, stream_stall_s=30)
    assert check_redis(ctx) == []


@pytest.fixture
def broken_database_alias():
    """A real connection attempt to a port nothing listens on."""
    alias = "health_broken"
    connections.settings[alias] = {
        **connections.settings["default"],
        "PORT": 1,
        "OPTIONS": {"connect_timeout": 1},
    }
    yield alias
    connections[alias].close()
    del connections.settings[alias]


def test_database_down(broken_database_alias, django_db_blocker):
    ctx = HealthContext(
        redis_url="", heartbeat_max_age_s=15, stream_stall_s=30, db_alias=broken_database_alias
    )
    with django_db_blocker.unblock():
        reasons = check_database(ctx)
    assert [r["code"] for r in reasons] == ["database_down"]
    assert ctx.database_ok is False


@pytest.mark.django_db
def test_an_engine_that_said_it_stopped_is_no_heartbeat_at_once(client, account, health_settings):
    beat(engine_status(engine_id="host:1:abcd", mode="stopped"))
    status, body = get(client)
    assert status == 503
    assert codes(body) == ["no_heartbeat"]
    assert body["engines"][0]["mode"] == "stopped"


def crashed_state():
    state = live_state()
    state["tasks"]["flush"] = {
        "owner": "pipeline",
        "state": "restarting",
        "restarts": 0,
        "last_error": "DatabaseError: password authentication failed",
        "last_crash_age_s": 0.1,
    }
    state["accounts"]["acc1"]["last_tick_age_s"] = 45.0
    return state


@pytest.mark.django_db
@pytest.mark.parametrize(
    "extra",
    [
        {"REMOTE_ADDR": "203.0.113.7"},
        # Loopback peer, but the request came through a reverse proxy.
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.7"},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_FORWARDED": "for=203.0.113.7"},
    ],
)
def test_the_public_sees_only_status_and_reason_codes(client, account, health_settings, extra):
    beat(crashed_state())
    response = client.get("/health", **extra)
    assert response.status_code == 503
    assert response.json() == {
        "status": "degraded",
        "reasons": [{"code": "stream_stalled"}, {"code": "task_failed"}],
    }
    for secret in ("host:1:abcd", "acc1", "password"):
        assert secret not in response.content.decode()


@pytest.mark.django_db
def test_staff_and_direct_loopback_see_the_details(client, account, health_settings):
    beat(crashed_state())
    # The test client's peer is 127.0.0.1 with no proxy header: a direct loopback client.
    body = client.get("/health").json()
    assert body["engines"][0]["engine_id"] == "host:1:abcd"
    assert "password authentication failed" in body["reasons"][1]["last_error"]

    remote = {"REMOTE_ADDR": "203.0.113.7"}
    user = User.objects.create_user("ops", password="pw-ops-1234")
    client.force_login(user)
    assert "engines" not in client.get("/health", **remote).json()
    User.objects.filter(pk=user.pk).update(is_staff=True)
    body = client.get("/health", **remote).json()
    assert body["engines"][0]["engine_id"] == "host:1:abcd"
    assert body["reasons"][0] == {
        "code": "stream_stalled", "account": "acc1", "engine": "host:1:abcd", "last_tick_age_s": 45.0
    }
