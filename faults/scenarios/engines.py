"""One runticker of the two is stopped (SIGTERM), killed (kill -9) or frozen past its lease
(SIGSTOP): the other takes its accounts over. Figures: takeover time, Kite connections per
api_key in every 5 ms sample, stale (duplicate) publishing seen by a watching client, and
1-minute bars lost once the backfill has run.

Takeover is done when every instrument of the victim's accounts is subscribed, in its mode,
on connections the victim did not have.
"""

from __future__ import annotations

import datetime as dt
import signal
import time

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.streamkit import (
    Watcher,
    fresh_db,
    lease_holders,
    poll_until,
    rounded,
    sim_view,
    streamed_keys,
    subscribed_on_new,
)

#: README: "a dead engine's accounts are taken over within 2x" TICKER_LEASE_TTL_S (15 s).
LEASE_TTL_S = 15.0
TAKEOVER_WITHIN_S = 2 * LEASE_TTL_S
#: A SIGTERM'd runticker exits within TICKER_SHUTDOWN_BOUND_S (README).
SHUTDOWN_BOUND_S = 30.0
#: SIGSTOP this long: past the lease, so the other engine takes the accounts while the frozen
#: one still holds its sockets open.
STOP_S = LEASE_TTL_S + 10.0
#: After SIGCONT: watch this long for the woken engine publishing what it had buffered.
AFTER_CONT_S = 10.0
TAKEOVER_DEADLINE_S = 90.0
#: Bars: the backfill is queued BACKFILL_MIN_AGE_S (60 s) after the first bar of a takeover;
#: wait this long for every minute of the outage to be stored.
BARS_SETTLE_S = 240.0
#: A minute's bar is closed and stored this long after the minute ends (grace, then a write).
BAR_STORED_AFTER_S = 10.0
WATCH_BEFORE_S = 3.0
#: A minute closes, then its bar is stored: the first bar of a new subscription comes within.
BARS_FIRST_S = 150.0


