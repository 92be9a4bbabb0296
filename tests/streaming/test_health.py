"""/health: 200 when everything is live, 503 with the right reasons when not, and back.

Also /health/live and /health/ready, and who sees the details (tickerproj/access.py).
"""

import datetime as dt

import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.utils import timezone

from accounts.models import KiteAccount
from streaming.health import HealthContext, RedisProbe, check_database, check_redis
from streaming.models import AccountLease, EngineHeartbeat
from tests.helpers import engine_status
from tickerproj.access import parse_networks


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


OPS_TOKEN = "ops-token-for-tests-0123456789abcdef"


@pytest.fixture
def health_settings(settings):
    settings.HEALTH_HEARTBEAT_MAX_AGE_S = 15.0
    settings.HEALTH_STREAM_STALL_S = 30.0
    settings.HEALTH_STALL_WHEN_MARKET_CLOSED = False
    settings.HEALTH_CACHE_S = 0  # every call computes; the cache has its own test
    settings.OPS_TOKEN = OPS_TOKEN  # get() below is the monitoring client
    settings.OPS_ALLOWED_NETWORKS = ()
    return settings


def get(client):
    """/health as monitoring sees it: with the ops bearer token."""
    response = client.get("/health", HTTP_AUTHORIZATION=f"Bearer {OPS_TOKEN}")
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
    reachable = health_settings.REDIS_URL  # this run's own database
    health_settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    status, body = get(client)
    assert status == 503
    assert codes(body) == ["redis_down"]
    health_settings.REDIS_URL = reachable
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
def test_loopback_alone_sees_no_details(client, account, health_settings):
    """M1: behind a same-host proxy every client is loopback, so loopback proves nothing."""
    beat(crashed_state())
    body = client.get("/health", REMOTE_ADDR="127.0.0.1").json()
    assert body == {"status": "degraded", "reasons": [{"code": "stream_stalled"}, {"code": "task_failed"}]}


@pytest.mark.django_db
def test_the_bearer_token_sees_the_details_and_a_wrong_one_does_not(client, account, health_settings):
    beat(crashed_state())
    remote = {"REMOTE_ADDR": "203.0.113.7"}
    body = client.get("/health", HTTP_AUTHORIZATION=f"Bearer {OPS_TOKEN}", **remote).json()
    assert body["engines"][0]["engine_id"] == "host:1:abcd"
    assert "password authentication failed" in body["reasons"][1]["last_error"]
    for wrong in (f"Bearer {OPS_TOKEN}x", f"Token {OPS_TOKEN}", "Bearer ", OPS_TOKEN):
        assert "engines" not in client.get("/health", HTTP_AUTHORIZATION=wrong, **remote).json()


@pytest.mark.django_db
def test_an_allowed_network_sees_the_details_by_its_peer_address_only(client, account, health_settings):
    health_settings.OPS_ALLOWED_NETWORKS = parse_networks(["10.0.0.0/8", "192.0.2.10"])
    beat(crashed_state())
    assert "engines" in client.get("/health", REMOTE_ADDR="10.1.2.3").json()
    assert "engines" in client.get("/health", REMOTE_ADDR="192.0.2.10").json()
    assert "engines" not in client.get("/health", REMOTE_ADDR="192.0.2.11").json()
    # A forwarded header naming an allowed address does not let an outsider in.
    outsider = {"REMOTE_ADDR": "203.0.113.7", "HTTP_X_FORWARDED_FOR": "10.1.2.3"}
    assert "engines" not in client.get("/health", **outsider).json()


