"""The KiteAccount admin: staff only, secrets write-only, blank keeps the stored value."""

import pytest
from django.urls import reverse

from accounts.models import IST, KiteAccount

pytestmark = pytest.mark.django_db


@pytest.fixture
def account():
    return KiteAccount.objects.create(
        label="primary", api_key="key1", api_secret="s3cret-api", access_token="tok-123"
    )


def _form_data(account: KiteAccount, **overrides) -> dict:
    data = {
        "label": account.label,
        "api_key": account.api_key,
        "api_secret": "",
        "access_token": "",
        "kite_user_id": account.kite_user_id,
        "status": account.status,
    }
    data.update(overrides)
    return data


def test_change_form_never_renders_the_secrets(admin_client, account):
    html = admin_client.get(reverse("admin:accounts_kiteaccount_change", args=[account.pk])).content.decode()
    assert "s3cret-api" not in html
    assert "tok-123" not in html
    assert 'name="api_secret"' in html and 'type="password"' in html


def test_blank_secret_keeps_the_stored_value(admin_client, account):
    url = reverse("admin:accounts_kiteaccount_change", args=[account.pk])
    response = admin_client.post(url, _form_data(account, kite_user_id="AB1234"))
    assert response.status_code == 302, response.content.decode()[:2000]
    account = KiteAccount.objects.get(pk=account.pk)
    assert account.kite_user_id == "AB1234"
    assert account.api_secret == "s3cret-api"
    assert account.access_token == "tok-123"


def test_new_token_replaces_and_starts_a_session(admin_client, account):
    url = reverse("admin:accounts_kiteaccount_change", args=[account.pk])
    response = admin_client.post(url, _form_data(account, access_token="fresh-token"))
    assert response.status_code == 302
    account = KiteAccount.objects.get(pk=account.pk)
    assert account.access_token == "fresh-token"
    assert account.api_secret == "s3cret-api"
    expires_ist = account.token_expires_at.astimezone(IST)
    issued_ist = account.token_issued_at.astimezone(IST)
    assert (expires_ist.hour, expires_ist.minute) == (6, 0)
    assert (expires_ist.date() - issued_ist.date()).days == 1
    assert account.status == KiteAccount.Status.ACTIVE


def test_changelist_shows_secret_presence_not_values(admin_client, account):
    html = admin_client.get(reverse("admin:accounts_kiteaccount_changelist")).content.decode()
    assert "api secret set" in html and "token set" in html
    assert "s3cret-api" not in html and "tok-123" not in html


def test_admin_is_staff_only(client, django_user_model, account):
    user = django_user_model.objects.create_user(username="ops", password="pw-for-test")
    client.force_login(user)
    response = client.get(reverse("admin:accounts_kiteaccount_changelist"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_pasting_a_token_keeps_a_disabled_account_disabled(admin_client, account):
    url = reverse("admin:accounts_kiteaccount_change", args=[account.pk])
    response = admin_client.post(
        url, _form_data(account, access_token="pasted-token", status=KiteAccount.Status.DISABLED)
    )
    assert response.status_code == 302
    account = KiteAccount.objects.get(pk=account.pk)
    assert account.access_token == "pasted-token"
    assert account.status == KiteAccount.Status.DISABLED


def test_admin_login_is_locked_out_after_repeated_failures(client, django_user_model, settings):
    django_user_model.objects.create_user(username="ops", password="right-pw-123", is_staff=True)
    url = reverse("admin:login")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        response = client.post(url, {"username": "ops", "password": "wrong"})
        assert response.status_code == 200  # the form again, with an error
    assert client.post(url, {"username": "ops", "password": "wrong"}).status_code == 429
    # Locked out: even the right password is refused now.
    response = client.post(url, {"username": "ops", "password": "right-pw-123"})
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session


def test_a_new_api_key_is_shown_once_in_the_response_and_stored_nowhere(admin_client, admin_user):
    from django.contrib.sessions.models import Session

    from accounts.models import ApiToken

    response = admin_client.post(reverse("admin:accounts_apitoken_add"), {"user": admin_user.pk, "name": "bot", "scopes": ["read"]})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    token = ApiToken.objects.get(name="bot")
    html = response.content.decode()
    key = html.split('id="api-key"', 1)[1].split(">", 1)[1].split("<", 1)[0]
    assert ApiToken.hash_key(key) == token.key_hash
    # Not in a cookie (the messages cookie is signed, not encrypted), not in the session.
    assert all(key not in morsel.value for morsel in admin_client.cookies.values())
    assert all(key not in str(s.get_decoded()) for s in Session.objects.all())
