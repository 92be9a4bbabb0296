"""Clients that misbehave and a daphne that dies under many: the server's memory, Redis's
memory, the well-behaved clients' lag, and the channel-layer members a dead daphne leaves.

Stuck clients are of two kinds, half each: ones that read but never acknowledge (a hidden
tab) and ones that stop reading altogether once subscribed (a suspended laptop; their TCP
buffers fill). The credit window (WS_SEND_WINDOW) must keep both from costing memory.
"""

from __future__ import annotations

import time
from collections import Counter

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.streamkit import ExtraClients, client_tokens, fresh_db, poll_until, rounded

STUCK_CLIENTS = 120
#: Memory is measured after this warm-up (connections set up, windows filled) ...
STUCK_WARMUP_S = 20.0
#: ... over this long.
STUCK_OBSERVE_S = 120.0
#: The bound: growth per minute of the fitted line (allocator noise stays far below).
MAX_SLOPE_MB_PER_MIN = 2.0
#: Healthy clients' lag p99 may grow by at most this much over the baseline (lag is measured
#: against exchange times in whole seconds, so a baseline p99 near 1 s is normal).
MAX_P99_GROWTH_S = 0.5
LAG_SAMPLE_S = 5.0

CROWD = 250  # + the fleet's 50 = 300
#: channel-layer membership expires after WS_GROUP_EXPIRY_S (900 s): observe that long, and
#: allow a minute more for the last expired member to be swept by a publish.
DEAD_MEMBER_WINDOW_S = 15 * 60.0
DEAD_MEMBER_GRACE_S = 60.0
DEAD_SAMPLE_S = 30.0
#: Redis memory after the dead members are gone: back within this of the level before.
REDIS_BACK_WITHIN_MB = 5.0
GROUP_KEY_PATTERN = "faults:group:*"


def _slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, MB) points, in MB per minute."""
    points = [(t, v) for t, v in points if v is not None and v == v]
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60.0


def _lag_p99s(dep, duration_s: float) -> list[float]:
    """The fleet's lag p99 (last 5 s) every LAG_SAMPLE_S for ``duration_s``."""
    values = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        time.sleep(min(LAG_SAMPLE_S, max(0.0, end - time.monotonic())))
        p99 = dep.clients.stats()["lag_p99_s"]
        if p99 is not None:
            values.append(p99)
    return values


