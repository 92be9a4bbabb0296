"""M2 (docs/security.md): a view-only staff user can look at everything and change nothing.

Walks every model admin of the site: its actions, its own extra views, and the Kite login
views, as a staff user holding every ``view_*`` permission and no other.
"""

import datetime as dt

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.test import RequestFactory
from django.urls import NoReverseMatch, reverse

from accounts.models import ApiToken, KiteAccount
from accounts.services import apitoken_create
from subscriptions.models import RebalanceRule, Subscription
from tests.conftest import make_option

pytestmark = pytest.mark.django_db

# The views every ModelAdmin has; they check Django's own permissions.
STANDARD_VIEWS = ("changelist", "add", "history", "delete", "change", "autocomplete")


@pytest.fixture
def viewer(django_user_model):
    user = django_user_model.objects.create_user(username="viewer", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__startswith="view_"))
    return django_user_model.objects.get(pk=user.pk)  # fresh permission cache


@pytest.fixture
def objects(django_user_model):
    """One row of each model an action can change."""
    account = KiteAccount.objects.create(label="acc1", api_key="k1", access_token="tok-viewer-1")
    owner = django_user_model.objects.create_user(username="owner", password="pw")
    apitoken_create(user=owner, name="prog")
    option = make_option(token=111, name="NIFTY", expiry=dt.date(2030, 1, 29), strike=24000, kind="CE")
    option.save()
    Subscription.objects.create(instrument=option)
    RebalanceRule.objects.create(name="nifty", underlying="NIFTY", pinned_account=account)


def _rows(model) -> list[dict]:
    return sorted(model.objects.values(), key=lambda r: str(r[model._meta.pk.attname]))


def _request(user):
    request = RequestFactory().get("/admin/")
    request.user = user
    return request


def test_view_only_staff_get_no_action(viewer, objects, admin_user):
    every = {}
    for model, model_admin in admin.site._registry.items():
        offered = set(model_admin.get_actions(_request(viewer)))
        assert not offered, f"{model.__name__} offers {sorted(offered)} to a view-only user"
        every[model] = set(model_admin.get_actions(_request(admin_user))) - {"delete_selected"}
    assert every[KiteAccount] == {
        "disable_accounts", "enable_accounts", "kill_switch_on", "kill_switch_off", "cancel_all_orders",
        "square_off_positions",
    }
    assert every[ApiToken] == {"revoke_tokens"}


def test_view_only_staff_cannot_run_an_action_by_posting_it(client, viewer, objects, admin_user):
    client.force_login(viewer)
    for model, model_admin in admin.site._registry.items():
        actions = set(model_admin.get_actions(_request(admin_user))) - {"delete_selected"}
        for action in sorted(actions):
            before, entries = _rows(model), LogEntry.objects.count()
            url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
            pks = [str(pk) for pk in model.objects.values_list("pk", flat=True)]
            assert pks, f"no {model.__name__} to run {action} on"
            client.post(url, {"action": action, "_selected_action": pks})
            assert _rows(model) == before, f"{model.__name__}.{action} changed rows"
            assert LogEntry.objects.count() == entries, f"{model.__name__}.{action} logged a change"


def test_view_only_staff_are_refused_every_extra_admin_view(client, viewer, objects):
    client.force_login(viewer)
    walked = []
    for model, model_admin in admin.site._registry.items():
        prefix = f"{model._meta.app_label}_{model._meta.model_name}_"
        for pattern in model_admin.get_urls():
            name = pattern.name or ""
            if not name.startswith(prefix) or name.removeprefix(prefix) in STANDARD_VIEWS:
                continue
            try:
                url = reverse(f"admin:{name}")
            except NoReverseMatch:
                url = reverse(f"admin:{name}", args=[model.objects.values_list("pk", flat=True)[0]])
            walked.append(name)
            for method in (client.get, client.post):
                response = method(url)
                # A POST-only view (django-import-export's process_import) refuses a GET with 405.
                refused = response.status_code == 403 or (method.__name__ == "get" and response.status_code == 405)
                assert refused, f"{method.__name__} {name}: {response.status_code}"
    assert "subscriptions_instrument_refresh" in walked


def test_view_only_staff_cannot_run_a_kite_login(client, viewer, objects, admin_client):
    account = KiteAccount.objects.get()
    client.force_login(viewer)
    assert client.get(reverse("accounts:kite_login", args=[account.pk])).status_code == 403
    assert client.get(reverse("accounts:kite_callback"), {"status": "success"}).status_code == 403
    # Who may change the account may log it in.
    assert admin_client.get(reverse("accounts:kite_login", args=[account.pk])).status_code == 302


def test_the_refresh_button_is_shown_only_to_who_may_refresh(client, viewer, admin_client):
    url = reverse("admin:subscriptions_instrument_changelist")
    assert "Refresh instruments now" in admin_client.get(url).content.decode()
    client.force_login(viewer)
    assert "Refresh instruments now" not in client.get(url).content.decode()
