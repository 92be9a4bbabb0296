"""Celery tasks for broker accounts."""

from __future__ import annotations

from typing import Any, Final

from celery import Task, shared_task
from django.db import transaction

from accounts.services import accounts_expire_sessions
from streaming.control import notify_engines_on_commit
from subscriptions.locks import job_lock, joblock_owner_id

EXPIRE_SESSIONS_TIME_LIMIT_S: Final = 60


@shared_task(
    name="accounts.expire_sessions",
    bind=True,
    soft_time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S - 10,
    time_limit=EXPIRE_SESSIONS_TIME_LIMIT_S,
)
def expire_sessions(self: Task) -> dict[str, Any]:
    """At 06:00 IST: mark accounts whose access token has expired; the admin shows who must log in."""
    owner = joblock_owner_id(self.request.id or "")
    with job_lock(name="expire_sessions", ttl_s=EXPIRE_SESSIONS_TIME_LIMIT_S + 30, owner=owner) as ok:
        if not ok:
            return {"skipped": "lock expire_sessions held by another run"}
        with transaction.atomic():
            labels = accounts_expire_sessions()
            if labels:
                # Engines drop the expired accounts' connections instead of waiting for a 403.
                notify_engines_on_commit()
        return {"expired": labels}
