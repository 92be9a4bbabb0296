"""Kite faults at the simulator: a stalled socket, 20 drops in a row, malformed frames and
REST errors, an expired token. Each against the deployment's two runtickers streaming live.

"Back in their modes" is read at the simulator: the key's live connections hold exactly the
subscriptions (token -> mode) they held before the fault.
"""

from __future__ import annotations

import secrets
import time

from faults.probe import summarize
from faults.registry import Outcome, Promise, scenario
from faults.scenarios.streamkit import (
    account_ids_by_key,
    account_labels_by_key,
    first_log_event,
    fresh_db,
    health_codes,
    lease_holders,
    metric_total,
    poll_until,
    rounded,
    sim_view,
    streamed_keys,
    subscribed_on_new,
    wait_next_scrape,
)

#: The issue's bounds.
STALL_DETECTED_WITHIN_S = 10.0
DROP_BACK_WITHIN_S = 2.0
TOKEN_RESUME_WITHIN_S = 2.0

#: How long a reconnect may take before it counts as not reconnected at all.
RECONNECT_DEADLINE_S = 40.0
DROPS = 20
#: Each connection streams this long before it is dropped: longer than the ticker's
#: backoff_reset_after_s (5 s), so every drop is of a connection that worked (a flapping
#: network); a server that accepts and drops at once gets the growing backoff instead.
UP_BETWEEN_DROPS_S = 6.0
MALFORMED_ROUNDS = 5
MALFORMED_KINDS = ("truncated", "unknown_length", "count_exceeds", "text")
#: REST faults armed on Kite's quote route while the REST fallback polls a stalled socket.
QUOTE_FAULTS = (("fail", 500), ("fail", 429), ("corrupt", "truncated"), ("corrupt", "html"),
                ("corrupt", "wrong_shape"), ("drop", None))
#: After /health shows the expired session: this long with no connect attempt expected.
EXPIRED_QUIET_S = 20.0
EXPIRED_QUIET_QUICK_S = 5.0


def _back_in_modes(dep, baseline: dict[str, dict[int, str]], old_ids: dict[str, set[int]]) -> bool:
    return all(subscribed_on_new(dep, key, old_ids[key]) == subs for key, subs in baseline.items())


@scenario("kite.stall", group="kite", quick=True)
def kite_stall(dep) -> Outcome:
    """One account's Kite socket goes silent (open, nothing sent): the engine notices
    (REST fallback, watchdog) and reconnects with every instrument in its mode."""
    key = streamed_keys(dep)[0]
    label = account_labels_by_key(dep)[key]
    holder = lease_holders(dep)[key]
    baseline, old_ids = sim_view(dep, key)
    wall0 = time.time()
    stalled = dep.sim("stall_current", key)
    dep.probe.mark(f"kite stall {key}")
    reconnect_s = poll_until(lambda: subscribed_on_new(dep, key, old_ids) == baseline,
                             timeout_s=RECONNECT_DEADLINE_S)
    # The log lines are written as they happen; give the file a moment to have them.
    poll_until(lambda: first_log_event(dep, "kite.ws.watchdog", since_epoch_s=wall0,
                                       procs=(holder,), account=label) is not None, timeout_s=5)
    fallback_s = first_log_event(dep, "rest_fallback.started", since_epoch_s=wall0,
                                 procs=(holder,), account=label)
    watchdog_s = first_log_event(dep, "kite.ws.watchdog", since_epoch_s=wall0, procs=(holder,),
                                 account=label)
    detected = [t for t in (fallback_s, watchdog_s) if t is not None]
    detect_s = min(detected) if detected else None
    fresh_s = dep.clients.wait_all_fresh(time.monotonic(), timeout_s=30)
    return Outcome(
        figures={"stalled_conns": stalled, "fallback_s": rounded(fallback_s),
                 "watchdog_s": rounded(watchdog_s), "detected_s": rounded(detect_s),
                 "reconnected_s": rounded(reconnect_s), "clients_fresh_s": rounded(fresh_s)},
        promises=[
            Promise(f"stall detected within {STALL_DETECTED_WITHIN_S:g} s",
                    detect_s is not None and detect_s <= STALL_DETECTED_WITHIN_S,
                    f"REST fallback at {rounded(fallback_s)} s, watchdog at {rounded(watchdog_s)} s"),
            Promise("reconnected, every instrument in its mode", reconnect_s is not None,
                    f"{rounded(reconnect_s)} s"),
            Promise("every client fresh afterwards", fresh_s is not None),
        ],
    )


