"""What `/health` checks: small functions that each return the reasons the service is degraded.

Each check takes a :class:`HealthContext` (settings read once by the view, plus lazily loaded
engine heartbeats) and returns a list of reasons, each a dict with a snake_case ``code`` and
whatever identifies the culprit (``account``, ``engine``, ``task``). An empty list from every
check means healthy. Adding a check is adding one function to :data:`CHECKS`.

Reasons:
- ``database_down``: PostgreSQL (or the embedded SQLite) did not answer ``SELECT 1``.
- ``redis_down``: Redis (when configured) did not answer PING within the timeout.
- ``no_heartbeat``: no running runticker process wrote a heartbeat within
  HEALTH_HEARTBEAT_MAX_AGE_S (an engine's last heartbeat on shutdown says "stopped").
- ``engine_status_invalid``: an engine's status document does not parse (``streaming.status``):
  another version, or a renamed field; that engine is left out of the other checks.
- ``session_expired``: an account that is not disabled needs a Kite login.
- ``stream_stalled``: during market hours (or always, with HEALTH_STALL_WHEN_MARKET_CLOSED),
  an account streams instruments but its last tick is too old.
- ``task_failed``: an engine task is restarting or gave up, or crashed within the last
  HEALTH_HEARTBEAT_MAX_AGE_S (so a crash that healed at once is still seen for a while).
- ``account_unleased``: an engine streams live but no engine holds a streamable account.
- ``needs_login``: an account that is not disabled has no access token, or its token has
  passed 06:00 IST before the expire_sessions job marked it (then it is ``session_expired``).
- ``subscription_drift``: the reconciler found active subscriptions no engine streams, inactive
  ones still streamed, or a wrong mode (from a DriftReport younger than its maximum age).
- ``subscriptions_unassigned``: engines cannot stream some active subscriptions (the reasons,
  e.g. capacity, are in the report and on each subscription).

Three audiences (see README): :func:`liveness_report` (the process answers: for restarts),
:func:`readiness_report` (database and Redis answer: for load balancers) and
:func:`health_report` (the business report: for monitoring and ops).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from django.db import DatabaseError, connections
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from accounts.models import KiteAccount
from accounts.selectors import account_list_needing_login, account_list_streamable
from streaming import status
from streaming.models import AccountLease, EngineHeartbeat
from subscriptions.jobs import drift_report_latest
from tickerproj.redis_connection import redis_client

Reason = dict[str, Any]

#: Every code a check can report, so that /metrics shows each one, at 0 when all is well.
REASON_CODES = (
    "database_down",
    "redis_down",
    "no_heartbeat",
    "session_expired",
    "stream_stalled",
    "task_failed",
    "account_unleased",
    "needs_login",
    "subscription_drift",
    "subscriptions_unassigned",
)


class RedisProbe:
    """PING through one pooled client per URL, so a probe opens no new connection per call.

    Owned by whoever serves the health endpoints (one per process) and passed to each
    :class:`HealthContext`.
    """

    def __init__(self, *, timeout_s: float = 1.0, client_name: str = "tickerproj.health") -> None:
        self._timeout_s = timeout_s
        self._client_name = client_name
        self._clients: dict[str, redis.Redis] = {}

    def ping(self, url: str) -> str | None:
        """None when Redis at ``url`` answers PING, else the error's text."""
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = redis_client(
                url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                client_name=self._client_name,
                # One connection is all a probe needs; a burst of probes queues for it.
                max_connections=2,
            )
        try:
            client.ping()
        except redis.RedisError as exc:
            return str(exc)[:200]
        return None

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


@dataclass
class HealthContext:
    """Values the checks need, read once per request; heartbeats load on first use."""

    redis_url: str
    heartbeat_max_age_s: float
    stream_stall_s: float
    redis_probe: RedisProbe = field(default_factory=RedisProbe)
    #: Report silence as a stall even while the market is closed (to test alerting, or for
    #: a feed that should never be silent).
    stall_when_market_closed: bool = False
    db_alias: str = "default"
    #: The reconciler writes every 30 s; an older report is not trusted (the job is not running).
    drift_report_max_age_s: float = 300.0
    now: dt.datetime = field(default_factory=timezone.now)
    database_ok: bool = True
    _heartbeats: list[EngineHeartbeat] | None = None
    _parsed: status.Parsed | None = None

    @property
    def heartbeats(self) -> list[EngineHeartbeat]:
        """Heartbeats written within the maximum age: the engines considered alive."""
        if self._heartbeats is None:
            self._heartbeats = heartbeat_list_fresh(
                since=self.now - dt.timedelta(seconds=self.heartbeat_max_age_s)
            )
        return self._heartbeats

    @property
    def parsed(self) -> status.Parsed:
        """The fresh heartbeats' status documents (those that do not parse: check_status)."""
        if self._parsed is None:
            self._parsed = status.parse_heartbeats(self.heartbeats)
        return self._parsed


