"""The periodic tasks on a real Celery worker (Redis broker), PostgreSQL and the Kite simulator."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from django.utils import timezone

from streaming.control import RELOAD_MESSAGE, control_channel
from streaming.greeks import expiry_close_epoch_s, years_to_expiry
from streaming.locks import joblock_acquire
from streaming.models import EngineHeartbeat
from subscriptions import tasks
from subscriptions.models import (
    CandleGreeks,
    DriftReport,
    HistoryRange,
    Instrument,
    RebalanceRule,
    Subscription,
)
from tests.helpers import engine_status
from tests.subscriptions.conftest import instruments_from_market, make_account

TASK_TIMEOUT_S = 60


@pytest.fixture
def loaded(transactional_db, kite_settings, market):
    """Instruments and a logged-in account, committed (the worker has its own connection)."""
    Instrument.objects.bulk_create(instruments_from_market(market))
    return make_account()


def run(task, **kwargs):
    """Send ``task`` through the broker and wait for the worker's result."""
    return task.apply_async(kwargs=kwargs).get(timeout=TASK_TIMEOUT_S)


def nifty_expiries() -> list[dt.date]:
    return list(
        Instrument.objects.filter(name="NIFTY", instrument_type="CE", expiry__gte=timezone.localdate())
        .order_by("expiry").values_list("expiry", flat=True).distinct()
    )


def owned_strikes(rule) -> list[float]:
    return sorted(set(
        Subscription.objects.filter(rebalance_rule=rule, status="active")
        .values_list("instrument__strike", flat=True)
    ))


def test_rebalance_task_moves_the_band_with_the_simulator(celery_worker, loaded, sim):
    expiry = nifty_expiries()[0]
    rule = RebalanceRule.objects.create(name="nifty", underlying="NIFTY", expiries_next_n=1,
                                        strikes_each_side=1, cooldown_s=0)

    def forward_to(price):
        t = float(years_to_expiry(now_epoch_s=timezone.now().timestamp(),
                                  expiry_epoch_s=expiry_close_epoch_s(expiry)))
        sim.call(sim.sim.market.set_spot, "NIFTY", price / math.exp((0.065 - 0.012) * t))

    forward_to(26_005.0)
    result = run(tasks.rebalance_strikes)
    assert result == {"nifty": {"activated": 6, "deactivated": 0, "recentred": True}}
    assert owned_strikes(rule) == [25_950.0, 26_000.0, 26_050.0]

    forward_to(26_160.0)
    result = run(tasks.rebalance_strikes)
    assert result["nifty"]["activated"] == 6 and result["nifty"]["deactivated"] == 6
    assert owned_strikes(rule) == [26_100.0, 26_150.0, 26_200.0]

    # Delivered twice (acks_late after a crash): the second run changes nothing.
    assert run(tasks.rebalance_strikes)["nifty"] == {"activated": 0, "deactivated": 0, "recentred": False}


def test_a_task_whose_lock_is_held_skips(celery_worker, loaded):
    assert joblock_acquire(name="rebalance_strikes", owner="another-worker", ttl_s=60)
    RebalanceRule.objects.create(name="nifty", underlying="NIFTY", expiries_next_n=1)
    result = run(tasks.rebalance_strikes)
    assert result == {"skipped": "lock rebalance_strikes held by another run"}
    assert not Subscription.objects.exists()


def test_refresh_instruments_loads_the_dump_and_retires_expired(celery_worker, kite_settings, sim, market):
    make_account()
    # A contract that expired yesterday, subscribed: Kite no longer lists it.
    old = Instrument.objects.create(
        instrument_token=999_001, exchange_token=3902, tradingsymbol="NIFTY24NOV24000CE", name="NIFTY",
        expiry=timezone.localdate() - dt.timedelta(days=1), strike=24_000.0, instrument_type="CE",
        segment="NFO-OPT", exchange="NFO",
    )
    sub = Subscription.objects.create(instrument=old)
    result = run(tasks.refresh_instruments)
    assert result["created"] == len(market.instruments)
    assert Instrument.objects.count() == len(market.instruments) + 1  # kept: it is referenced
    sub.refresh_from_db()
    assert sub.status == "inactive"
    assert "expired" in sub.status_reason


def test_refresh_instruments_without_a_session_skips(celery_worker, kite_settings):
    result = run(tasks.refresh_instruments)
    assert "log in to Kite" in result["skipped"]


def test_transient_kite_errors_are_retried_by_celery(celery_worker, kite_settings, sim, market):
    make_account()
    # More 503s than the REST client's own four attempts: the task fails once, Celery retries.
    sim.call(sim.sim.fail_next, "market.instruments.all", status=503, times=5)
    result = run(tasks.refresh_instruments)
    assert result["created"] == len(market.instruments)
    assert sim.sim.rest_requests["market.instruments.all"] == 6


def test_permanent_kite_errors_fail_without_retry(celery_worker, kite_settings, sim):
    make_account()
    sim.call(sim.sim.fail_next, "market.instruments.all", status=403, error_type="TokenException")
    async_result = tasks.refresh_instruments.apply_async()
    with pytest.raises(Exception, match="TokenException"):
        async_result.get(timeout=TASK_TIMEOUT_S)
    assert async_result.state == "FAILURE"
    assert sim.sim.rest_requests["market.instruments.all"] == 1


