"""Celery tasks for broker accounts."""

from __future__ import annotations

from typing import Any, Final

from celery import Task, shared_task

from accounts.services import accounts_expire_sessions
from streaming.locks import run_locked
from subscriptions.tasks import DATABASE_BLIPS, RETRY_BACKOFF

EXPIRE_SESSIONS_TIME_LIMIT_S: Final = 60


@shared_task(
    name="accounts.expire_sessions",
    bind=True,
    soft_time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S - 10,
    time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S,
    # A daily job: a database blip at 06:00 must not leave expired sessions unmarked all day.
    autoretry_for=DATABASE_BLIPS,
    **RETRY_BACKOFF,
)
def expire_sessions(self: Task) -> dict[str, Any]:
    """At 06:00 IST: mark accounts whose access token has expired; the admin shows who must log in."""

    def run() -> dict[str, Any]:
        return {"expired": accounts_expire_sessions()}

    return run_locked(
        name="expire_sessions", time_limit_s=EXPIRE_SESSIONS_TIME_LIMIT_S,
        task_id=self.request.id or "", fn=run,
    )