@pytest.mark.django_db
def test_a_forwarded_request_is_never_let_in_by_its_address(client, account, health_settings):
    """Behind a proxy daphne runs with --proxy-headers and makes the first X-Forwarded-For
    entry, which the client wrote, the peer: REMOTE_ADDR is then the forged address itself.
    Found by the fault suite (security.ops_exposure); the OPS_TOKEN still works."""
    health_settings.OPS_ALLOWED_NETWORKS = parse_networks(["10.0.0.0/8"])
    beat(crashed_state())
    for header in ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED"):
        forged = {"REMOTE_ADDR": "10.1.2.3", header: "10.1.2.3"}
        assert "engines" not in client.get("/health", **forged).json(), header
    bearer = {"REMOTE_ADDR": "10.1.2.3", "HTTP_X_FORWARDED_FOR": "10.1.2.3",
              "HTTP_AUTHORIZATION": f"Bearer {OPS_TOKEN}"}
    assert "engines" in client.get("/health", **bearer).json()


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("OPS_ALLOWED_NETWORKS", "10.0.0.0/8,not-an-ip", "OPS_ALLOWED_NETWORKS: 'not-an-ip'"),
        ("OPS_TOKEN", "short", "OPS_TOKEN must be at least 32 characters"),
    ],
)
def test_bad_ops_settings_stop_start_up_with_a_clear_error(setting, value, message):
    import os
    import subprocess
    import sys

    env = {**os.environ, setting: value}
    proc = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={**env, "DJANGO_SETTINGS_MODULE": "tickerproj.settings"},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    if setting == "OPS_TOKEN":
        assert value not in proc.stderr  # a secret, even a bad one, is not echoed


@pytest.mark.django_db
def test_staff_see_the_details(client, account, health_settings):
    beat(crashed_state())
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


# --- three audiences -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_live_answers_without_touching_the_database_or_redis(
    client, health_settings, django_assert_num_queries
):
    health_settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with django_assert_num_queries(0):
        response = client.get("/health/live")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert client.get("/health/live/").status_code == 200


@pytest.mark.django_db
def test_ready_ignores_logins_and_engines_but_not_redis(client, health_settings):
    """The morning's expired sessions must not take every web node out of the load balancer."""
    KiteAccount.objects.create(label="acc1", api_key="key1", status=KiteAccount.Status.SESSION_EXPIRED)
    assert client.get("/health").status_code == 503  # no heartbeat, session expired
    response = client.get("/health/ready")
    assert (response.status_code, response.json()) == (200, {"status": "ready", "reasons": []})
    assert client.get("/health/ready/").status_code == 200

    health_settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = client.get("/health/ready")
    assert (response.status_code, response.json()) == (
        503, {"status": "unavailable", "reasons": [{"code": "redis_down"}]}
    )


def test_ready_reports_a_database_down(broken_database_alias, django_db_blocker):
    from streaming.health import readiness_report

    ctx = HealthContext(
        redis_url="", heartbeat_max_age_s=15, stream_stall_s=30, db_alias=broken_database_alias
    )
    with django_db_blocker.unblock():
        report = readiness_report(ctx)
    assert report == {"status": "unavailable", "reasons": [{"code": "database_down"}]}


# --- cost of a call (M8) -------------------------------------------------------------------------


@pytest.mark.django_db
def test_reports_are_cached_briefly(client, account, health_settings, django_assert_num_queries):
    health_settings.HEALTH_CACHE_S = 60
    from django.core.cache import cache

    cache.clear()
    beat(live_state())
    assert client.get("/health").status_code == 200
    assert client.get("/health/ready").status_code == 200
    beat(live_state(last_tick_age_s=45.0))
    with django_assert_num_queries(0):
        assert client.get("/health").status_code == 200  # the cached report
        assert client.get("/health/ready").status_code == 200
    cache.clear()  # what the TTL's end does
    assert client.get("/health").status_code == 503
    cache.clear()


@pytest.mark.django_db
def test_the_query_count_does_not_grow_with_accounts_and_engines(
    client, account, health_settings, django_assert_max_num_queries
):
    beat(live_state())
    with django_assert_max_num_queries(8) as one:
        client.get("/health")
    for n in range(2, 30):
        acc = KiteAccount.objects.create(label=f"acc{n}", api_key=f"key{n}", access_token="tok")
        AccountLease.objects.create(
            account=acc, owner=f"host:{n}:x", acquired_at=timezone.now(),
            renewed_at=timezone.now(), expires_at=timezone.now() + dt.timedelta(seconds=15),
        )
    for n in range(5):
        beat(live_state(), engine_id=f"host:{n}:engine")
    with django_assert_max_num_queries(len(one.captured_queries)):
        client.get("/health")


