"""Reconciliation: what should stream against what the engines say they stream.

:func:`subscriptions_reconcile` compares the active subscriptions with the engines' view
(``assigned_account``/``streamed_mode`` written by the engine after each allocation, and the
heartbeats), stores the finding in ``DriftReport`` for the admin and ``/health``, and tells
the engines to reload when that can repair something.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

import structlog
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from streaming import status
from streaming.models import EngineHeartbeat
from subscriptions import services
from subscriptions.models import DriftReport, JobRun, Subscription

log = structlog.get_logger(__name__)

DRIFT_REPORT_NAME: Final = "subscriptions"
_SAMPLE_SIZE: Final = 10


@dataclass(frozen=True, slots=True)
class DriftSummary:
    report: DriftReport
    reload_requested: bool


def _sample(queryset) -> list[int]:
    return list(queryset.order_by("instrument_id").values_list("instrument_id", flat=True)[:_SAMPLE_SIZE])


def subscriptions_reconcile(
    *, now: dt.datetime | None = None, heartbeat_max_age_s: float, grace_s: float
) -> DriftSummary:
    """Compare desired and streamed subscriptions, store the finding, ask for a reload.

    A subscription changed within ``grace_s`` is not counted as drift: the engine reloads
    within seconds of a change and writes its allocation after that. Engines are asked to
    reload when drift is found, or when subscriptions changed since the previous report (a
    lost pub/sub notice is repaired within one run).
    """
    now = now or timezone.now()
    settled = Q(updated_at__lte=now - dt.timedelta(seconds=grace_s))
    active = Subscription.objects.filter(status=Subscription.Status.ACTIVE)
    desired = active.count()
    streamed = active.filter(assigned_account__isnull=False).count()
    missing_qs = active.filter(settled, assigned_account__isnull=True, unassigned_reason="")
    unassigned_qs = active.filter(assigned_account__isnull=True).exclude(unassigned_reason="")
    extra_qs = Subscription.objects.filter(
        settled, status=Subscription.Status.INACTIVE, assigned_account__isnull=False
    )
    mismatch_qs = active.filter(settled, assigned_account__isnull=False).exclude(
        streamed_mode=F("mode")
    )
    missing, unassigned = missing_qs.count(), unassigned_qs.count()
    extra, mode_mismatch = extra_qs.count(), mismatch_qs.count()

    heartbeats = list(
        EngineHeartbeat.objects.filter(
            updated_at__gte=now - dt.timedelta(seconds=heartbeat_max_age_s)
        ).order_by("engine_id")
    )
    parsed = status.parse_heartbeats(heartbeats)
    for exc in parsed.errors:
        log.error("subscriptions.engine_status_invalid", engine=exc.engine_id, error=exc.error)
    engine_statuses = [st for st, _ in parsed.statuses]
    heartbeat_streamed = sum(st.streamed_count for st in engine_statuses) if engine_statuses else None
    mocked = sum(st.mocked_count for st in engine_statuses)
    # Subscriptions no account can stream are fed by the engine that holds the mock pool
    # (outside market hours, or with --mock): those are streamed, not lost.
    unassigned = max(unassigned - mocked, 0)

    unassigned_reasons = list(
        unassigned_qs.values("unassigned_reason")
        .annotate(count=Count("pk"))
        .order_by("-count", "unassigned_reason")[:_SAMPLE_SIZE]
    )
    no_engine = desired > 0 and not heartbeats
    drift = bool(missing or extra or mode_mismatch)
    # An engine whose document does not parse is not taken for one that streams nothing.
    ok = not (drift or unassigned or no_engine or parsed.errors)
    parts = [f"{desired} wanted, {streamed} assigned"]
    if heartbeat_streamed is not None:
        parts.append(f"engines report {heartbeat_streamed} streamed")
    if mocked:
        parts.append(f"{mocked} streamed from the mock market")
    for count, text in (
        (missing, "missing"),
        (extra, "inactive but still streamed"),
        (mode_mismatch, "in the wrong mode"),
        (unassigned, "unassigned (see reasons)"),
    ):
        if count:
            parts.append(f"{count} {text}")
    if no_engine:
        parts.append(f"no engine heartbeat within {heartbeat_max_age_s:g}s")
    if parsed.errors:
        unreadable = ", ".join(exc.engine_id for exc in parsed.errors)
        parts.append(f"unreadable engine status from {unreadable}")
    details: dict[str, Any] = {
        "missing_sample": _sample(missing_qs),
        "extra_sample": _sample(extra_qs),
        "mode_mismatch_sample": _sample(mismatch_qs),
        "unassigned_reasons": [
            {"reason": r["unassigned_reason"], "count": r["count"]} for r in unassigned_reasons
        ],
        "engines": [hb.engine_id for hb in heartbeats],
        "mocked": mocked,
    }
    previous = DriftReport.objects.filter(name=DRIFT_REPORT_NAME).values_list("checked_at", flat=True).first()
    changed_since = previous is None or Subscription.objects.filter(updated_at__gt=previous).exists()
    with transaction.atomic():
        report, _ = DriftReport.objects.update_or_create(
            name=DRIFT_REPORT_NAME,
            defaults={
                "checked_at": now,
                "ok": ok,
                "desired": desired,
                "streamed": streamed,
                "heartbeat_streamed": heartbeat_streamed,
                "engines_alive": len(heartbeats),
                "missing": missing,
                "unassigned": unassigned,
                "extra": extra,
                "mode_mismatch": mode_mismatch,
                "summary": "; ".join(parts),
                "details": details,
            },
        )
        reload_requested = drift or changed_since
        if reload_requested:
            services.engines_reload(reason="drift found" if drift else "subscriptions changed")
    log.info(
        "subscriptions.reconciled", ok=ok, desired=desired, streamed=streamed, missing=missing,
        extra=extra, mode_mismatch=mode_mismatch, unassigned=unassigned,
        engines=len(heartbeats), reload=reload_requested,
    )  # fmt: skip
    return DriftSummary(report, reload_requested)


def drift_report_latest() -> DriftReport | None:
    return DriftReport.objects.filter(name=DRIFT_REPORT_NAME).first()


#: A run's summary is for a person reading the admin, not a result store.
JOB_RUN_SUMMARY_MAX_CHARS: Final = 1000


def job_run_record(
    *, task_name: str, task_id: str, outcome: str, duration_s: float | None, summary: str
) -> JobRun:
    """Overwrite the task's last-run row with this run's outcome."""
    run, _ = JobRun.objects.update_or_create(
        task_name=task_name,
        defaults={
            "task_id": task_id,
            "outcome": outcome,
            "finished_at": timezone.now(),
            "duration_s": duration_s,
            "summary": summary[:JOB_RUN_SUMMARY_MAX_CHARS],
        },
    )
    return run