@scenario("clients.stuck_120", group="clients")
def clients_stuck_120(dep) -> Outcome:
    """120 stuck clients (60 never acknowledge, 60 stop reading) beside the 50 healthy ones for
    2 min: daphne's and Redis's memory slope, the healthy clients' lag p99."""
    baseline = _lag_p99s(dep, 20.0)
    tokens = client_tokens(count=STUCK_CLIENTS, prefix="stuck")
    half = STUCK_CLIENTS // 2
    groups = [ExtraClients(dep, count=half, behaviour="no_ack", tokens=tokens[: half // 10], first_addr=10),
              ExtraClients(dep, count=half, behaviour="frozen", tokens=tokens[half // 10:], first_addr=11)]
    try:
        dep.probe.mark("stuck clients connected")
        time.sleep(STUCK_WARMUP_S)  # warm-up before measuring (module constant)
        since = time.monotonic()
        during = _lag_p99s(dep, STUCK_OBSERVE_S)
        until = time.monotonic()
        states = [g.state() for g in groups]
    finally:
        for g in groups:
            g.stop()
    samples = dep.probe.samples(since, until)[::20]  # every 100 ms is plenty for a slope
    daphne = _slope_mb_per_min([(s.t, s.rss_mb.get("daphne")) for s in samples])
    redis_slope = _slope_mb_per_min([(s.t, s.redis_used_mb) for s in samples])
    base_p99 = max(baseline) if baseline else None
    worst_p99 = max(during) if during else None
    connected = sum(st["connected"] for st in states)
    no_ack_up, frozen_up = (st["connected"] for st in states)
    fleet_up = sum(c["connected"] for c in dep.clients.stats()["clients"])
    return Outcome(
        figures={"stuck": STUCK_CLIENTS, "stuck_connected_at_end": connected,
                 "no_ack_connected": no_ack_up, "frozen_connected": frozen_up,
                 "daphne_mb_per_min": rounded(daphne, 3), "redis_mb_per_min": rounded(redis_slope, 3),
                 "daphne_rss_mb": rounded(samples[-1].rss_mb.get("daphne") if samples else None, 1),
                 "healthy_p99_base_s": rounded(base_p99), "healthy_p99_max_s": rounded(worst_p99),
                 "healthy_connected": fleet_up, "observed_s": STUCK_OBSERVE_S},
        promises=[
            Promise(f"daphne memory slope <= {MAX_SLOPE_MB_PER_MIN:g} MB/min",
                    daphne is not None and daphne <= MAX_SLOPE_MB_PER_MIN, f"{rounded(daphne, 3)}"),
            Promise(f"Redis memory slope <= {MAX_SLOPE_MB_PER_MIN:g} MB/min",
                    redis_slope is not None and redis_slope <= MAX_SLOPE_MB_PER_MIN,
                    f"{rounded(redis_slope, 3)}"),
            Promise(f"healthy clients' lag p99 within {MAX_P99_GROWTH_S:g} s of before",
                    base_p99 is not None and worst_p99 is not None
                    and worst_p99 <= base_p99 + MAX_P99_GROWTH_S,
                    f"{rounded(base_p99)} s before, {rounded(worst_p99)} s at worst"),
            Promise("every healthy client stays connected", fleet_up == dep.n_clients, f"{fleet_up}"),
        ],
    )


def _members_by_prefix(redis_client, *, kinds_of: str | None = None) -> Counter:
    """channel-layer group members per client prefix (one per process's layer); with
    ``kinds_of``, that prefix's members per kind of group (the group name up to its first
    ``.``: ``chain``, ``user``...)."""
    counts: Counter = Counter()
    for key in redis_client.scan_iter(match=GROUP_KEY_PATTERN, count=500):
        kind = key.decode().split(":group:", 1)[-1].split(".", 1)[0]
        for member in redis_client.zrange(key, 0, -1):
            prefix = member.decode().split(".", 1)[-1].split("!", 1)[0]
            if kinds_of is None:
                counts[prefix] += 1
            elif prefix == kinds_of:
                counts[kind] += 1
    return counts


@scenario("clients.daphne_kill9_300", group="clients")
def clients_daphne_kill9_300(dep) -> Outcome:
    """daphne killed (-9) with 300 clients connected and restarted; for 15 min: the dead
    channel-layer members it left and Redis's memory."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=dep.redis_port, socket_timeout=10)
    tokens = client_tokens(count=CROWD, prefix="crowd")
    crowd = ExtraClients(dep, count=CROWD, behaviour="ack", tokens=tokens, first_addr=12)
    try:
        connected_s = poll_until(lambda: crowd.state()["connected"] >= CROWD, timeout_s=180,
                                 interval_s=0.5)
        time.sleep(5.0)  # every subscription joined its groups
        before = _members_by_prefix(r)
        dead_prefix, members_before = before.most_common(1)[0]  # daphne's: the 300 clients'
        redis_before = int(r.info("memory")["used_memory"]) / 2**20
        dep.probe.mark("daphne kill -9")
        killed_at = time.monotonic()
        dep.procs["daphne"].kill9()
        restart_s = dep.procs["daphne"].start()
        back_s = poll_until(lambda: crowd.state()["connected"] >= CROWD, timeout_s=180, interval_s=0.5)
        timeline: list[tuple[float, int, float]] = []
        zero_after_s = None
        deadline = killed_at + DEAD_MEMBER_WINDOW_S + DEAD_MEMBER_GRACE_S
        while True:
            dead = _members_by_prefix(r).get(dead_prefix, 0)
            used = int(r.info("memory")["used_memory"]) / 2**20
            elapsed = time.monotonic() - killed_at
            timeline.append((elapsed, dead, used))
            if dead == 0 and zero_after_s is None:
                zero_after_s = elapsed
            if elapsed >= DEAD_MEMBER_WINDOW_S and (dead == 0 or time.monotonic() >= deadline):
                break
            time.sleep(DEAD_SAMPLE_S)  # the observation's sampling interval (module constant)
        crowd_state = crowd.state()
        dead_kinds = dict(_members_by_prefix(r, kinds_of=dead_prefix).most_common(4))
    finally:
        crowd.stop()
    fresh_db()
    dead_after_kill = timeline[0][1]
    dead_end = timeline[-1][1]
    redis_peak = max(u for _, _, u in timeline)
    redis_end = timeline[-1][2]
    return Outcome(
        figures={"clients": CROWD + dep.n_clients, "crowd_connected_s": rounded(connected_s, 1),
                 "members_before": members_before, "daphne_restart_s": rounded(restart_s, 1),
                 "crowd_back_s": rounded(back_s, 1), "dead_members_after_kill": dead_after_kill,
                 "dead_members_end": dead_end, "dead_left_in": dead_kinds,
                 "dead_zero_after_s": rounded(zero_after_s, 0),
                 "redis_mb_before": rounded(redis_before, 1), "redis_mb_peak": rounded(redis_peak, 1),
                 "redis_mb_end": rounded(redis_end, 1), "observed_min": round(timeline[-1][0] / 60, 1),
                 "crowd_connected_end": crowd_state.get("connected")},
        promises=[
            Promise("every client reconnects to the restarted daphne", back_s is not None,
                    f"{rounded(back_s, 1)} s"),
            Promise("no dead channel-layer member left after the group expiry (15 min)",
                    dead_end == 0, f"{dead_end} left after {timeline[-1][0] / 60:.1f} min"),
            Promise(f"Redis memory back within {REDIS_BACK_WITHIN_MB:g} MB of before",
                    redis_end <= redis_before + REDIS_BACK_WITHIN_MB,
                    f"{redis_before:.1f} MB before, {redis_end:.1f} MB at the end"),
        ],
    )
