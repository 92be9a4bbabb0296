"""Celery tasks for instruments and subscriptions: thin wrappers around services.

Each task reads its settings here (the edge), takes its JobLock (a run that finds the lock
held logs ``joblock.busy`` and returns), calls one service and releases the lock. Services are
idempotent, so a task delivered twice (acks_late after a worker crash) does no harm. Only
transient Kite errors are retried, by Celery's autoretry with exponential backoff and jitter,
and, for the daily jobs, a database blip (a dropped connection, a failover): their next run is
a day away. Everything else fails the run loudly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, Final, TypeVar

import structlog
from celery import Task, shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.db.models import Q
from django.utils import timezone

from streaming.kite.rest import (
    KiteError,
    KiteRateLimiterUnavailable,
    KiteRateLimitTimeout,
    KiteRestClient,
)
from streaming.locks import run_locked
from streaming.models import EngineHeartbeat
from subscriptions import history, jobs, rebalancer
from subscriptions.clients import NoKiteSessionError, rest_client_for_service
from subscriptions.models import RebalanceRule, Subscription
from subscriptions.services import instruments_refresh

log = structlog.get_logger(__name__)

T = TypeVar("T")


class KiteTransientError(Exception):
    """A Kite failure worth retrying later (network, 429, 5xx, rate-limit wait); wraps it."""


@contextmanager
def transient_kite_errors() -> Iterator[None]:
    """Re-raise transient Kite errors as KiteTransientError, the only autoretried class."""
    try:
        yield
    except (KiteRateLimitTimeout, KiteRateLimiterUnavailable) as exc:
        raise KiteTransientError(str(exc)) from exc
    except KiteError as exc:
        if exc.retryable:
            raise KiteTransientError(str(exc)) from exc
        raise


# Shared options: retries only for transient Kite errors, backoff 2, 4, 8... s with jitter.
RETRY_BACKOFF: Final[dict[str, Any]] = {
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 5,
}
_RETRYING: Final[dict[str, Any]] = {"bind": True, "autoretry_for": (KiteTransientError,), **RETRY_BACKOFF}

#: A dropped or refused database connection: worth another try for a job that runs once a
#: day. A retry gets a fresh connection (Celery's Django fixup closes the broken one, and the
#: pool discards it). The job's lock was taken under the same task id, so the retry retakes
#: it in whichever worker process runs it (streaming/locks.py).
DATABASE_BLIPS: Final = (OperationalError, InterfaceError)

#: Retries for the daily jobs: transient Kite errors and database blips.
DAILY_RETRYING: Final[dict[str, Any]] = {
    **_RETRYING,
    "autoretry_for": (KiteTransientError, *DATABASE_BLIPS),
}

REFRESH_TIME_LIMIT_S: Final = 300
RECONCILE_TIME_LIMIT_S: Final = 60
REBALANCE_TIME_LIMIT_S: Final = 60
HISTORY_TIME_LIMIT_S: Final = 900


def _locked(task: Task, name: str, time_limit_s: int, fn: Callable[[], T]) -> T | dict[str, str]:
    return run_locked(name=name, time_limit_s=time_limit_s, task_id=task.request.id or "", fn=fn)


def _client() -> KiteRestClient:
    return rest_client_for_service(api_root=settings.KITE_API_ROOT, redis_url=settings.REDIS_URL)


# --------------------------------------------------------------------------------------------


@shared_task(
    name="subscriptions.refresh_instruments",
    soft_time_limit=REFRESH_TIME_LIMIT_S - 30,
    time_limit=REFRESH_TIME_LIMIT_S,
    **DAILY_RETRYING,
)
def refresh_instruments(self: Task) -> dict[str, Any]:
    """Reload Kite's instrument dump; subscriptions of expired or delisted contracts retire.

    Also the admin's "Refresh instruments now". A dump much smaller than the registry is
    refused by the service (InstrumentDumpSuspicious): the task fails loudly, nothing changes.
    """

    def run() -> dict[str, Any]:
        try:
            client = _client()
        except NoKiteSessionError as exc:
            log.warning("instruments.refresh_skipped", error=str(exc))
            return {"skipped": str(exc)}
        with transient_kite_errors(), client:
            result = instruments_refresh(client=client)
        return {"summary": result.summary(), **dataclasses.asdict(result)}

    return _locked(self, "refresh_instruments", REFRESH_TIME_LIMIT_S, run)


@shared_task(
    name="subscriptions.reconcile_subscriptions",
    bind=True,
    soft_time_limit=RECONCILE_TIME_LIMIT_S - 10,
    time_limit=RECONCILE_TIME_LIMIT_S,
)
def reconcile_subscriptions(self: Task) -> dict[str, Any]:
    """Compare wanted and streamed subscriptions, report drift, ask the engines to reload."""

    def run() -> dict[str, Any]:
        summary = jobs.subscriptions_reconcile(
            heartbeat_max_age_s=settings.HEALTH_HEARTBEAT_MAX_AGE_S,
            grace_s=settings.RECONCILE_GRACE_S,
        )
        return {
            "ok": summary.report.ok,
            "summary": summary.report.summary,
            "reload": summary.reload_requested,
        }

    return _locked(self, "reconcile_subscriptions", RECONCILE_TIME_LIMIT_S, run)


def live_prices(*, now: dt.datetime, client_factory: Callable[[], KiteRestClient], stack: ExitStack):
    """The rebalancer's price source: fresh engine heartbeats, REST ltp of futures as fallback."""
    heartbeats = EngineHeartbeat.objects.filter(
        updated_at__gte=now - dt.timedelta(seconds=settings.HEALTH_HEARTBEAT_MAX_AGE_S)
    )
    from_heartbeats = rebalancer.heartbeat_prices(
        heartbeats,
        now=now,
        max_age_s=settings.TICKER_STALE_UNDERLYING_S,
        # The demo runs on the synthetic market by design; production follows live prices only.
        include_mock=settings.EMBEDDED,
    )
    client: KiteRestClient | None = None

    def rest_ltp(keys: list[str]) -> Mapping[str, float]:
        nonlocal client
        if client is None:
            try:
                client = stack.enter_context(client_factory())
            except NoKiteSessionError as exc:
                log.warning("rebalancer.no_rest_fallback", error=str(exc))
                return {}
        try:
            return {key: quote.last_price for key, quote in client.ltp(keys).items()}
        except KiteError as exc:
            # The fallback failing means "no price": bands stay where they are until the next
            # run (15 s), which is the retry; failing the whole run would stop every rule.
            log.warning("rebalancer.rest_fallback_failed", error=str(exc))
            return {}

    return rebalancer.LivePrices(from_heartbeats=from_heartbeats, rest_ltp=rest_ltp, now=now)


