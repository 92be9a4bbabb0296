"""L5: a daily job that meets a database blip is retried, not lost for the day.

The blip is real: PostgreSQL terminates the worker's pooled connections between two runs, so
the next run's first query fails with OperationalError, as after a failover or a restart.
"""

from __future__ import annotations

import pytest
from django.db import connection

from accounts.tasks import expire_sessions
from subscriptions import tasks
from subscriptions.models import Instrument
from tests.subscriptions.conftest import make_account

TASK_TIMEOUT_S = 90


def terminate_other_connections() -> int:
    """Kill every backend on the test database but this test's own; how many went."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_the_instrument_refresh_survives_a_database_blip(celery_worker, kite_settings, sim, market):
    make_account()
    assert tasks.refresh_instruments.apply_async().get(timeout=TASK_TIMEOUT_S)["created"] > 0
    assert terminate_other_connections() >= 1  # the worker's pooled connection
    result = tasks.refresh_instruments.apply_async().get(timeout=TASK_TIMEOUT_S)
    assert result["unchanged"] == len(market.instruments)
    assert Instrument.objects.count() == len(market.instruments)


def test_the_session_expiry_survives_a_database_blip(celery_worker):
    assert expire_sessions.apply_async().get(timeout=TASK_TIMEOUT_S) == {"expired": []}
    assert terminate_other_connections() >= 1
    assert expire_sessions.apply_async().get(timeout=TASK_TIMEOUT_S) == {"expired": []}


@pytest.mark.parametrize("task", [tasks.refresh_instruments, tasks.enrich_history, expire_sessions])
def test_daily_jobs_retry_database_errors(task):
    from django.db import InterfaceError, OperationalError

    assert {OperationalError, InterfaceError} <= set(task.autoretry_for)