def _minute(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s // 60 * 60, dt.UTC)


def _ensure_bars(dep) -> None:
    """Bars are of underlyings (the index): subscribe the chain's index, and wait until one of
    its bars has been stored (the deployment subscribes the chain's options and futures)."""
    from streaming.models import UnderlyingBar
    from subscriptions.models import Instrument, Subscription
    from subscriptions.services import subscription_activate

    fresh_db()
    index = Instrument.objects.get(instrument_token=dep.simulator.market.index_token(dep.chain["underlying"]))
    if not Subscription.objects.filter(instrument=index, status=Subscription.Status.ACTIVE).exists():
        subscription_activate(instrument=index, mode=Subscription.Mode.FULL)

    def stored() -> bool:
        fresh_db()
        return UnderlyingBar.objects.filter(instrument=index, is_mock=False).exists()

    poll_until(stored, timeout_s=BARS_FIRST_S, interval_s=1.0)


def _bar_instruments(since: dt.datetime) -> set[int]:
    from streaming.models import UnderlyingBar

    fresh_db()
    return set(UnderlyingBar.objects.filter(start__gte=since, is_mock=False)
               .values_list("instrument_id", flat=True))


def _bars_missing(instruments: set[int], first: dt.datetime, last: dt.datetime) -> int:
    """(instrument, minute) pairs in [first, last] with no bar, or a gap Kite's history did not
    fill: the minutes lost."""
    from streaming.models import UnderlyingBar

    fresh_db()
    minutes = int((last - first).total_seconds() // 60) + 1
    kept = set(UnderlyingBar.objects.filter(instrument_id__in=instruments, start__gte=first,
                                            start__lte=last)
               .exclude(is_gap=True, backfilled=False)
               .values_list("instrument_id", "start"))
    return len(instruments) * minutes - len(kept)


def _engine_fault(dep, kind: str) -> Outcome:
    _ensure_bars(dep)
    holders = lease_holders(dep)
    keys = streamed_keys(dep)
    victim = holders[keys[0]]
    other = "runticker-b" if victim == "runticker-a" else "runticker-a"
    victim_keys = [k for k in keys if holders.get(k) == victim]
    proc = dep.procs[victim]
    views = {key: sim_view(dep, key) for key in victim_keys}
    baseline = {key: v[0] for key, v in views.items()}
    old_ids = {key: v[1] for key, v in views.items()}
    bar_instruments = _bar_instruments(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))

    with Watcher(dep) as watcher:
        watcher.wait_streaming()
        time.sleep(WATCH_BEFORE_S)  # the watcher's latest exchange times, before the fault
        watcher.reset_gaps()
        since = time.monotonic()
        fault_wall = time.time()
        dep.probe.mark(f"engines {kind} {victim}")
        exit_s = None
        if kind == "sigterm":
            proc.signal(signal.SIGTERM)
        elif kind == "kill9":
            proc.kill9()
        else:
            proc.signal(signal.SIGSTOP)

        def taken_over() -> bool:
            now_holders = lease_holders(dep)
            return all(now_holders.get(k) == other and subscribed_on_new(dep, k, old_ids[k]) == subs
                       for k, subs in baseline.items())

        def poll() -> bool:
            nonlocal exit_s
            if kind == "sigterm" and exit_s is None and not proc.alive():
                exit_s = time.monotonic() - since
            return taken_over()

        takeover_s = poll_until(poll, timeout_s=TAKEOVER_DEADLINE_S, interval_s=0.05)
        if kind == "sigterm" and exit_s is None:
            poll_until(lambda: not proc.alive(), timeout_s=SHUTDOWN_BOUND_S + 10)
            exit_s = None if proc.alive() else time.monotonic() - since
        if kind == "sigstop":
            left = STOP_S - (time.monotonic() - since)
            if left > 0:
                time.sleep(left)  # frozen for STOP_S in all (module constant)
            proc.signal(signal.SIGCONT)
            dep.probe.mark(f"engines SIGCONT {victim}")
            time.sleep(AFTER_CONT_S)  # an observation window for stale publishing
        watched = watcher.report()
    conns = dep.probe.max_kite_conns(since)
    fresh_s = dep.clients.wait_all_fresh(time.monotonic(), timeout_s=60)

    # Every minute from the one before the fault to the one the takeover ended in, once that
    # one has closed and been stored.
    taken_wall = fault_wall + (takeover_s if takeover_s is not None else TAKEOVER_DEADLINE_S)
    first, last = _minute(fault_wall - 60), _minute(taken_wall)
    closed_wall = last.timestamp() + 60 + BAR_STORED_AFTER_S
    if time.time() < closed_wall:
        time.sleep(closed_wall - time.time())  # until the minute has closed (a clock, not a hope)
    missing = None
    if bar_instruments:
        settle = poll_until(lambda: _bars_missing(bar_instruments, first, last) == 0,
                            timeout_s=BARS_SETTLE_S, interval_s=5.0)
        missing = 0 if settle is not None else _bars_missing(bar_instruments, first, last)
    figures = {"victim": victim, "accounts": len(victim_keys), "takeover_s": rounded(takeover_s)}
    if kind == "sigterm":
        figures["exit_s"] = rounded(exit_s)
    figures.update({"kite_conns_max": max(conns.values()), "watched_snapshots": watched.snapshots,
                    "stale_snapshots": watched.regressions,
                    "stale_instruments": watched.regressed_tokens,
                    "watch_gap_max_s": rounded(watched.max_gap_s), "bars_lost": missing,
                    "bar_minutes": int((last - first).total_seconds() // 60) + 1,
                    "clients_fresh_s": rounded(fresh_s)})
    promises = [
        Promise(f"accounts taken over within {TAKEOVER_WITHIN_S:g} s (2x the lease)",
                takeover_s is not None and takeover_s <= TAKEOVER_WITHIN_S, f"{rounded(takeover_s)} s"),
        Promise("Kite connections per key never above 3 in any 5 ms sample",
                max(conns.values()) <= 3, f"{conns}"),
        Promise("no duplicate publishing: no instrument's data older than what was already sent",
                watched.snapshots > 0 and watched.regressions == 0,
                f"{watched.regressions} stale snapshots of {watched.regressed_tokens} instruments"),
        Promise("no bar lost (after the backfill)", missing == 0,
                "no live bars before the fault" if missing is None else f"{missing} minute bars"),
        Promise("every client fresh afterwards", fresh_s is not None),
    ]
    if kind == "sigterm":
        promises.insert(0, Promise(f"SIGTERM exit within {SHUTDOWN_BOUND_S:g} s",
                                   exit_s is not None and exit_s <= SHUTDOWN_BOUND_S,
                                   f"{rounded(exit_s)} s"))
    return Outcome(figures=figures, promises=promises)


@scenario("engines.sigterm", group="engines")
def engines_sigterm(dep) -> Outcome:
    """SIGTERM to the runticker holding an account: it drains and hands over its leases."""
    return _engine_fault(dep, "sigterm")


@scenario("engines.kill9", group="engines")
def engines_kill9(dep) -> Outcome:
    """kill -9 of the runticker holding an account: its lease expires and is taken over."""
    return _engine_fault(dep, "kill9")


@scenario("engines.sigstop", group="engines")
def engines_sigstop(dep) -> Outcome:
    """SIGSTOP of the runticker holding an account for 25 s (past its 15 s lease), then
    SIGCONT: the other takes over while the frozen one's sockets are still open."""
    return _engine_fault(dep, "sigstop")
