"""The periodic jobs and their default schedules.

In production Celery beat runs them from django-celery-beat's database scheduler, so ops see
and edit the schedules in the admin. :func:`schedules_ensure_defaults` creates the defaults
that are missing, by name, and never changes a periodic task once it exists: an edit made in the admin survives every deploy. It runs after ``migrate``
(post_migrate) and as ``manage.py ensure_schedules``.

The demo has no broker: it runs the same task functions in-process on
:data:`DEFAULT_SCHEDULES` (``celery_schedule`` gives each one's Celery schedule object, whose
``is_due`` says when to run it).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from celery.schedules import crontab, schedule
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

log = structlog.get_logger(__name__)

SCHEDULE_TIMEZONE: Final = "Asia/Kolkata"


@dataclass(frozen=True, slots=True)
class Cron:
    """A crontab in IST (fields as in cron)."""

    minute: str = "*"
    hour: str = "*"
    day_of_week: str = "*"
    day_of_month: str = "*"
    month_of_year: str = "*"


@dataclass(frozen=True, slots=True)
class JobSchedule:
    """One periodic job: its admin name, the Celery task name and the default schedule."""

    name: str
    task: str
    every: dt.timedelta | Cron
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: A run not started within this many seconds of being due is dropped (no pile-up).
    expire_s: int | None = None


DEFAULT_SCHEDULES: Final[tuple[JobSchedule, ...]] = (
    JobSchedule(
        name="Refresh instruments before the open",
        task="subscriptions.refresh_instruments",
        every=Cron(minute="30", hour="8", day_of_week="mon-fri"),
        description="Reload Kite's instrument dump at 08:30 IST on weekdays; retire expired "
        "contracts' subscriptions.",
        expire_s=3600,
    ),
    JobSchedule(
        name="Reconcile subscriptions",
        task="subscriptions.reconcile_subscriptions",
        every=dt.timedelta(seconds=30),
        description="Compare wanted and streamed subscriptions, report drift, reload engines.",
        expire_s=30,
    ),
    JobSchedule(
        name="Rebalance strikes",
        task="subscriptions.rebalance_strikes",
        every=dt.timedelta(seconds=15),
        description="Move each rebalance rule's strike band with the market (rules have their "
        "own hysteresis and cooldown).",
        expire_s=15,
    ),
    JobSchedule(
        name="Expire Kite sessions",
        task="accounts.expire_sessions",
        every=Cron(minute="0", hour="6"),
        description="Kite access tokens expire at 06:00 IST: mark the accounts that need a login.",
        expire_s=3600,
    ),
    JobSchedule(
        name="Enrich historical Greeks",
        task="subscriptions.enrich_history",
        every=Cron(minute="*/15", hour="16-23", day_of_week="mon-fri"),
        description="Compute the Greeks of the configured history ranges after the close.",
        expire_s=900,
    ),
    JobSchedule(
        name="Resolve stale orders",
        task="accounts.resolve_stale_orders",
        every=dt.timedelta(seconds=30),
        description="Settle UNKNOWN orders, and orders whose placing process stopped, from Kite's "
        "order book (each UNKNOWN order also has its own countdown task).",
        expire_s=30,
    ),
)


def celery_schedule(spec: JobSchedule) -> schedule:
    """The Celery schedule object of a job (``is_due``/``remaining_estimate``), in the app's tz."""
    if isinstance(spec.every, Cron):
        c = spec.every
        return crontab(
            minute=c.minute, hour=c.hour, day_of_week=c.day_of_week,
            day_of_month=c.day_of_month, month_of_year=c.month_of_year,
        )  # fmt: skip
    return schedule(run_every=spec.every)


def _schedule_row(every: dt.timedelta | Cron) -> dict[str, Any]:
    if isinstance(every, Cron):
        fields = {
            "minute": every.minute,
            "hour": every.hour,
            "day_of_week": every.day_of_week,
            "day_of_month": every.day_of_month,
            "month_of_year": every.month_of_year,
            "timezone": SCHEDULE_TIMEZONE,
        }
        row = CrontabSchedule.objects.filter(**fields).order_by("pk").first()
        return {"crontab": row or CrontabSchedule.objects.create(**fields)}
    seconds = int(every.total_seconds())
    fields = {"every": seconds, "period": IntervalSchedule.SECONDS}
    row = IntervalSchedule.objects.filter(**fields).order_by("pk").first()
    return {"interval": row or IntervalSchedule.objects.create(**fields)}


def schedules_ensure_defaults(
    *, schedules: tuple[JobSchedule, ...] = DEFAULT_SCHEDULES
) -> list[str]:
    """Create the default periodic tasks that do not exist yet; returns the names created.

    An existing task (matched by name) is left exactly as ops left it: schedule, enabled
    flag, arguments, expiry. Renaming a task in code therefore needs a data migration.
    """
    created: list[str] = []
    for spec in schedules:
        with transaction.atomic():
            if PeriodicTask.objects.filter(name=spec.name).exists():
                continue
            _, was_created = PeriodicTask.objects.get_or_create(
                name=spec.name,
                defaults={
                    "task": spec.task,
                    "description": spec.description,
                    "kwargs": json.dumps(spec.kwargs),
                    "expire_seconds": spec.expire_s,
                    "enabled": True,
                    **_schedule_row(spec.every),
                },
            )
            if was_created:
                created.append(spec.name)
    if created:
        log.info("schedules.created", names=created)
    return created
