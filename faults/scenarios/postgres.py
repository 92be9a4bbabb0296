"""PostgreSQL faults: fast restarts, a 20 s stop, a 60 s black hole (through the proxy).

What the project promises when PostgreSQL is away (docs/architecture.md "When PostgreSQL is
away", README, docs/security.md M5):

- every wait on it is bounded (connect 5 s, statement 60 s, a 30 s TCP user timeout); the
  engine's database calls run on 4 threads of its own, so a frozen server pins those and
  nothing else; runticker exits within TICKER_SHUTDOWN_BOUND_S (30 s) of SIGTERM;
- ticks keep flowing while Kite connections are up; closed bars wait in memory and are saved
  when the database answers (no bar lost); live accounts stop streaming before their lease
  can lapse, so Kite's 3 connections per api_key are never exceeded, and streaming resumes by
  itself (a dead engine's accounts are taken over within 2 x TICKER_LEASE_TTL_S = 30 s);
- bad luck is never a 500: the HTTP API answers 503 while the database is away.
"""

from __future__ import annotations

import datetime as dt
import time

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.infra_support import (
    FleetGaps,
    HttpLoad,
    LogCursor,
    ThreadCounter,
    WsConnectTimer,
    api_targets,
    percentile,
    rounded,
    thread_count,
    wait_until,
)

ENGINES = ("runticker-a", "runticker-b")
LEASE_TTL_S = 15.0
"""TICKER_LEASE_TTL_S's default (the deployment keeps it)."""
TAKEOVER_BOUND_S = 2 * LEASE_TTL_S
"""README: a dead engine's accounts are taken over within 2 x TICKER_LEASE_TTL_S (30 s)."""
SHUTDOWN_BOUND_S = 30.0
"""TICKER_SHUTDOWN_BOUND_S's default."""
EXIT_OBSERVE_SLACK_S = 1.0
"""Between the process's exit and the runner seeing it (Popen.wait polls)."""
STREAM_GAP_BOUND_S = 2.0
"""Ticks do not pass through PostgreSQL: no client goes silent longer than this."""
DB_THREADS = 4
"""streaming.engine.store.DB_THREADS: what a frozen server may pin in an engine."""
WS_CONNECT_BOUND_S = 35.0
"""A connect's token lookup waits at most the 30 s TCP user timeout + the 5 s connect timeout."""
RECOVERY_TIMEOUT_S = 90.0
BARS_TIMEOUT_S = 30.0

RESTARTS = 5
RESTART_EVERY_S = 15.0
STOP_S = 20.0
BLACKHOLE_S = 60.0
SIGTERM_AT_S = 25.0
"""Into the black hole: past the lease lapse, with time left for the 30 s bound to show."""


# --- what the scenarios read ------------------------------------------------------------


def _lease_lapses(cursors: dict[str, LogCursor]) -> int:
    return sum(c.count("lease.lapsing", "lease.lost") for c in cursors.values())


def _bar_tokens() -> set[int]:
    """The instruments with a live bar in the last 3 minutes: those that should have one a minute."""
    from django.db import close_old_connections
    from django.utils import timezone

    from streaming.models import UnderlyingBar

    close_old_connections()
    recent = timezone.now() - dt.timedelta(minutes=3)
    return set(UnderlyingBar.objects.filter(start__gte=recent, is_gap=False)
               .values_list("instrument_id", flat=True).distinct())


def _minute_floor(t: dt.datetime) -> dt.datetime:
    return t.replace(second=0, microsecond=0)


