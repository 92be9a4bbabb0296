"""Default schedules: created after migrate, shown in the admin, never overwritten by a redeploy."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from celery.schedules import crontab
from django.core.management import call_command
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from subscriptions.schedules import (
    DEFAULT_SCHEDULES,
    Cron,
    celery_schedule,
    schedules_ensure_defaults,
)
from tickerproj.celery import app

pytestmark = pytest.mark.django_db

NAMES = {spec.name for spec in DEFAULT_SCHEDULES}


def test_migrate_created_every_default_schedule():
    tasks = {t.name: t for t in PeriodicTask.objects.filter(name__in=NAMES)}
    assert set(tasks) == NAMES
    refresh = tasks["Refresh instruments before the open"]
    assert refresh.task == "subscriptions.refresh_instruments"
    assert (refresh.crontab.minute, refresh.crontab.hour, refresh.crontab.day_of_week) == ("30", "8", "mon-fri")
    assert str(refresh.crontab.timezone) == "Asia/Kolkata"
    expire = tasks["Expire Kite sessions"]
    assert (expire.crontab.minute, expire.crontab.hour, expire.task) == ("0", "6", "accounts.expire_sessions")
    assert (tasks["Reconcile subscriptions"].interval.every, tasks["Reconcile subscriptions"].interval.period) == (
        30, IntervalSchedule.SECONDS
    )
    assert tasks["Rebalance strikes"].interval.every == 15
    assert tasks["Rebalance strikes"].expire_seconds == 15
    assert all(t.enabled for t in tasks.values())


def test_every_scheduled_task_is_registered_with_celery():
    app.loader.import_default_modules()
    assert {spec.task for spec in DEFAULT_SCHEDULES} <= set(app.tasks)


def test_ensure_defaults_is_idempotent():
    crontabs, intervals = CrontabSchedule.objects.count(), IntervalSchedule.objects.count()
    assert schedules_ensure_defaults() == []
    call_command("ensure_schedules")
    assert PeriodicTask.objects.filter(name__in=NAMES).count() == len(NAMES)
    assert (CrontabSchedule.objects.count(), IntervalSchedule.objects.count()) == (crontabs, intervals)


def test_a_deleted_default_comes_back():
    PeriodicTask.objects.filter(name="Rebalance strikes").delete()
    assert schedules_ensure_defaults() == ["Rebalance strikes"]
    assert PeriodicTask.objects.get(name="Rebalance strikes").interval.every == 15


def test_schedules_show_in_the_admin_and_an_edit_there_survives_a_redeploy(admin_client):
    changelist = admin_client.get("/admin/django_celery_beat/periodictask/")
    assert changelist.status_code == 200
    for name in NAMES:
        assert name in changelist.content.decode()

    task = PeriodicTask.objects.get(name="Reconcile subscriptions")
    every_minute = IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)
    form = {
        "name": task.name,
        "regtask": task.task,
        "task": "",
        # "enabled" left out: unchecked
        "description": "ops: slower, and off during the migration",
        "interval": every_minute.pk,
        "crontab": "",
        "solar": "",
        "clocked": "",
        "start_time_0": "",
        "start_time_1": "",
        "last_run_at_0": "",
        "last_run_at_1": "",
        "args": "[]",
        "kwargs": json.dumps({}),
        "expires_0": "",
        "expires_1": "",
        "expire_seconds": "60",
        "queue": "",
        "exchange": "",
        "routing_key": "",
        "priority": "",
        "headers": "{}",
        "_save": "Save",
    }
    response = admin_client.post(f"/admin/django_celery_beat/periodictask/{task.pk}/change/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    task.refresh_from_db()
    assert (task.enabled, task.interval_id, task.expire_seconds) == (False, every_minute.pk, 60)

    # A redeploy: migrations (post_migrate) and the explicit command both run again.
    call_command("migrate", verbosity=0)
    call_command("ensure_schedules")
    task.refresh_from_db()
    assert (task.enabled, task.interval_id, task.expire_seconds) == (False, every_minute.pk, 60)
    assert task.description == "ops: slower, and off during the migration"


def test_the_demo_gets_celery_schedules_for_the_same_jobs():
    by_task = {spec.task: spec for spec in DEFAULT_SCHEDULES}
    refresh = celery_schedule(by_task["subscriptions.refresh_instruments"])
    assert isinstance(refresh, crontab)
    assert refresh.hour == {8} and refresh.minute == {30} and refresh.day_of_week == {1, 2, 3, 4, 5}
    rebalance = celery_schedule(by_task["subscriptions.rebalance_strikes"])
    assert rebalance.run_every == dt.timedelta(seconds=15)
    due, _ = rebalance.is_due(rebalance.now() - dt.timedelta(seconds=16))
    assert due
    assert isinstance(by_task["accounts.expire_sessions"].every, Cron)