def heartbeat_list_fresh(*, since: dt.datetime) -> list[EngineHeartbeat]:
    return list(EngineHeartbeat.objects.filter(updated_at__gte=since).order_by("engine_id"))


def check_database(ctx: HealthContext) -> list[Reason]:
    try:
        with connections[ctx.db_alias].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        ctx.database_ok = False
        return [{"code": "database_down", "error": str(exc)[:200]}]
    return []


def check_redis(ctx: HealthContext) -> list[Reason]:
    if not ctx.redis_url:
        return []
    error = ctx.redis_probe.ping(ctx.redis_url)
    return [{"code": "redis_down", "error": error}] if error is not None else []


def check_heartbeat(ctx: HealthContext) -> list[Reason]:
    if not ctx.database_ok:
        return []
    if not any(st.mode != "stopped" for st, _ in ctx.parsed.statuses):
        return [{"code": "no_heartbeat", "max_age_s": ctx.heartbeat_max_age_s}]
    return []


def check_status(ctx: HealthContext) -> list[Reason]:
    """Engines whose status document does not parse: another version, or a renamed field."""
    if not ctx.database_ok:
        return []
    return [
        {"code": "engine_status_invalid", "engine": exc.engine_id, "error": exc.error[:200]}
        for exc in ctx.parsed.errors
    ]


def check_sessions(ctx: HealthContext) -> list[Reason]:
    """Accounts needing a login, from the database and from what the engines saw."""
    if not ctx.database_ok:
        return []
    labels = set(
        KiteAccount.objects.filter(status=KiteAccount.Status.SESSION_EXPIRED).values_list(
            "label", flat=True
        )
    )
    for st, _ in ctx.parsed.statuses:
        labels.update(label for label, acc in st.accounts.items() if acc.needs_login)
    return [{"code": "session_expired", "account": label} for label in sorted(labels)]


def check_streams(ctx: HealthContext) -> list[Reason]:
    """Accounts that stream instruments yet have had no tick for longer than the stall limit."""
    if not ctx.database_ok:
        return []
    reasons = []
    for st, _ in ctx.parsed.statuses:
        # Kite sends nothing while the market is closed: silence then is not a stall.
        if st.mode != "live":
            continue
        if not st.market_open and not ctx.stall_when_market_closed:
            continue
        for label, acc in st.accounts.items():
            if acc.state != "streaming" or not acc.instruments:
                continue
            age_s = acc.last_tick_age_s
            if age_s is None or age_s > ctx.stream_stall_s:
                reasons.append(
                    {
                        "code": "stream_stalled",
                        "account": label,
                        "engine": st.engine_id,
                        "last_tick_age_s": age_s,
                    }
                )
    return reasons


def check_tasks(ctx: HealthContext) -> list[Reason]:
    if not ctx.database_ok:
        return []
    reasons = []
    for st, written_at_s in ctx.parsed.statuses:
        hb_age_s = ctx.now.timestamp() - written_at_s
        for name, task in sorted(st.tasks.items()):
            crash_age_s = task.last_crash_age_s
            recent = crash_age_s is not None and crash_age_s + hb_age_s < ctx.heartbeat_max_age_s
            if task.state in ("restarting", "failed") or recent:
                reasons.append(
                    {
                        "code": "task_failed",
                        "task": name,
                        "engine": st.engine_id,
                        "state": task.state,
                        "restarts": task.restarts,
                        "last_error": task.last_error,
                    }
                )
    return reasons


def check_leases(ctx: HealthContext) -> list[Reason]:
    """Streamable accounts that no engine holds while engines stream live."""
    if not ctx.database_ok or not any(st.mode == "live" for st, _ in ctx.parsed.statuses):
        return []
    leased = set(
        AccountLease.objects.filter(expires_at__gt=ctx.now).values_list("account_id", flat=True)
    )
    return [
        {"code": "account_unleased", "account": label}
        for pk, label in account_list_streamable().order_by("label").values_list("pk", "label")
        if pk not in leased
    ]


def check_needs_login(ctx: HealthContext) -> list[Reason]:
    """Accounts that need a Kite login but are not (yet) marked session_expired."""
    if not ctx.database_ok:
        return []
    rows = (
        account_list_needing_login()
        .exclude(status=KiteAccount.Status.SESSION_EXPIRED)
        .values_list("label", "token_expires_at")  # never the token itself
    )
    return [
        {"code": "needs_login", "account": label,
         "why": "token_expired" if expires is not None and expires <= ctx.now else "no_token"}
        for label, expires in rows
    ]  # fmt: skip


