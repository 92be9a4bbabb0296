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


@scenario("smoke.levers", group="smoke")
def levers(dep) -> Outcome:
    """Every fault lever of the harness works and the deployment comes back after each."""
    import signal

    recover: dict[str, float] = {}
    dep.redis_cli("shutdown", "nosave")
    wait_for_exit(dep.procs["redis"])
    dep.procs["redis"].start()
    recover["redis_restart_s"] = dep.reset_between_scenarios()
    dep.pg_ctl("restart", "fast")
    recover["pg_restart_s"] = dep.reset_between_scenarios()
    for name, mode in (("redis", "blackhole"), ("postgres", "reset"), ("kite-ws", "delay")):
        dep.proxies[name].set_mode(mode, delay_ms=200)
        time.sleep(1.0)  # the fault held for a moment: what it does is the scenarios' business
        dep.proxies[name].set_mode("pass")
        recover[f"{name}_{mode}_s"] = dep.reset_between_scenarios()
    dep.procs["runticker-a"].signal(signal.SIGSTOP)
    time.sleep(1.0)
    dep.procs["runticker-a"].signal(signal.SIGCONT)
    recover["runticker_sigstop_s"] = dep.reset_between_scenarios()
    dep.procs["runticker-b"].kill9()
    recover["runticker_kill9_s"] = dep.reset_between_scenarios()
    dep.procs["daphne"].kill9()
    recover["daphne_kill9_s"] = dep.reset_between_scenarios()
    dropped = dep.sim("drop_connections")
    recover["kite_drop_s"] = dep.reset_between_scenarios()
    dep.sim("stall")
    time.sleep(1.0)
    recover["kite_stall_s"] = dep.reset_between_scenarios()
    return Outcome(
        figures={k: round(v, 1) for k, v in recover.items()} | {"kite_dropped": dropped},
        promises=[Promise("the deployment recovered from every lever (a reset each)", True)],
    )


def wait_for_exit(proc, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.alive():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} still running {timeout_s} s after it was told to stop")
        time.sleep(0.02)
