"""Redis faults: restarts that lose everything, a frozen server, connection resets.

Redis carries the channel layer (the engines' snapshots to daphne, group memberships), the
Celery broker, the Kite rate limiter and the engines' reload notices; it runs without
persistence, so a restart forgets every group and every queued task. The promises:

- the project's recovery figure for Redis (docs/deploy.md, Sentinel failover): snapshots
  resume within 10 s; the same bound is held for a plain restart and a thaw;
- no subscription is lost: after recovery every client's channel-layer groups have all their
  members again and every instrument each client was receiving ticks again;
- no Celery task the broker accepted is lost;
- /health keeps answering while Redis is frozen (its Redis PING gives up after 1 s,
  streaming/health.py) and the admin, which needs only PostgreSQL, keeps answering too;
- a connection reset leaves no dead channel-layer member behind (a member whose connection
  is gone still receives every snapshot of its groups until it expires).
"""

from __future__ import annotations

import signal
import time

from faults.probe import summarize
from faults.registry import Outcome, Promise, scenario
from faults.scenarios.infra_support import (
    AdminSession,
    HttpLoad,
    LogCursor,
    RestartLikeSystemd,
    TaskStream,
    admin_user,
    client_groups,
    group_members,
    members_extra,
    members_missing,
    percentile,
    rounded,
    silent_pairs,
    ticking,
    wait_first_frame,
    wait_group_members,
    wait_until,
)

RECOVERY_BOUND_S = 10.0
"""docs/deploy.md: snapshots resume within 10 s of losing the Redis master."""
RECOVERY_TIMEOUT_S = 60.0
"""How long a scenario waits for a recovery before it counts it as not recovered."""
TASKS_TIMEOUT_S = 30.0

RESTARTS = 5
RESTART_SETTLE_S = 5.0
"""Steady streaming between two restarts."""

STOP_S = 20.0
HEALTH_BOUND_MS = 2000.0
"""/health's Redis PING times out after 1 s (streaming/health.py: RedisProbe); 1 s more for
the rest of the report."""
ADMIN_BOUND_S = 2.0

RESETS = 5
RESET_S = 1.0
RESET_SETTLE_S = 5.0


def _stopped_redis(dep) -> None:
    redis = dep.procs["redis"]
    dep.redis_cli("SHUTDOWN", "NOSAVE")
    if wait_until(lambda: not redis.alive(), timeout_s=30) is None:
        raise RuntimeError("redis-server did not exit after SHUTDOWN NOSAVE")


@scenario("redis.restart_x5", group="redis")
def restart_x5(dep) -> Outcome:
    """Redis `SHUTDOWN NOSAVE` + restart x5 while streaming: resume, fresh, subs and tasks lost.

    A task is queued every 250 ms throughout; the worker is restarted when it exits, as its
    systemd unit does."""
    worker_log = LogCursor(dep.procs["celery-worker"].log_path)
    groups_before = client_groups(group_members(dep))
    receiving = ticking(dep, window_s=2.0)
    resumes: list[float | None] = []
    freshes: list[float | None] = []
    members_lost = 0
    # The worker's unit restarts it when it exits (Celery 5.7 exits on a broker connection
    # lost while a task is unacknowledged: "Unrecoverable error").
    with TaskStream() as tasks, RestartLikeSystemd(dep, ["celery-worker"]) as systemd:
        for i in range(RESTARTS):
            dep.probe.mark(f"redis SHUTDOWN NOSAVE #{i + 1}")
            _stopped_redis(dep)
            dep.procs["redis"].start()
            up = dep.probe.mark(f"redis up #{i + 1}")
            resumes.append(wait_first_frame(dep, up, timeout_s=RECOVERY_TIMEOUT_S))
            freshes.append(dep.clients.wait_all_fresh(up, RECOVERY_TIMEOUT_S))
            groups_now = wait_group_members(dep, groups_before, timeout_s=RECOVERY_BOUND_S)
            members_lost += members_missing(groups_before, groups_now)
            time.sleep(RESTART_SETTLE_S)  # steady streaming before the next restart
    instruments_lost = silent_pairs(dep, receiving, timeout_s=RECOVERY_BOUND_S)
    lost = tasks.lost(worker_log, timeout_s=TASKS_TIMEOUT_S)
    recovered = [f for f in freshes if f is not None]
    resume_max = max((r for r in resumes if r is not None), default=None)
    fresh_max = max(recovered, default=None)
    return Outcome(
        figures={
            "resume_s_max": rounded(resume_max), "fresh_s_max": rounded(fresh_max),
            "not_recovered": len(freshes) - len(recovered), "subs_lost": members_lost,
            "instruments_silent": instruments_lost, "tasks_sent": len(tasks.accepted),
            "tasks_refused": tasks.refused, "tasks_lost": len(lost),
            "worker_restarts": systemd.restarts["celery-worker"],
        },
        promises=[
            Promise(f"every client fresh within {RECOVERY_BOUND_S:.0f} s of each restart",
                    len(recovered) == RESTARTS and fresh_max <= RECOVERY_BOUND_S,
                    f"fresh after {[rounded(f) for f in freshes]} s"),
            Promise("subscriptions lost = 0 (every group's members back after each restart)",
                    members_lost == 0, f"{members_lost} members missing"),
            Promise("every instrument a client received ticks again", instruments_lost == 0,
                    f"{instruments_lost} (client, instrument) pairs silent"),
            Promise("Celery tasks the broker accepted are not lost", not lost,
                    f"{len(lost)} of {len(tasks.accepted)} never ran"),
        ],
    )


