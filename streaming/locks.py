"""Named job locks with an owner and an expiry, so a periodic job never overlaps itself.

A lock is one ``JobLock`` row. Taking it is one conditional UPDATE (the row is free when it
has expired or is already ours) and, when no row exists yet, one INSERT that loses cleanly to
a concurrent INSERT on the primary key. No lock is held across the job itself: a worker that
dies leaves a row that expires after ``ttl_s``, and the next run takes it over; the same
Celery task delivered again (its worker process died) or retried takes it over at once. Works the same
on PostgreSQL and on the demo's SQLite.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import structlog
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from streaming.models import JobLock

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: A task's lock outlives its hard time limit by this much, so it never expires under a run.
LOCK_MARGIN_S = 30


def joblock_owner_id(suffix: str = "") -> str:
    """An owner id that names the host and process, unique per call."""
    parts = [socket.gethostname(), str(os.getpid()), suffix or uuid.uuid4().hex[:12]]
    return ":".join(parts)[:200]


def joblock_acquire(
    *, name: str, owner: str, ttl_s: float, now: dt.datetime | None = None, task_id: str = ""
) -> bool:
    """Take (or renew) the lock ``name`` for ``owner`` until now + ``ttl_s``; True if taken.

    ``task_id``: a lock held under the same Celery task id (an owner ending ``:<task_id>``) is
    taken over at once. It is an earlier try or delivery of this very run, and it is over:
    Celery hands a task id to one process at a time, again only after that process died
    (``task_reject_on_worker_lost``), as a retry sent after the try ended (its release may
    have met the database blip it is retried for), or past the broker's visibility timeout
    (1 h, beyond every task's time limit).
    """
    now = now or timezone.now()
    expires_at = now + dt.timedelta(seconds=ttl_s)
    free = Q(expires_at__lte=now) | Q(owner=owner)
    if task_id:
        free |= Q(owner__endswith=f":{task_id}")
    taken = (
        JobLock.objects.filter(name=name).filter(free).update(owner=owner, expires_at=expires_at)
    )
    if taken:
        return True
    try:
        # A savepoint, so that losing the race does not break a caller's transaction.
        with transaction.atomic():
            JobLock.objects.create(name=name, owner=owner, expires_at=expires_at)
    except IntegrityError:
        return False
    return True


def joblock_release(*, name: str, owner: str) -> bool:
    """Give the lock back if ``owner`` still holds it; True if it did."""
    deleted, _ = JobLock.objects.filter(name=name, owner=owner).delete()
    return bool(deleted)


@contextmanager
def job_lock(
    *, name: str, ttl_s: float, owner: str | None = None, task_id: str = ""
) -> Iterator[bool]:
    """Hold the lock ``name`` for the ``with`` block; yields False (and holds nothing) if taken.

    ``ttl_s`` should exceed the job's hard time limit so the lock cannot expire under a
    running job; a killed job's lock expires on its own, or is taken over at once by the
    same task's next delivery (``task_id``, see :func:`joblock_acquire`).
    """
    owner = owner or joblock_owner_id()
    acquired = joblock_acquire(name=name, owner=owner, ttl_s=ttl_s, task_id=task_id)
    if not acquired:
        holder = JobLock.objects.filter(name=name).values_list("owner", "expires_at").first()
        log.info(
            "joblock.busy",
            lock=name,
            holder=holder[0] if holder else None,
            expires_at=holder[1].isoformat() if holder else None,
        )
        yield False
        return
    try:
        yield True
    finally:
        joblock_release(name=name, owner=owner)


def run_locked(
    *, name: str, time_limit_s: float, task_id: str, fn: Callable[[], T]
) -> T | dict[str, str]:
    """Run a periodic job's body under its lock; a concurrent run returns a "skipped" result.

    A redelivery or retry of the same task (``task_id``) takes over the lock its earlier try
    left behind, whichever worker process runs it.
    """
    owner = joblock_owner_id(task_id)
    with job_lock(
        name=name, ttl_s=time_limit_s + LOCK_MARGIN_S, owner=owner, task_id=task_id
    ) as acquired:
        if not acquired:
            return {"skipped": f"lock {name} held by another run"}
        return fn()
