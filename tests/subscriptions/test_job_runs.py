"""The outcome of the last run of each job, recorded by the worker and shown in the admin."""

from __future__ import annotations

import pytest

from subscriptions import tasks
from subscriptions.models import JobRun
from tests.helpers import wait_until
from tests.subscriptions.conftest import make_account


def last_run(task_name: str, *, task_id: str) -> JobRun:
    """The row, once the worker wrote it (its signal fires just after the result is stored)."""
    return wait_until(
        lambda: JobRun.objects.filter(task_name=task_name, task_id=task_id).first(),
        timeout_s=30, what=f"the outcome of {task_id}",
    )


def test_the_last_run_of_each_job_is_recorded_and_shown(celery_worker, kite_settings, sim, market, client):
    from django.contrib.auth.models import User

    make_account()
    ok = tasks.refresh_instruments.apply_async()
    assert ok.get(timeout=90)["created"] > 0
    run = last_run("subscriptions.refresh_instruments", task_id=ok.id)
    assert run.outcome == "succeeded" and run.duration_s is not None and "created" in run.summary

    sim.call(sim.sim.fail_next, "market.instruments.all", status=403, error_type="TokenException")
    failing = tasks.refresh_instruments.apply_async()
    with pytest.raises(Exception, match="TokenException"):
        failing.get(timeout=90)
    run = last_run("subscriptions.refresh_instruments", task_id=failing.id)
    assert run.outcome == "failed"
    assert "TokenException" in run.summary

    admin = User.objects.create_superuser("ops", password="pw-ops-12345")
    client.force_login(admin)
    html = client.get("/admin/subscriptions/jobrun/").content.decode()
    assert "subscriptions.refresh_instruments" in html and "Failed" in html
    assert client.get("/admin/subscriptions/jobrun/add/").status_code == 403