@shared_task(
    name="subscriptions.rebalance_strikes",
    bind=True,
    soft_time_limit=REBALANCE_TIME_LIMIT_S - 10,
    time_limit=REBALANCE_TIME_LIMIT_S,
)
def rebalance_strikes(self: Task, rule_ids: list[int] | None = None) -> dict[str, Any]:
    """Run the strike rebalancer for every rule (or ``rule_ids``); disabled rules retire theirs."""

    def run() -> dict[str, Any]:
        now = timezone.now()
        rules = RebalanceRule.objects.filter(
            Q(enabled=True)
            | Q(subscriptions__status=Subscription.Status.ACTIVE)  # disabled, still streaming
        ).distinct()
        if rule_ids is not None:
            rules = rules.filter(pk__in=rule_ids)
        out: dict[str, Any] = {}
        with ExitStack() as stack:
            prices = live_prices(now=now, client_factory=_client, stack=stack)
            for rule_id, name in rules.order_by("pk").values_list("pk", "name"):
                try:
                    outcome = rebalancer.rebalance_rule_apply(rule_id=rule_id, prices=prices, now=now)
                except RebalanceRule.DoesNotExist:
                    continue  # deleted since the list was read
                out[name] = {
                    "activated": outcome.activated,
                    "deactivated": outcome.deactivated,
                    "recentred": outcome.recentred,
                }
        return out

    return _locked(self, "rebalance_strikes", REBALANCE_TIME_LIMIT_S, run)


@shared_task(
    name="subscriptions.enrich_history",
    soft_time_limit=HISTORY_TIME_LIMIT_S - 60,
    time_limit=HISTORY_TIME_LIMIT_S,
    **DAILY_RETRYING,
)
def enrich_history(self: Task) -> dict[str, Any]:
    """Compute and store the Greeks of every enabled HistoryRange that is not yet stored."""

    def run() -> dict[str, Any]:
        try:
            with ExitStack() as stack, transient_kite_errors():
                lines = history.history_ranges_enrich(
                    client_factory=lambda: stack.enter_context(_client()),
                    r=settings.RISK_FREE_RATE,
                    q=settings.DIVIDEND_YIELD,
                )
        except NoKiteSessionError as exc:
            log.warning("history.enrich_skipped", error=str(exc))
            return {"skipped": str(exc)}
        return {"ranges": lines}

    return _locked(self, "enrich_history", HISTORY_TIME_LIMIT_S, run)


def job_dispatch(task: Task, *, embedded: bool, **kwargs: Any) -> str:
    """Start a job from the admin: queued for a worker, or run here on embedded defaults.

    Embedded defaults have no broker (``manage.py demo``), so the job runs in the request;
    the demo's data is small enough for that. Returns what happened, for the admin message.
    """
    if embedded:
        result = task.apply(kwargs=kwargs)
        if result.failed():
            return f"failed: {result.result!r}"
        return f"done: {result.result}"
    async_result = task.apply_async(kwargs=kwargs)
    return f"queued as task {async_result.id}"