def check_subscription_drift(ctx: HealthContext) -> list[Reason]:
    """The reconciler's latest finding, if recent: drift, and subscriptions no engine can take."""
    if not ctx.database_ok:
        return []
    report = drift_report_latest()
    if report is None or (ctx.now - report.checked_at).total_seconds() > ctx.drift_report_max_age_s:
        return []
    reasons: list[Reason] = []
    if report.missing or report.extra or report.mode_mismatch:
        reasons.append(
            {
                "code": "subscription_drift",
                "missing": report.missing,
                "extra": report.extra,
                "mode_mismatch": report.mode_mismatch,
                "checked_at": report.checked_at.isoformat(),
            }
        )
    if report.unassigned:
        reasons.append(
            {
                "code": "subscriptions_unassigned",
                "count": report.unassigned,
                "reasons": report.details.get("unassigned_reasons", []),
            }
        )
    return reasons


CHECKS: list[Callable[[HealthContext], list[Reason]]] = [
    check_database,
    check_redis,
    check_heartbeat,
    check_status,
    check_sessions,
    check_streams,
    check_tasks,
    check_leases,
    check_needs_login,
    check_subscription_drift,
]
"""Run in order; the database check runs first so the others can skip when it is down."""


READINESS_CHECKS: list[Callable[[HealthContext], list[Reason]]] = [check_database, check_redis]
"""What this process needs to serve requests; accounts and engines are not its business."""


def liveness_report() -> dict[str, Any]:
    """The process answers; touches nothing, so a database outage restarts no web process."""
    return {"status": "ok"}


def readiness_report(ctx: HealthContext) -> dict[str, Any]:
    """``ready`` when the database and Redis answer; only reason codes, never error texts."""
    codes = [reason["code"] for check in READINESS_CHECKS for reason in check(ctx)]
    return {
        "status": "ready" if not codes else "unavailable",
        "reasons": [{"code": code} for code in codes],
    }


def health_report(ctx: HealthContext) -> dict[str, Any]:
    """Run every check; ``ok`` is True when no check found a reason."""
    reasons: list[Reason] = []
    for check in CHECKS:
        try:
            reasons.extend(check(ctx))
        except DatabaseError as exc:
            # The database went away after the first check answered (a restart, a failover):
            # reported as down, never a 500; the checks after it skip the database.
            if ctx.database_ok:
                ctx.database_ok = False
                reasons.append({"code": "database_down", "error": str(exc)[:200]})
    engines = []
    if ctx.database_ok:
        for st, written_at_s in ctx.parsed.statuses:
            engines.append(
                {
                    "engine_id": st.engine_id,
                    "age_s": round(ctx.now.timestamp() - written_at_s, 1),
                    "mode": st.mode,
                    "accounts": sorted(st.accounts),
                    "streamed_count": st.streamed_count,
                    "ticks_per_s": st.ticks_per_s,
                }
            )
    return {
        "status": "ok" if not reasons else "degraded",
        "reasons": reasons,
        "engines": engines,
        "checked_at": ctx.now.isoformat(),
    }


def health_report_public(report: dict[str, Any]) -> dict[str, Any]:
    """What anyone may see of a report: its status and each reason's code, once."""
    codes = dict.fromkeys(reason["code"] for reason in report["reasons"])
    return {"status": report["status"], "reasons": [{"code": code} for code in codes]}


class HealthCollector:
    """The business report as Prometheus gauges, for alert rules (deploy/prometheus/alerts.yml).

    ``tickerproj_health_reasons{code}`` counts the reasons of each code (accounts needing a
    login, stalled streams...); ``tickerproj_health_ok`` is 1 when there are none. Labels are
    codes only: account labels would make the series count grow with the accounts.
    """

    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        self._report = report

    def collect(self):
        report = self._report()
        counts = dict.fromkeys(REASON_CODES, 0)
        for reason in report["reasons"]:
            counts[reason["code"]] = counts.get(reason["code"], 0) + 1
        reasons = GaugeMetricFamily(
            "tickerproj_health_reasons", "Reasons /health reports, by code.", labels=["code"]
        )
        for code, count in counts.items():
            reasons.add_metric([code], count)
        yield reasons
        yield GaugeMetricFamily(
            "tickerproj_health_ok", "1 when /health reports no reason.", value=float(not report["reasons"])
        )
