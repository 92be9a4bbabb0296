"""The deployment itself: everything streams and the probe samples at its rate."""

from __future__ import annotations

import time

from faults.probe import summarize
from faults.registry import Outcome, Promise, scenario

OBSERVE_S = 5.0


@scenario("smoke.steady_state", group="smoke", quick=True)
def steady_state(dep) -> Outcome:
    """Steady streaming for 5 s: /health, client lag, Kite connections, probe rate."""
    since = time.monotonic()
    time.sleep(OBSERVE_S)  # an observation window, not a wait on a condition
    until = time.monotonic()
    samples = dep.probe.samples(since, until)
    health = summarize([s.health_ms for s in samples])
    non_200 = sum(s.health_status != 200 for s in samples)
    conns = dep.probe.max_kite_conns(since, until)
    stats = dep.clients.stats()
    connected = sum(c["connected"] for c in stats["clients"])
    rate = dep.probe.rate_hz(since, until)
    return Outcome(
        figures={"probe_hz": round(rate), "health_p99_ms": health["p99"], "health_non_200": non_200,
                 "clients_connected": connected, "lag_p99_s": stats["lag_p99_s"],
                 "kite_conns_max": max(conns.values())},
        promises=[
            Promise("/health 200 in every sample", non_200 == 0, f"{non_200} not 200"),
            Promise(f"all {dep.n_clients} clients connected", connected == dep.n_clients,
                    f"{connected}"),
            Promise("Kite connections per key <= 3", max(conns.values()) <= 3, f"{conns}"),
        ],
    )