def _bars_missing(tokens: set[int], began: dt.datetime, ended: dt.datetime) -> tuple[int, int]:
    """(bars missing, minutes checked): live bars absent for every minute the window touched,
    once the last of them has closed and the bar sink has had time to store it."""
    from django.db import close_old_connections
    from django.utils import timezone

    from streaming.models import UnderlyingBar

    first, last = _minute_floor(began), _minute_floor(ended)
    if not tokens:
        return 0, 0
    minutes = int((last - first).total_seconds() // 60) + 1
    expected = len(tokens) * minutes
    closed = last + dt.timedelta(minutes=1)
    # The last minute closes with the next minute's first tick: wait for the clock to pass it.
    wait_until(lambda: timezone.now() >= closed, timeout_s=61, interval_s=0.5)
    found = 0

    def stored() -> bool:
        nonlocal found
        close_old_connections()
        found = UnderlyingBar.objects.filter(
            instrument_id__in=tokens, start__gte=first, start__lte=last, is_gap=False
        ).count()
        return found >= expected

    wait_until(stored, timeout_s=BARS_TIMEOUT_S, interval_s=0.5)
    return expected - found, minutes


def _http_figures(dep, load: HttpLoad, since: float, until: float) -> dict[str, int]:
    hits = load.during(since, until)
    return {
        "http_requests": len(hits),
        "http_500": sum(h.status == 500 for h in hits),
        "http_5xx": sum(h.status >= 500 for h in hits),
        "http_unanswered": sum(h.status == 0 for h in hits),
        "health_500": sum(s.health_status == 500 for s in dep.probe.samples(since, until)),
    }


def _no_500(figures: dict[str, int]) -> Promise:
    return Promise("the HTTP API and /health never answer 500 (503 while the database is away)",
                   figures["http_500"] == 0 and figures["http_unanswered"] == 0
                   and figures["health_500"] == 0,
                   f"{figures['http_500']} x 500, {figures['http_unanswered']} unanswered "
                   f"of {figures['http_requests']}; /health 500 in {figures['health_500']} samples")


def _kite_limit(dep, since: float, until: float) -> tuple[int, Promise]:
    conns = dep.probe.max_kite_conns(since, until)
    most = max(conns.values(), default=0)
    return most, Promise("Kite connections per api_key <= 3 in every 5 ms sample", most <= 3,
                         f"{conns}")


# --- scenarios ----------------------------------------------------------------------------


@scenario("postgres.restart_x5", group="postgres")
def restart_x5(dep) -> Outcome:
    """PostgreSQL fast restart x5, 15 s apart: HTTP 5xx, lease lapses, stream gap, bars missing.

    HTTP API reads run at 5/s throughout."""
    from django.utils import timezone

    cursors = {name: LogCursor(dep.procs[name].log_path) for name in ENGINES}
    tokens = _bar_tokens()
    began_wall = timezone.now()
    began = dep.probe.mark("postgres restarts begin")
    restart_s: list[float] = []
    with HttpLoad(dep, api_targets(dep), interval_s=0.2, timeout_s=60) as load, FleetGaps(dep) as gaps:
        for i in range(RESTARTS):
            at = dep.probe.mark(f"postgres fast restart #{i + 1}")
            restart_s.append(dep.pg_ctl("restart", mode="fast"))
            # Steady again before the next restart (an observation window, not a condition).
            time.sleep(max(0.0, RESTART_EVERY_S - (time.monotonic() - at)))
        ended = dep.probe.mark("postgres restarts end")
    ended_wall = timezone.now()
    http = _http_figures(dep, load, began, ended)
    lapses = _lease_lapses(cursors)
    gap = gaps.longest(began, ended)
    missing, minutes = _bars_missing(tokens, began_wall, ended_wall)
    most, kite_promise = _kite_limit(dep, began, ended)
    return Outcome(
        figures={**http, "restart_s_max": rounded(max(restart_s)), "lease_lapses": lapses,
                 "stream_gap_s": rounded(gap), "bars_missing": missing, "bar_minutes": minutes,
                 "kite_conns_max": most},
        promises=[
            _no_500(http),
            Promise("no lease lapses in a fast restart (leases are trusted for 10 s)",
                    lapses == 0, f"{lapses} lease.lapsing/lease.lost"),
            Promise(f"the stream goes on: no client silent > {STREAM_GAP_BOUND_S:.0f} s",
                    gap is not None and gap <= STREAM_GAP_BOUND_S, f"{rounded(gap)} s"),
            Promise("no bar missing (closed bars wait in memory and are saved)",
                    missing == 0 and minutes > 0,
                    f"{missing} of {len(tokens) * minutes} bars over {minutes} minutes" if tokens
                    else "not shown: the deployment had stored no live bar in the 3 minutes before"),
            kite_promise,
        ],
    )


@scenario("postgres.stopped_20s", group="postgres", quick=True)
def stopped_20s(dep) -> Outcome:
    """PostgreSQL stopped 20 s (past a lease's trust): HTTP 5xx, Kite connections, recovery."""
    cursors = {name: LogCursor(dep.procs[name].log_path) for name in ENGINES}
    with HttpLoad(dep, api_targets(dep), interval_s=0.2, timeout_s=60) as load, FleetGaps(dep) as gaps:
        stopped = dep.probe.mark("postgres stop")
        dep.pg_ctl("stop", mode="fast")
        try:
            time.sleep(STOP_S)  # the fault's duration
        finally:
            dep.pg_ctl("start")
        back = dep.probe.mark("postgres started")
        fresh = dep.clients.wait_all_fresh(back, RECOVERY_TIMEOUT_S)
        ended = dep.probe.mark("postgres recovered")
    http = _http_figures(dep, load, stopped, ended)
    lapses = _lease_lapses(cursors)
    most, kite_promise = _kite_limit(dep, stopped, ended)
    return Outcome(
        figures={**http, "lease_lapses": lapses, "stream_gap_s": rounded(gaps.longest(stopped, ended)),
                 "fresh_s": rounded(fresh), "kite_conns_max": most},
        promises=[
            _no_500(http),
            kite_promise,
            Promise(f"streaming resumes: every client fresh within {TAKEOVER_BOUND_S:.0f} s "
                    "of PostgreSQL's return", fresh is not None and fresh <= TAKEOVER_BOUND_S,
                    f"{rounded(fresh)} s"),
        ],
    )


@scenario("postgres.blackhole_60s", group="postgres")
def blackhole_60s(dep) -> Outcome:
    """PostgreSQL black-holed 60 s: engine threads, WS connect p99, SIGTERM exit, recovery.

    Connections stay open and no byte moves (the proxy's black hole)."""
    engine = dep.procs["runticker-b"]
    threads_before = {name: thread_count(dep.procs[name].pid) for name in ENGINES}
    exit_s = None
    exit_status = None
    with (
        HttpLoad(dep, api_targets(dep), interval_s=0.5, timeout_s=90) as load,
        WsConnectTimer(dep, interval_s=1.0, timeout_s=90) as ws,
        ThreadCounter(dep, list(ENGINES)) as threads,
    ):
        holed = dep.probe.mark("postgres blackhole")
        dep.proxies["postgres"].set_mode("blackhole")
        try:
            time.sleep(SIGTERM_AT_S)  # into the black hole
            dep.probe.mark("runticker-b SIGTERM")
            exit_s = engine.stop(timeout_s=SHUTDOWN_BOUND_S + 30)
            exit_status = engine.popen.returncode
            time.sleep(max(0.0, BLACKHOLE_S - (time.monotonic() - holed)))  # the rest of it
        finally:
            dep.proxies["postgres"].set_mode("pass")
        back = dep.probe.mark("postgres pass")
        engine.start()
        fresh = dep.clients.wait_all_fresh(back, RECOVERY_TIMEOUT_S)
        ended = dep.probe.mark("postgres recovered")
    # Leaving the block waited for the connect in flight, however long it took.
    during = [(s, ok) for t, s, ok in ws.attempts if holed <= t <= back]
    connect_s = [s for s, _ok in during]
    grown = {name: (threads.max_during(name, holed, back) or 0) - (threads_before[name] or 0)
             for name in ENGINES}
    http = _http_figures(dep, load, holed, ended)
    most, kite_promise = _kite_limit(dep, holed, ended)
    p99 = percentile(connect_s, 0.99)
    return Outcome(
        figures={
            "engine_threads_grown": max(grown.values()), "ws_connect_p99_s": rounded(p99),
            "ws_connect_max_s": rounded(max(connect_s, default=None)),
            "ws_connects": len(during), "ws_refused": sum(not ok for _s, ok in during),
            "sigterm_exit_s": rounded(exit_s), "exit_status": exit_status, **http,
            "fresh_s": rounded(fresh), "kite_conns_max": most,
        },
        promises=[
            Promise(f"a frozen database pins only the engine's {DB_THREADS} database threads",
                    max(grown.values()) <= DB_THREADS, f"threads grown by {grown}"),
            Promise(f"every WebSocket connect ends within {WS_CONNECT_BOUND_S:.0f} s (bounded waits)",
                    bool(connect_s) and max(connect_s) <= WS_CONNECT_BOUND_S,
                    f"p99 {rounded(p99)} s, max {rounded(max(connect_s, default=None))} s"),
            Promise(f"runticker exits within TICKER_SHUTDOWN_BOUND_S ({SHUTDOWN_BOUND_S:.0f} s) of "
                    f"SIGTERM (+{EXIT_OBSERVE_SLACK_S:.0f} s to observe it)",
                    exit_s is not None and exit_s <= SHUTDOWN_BOUND_S + EXIT_OBSERVE_SLACK_S,
                    f"{rounded(exit_s)} s, status {exit_status}"),
            _no_500(http),
            kite_promise,
            Promise(f"every client fresh within {TAKEOVER_BOUND_S:.0f} s of the database's return",
                    fresh is not None and fresh <= TAKEOVER_BOUND_S, f"{rounded(fresh)} s"),
        ],
    )