@scenario("kite.drops_x20", group="kite")
def kite_drops_x20(dep) -> Outcome:
    """Every Kite connection dropped (TCP abort) 20 times in a row, each after 6 s up: all
    instruments back in their modes each time."""
    keys = streamed_keys(dep)
    since = time.monotonic()
    backs: list[float | None] = []
    for i in range(DROPS):
        views = {key: sim_view(dep, key) for key in keys}
        baseline = {key: v[0] for key, v in views.items()}
        old_ids = {key: v[1] for key, v in views.items()}
        time.sleep(UP_BETWEEN_DROPS_S)  # the connections work this long (module constant)
        dep.probe.mark(f"kite drop {i + 1}")
        dep.sim("drop_connections")
        back_s = poll_until(lambda b=baseline, o=old_ids: _back_in_modes(dep, b, o),
                            timeout_s=RECONNECT_DEADLINE_S, interval_s=0.005)
        backs.append(back_s)
        if back_s is None:
            break  # not back at all: the rest would measure the same outage
    conns = dep.probe.max_kite_conns(since)
    done = [b for b in backs if b is not None]
    stats = summarize(done)
    slow = sum(b is None or b > DROP_BACK_WITHIN_S for b in backs)
    return Outcome(
        figures={"drops": len(backs), "keys": len(keys), "back_p50_s": rounded(stats["p50"]),
                 "back_max_s": rounded(stats["max"]), "over_2s": slow,
                 "kite_conns_max": max(conns.values())},
        promises=[
            Promise(f"all instruments back in their modes within {DROP_BACK_WITHIN_S:g} s, "
                    f"each of {DROPS} drops", len(backs) == DROPS and slow == 0,
                    f"{slow} of {len(backs)} slower; max {rounded(stats['max'])} s"),
            Promise("Kite connections per key <= 3", max(conns.values()) <= 3, f"{conns}"),
        ],
    )


@scenario("kite.malformed_and_rest_errors", group="kite")
def kite_malformed_and_rest_errors(dep) -> Outcome:
    """Malformed ticker frames (4 kinds x 5) on every socket, then Kite's quote API failing
    6 ways while the REST fallback polls a stalled socket: counted, nothing raised."""
    key = streamed_keys(dep)[0]
    wait_next_scrape(dep)
    malformed0 = metric_total(dep, "tickerproj_engine_kite_malformed_parts")
    crashes0 = metric_total(dep, "tickerproj_engine_task_crashes_total")
    attempts0 = {k: dep.sim("connection_attempts", k) for k in dep.api_keys}
    errors0 = metric_total(dep, "tickerproj_engine_rest_fallback_requests_total", outcome="error")
    ok0 = metric_total(dep, "tickerproj_engine_rest_fallback_requests_total", outcome="ok")

    sent = 0
    for _ in range(MALFORMED_ROUNDS):
        for kind in MALFORMED_KINDS:
            sent += dep.sim("send_malformed", kind=kind)
    counted_s = poll_until(
        lambda: metric_total(dep, "tickerproj_engine_kite_malformed_parts") - malformed0 >= sent,
        timeout_s=20, interval_s=0.25)
    malformed = metric_total(dep, "tickerproj_engine_kite_malformed_parts") - malformed0
    # Exact, at the simulator (the engines' reconnect gauge is only as fresh as a heartbeat).
    reconnects_after_malformed = sum(dep.sim("connection_attempts", k) - n for k, n in attempts0.items())

    for kind, detail in QUOTE_FAULTS:
        if kind == "fail":
            dep.sim("fail_next", "market.quote", detail,
                    "NetworkException" if detail == 429 else "GeneralException")
        elif kind == "corrupt":
            dep.sim("corrupt_next", "market.quote", kind=detail)
        else:
            dep.sim("drop_next", "market.quote")
    quotes0 = dep.simulator.rest_requests.get("market.quote", 0)
    dep.sim("stall", key)  # every socket of the key, reconnects too: the fallback goes on
    dep.probe.mark(f"quote faults armed, {key} stalled")

    def errors() -> float:
        return metric_total(dep, "tickerproj_engine_rest_fallback_requests_total", outcome="error") - errors0

    def oks() -> float:
        return metric_total(dep, "tickerproj_engine_rest_fallback_requests_total", outcome="ok") - ok0

    poll_until(lambda: errors() >= len(QUOTE_FAULTS) and oks() >= 1, timeout_s=60, interval_s=0.25)
    dep.sim("resume")
    quote_calls = dep.simulator.rest_requests.get("market.quote", 0) - quotes0
    wait_next_scrape(dep)
    counted_errors, recovered = errors(), oks()
    crashes = metric_total(dep, "tickerproj_engine_task_crashes_total") - crashes0
    alive = all(dep.procs[n].alive() for n in ("runticker-a", "runticker-b"))
    fresh_s = dep.clients.wait_all_fresh(time.monotonic(), timeout_s=40)
    expected_errors = min(quote_calls, len(QUOTE_FAULTS))
    return Outcome(
        figures={"malformed_sent": sent, "malformed_counted": int(malformed),
                 "counted_in_s": rounded(counted_s), "reconnects": int(reconnects_after_malformed),
                 "quote_calls": quote_calls, "quote_errors_counted": int(counted_errors),
                 "quote_ok_after": int(recovered), "task_crashes": int(crashes)},
        promises=[
            Promise("every malformed frame counted", malformed >= sent, f"{int(malformed)} of {sent}"),
            Promise("malformed frames cost no reconnect", reconnects_after_malformed == 0,
                    f"{int(reconnects_after_malformed)}"),
            Promise("every quote error counted", counted_errors >= expected_errors and expected_errors > 0,
                    f"{int(counted_errors)} of {expected_errors}"),
            Promise("the fallback recovers after the errors", recovered >= 1, f"{int(recovered)} ok"),
            Promise("nothing raised: no task crash, both runtickers up", crashes == 0 and alive,
                    f"{int(crashes)} crashes"),
            Promise("every client fresh afterwards", fresh_s is not None),
        ],
    )


