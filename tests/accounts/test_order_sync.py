"""The order sync (``accounts.sync_orders``) on a real Celery worker against the simulator:
it repairs what the live updates missed, through the same services, records each
correction, and a second run finds nothing to correct."""

from __future__ import annotations

import logging

import pytest
from django.urls import reverse
from django_celery_beat.models import PeriodicTask

from accounts.brokers import broker_for
from accounts.models import Order, OrderSyncRun, PositionSnapshot, Trade
from accounts.order_services import order_apply_update
from accounts.tasks import sync_orders
from subscriptions.models import Instrument
from subscriptions.schedules import schedules_ensure_defaults
from tests.subscriptions.conftest import SIM_ACCESS_TOKEN, SIM_API_KEY, SIM_API_SECRET
from tests.subscriptions.conftest import kite_settings as kite_settings
from tests.subscriptions.conftest import market as market
from tests.subscriptions.conftest import sim as sim
from tests.subscriptions.conftest import sim_account as sim_account
from tests.subscriptions.conftest import sim_instruments as sim_instruments

pytestmark = pytest.mark.django_db(transaction=True)


def nifty_call() -> Instrument:
    return Instrument.objects.filter(name="NIFTY", instrument_type="CE").order_by("strike").first()


def place(account, option: Instrument, *, order_type: str, price: float = 0, tag: str) -> str:
    params = {
        "variety": "regular", "exchange": option.exchange, "tradingsymbol": option.tradingsymbol,
        "transaction_type": "BUY", "order_type": order_type, "product": "NRML",
        "validity": "DAY", "quantity": option.lot_size, "tag": tag,
    }  # fmt: skip
    if price:
        params["price"] = price
    return broker_for(account=account).place_order(params=params)


def run_sync(account) -> OrderSyncRun:
    result = sync_orders.delay(account_id=account.pk, trigger="manual").get(timeout=120)
    return OrderSyncRun.objects.get(pk=result[account.label]["run"])


def test_the_sync_repairs_missed_updates_records_them_and_then_finds_nothing(
    kite_settings, sim, sim_account, sim_instruments, celery_worker, caplog, admin_client
):
    option = nifty_call()
    sim.call(sim.sim.mute_order_updates, SIM_API_KEY)  # nothing live reaches us: all missed
    filled = place(sim_account, option, order_type="MARKET", tag="sync1")
    resting = place(sim_account, option, order_type="LIMIT", price=0.05, tag="sync2")
    # We saw the filled order open (say on the ticker) and then missed its completion.
    first_state = sim.call(sim.sim.order_history, SIM_API_KEY, filled)[1]
    order_apply_update(account=sim_account, update=first_state, source="ticker")

    with caplog.at_level(logging.INFO):
        run = run_sync(sim_account)

    assert run.status == "ok" and run.trigger == "manual" and run.finished_at is not None
    assert (run.orders_seen, run.trades_seen) == (2, 1)
    by_order = {c["order_id"]: c for c in run.corrections if c["kind"] == "order"}
    assert by_order[filled]["before"] == {"status": "OPEN", "filled_quantity": 0}
    assert by_order[filled]["after"] == {"status": "COMPLETE", "filled_quantity": option.lot_size}
    assert by_order[resting]["before"] is None  # first seen by the sync
    assert by_order[resting]["after"]["status"] == "OPEN"
    trades = [c for c in run.corrections if c["kind"] == "trade"]
    assert [(t["order_id"], t["quantity"]) for t in trades] == [(filled, option.lot_size)]

    done = Order.objects.get(account=sim_account, kite_order_id=filled)
    assert (done.status, done.filled_quantity) == ("COMPLETE", option.lot_size)
    assert [h["source"] for h in done.status_history] == ["ticker", "sync"]
    assert Trade.objects.filter(account=sim_account).count() == 1
    assert PositionSnapshot.objects.filter(account=sim_account, source="sync").count() == 1

    again = run_sync(sim_account)
    assert again.status == "ok" and again.corrections == []
    assert Trade.objects.filter(account=sim_account).count() == 1
    assert len(Order.objects.get(pk=done.pk).status_history) == 2

    page = admin_client.get(reverse("admin:accounts_ordersyncrun_changelist"))
    assert page.status_code == 200 and b"manual" in page.content
    detail = admin_client.get(reverse("admin:accounts_ordersyncrun_change", args=[run.pk]))
    assert detail.status_code == 200 and filled.encode() in detail.content

    logged = "\n".join(f"{r.getMessage()} {r.msg!r}" for r in caplog.records)
    assert "order_sync.done" in logged
    for secret in (SIM_ACCESS_TOKEN, SIM_API_SECRET):
        assert secret not in logged
        assert secret not in str(run.corrections)


def test_a_sync_kite_refuses_is_recorded_failed_without_the_token(
    kite_settings, sim, sim_account, celery_worker
):
    sim.call(sim.sim.fail_next, "orders", 403, "TokenException",
             message="Incorrect `api_key` or `access_token`.")
    run = run_sync(sim_account)
    assert run.status == "failed" and run.error
    assert SIM_ACCESS_TOKEN not in run.error
    assert not PositionSnapshot.objects.filter(account=sim_account).exists()


def test_the_sync_has_a_schedule_in_the_admin(db, admin_client):
    schedules_ensure_defaults()
    task = PeriodicTask.objects.get(name="Sync orders")
    assert task.task == "accounts.sync_orders" and task.enabled
    assert task.crontab is not None and task.crontab.hour == "9-15"
    page = admin_client.get(reverse("admin:django_celery_beat_periodictask_change", args=[task.pk]))
    assert page.status_code == 200
