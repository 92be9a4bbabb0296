"""API tokens in the admin: scopes chosen at creation and shown, changed later, key shown once."""

import pytest
from django.urls import reverse

from accounts.models import ApiToken

pytestmark = pytest.mark.django_db


def test_a_token_is_made_with_the_chosen_scopes(admin_client, admin_user):
    add = reverse("admin:accounts_apitoken_add")
    page = admin_client.get(add).content.decode()
    assert 'name="scopes" value="subscribe"' in page and 'name="scopes" value="trade"' in page
    response = admin_client.post(
        add, {"user": admin_user.pk, "name": "desk", "scopes": ["read", "subscribe"]}
    )
    assert response.status_code == 200
    token = ApiToken.objects.get(name="desk")
    assert token.scopes == ["read", "subscribe"]
    assert token.prefix in response.content.decode()  # the key, shown once on this page
    listing = admin_client.get(reverse("admin:accounts_apitoken_changelist")).content.decode()
    assert "read, subscribe" in listing


def test_scopes_can_be_changed_and_an_unknown_one_is_refused(admin_client, admin_user):
    admin_client.post(reverse("admin:accounts_apitoken_add"),
                      {"user": admin_user.pk, "name": "bot", "scopes": ["read"]})  # fmt: skip
    token = ApiToken.objects.get(name="bot")
    change = reverse("admin:accounts_apitoken_change", args=[token.pk])
    assert admin_client.post(change, {"name": "bot", "scopes": ["read", "trade"]}).status_code == 302
    token.refresh_from_db()
    assert token.scopes == ["read", "trade"]
    response = admin_client.post(change, {"name": "bot", "scopes": ["root"]})
    assert response.status_code == 200 and "not one of the available choices" in response.content.decode()
