"""Celery faults in the middle of a job: its worker process killed, a PostgreSQL blip.

The job is the instrument refresh (``subscriptions.refresh_instruments``, daily, under the
``refresh_instruments`` JobLock), made to last by the simulator holding its instrument dump
for 5 s. The promise (subscriptions/tasks.py, streaming/locks.py): a run that is cut short is
retried or taken over, its work is done (here within a minute; its next scheduled run is a
day away), and the job never runs twice at once.

How "twice at once" is seen: the worker logs ``task_started`` when a try of the task begins
and ``task_succeeded`` / ``task_failed`` when it ends (django-structlog, every line bound to
the task id); a try that is retried ends when it queues its retry (``task_enqueued`` of its
own id: the body and its lock are behind it by then; ``task_retrying`` comes later),
``joblock.busy`` says a try found the lock held and skipped, and a try whose process was
killed ends at the kill. A try that starts while another one runs and does not skip is a
second run at once.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
import uuid
from pathlib import Path

import orjson

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.infra_support import rounded, wait_until

JOB = "subscriptions.refresh_instruments"
LOCK = "refresh_instruments"
DUMP_ROUTE = "market.instruments.all"
DUMP_DELAY_S = 5.0
"""Under the REST client's 7 s read timeout: the try waits, it does not fail."""
DONE_BOUND_S = 60.0
JOB_START_TIMEOUT_S = 30.0

_STARTED = "task_started"
_ENDED = ("task_succeeded", "task_failed")
_RETRY_QUEUED = "task_enqueued"
_RETRYING = "task_retrying"
_SKIPPED = "joblock.busy"


def _queue_job() -> str:
    from tickerproj.celery import app

    task_id = f"faults-{uuid.uuid4()}"
    app.send_task(JOB, task_id=task_id)
    return task_id


def _lock_owner() -> str | None:
    from django.db import DatabaseError, close_old_connections

    from streaming.models import JobLock

    try:
        close_old_connections()
        return JobLock.objects.filter(name=LOCK).values_list("owner", flat=True).first()
    except DatabaseError:
        close_old_connections()
        return None


def _done_after(task_id: str, since: dt.datetime) -> bool:
    """The job's last run is this task's, succeeded (not skipped) after ``since``."""
    from django.db import DatabaseError, close_old_connections

    from subscriptions.models import JobRun

    try:
        close_old_connections()
        run = JobRun.objects.filter(task_name=JOB, task_id=task_id).first()
    except DatabaseError:
        close_old_connections()
        return False
    return (run is not None and run.outcome == JobRun.Outcome.SUCCEEDED
            and run.finished_at >= since and "skipped" not in run.summary)


def _events(path: Path, offset: int, task_id: str) -> list[tuple[int, str]]:
    """(byte offset, event) of the worker's lines about ``task_id``, in log order; a retry
    the task queues of itself is one ``task_enqueued`` (it may be logged twice)."""
    found: list[tuple[int, str]] = []
    with path.open("rb") as f:
        f.seek(offset)
        position = offset
        for raw in f:
            line_at, position = position, position + len(raw)
            if task_id.encode() not in raw:
                continue
            start = raw.find(b"{")
            try:
                record = orjson.loads(raw[start:]) if start >= 0 else None
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("task_id") != task_id:
                continue
            event = str(record.get("event"))
            if event == _RETRY_QUEUED and (record.get("child_task_id") != task_id
                                           or (found and found[-1][1] == _RETRY_QUEUED)):
                continue
            found.append((line_at, event))
    return found


def _tries(events: list[tuple[int, str]], kill_offsets: list[int]) -> tuple[int, int]:
    """(tries started, the most running at once) from the worker's lines and the kills."""
    running = started = most = retries_ended = 0
    kills = sorted(kill_offsets)
    for at, event in events:
        while kills and kills[0] <= at:
            kills.pop(0)
            running = max(0, running - 1)
        if event == _STARTED:
            started += 1
            running += 1
            most = max(most, running)
        elif event == _SKIPPED:
            running = max(0, running - 1)  # this try holds nothing; its end line follows
            started -= 1
        elif event == _RETRY_QUEUED:
            running = max(0, running - 1)
            retries_ended += 1
        elif event == _RETRYING and retries_ended:
            retries_ended -= 1  # ended when it queued the retry
        elif event in (*_ENDED, _RETRYING):
            running = max(0, running - 1)
    return started, most


def _job_in_flight(dep) -> tuple[str, str]:
    """Queue the job with its dump held back: (task id, lock owner) once the try is in it."""
    dep.sim("delay_next", DUMP_ROUTE, DUMP_DELAY_S)
    task_id = _queue_job()
    owner = wait_until(lambda: (o := _lock_owner()) and o.endswith(task_id) and o,
                       timeout_s=JOB_START_TIMEOUT_S)
    if owner is None:
        raise RuntimeError(f"the job did not take its lock within {JOB_START_TIMEOUT_S} s")
    return task_id, owner


def _outcome(*, task_id: str, since_wall: dt.datetime, since: float, log: Path, offset: int,
             kill_offsets: list[int], extra: dict) -> Outcome:
    done = wait_until(lambda: _done_after(task_id, since_wall), timeout_s=DONE_BOUND_S, interval_s=0.25)
    done_s = time.monotonic() - since if done else None
    started, most = _tries(_events(log, offset, task_id), kill_offsets)
    return Outcome(
        figures={**extra, "done_s": rounded(done_s), "tries": started, "at_once_max": most},
        promises=[
            Promise(f"the job is retried or taken over and done within {DONE_BOUND_S:.0f} s",
                    done_s is not None, f"{'done after ' + str(rounded(done_s)) + ' s' if done else 'not done'}"
                    f", {started} tries"),
            Promise("the job never runs twice at once", most <= 1, f"at most {most} at once"),
        ],
    )


@scenario("celery.worker_killed_mid_job", group="celery", quick=True)
def worker_killed_mid_job(dep) -> Outcome:
    """Worker process killed (-9) mid-job: retried or taken over, done, never twice at once."""
    from django.utils import timezone

    log = dep.procs["celery-worker"].log_path
    offset = log.stat().st_size
    task_id, owner = _job_in_flight(dep)
    pid = int(owner.split(":")[-2])  # owner: host:pid:task_id (streaming.locks.joblock_owner_id)
    killed_wall = timezone.now()
    killed = dep.probe.mark(f"celery pool process {pid} kill -9")
    os.kill(pid, signal.SIGKILL)
    kill_offset = log.stat().st_size
    return _outcome(task_id=task_id, since_wall=killed_wall, since=killed, log=log, offset=offset,
                    kill_offsets=[kill_offset], extra={"killed_pid": pid})


@scenario("celery.postgres_blip_mid_job", group="celery")
def postgres_blip_mid_job(dep) -> Outcome:
    """PostgreSQL blip (fast restart) mid-job: retried, done, never twice at once."""
    from django.utils import timezone

    log = dep.procs["celery-worker"].log_path
    offset = log.stat().st_size
    task_id, _owner = _job_in_flight(dep)
    blip_wall = timezone.now()
    blip = dep.probe.mark("postgres fast restart mid-job")
    restart_s = dep.pg_ctl("restart", mode="fast")
    return _outcome(task_id=task_id, since_wall=blip_wall, since=blip, log=log, offset=offset,
                    kill_offsets=[], extra={"restart_s": rounded(restart_s)})