@scenario("redis.sigstop_20s", group="redis")
def sigstop_20s(dep) -> Outcome:
    """Redis SIGSTOP 20 s: /health and admin latency during it, recovery after SIGCONT."""
    username, password = admin_user(username="faults-infra-admin")
    admin = AdminSession(dep, username=username, password=password)
    targets = [
        ("admin", "/admin/", admin.headers),
        ("admin", "/admin/streaming/engineheartbeat/", admin.headers),
        ("admin", "/admin/subscriptions/subscription/", admin.headers),
    ]
    redis = dep.procs["redis"]
    with HttpLoad(dep, targets, interval_s=0.25, timeout_s=STOP_S + 40) as load:
        frozen = dep.probe.mark("redis SIGSTOP")
        redis.signal(signal.SIGSTOP)
        try:
            time.sleep(STOP_S)  # the fault's duration
        finally:
            redis.signal(signal.SIGCONT)
        thawed = dep.probe.mark("redis SIGCONT")
        resume = wait_first_frame(dep, thawed, timeout_s=RECOVERY_TIMEOUT_S)
        fresh = dep.clients.wait_all_fresh(thawed, RECOVERY_TIMEOUT_S)
    samples = dep.probe.samples(frozen, thawed)
    health = summarize([s.health_ms for s in samples])
    health_unanswered = sum(s.health_status == 0 for s in samples)
    # Requests that began during the freeze, whenever they ended.
    admin_hits = load.during(frozen, thawed, "admin")
    admin_s = [h.seconds for h in admin_hits]
    admin_bad = [h for h in admin_hits if h.status == 0 or h.status >= 500]
    admin_max = max(admin_s, default=None)
    return Outcome(
        figures={
            "health_p99_ms": rounded(health["p99"], 0), "health_max_ms": rounded(health["max"], 0),
            "health_unanswered": health_unanswered, "admin_p99_s": rounded(percentile(admin_s, 0.99)),
            "admin_max_s": rounded(admin_max), "admin_failed": len(admin_bad),
            "resume_s": rounded(resume), "fresh_s": rounded(fresh),
        },
        promises=[
            Promise(f"/health answers within {HEALTH_BOUND_MS / 1000:.0f} s while Redis is frozen",
                    health_unanswered == 0 and health["max"] is not None
                    and health["max"] <= HEALTH_BOUND_MS,
                    f"max {rounded(health['max'], 0)} ms, {health_unanswered} unanswered"),
            Promise(f"admin pages answer within {ADMIN_BOUND_S:.0f} s, never a 5xx, while Redis is frozen",
                    bool(admin_hits) and not admin_bad and admin_max <= ADMIN_BOUND_S,
                    f"max {rounded(admin_max)} s, {len(admin_bad)} failed of {len(admin_hits)}"),
            Promise(f"every client fresh within {RECOVERY_BOUND_S:.0f} s of SIGCONT",
                    fresh is not None and fresh <= RECOVERY_BOUND_S, f"{rounded(fresh)} s"),
        ],
    )


@scenario("redis.resets_1s", group="redis")
def resets_1s(dep) -> Outcome:
    """Redis connections reset 1 s (proxy) x5: recovery, members lost, dead members left."""
    groups_before = client_groups(group_members(dep))
    freshes: list[float | None] = []
    for i in range(RESETS):
        dep.probe.mark(f"redis proxy reset #{i + 1}")
        dep.proxies["redis"].set_mode("reset")
        try:
            time.sleep(RESET_S)  # the fault's duration
        finally:
            dep.proxies["redis"].set_mode("pass")
        back = dep.probe.mark(f"redis proxy pass #{i + 1}")
        freshes.append(dep.clients.wait_all_fresh(back, RECOVERY_TIMEOUT_S))
        time.sleep(RESET_SETTLE_S)  # steady streaming before the next reset
    groups_after = wait_group_members(dep, groups_before, timeout_s=RECOVERY_BOUND_S)
    missing = members_missing(groups_before, groups_after)
    dead = members_extra(groups_before, groups_after)
    reconnects = sum(c["connects"] for c in dep.clients.stats()["clients"])
    recovered = [f for f in freshes if f is not None]
    fresh_max = max(recovered, default=None)
    return Outcome(
        figures={"fresh_s_max": rounded(fresh_max), "not_recovered": len(freshes) - len(recovered),
                 "members_missing": missing, "dead_members": dead,
                 "client_connects_total": reconnects},
        promises=[
            Promise(f"every client fresh within {RECOVERY_BOUND_S:.0f} s of each reset",
                    len(recovered) == RESETS and fresh_max <= RECOVERY_BOUND_S,
                    f"fresh after {[rounded(f) for f in freshes]} s"),
            Promise("subscriptions lost = 0 (every group's members back)", missing == 0,
                    f"{missing} members missing"),
            Promise("no dead channel-layer member left behind", dead == 0,
                    f"{dead} members beyond the live connections'"),
        ],
    )
