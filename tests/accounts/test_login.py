"""The Kite login flow: admin link, redirect to Kite, callback, session exchange on the simulator."""

from __future__ import annotations

import datetime as dt
from urllib.parse import parse_qs, urlsplit

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts import views
from accounts.models import KiteAccount
from accounts.services import AccountLoginError, account_login_complete, account_set_session
from streaming.kite.rest import KiteRateLimiter, KiteRestClient, KiteTokenError
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread

pytestmark = pytest.mark.django_db

API_KEY = "loginkey"
API_SECRET = "0123456789abcdef" + "s" * 16
KITE_LOGIN_URL = "https://kite.example.invalid/connect/login"


@pytest.fixture
def sim(settings):
    simulator = KiteSimulator(market=SyntheticMarket(seed=2), tick_interval_ms=1000)
    simulator.register_account(api_key=API_KEY, api_secret=API_SECRET, user_id="ZL0001")
    with SimulatorThread(simulator) as thread:
        settings.KITE_API_ROOT = thread.http_url
        settings.KITE_LOGIN_URL = KITE_LOGIN_URL
        yield thread


@pytest.fixture
def account():
    return KiteAccount.objects.create(label="desk", api_key=API_KEY, api_secret=API_SECRET)


def start_login(admin_client, account) -> str:
    """Follow the admin's login link; returns the nonce Kite will hand back."""
    response = admin_client.get(reverse("accounts:kite_login", args=[account.pk]))
    assert response.status_code == 302
    url = urlsplit(response["Location"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == KITE_LOGIN_URL
    query = parse_qs(url.query)
    assert query["v"] == ["3"] and query["api_key"] == [API_KEY]
    return parse_qs(query["redirect_params"][0])["state"][0]


def callback(admin_client, **params):
    return admin_client.get(reverse("accounts:kite_callback"), params)


def flash(response) -> list[str]:
    return [str(m) for m in response.wsgi_request._messages]


def test_the_admin_links_each_account_to_its_kite_login(admin_client, account):
    change = admin_client.get(reverse("admin:accounts_kiteaccount_change", args=[account.pk]))
    link = reverse("accounts:kite_login", args=[account.pk])
    assert f'<a href="{link}">Log in to Kite</a>' in change.content.decode()
    listing = admin_client.get(reverse("admin:accounts_kiteaccount_changelist"))
    assert link in listing.content.decode()


def test_login_round_trip_stores_the_session(admin_client, account, sim, django_capture_on_commit_callbacks):
    nonce = start_login(admin_client, account)
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    with django_capture_on_commit_callbacks(execute=False) as engine_notices:
        response = callback(admin_client, request_token=request_token, status="success", state=nonce,
                            action="login", type="login")
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:accounts_kiteaccount_change", args=[account.pk])
    assert any(m.startswith("Logged in to Kite: desk streams until") for m in flash(response))
    account.refresh_from_db()
    assert account.access_token == sim.call(sim.sim.access_token, API_KEY)
    assert account.status == KiteAccount.Status.ACTIVE and account.kite_user_id == "ZL0001"
    assert account.token_expires_at > timezone.now() and not account.needs_login
    assert len(engine_notices) == 1
    # The state is single-use: replaying the callback is refused.
    replay = callback(admin_client, request_token=request_token, status="success", state=nonce)
    assert flash(replay)[-1] == "No Kite login in progress: start it from the account's page."


def test_a_wrong_secret_is_reported_without_the_secret(admin_client, account, sim):
    account.api_secret = "w" * 32
    account.save()
    nonce = start_login(admin_client, account)
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    response = callback(admin_client, request_token=request_token, status="success", state=nonce)
    [message] = flash(response)
    assert message.startswith("Kite login for desk failed: kite session: TokenException (HTTP 403)")
    assert "w" * 32 not in message and request_token not in message
    account.refresh_from_db()
    assert not account.access_token_is_set and account.needs_login


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "success", "state": "forged"}, "Kite login for desk refused: it was not started here."),
        ({"status": "cancelled"}, "Kite login for desk did not succeed (status 'cancelled')."),
        ({"status": "success", "request_token": ""}, "Kite login for desk did not succeed (status 'success')."),
    ],
)
def test_callbacks_that_do_not_match_a_started_login_are_refused(admin_client, account, sim, params, expected):
    nonce = start_login(admin_client, account)
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    response = callback(admin_client, **{"request_token": request_token, "state": nonce, **params})
    assert flash(response) == [expected]
    assert sim.call(lambda: sim.sim.rest_requests.get("api.token", 0)) == 0
    account.refresh_from_db()
    assert not account.access_token_is_set


def test_a_login_older_than_the_state_lifetime_is_refused(admin_client, account, sim, monkeypatch):
    nonce = start_login(admin_client, account)
    monkeypatch.setattr(views, "KITE_LOGIN_STATE_MAX_AGE_S", -1)
    response = callback(admin_client, request_token="x", status="success", state=nonce)
    assert flash(response) == ["The Kite login took too long or was tampered with: start it again."]


def test_only_staff_can_log_accounts_in(client, django_user_model, account, sim):
    login = reverse("accounts:kite_login", args=[account.pk])
    assert reverse("admin:login") in client.get(login)["Location"]
    user = django_user_model.objects.create_user("trader", password="pw-not-used-elsewhere")
    client.force_login(user)
    assert reverse("admin:login") in client.get(login)["Location"]
    assert reverse("admin:login") in client.get(reverse("accounts:kite_callback"))["Location"]


def test_login_for_another_kite_user_is_refused(account, sim):
    account.kite_user_id = "ZZ9999"
    account.save()
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    client = KiteRestClient(api_key=API_KEY, api_root=sim.http_url, rate_limiter=KiteRateLimiter())
    with pytest.raises(AccountLoginError, match="logged in user ZL0001, but account desk belongs to ZZ9999"):
        account_login_complete(account=account, request_token=request_token, client=client)
    account.refresh_from_db()
    assert not account.access_token_is_set


def test_login_needs_the_api_secret_and_a_fresh_request_token(account, sim):
    client = KiteRestClient(api_key=API_KEY, api_root=sim.http_url, rate_limiter=KiteRateLimiter())
    with pytest.raises(KiteTokenError, match="Token is invalid or has expired"):
        account_login_complete(account=account, request_token="a" * 32, client=client)
    account.api_secret = ""
    account.save()
    with pytest.raises(AccountLoginError, match="has no api secret"):
        account_login_complete(account=account, request_token="a" * 32, client=client)
    other = KiteRestClient(api_key="otherkey", api_root=sim.http_url, rate_limiter=KiteRateLimiter())
    with pytest.raises(ValueError, match="client is for api key otherkey"):
        account_login_complete(account=account, request_token="a" * 32, client=other)


def test_a_new_login_replaces_an_expired_session(account, sim):
    account_set_session(account=account, access_token="old" * 11,
                        issued_at=timezone.now() - dt.timedelta(days=3))
    assert account.needs_login
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    client = KiteRestClient(api_key=API_KEY, api_root=sim.http_url, rate_limiter=KiteRateLimiter())
    account_login_complete(account=account, request_token=request_token, client=client)
    account.refresh_from_db()
    assert not account.needs_login and account.access_token != "old" * 11