def test_reconcile_reports_drift_and_asks_engines_to_reload(celery_worker, loaded, redis_client, settings):
    settings.RECONCILE_GRACE_S = 0
    account = loaded
    options = list(Instrument.objects.filter(instrument_type="CE").order_by("pk")[:5])
    streamed = Subscription.objects.create(instrument=options[0], mode="full", assigned_account=account,
                                           streamed_mode="full")
    Subscription.objects.create(instrument=options[1], mode="full")  # missing
    Subscription.objects.create(instrument=options[2], mode="full", unassigned_reason="no capacity")
    Subscription.objects.create(instrument=options[3], mode="full", status="inactive",
                                assigned_account=account, streamed_mode="full")  # extra
    Subscription.objects.create(instrument=options[4], mode="ltp", assigned_account=account,
                                streamed_mode="quote")  # wrong mode
    now = timezone.now()
    EngineHeartbeat.objects.create(engine_id="e1", hostname="h", pid=1, started_at=now, updated_at=now,
                                   state=engine_status(streamed_count=3))
    pubsub = redis_client.pubsub()
    pubsub.subscribe(control_channel(settings.CHANNEL_LAYER_PREFIX))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    result = run(tasks.reconcile_subscriptions)

    assert result["ok"] is False and result["reload"] is True
    report = DriftReport.objects.get()
    assert (report.desired, report.streamed, report.heartbeat_streamed, report.engines_alive) == (4, 2, 3, 1)
    assert (report.missing, report.extra, report.mode_mismatch, report.unassigned) == (1, 1, 1, 1)
    assert report.details["missing_sample"] == [options[1].pk]
    assert report.details["unassigned_reasons"] == [{"reason": "no capacity", "count": 1}]
    message = pubsub.get_message(timeout=5)
    assert message is not None and message["data"] == RELOAD_MESSAGE
    pubsub.close()
    assert streamed.status == "active"


def test_reconcile_is_ok_when_everything_streams(celery_worker, loaded, settings):
    settings.RECONCILE_GRACE_S = 0
    option = Instrument.objects.filter(instrument_type="CE").first()
    Subscription.objects.create(instrument=option, mode="quote", assigned_account=loaded, streamed_mode="quote")
    now = timezone.now()
    EngineHeartbeat.objects.create(engine_id="e1", hostname="h", pid=1, started_at=now, updated_at=now,
                                   state=engine_status(streamed_count=1))
    run(tasks.reconcile_subscriptions)
    report = DriftReport.objects.get()
    assert report.ok
    # Nothing changed since: the next run does not wake the engines.
    assert run(tasks.reconcile_subscriptions)["reload"] is False


def test_reconcile_counts_mock_streamed_subscriptions_as_streamed(celery_worker, loaded, settings):
    settings.RECONCILE_GRACE_S = 0
    options = list(Instrument.objects.filter(instrument_type="CE").order_by("pk")[:3])
    for option in options:
        Subscription.objects.create(instrument=option, mode="full", unassigned_reason="no streamable account")
    now = timezone.now()
    EngineHeartbeat.objects.create(engine_id="e1", hostname="h", pid=1, started_at=now, updated_at=now,
                                   state=engine_status(mode="mock", mocked_count=2))
    run(tasks.reconcile_subscriptions)
    report = DriftReport.objects.get()
    # Two of the three are fed by the mock market; the third is really unassigned.
    assert (report.ok, report.unassigned, report.details["mocked"]) == (False, 1, 2)
    assert "2 streamed from the mock market" in report.summary

    EngineHeartbeat.objects.filter(engine_id="e1").update(
        state=engine_status(mode="mock", mocked_count=3)
    )
    run(tasks.reconcile_subscriptions)
    report = DriftReport.objects.get()
    assert (report.ok, report.unassigned) == (True, 0)


def test_reconcile_ignores_changes_younger_than_the_grace(celery_worker, loaded, settings):
    settings.RECONCILE_GRACE_S = 60
    Subscription.objects.create(instrument=Instrument.objects.filter(instrument_type="CE").first())
    run(tasks.reconcile_subscriptions)
    report = DriftReport.objects.get()
    assert report.missing == 0
    assert "no engine heartbeat" in report.summary  # but no engine at all is reported


def test_enrich_history_stores_the_configured_ranges(celery_worker, loaded, sim):
    option = Instrument.objects.filter(name="NIFTY", instrument_type="PE", strike=26_000.0).order_by("expiry").first()
    rng = HistoryRange.objects.create(instrument=option, interval="15minute", days_back=5)
    result = run(tasks.enrich_history)
    assert len(result["ranges"]) == 1 and "computed" in result["ranges"][0]
    stored = CandleGreeks.objects.filter(instrument=option, interval="15minute").count()
    assert stored > 0
    rng.refresh_from_db()
    assert rng.last_run_at is not None and f"{stored} candles" in rng.last_result
    calls = sim.sim.rest_requests["market.historical"]
    # The next run finds the range stored up to the last closed candle.
    result = run(tasks.enrich_history)
    assert CandleGreeks.objects.filter(instrument=option, interval="15minute").count() == stored
    assert sim.sim.rest_requests["market.historical"] <= calls + 2


def test_enrich_history_records_a_range_kite_refuses_and_goes_on(celery_worker, loaded, sim):
    options = list(Instrument.objects.filter(name="NIFTY", instrument_type="CE", strike=26_000.0).order_by("expiry")[:2])
    refused = HistoryRange.objects.create(instrument=options[0], interval="60minute", days_back=3)
    fine = HistoryRange.objects.create(instrument=options[1], interval="60minute", days_back=3)
    sim.call(sim.sim.fail_next, "market.historical", status=400, error_type="InputException",
             message="invalid instrument")
    result = run(tasks.enrich_history)
    assert len(result["ranges"]) == 2
    refused.refresh_from_db()
    fine.refresh_from_db()
    assert "Kite refused" in refused.last_result and "InputException" in refused.last_result
    assert "computed" in fine.last_result
    assert CandleGreeks.objects.filter(instrument=options[1]).exists()
    assert not CandleGreeks.objects.filter(instrument=options[0]).exists()