def _pin(account_id: int | None, pks: list[int], reason: str) -> None:
    """Pin (or, with None, unpin) subscriptions to an account, and tell the engines."""
    from django.db import transaction

    from subscriptions.models import Subscription
    from subscriptions.services import engines_reload

    fresh_db()
    with transaction.atomic():
        Subscription.objects.filter(pk__in=pks).update(pinned_account_id=account_id)
        engines_reload(reason=reason)


@scenario("kite.token_expiry", group="kite", quick=True)
def kite_token_expiry(dep) -> Outcome:
    """Kite expires an account's token (sockets closed, upgrades refused): session_expired on
    /health, no connect attempt until a new token, streaming again soon after it. Its
    subscriptions are pinned to it meanwhile (unpinned, the engine moves them to the other
    account at once, and nothing waits for the token)."""
    from accounts.models import KiteAccount
    from accounts.services import account_set_session
    from subscriptions.models import Subscription

    key = streamed_keys(dep)[0]
    account_id = account_ids_by_key(dep)[key]
    baseline, _ = sim_view(dep, key)
    pks = list(Subscription.objects.filter(status=Subscription.Status.ACTIVE,
                                           assigned_account_id=account_id).values_list("pk", flat=True))
    _pin(account_id, pks, "faults: kite.token_expiry pins the account's subscriptions")
    try:
        connections = len(dep.sim("connections", key))
        attempts0 = dep.sim("connection_attempts", key)
        dep.sim("expire_token", key)
        dep.probe.mark(f"token expired {key}")
        shown_s = poll_until(lambda: "session_expired" in health_codes(dep), timeout_s=60,
                             interval_s=0.2)
        attempts_shown = dep.sim("connection_attempts", key)
        quiet_s = EXPIRED_QUIET_QUICK_S if dep.quick else EXPIRED_QUIET_S
        time.sleep(quiet_s)  # an observation window: no attempt may come in it
        attempts_quiet = dep.sim("connection_attempts", key) - attempts_shown
        status = KiteAccount.objects.get(pk=account_id).status

        token = f"tok-{key}-{secrets.token_hex(8)}"
        dep.sim("set_access_token", key, token)
        began = time.monotonic()
        account_set_session(account=KiteAccount.objects.get(pk=account_id), access_token=token)
        resumed = poll_until(lambda: sim_view(dep, key)[0] == baseline, timeout_s=60, interval_s=0.01)
        resume_s = None if resumed is None else time.monotonic() - began  # from before the save
        cleared_s = poll_until(lambda: "session_expired" not in health_codes(dep), timeout_s=30,
                               interval_s=0.2)
    finally:
        _pin(None, pks, "faults: kite.token_expiry unpins")
    return Outcome(
        figures={"shown_s": rounded(shown_s), "attempts_until_shown": attempts_shown - attempts0,
                 "attempts_in_quiet": attempts_quiet, "quiet_s": quiet_s, "account_status": status,
                 "resumed_s": rounded(resume_s), "health_cleared_s": rounded(cleared_s)},
        promises=[
            Promise("session_expired shown on /health", shown_s is not None, f"{rounded(shown_s)} s"),
            Promise("each connection tries once, then no attempt until a new token",
                    attempts_shown - attempts0 <= max(connections, 1) and attempts_quiet == 0,
                    f"{attempts_shown - attempts0} attempts until shown, {attempts_quiet} in "
                    f"{quiet_s:g} s after"),
            Promise(f"streaming within {TOKEN_RESUME_WITHIN_S:g} s of the new token",
                    resume_s is not None and resume_s <= TOKEN_RESUME_WITHIN_S, f"{rounded(resume_s)} s"),
        ],
    )
