"""Logs and metrics of Celery's worker and beat, wired into the Celery app by :func:`install`.

- Logging: Celery replaces the root logger's handlers with its own formatter unless someone
  answers its ``setup_logging`` signal; we answer it with the project's structlog set-up, so
  worker and beat write the same JSON lines as every other process. django-structlog's worker
  step binds ``task_id`` (and the queuing request's ``request_id``) to every line of a task.
- Metrics: each task's outcome and duration, counted in the process that ran it, served by
  the worker on CELERY_METRICS_PORT behind the ops access (tickerproj/metrics.py).
- Outcomes: the last run of each task, written to ``JobRun`` for the admin.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery import Celery, signals
from django_structlog.celery.steps import DjangoStructLogInitStep
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tickerproj.logging import configure_logging

log = structlog.get_logger(__name__)


class CeleryTaskMetrics:
    """Task outcomes, durations and last successes, keyed by the task's name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks = Counter(
            "tickerproj_celery_tasks_total",
            "Finished task runs by outcome (succeeded, failed, retried).",
            ["task", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "tickerproj_celery_task_duration_seconds",
            "Wall time of a task run.",
            ["task"],
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900),
            registry=registry,
        )
        self.last_success = Gauge(
            "tickerproj_celery_task_last_success_timestamp_seconds",
            "Unix time of the task's last successful run.",
            ["task"],
            registry=registry,
            multiprocess_mode="max",
        )
        self._started: dict[str, float] = {}

    def task_started(self, *, task_id: str) -> None:
        self._started[task_id] = time.monotonic()

    def task_finished(self, *, task_id: str, task_name: str, outcome: str, summary: str) -> None:
        started = self._started.pop(task_id, None)
        duration_s = time.monotonic() - started if started is not None else None
        if duration_s is not None:
            self.duration.labels(task_name).observe(duration_s)
        self.tasks.labels(task_name, outcome).inc()
        if outcome == "succeeded":
            self.last_success.labels(task_name).set(time.time())
        _record_outcome(
            task_name=task_name, task_id=task_id, outcome=outcome, duration_s=duration_s, summary=summary
        )

    def connect(self) -> None:
        """Count through Celery's task signals (sent in the process that runs the task)."""

        def prerun(task_id: str, task: Any, **_: Any) -> None:
            self.task_started(task_id=task_id)

        def success(sender: Any, result: Any = None, **_: Any) -> None:
            self.task_finished(
                task_id=sender.request.id, task_name=sender.name, outcome="succeeded",
                summary=repr(result),
            )

        def failure(sender: Any, task_id: str, exception: BaseException | None = None, **_: Any) -> None:
            self.task_finished(
                task_id=task_id, task_name=sender.name, outcome="failed",
                summary=f"{type(exception).__name__}: {exception}",
            )

        def retry(sender: Any, request: Any, reason: Any = None, **_: Any) -> None:
            self.task_finished(
                task_id=request.id, task_name=sender.name, outcome="retried", summary=str(reason)
            )

        for signal, receiver in (
            (signals.task_prerun, prerun),
            (signals.task_success, success),
            (signals.task_failure, failure),
            (signals.task_retry, retry),
        ):
            signal.connect(receiver, weak=False)


def _record_outcome(**fields: Any) -> None:
    """Write the run's outcome; a failure to write is logged, never the task's failure."""
    from django.db import DatabaseError

    from subscriptions.jobs import job_run_record

    try:
        job_run_record(**fields)
    except DatabaseError as exc:
        log.warning("celery.outcome_not_recorded", task=fields["task_name"], error=str(exc)[:200])


def install(app: Celery) -> CeleryTaskMetrics:
    """Wire logging and metrics into ``app``; returns the metrics (their registry is private)."""
    app.steps["worker"].add(DjangoStructLogInitStep)

    def keep_project_logging(**_: Any) -> None:
        from django.conf import settings

        configure_logging(json=settings.LOG_JSON, level=settings.LOG_LEVEL)

    signals.setup_logging.connect(keep_project_logging, weak=False)

    metrics = CeleryTaskMetrics(CollectorRegistry())
    metrics.connect()

    def serve_on_ready(**_: Any) -> None:
        from django.conf import settings

        from tickerproj.access import OpsAccess
        from tickerproj.metrics import serve_metrics

        if not settings.CELERY_METRICS_PORT:
            return
        serve_metrics(
            registry=metrics.registry,
            access=OpsAccess.from_settings(settings),
            port=settings.CELERY_METRICS_PORT,
            addr=settings.CELERY_METRICS_ADDR,
        )
        log.info("celery.metrics_serving", port=settings.CELERY_METRICS_PORT)

    signals.worker_ready.connect(serve_on_ready, weak=False)
    return metrics
