"""The jobs in the admin: refresh now, rebalance now, drift shown to ops."""

from __future__ import annotations

import re

import pytest
from celery.result import AsyncResult
from django.contrib.messages import get_messages
from django.utils import timezone

from subscriptions.jobs import subscriptions_reconcile
from subscriptions.models import DriftReport, Instrument, RebalanceRule, Subscription
from tests.subscriptions.conftest import instruments_from_market, make_account
from tickerproj.celery import app

REFRESH_URL = "/admin/subscriptions/instrument/refresh/"


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.mark.django_db
def test_the_instrument_changelist_has_a_refresh_button(admin_client):
    response = admin_client.get("/admin/subscriptions/instrument/")
    html = response.content.decode()
    assert "Refresh instruments now" in html
    assert f'action="{REFRESH_URL}"' in html


def test_refresh_now_queues_the_job_for_a_worker(celery_worker, admin_client, kite_settings, market):
    make_account()
    response = admin_client.post(REFRESH_URL, follow=True)
    (message,) = messages_of(response)
    task_id = re.search(r"queued as task ([0-9a-f-]{36})", message).group(1)
    result = AsyncResult(task_id, app=app).get(timeout=60)
    assert result["created"] == len(market.instruments)
    assert Instrument.objects.count() == len(market.instruments)


@pytest.mark.django_db
def test_refresh_now_runs_in_process_on_embedded_defaults(admin_client, kite_settings, market, sim_account):
    kite_settings.EMBEDDED = True
    response = admin_client.post(REFRESH_URL, follow=True)
    (message,) = messages_of(response)
    assert message.startswith("Instrument refresh done: ")
    assert Instrument.objects.count() == len(market.instruments)


@pytest.mark.django_db
def test_refresh_now_needs_a_post(admin_client):
    response = admin_client.get(REFRESH_URL)
    assert response.status_code == 302
    assert not Instrument.objects.exists()


@pytest.mark.django_db
def test_rebalance_now_action_runs_the_selected_rules(admin_client, kite_settings, market, sim_account):
    kite_settings.EMBEDDED = True
    Instrument.objects.bulk_create(instruments_from_market(market))
    rule = RebalanceRule.objects.create(name="nifty", underlying="NIFTY", expiries_next_n=1, strikes_each_side=1)
    RebalanceRule.objects.create(name="bank", underlying="BANKNIFTY", expiries_next_n=1)
    response = admin_client.post(
        "/admin/subscriptions/rebalancerule/",
        {"action": "rebalance_now", "_selected_action": [rule.pk]},
        follow=True,
    )
    assert any(m.startswith("Rebalance of 1 rule(s) done") for m in messages_of(response))
    rule.refresh_from_db()
    assert "REST ltp" in rule.last_result  # no engine runs here: the simulator's quotes
    assert Subscription.objects.filter(rebalance_rule=rule, status="active").count() == 6
    assert RebalanceRule.objects.get(name="bank").last_result == ""


@pytest.mark.django_db
def test_a_failing_rest_fallback_leaves_the_bands_alone(kite_settings, sim, market, sim_account):
    from subscriptions.tasks import rebalance_strikes

    Instrument.objects.bulk_create(instruments_from_market(market))
    rule = RebalanceRule.objects.create(name="nifty", underlying="NIFTY", expiries_next_n=1)
    sim.call(sim.sim.fail_next, "market.quote.ltp", status=400, error_type="InputException")
    assert rebalance_strikes.apply().get() == {
        "nifty": {"activated": 0, "deactivated": 0, "recentred": False}
    }
    rule.refresh_from_db()
    assert "no live price" in rule.last_result


@pytest.mark.django_db
def test_drift_is_shown_on_the_subscription_changelist(admin_client, settings, market):
    Instrument.objects.bulk_create(instruments_from_market(market)[:3])
    Subscription.objects.create(instrument=Instrument.objects.first())
    subscriptions_reconcile(heartbeat_max_age_s=15, grace_s=0, now=timezone.now())
    response = admin_client.get("/admin/subscriptions/subscription/")
    (message,) = messages_of(response)
    assert "Drift found" in message and "1 missing" in message
    report_page = admin_client.get("/admin/subscriptions/driftreport/")
    assert report_page.status_code == 200
    assert "1 wanted, 0 assigned" in report_page.content.decode()
    assert DriftReport.objects.get().ok is False