def _probe_connection_ids(name: str) -> set[int]:
    """Ids of the connections named ``name`` on the test Redis database (ids are never reused)."""
    import redis
    from django.conf import settings

    admin = redis.Redis.from_url(settings.REDIS_URL)
    db = str(admin.connection_pool.connection_kwargs.get("db", 0))
    try:
        return {c["id"] for c in admin.client_list() if c.get("name") == name and c["db"] == db}
    finally:
        admin.close()


def test_the_redis_probe_reuses_one_connection():
    from django.conf import settings

    name = f"health-test-{dt.datetime.now().timestamp()}"
    probe = RedisProbe(client_name=name)
    ctx = HealthContext(
        redis_url=settings.REDIS_URL, heartbeat_max_age_s=15, stream_stall_s=30, redis_probe=probe
    )
    try:
        seen = set()
        for _ in range(5):
            assert check_redis(ctx) == []
            seen |= _probe_connection_ids(name)
        assert len(seen) == 1
    finally:
        probe.close()


@pytest.mark.django_db
def test_the_view_keeps_its_redis_connection_between_calls(client, health_settings):
    from django.conf import settings

    health_settings.REDIS_URL = settings.REDIS_URL
    seen = set()
    for _ in range(4):
        assert client.get("/health/ready").status_code == 200
        seen |= _probe_connection_ids("tickerproj.health")
    assert len(seen) == 1


# --- L14 -----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_setting_reports_a_stall_while_the_market_is_closed(client, account, health_settings):
    beat({**live_state(last_tick_age_s=45.0), "market_open": False})
    assert client.get("/health").status_code == 200
    health_settings.HEALTH_STALL_WHEN_MARKET_CLOSED = True
    status, body = get(client)
    assert status == 503
    assert codes(body) == ["stream_stalled"]
    # The synthetic market is not Kite: mock mode is never a stall.
    beat({**live_state(last_tick_age_s=45.0), "mode": "mock", "market_open": False})
    assert get(client)[0] == 200


# --- /metrics ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_report_is_exported_as_gauges_for_alert_rules(account, health_settings):
    from prometheus_client import CollectorRegistry, generate_latest

    from streaming.health import REASON_CODES, HealthCollector
    from streaming.views import HealthViews

    registry = CollectorRegistry()
    registry.register(HealthCollector(HealthViews(redis_probe=RedisProbe()).business_report))
    beat(live_state())
    text = generate_latest(registry).decode()
    assert "tickerproj_health_ok 1.0" in text
    for code in REASON_CODES:
        assert f'tickerproj_health_reasons{{code="{code}"}} 0.0' in text
    beat(crashed_state())
    text = generate_latest(registry).decode()
    assert "tickerproj_health_ok 0.0" in text
    assert 'tickerproj_health_reasons{code="stream_stalled"} 1.0' in text
    assert 'tickerproj_health_reasons{code="task_failed"} 1.0' in text
    assert "acc1" not in text  # codes only: bounded series, no account labels


@pytest.mark.django_db(transaction=True)
def test_a_database_lost_between_two_checks_is_database_down_not_a_500(account):
    """A real failure after check_database answered: the drift report's table is locked by
    another connection and the waiting statement is cancelled, as a restarting server does."""
    from streaming.health import health_report
    from tests.helpers import statement_cancelled_on_lock

    ctx = HealthContext(redis_url="", heartbeat_max_age_s=15, stream_stall_s=30)
    with statement_cancelled_on_lock("subscriptions_driftreport"):
        report = health_report(ctx)
    assert report["status"] == "degraded"
    assert "database_down" in [r["code"] for r in report["reasons"]]
    assert ctx.database_ok is False
