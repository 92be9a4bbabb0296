"""Gap backfill and REST fallback against the Kite simulator: requests, seconds, rates.

1. Backfill: ``--underlyings`` index underlyings each lose ``--gap-minutes`` minutes (gap bars
   stored, as a stall leaves them); ``streaming.services.bars_backfill`` fills them from the
   simulator's historical candles through the validated REST client and the rate limiter
   (Kite's 3 historical requests/s per api_key). Printed: requests, seconds, minutes filled,
   and the floor the rate limit sets (``(requests - 1) / 3`` s).
2. REST fallback: a real engine streams ``--accounts`` accounts of ``--instruments`` options
   each from the simulator; every account's socket is stalled, then only the first's; the
   engine polls with /quote (at most 500 instruments a call, 1 call/s per api_key, spread over
   every account's key). Printed: the delay from the stall to the first polled tick against
   ``--after-s``, quote calls per second per api_key against Kite's limit of 1, seconds per
   full refresh of a stalled account's instruments, and the delay from the resume to the
   last call.

The simulator enforces Kite's limits (``enforce_rate_limits``): a refused call is counted.
Run from the repository root (PostgreSQL on 127.0.0.1 with trust auth; the benchmark creates
and migrates its own database ``bench_fallback``; Redis is not needed):

    uv run python benchmarks/fallback/run.py [--underlyings 9] [--gap-minutes 30]
        [--accounts 2] [--instruments 1200] [--after-s 2] [--window-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BENCH_DB = "bench_fallback"
os.environ.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}")
os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
os.environ.setdefault("FIELD_ENCRYPTION_KEYS", "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ["REDIS_URL"] = ""  # in-process rate limiter and channel layer
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")

MINUTE_S = 60
API_SECRET, ACCESS_TOKEN = "benchsecret", "benchtoken"


def ensure_database() -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')


def reset_tables() -> None:
    from accounts.models import KiteAccount
    from streaming.models import AccountLease, EngineHeartbeat, UnderlyingBar
    from subscriptions.models import Instrument, Subscription

    for model in (UnderlyingBar, Subscription, AccountLease, EngineHeartbeat, KiteAccount, Instrument):
        model.objects.all().delete()


def instruments(market) -> None:
    from streaming.kite.schemas import INSTRUMENT_CSV_COLUMNS
    from subscriptions.models import Instrument

    Instrument.objects.bulk_create(
        [Instrument(**{**{c: r[c] for c in INSTRUMENT_CSV_COLUMNS}, "exchange_token": int(r["exchange_token"])})
         for r in market.instruments],
        batch_size=2000,
    )


def last_session_open_s() -> float:
    from streaming.greeks import IST
    from streaming.nse_calendar import previous_trading_day_on_or_before, session_open_epoch_s

    today = dt.datetime.now(IST).date()
    return session_open_epoch_s(previous_trading_day_on_or_before(today - dt.timedelta(days=1), frozenset()))


def bench_backfill(underlyings: int, gap_minutes: int) -> None:
    from django.utils import timezone

    from streaming.engine.store import bars_save
    from streaming.kite.rest import KiteRateLimiter, KiteRestClient
    from streaming.market import SyntheticMarket
    from streaming.services import bars_backfill
    from streaming.sim.simulator import KiteSimulator, SimulatorThread
    from subscriptions.models import Instrument

    reset_tables()
    open_s = last_session_open_s()
    market = SyntheticMarket(seed=0, extra_underlyings=max(0, underlyings - 2),
                             now_fn=lambda: open_s + 6 * 3600)
    instruments(market)
    tokens = sorted(Instrument.objects.filter(segment="INDICES").values_list("instrument_token", flat=True))
    m0 = int(open_s) + 30 * MINUTE_S

    def row(token: int, minute: int, gap: bool) -> dict:
        price = None if gap else 100.0
        return {"instrument_id": token, "start": dt.datetime.fromtimestamp(minute, tz=dt.UTC),
                "open": price, "high": price, "low": price, "close": price, "volume": 0,
                "tick_count": 0 if gap else 10, "is_gap": gap, "is_mock": False, "backfilled": False}

    for token in tokens:
        bars_save(bars=[row(token, m0, False),
                        *(row(token, m0 + k * MINUTE_S, True) for k in range(1, gap_minutes + 1)),
                        row(token, m0 + (gap_minutes + 1) * MINUTE_S, False)])
    simulator = KiteSimulator(market=market, step_market=False, enforce_rate_limits=True)
    simulator.register_account(api_key="k1", api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    with SimulatorThread(simulator) as sim:
        client = KiteRestClient(api_key="k1", access_token=ACCESS_TOKEN, api_root=sim.http_url,
                                rate_limiter=KiteRateLimiter(), retry_attempts=1)
        started = time.perf_counter()
        result = bars_backfill(client=client, since=dt.datetime.fromtimestamp(open_s, tz=dt.UTC),
                               until=timezone.now(), now=timezone.now)
        elapsed = time.perf_counter() - started
        client.close()
        served = sim.call(lambda: simulator.rest_requests.get("market.historical", 0))
    floor = (result.requests - 1) / 3.0
    print(f"backfill: {len(tokens)} underlyings x {gap_minutes} gap minutes = "
          f"{len(tokens) * gap_minutes} minutes")
    print(f"  requests {result.requests} (served {served}, failed {result.failed_requests}), "
          f"filled {len(result.filled)}, lacked {result.lacked}")
    print(f"  {elapsed:.2f} s to close every gap; the 3 requests/s limit's floor is {floor:.2f} s "
          f"({elapsed / max(result.requests, 1):.3f} s per request)")


async def bench_fallback(accounts: int, per_account: int, after_s: float, window_s: float) -> None:
    from asgiref.sync import sync_to_async
    from channels.layers import InMemoryChannelLayer

    from accounts.models import KiteAccount
    from accounts.services import account_set_session
    from streaming.engine.app import Engine
    from streaming.engine.config import EngineConfig
    from streaming.kite.limits import QUOTE_MAX_INSTRUMENTS_PER_CALL
    from streaming.market import SyntheticMarket
    from streaming.sim.simulator import KiteSimulator, SimulatorThread
    from subscriptions.models import Instrument, Subscription

    market = SyntheticMarket(seed=0, extra_underlyings=20)

    def setup() -> None:
        reset_tables()
        instruments(market)
        tokens = list(Instrument.objects.filter(instrument_type__in=("CE", "PE"))
                      .order_by("instrument_token").values_list("instrument_token", flat=True))
        for i in range(accounts):
            account = KiteAccount.objects.create(label=f"acc{i}", api_key=f"k{i}", api_secret=API_SECRET)
            account_set_session(account=account, access_token=f"{ACCESS_TOKEN}{i}")
            Subscription.objects.bulk_create(
                [Subscription(instrument_id=t, mode="full", pinned_account=account)
                 for t in tokens[i * per_account:(i + 1) * per_account]], batch_size=2000)

    await sync_to_async(setup)()
    sim = KiteSimulator(market=market, tick_interval_ms=250, enforce_rate_limits=True)
    for i in range(accounts):
        sim.register_account(api_key=f"k{i}", api_secret=API_SECRET, access_token=f"{ACCESS_TOKEN}{i}")
    thread = SimulatorThread(sim)  # its own loop, as Kite is another machine
    thread.__enter__()
    config = EngineConfig(engine_id="bench-fallback", kite_ws_url=sim.ws_url, kite_api_root=sim.http_url,
                          force_mode="live", rest_fallback_after_s=after_s, watchdog_s=window_s * 3)
    engine = Engine.build(config, channel_layer=InMemoryChannelLayer())
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        def streamed() -> int:
            return thread.call(lambda: sum(len(sim.subscriptions(f"k{i}")) for i in range(accounts)))

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if streamed() >= accounts * per_account:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        chunks = -(-per_account // QUOTE_MAX_INSTRUMENTS_PER_CALL)
        print(f"rest fallback: {accounts} accounts x {per_account} instruments "
              f"({chunks} calls of <= {QUOTE_MAX_INSTRUMENTS_PER_CALL} per refresh), after_s={after_s}")
        for stalled in (list(range(accounts)), [0]):
            await fallback_phase(engine, thread, sim, stalled=stalled, accounts=accounts,
                                 chunks=chunks, after_s=after_s, window_s=window_s)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)
        thread.__exit__(None, None, None)


def calls_by_account(engine, accounts: int) -> list[float]:
    counter = engine.metrics.rest_fallback_requests
    return [counter.labels(f"acc{i}", "ok")._value.get() + counter.labels(f"acc{i}", "error")._value.get()
            for i in range(accounts)]


async def fallback_phase(engine, thread, sim, *, stalled: list[int], accounts: int, chunks: int,
                         after_s: float, window_s: float) -> None:
    """Stall ``stalled`` accounts' sockets, measure the polling, resume, wait for it to stop."""
    rest = engine.metrics.ticks_in

    def polled_ticks() -> float:
        return sum(rest.labels("rest", f"acc{i}")._value.get() for i in stalled)

    before = polled_ticks()
    for i in stalled:
        thread.call(sim.stall, f"k{i}")
    stalled_at = time.monotonic()
    first_rest = None
    while time.monotonic() - stalled_at < window_s + after_s + 5:
        if first_rest is None and polled_ticks() > before:
            first_rest = time.monotonic() - stalled_at
            calls_at_start = calls_by_account(engine, accounts)
            window_started = time.monotonic()
        if first_rest is not None and time.monotonic() - window_started >= window_s:
            break
        await asyncio.sleep(0.05)
    measured_s = time.monotonic() - window_started
    per_key = [(b - a) / measured_s for a, b in zip(calls_at_start, calls_by_account(engine, accounts),
                                                      strict=True)]
    errors = sum(engine.metrics.rest_fallback_requests.labels(f"acc{i}", "error")._value.get()
                 for i in range(accounts))
    thread.call(sim.resume)
    resumed_at = time.monotonic()
    last_calls, last_change = calls_by_account(engine, accounts), time.monotonic()
    while time.monotonic() - resumed_at < 5:
        now_calls = calls_by_account(engine, accounts)
        if now_calls != last_calls:
            last_calls, last_change = now_calls, time.monotonic()
        await asyncio.sleep(0.05)
    refresh_s = chunks * len(stalled) / max(sum(per_key), 1e-9)
    print(f"  {len(stalled)} of {accounts} accounts stalled:")
    print(f"    first polled tick {first_rest:.2f} s after the stall (configured {after_s} s, "
          f"checked every 0.25 s)")
    print(f"    quote calls/s per api_key over {measured_s:.1f} s: "
          f"{', '.join(f'{r:.2f}' for r in per_key)} (Kite's limit 1/s each); "
          f"refused or failed so far {int(errors)}")
    print(f"    a stalled account's {chunks} chunks all refreshed every {refresh_s:.1f} s")
    print(f"    last quote call {max(0.0, last_change - resumed_at):.2f} s after the resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--underlyings", type=int, default=9)
    parser.add_argument("--gap-minutes", type=int, default=30)
    parser.add_argument("--accounts", type=int, default=2)
    parser.add_argument("--instruments", type=int, default=1200)
    parser.add_argument("--after-s", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    args = parser.parse_args()

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    bench_backfill(args.underlyings, args.gap_minutes)
    asyncio.run(bench_fallback(args.accounts, args.instruments, args.after_s, args.window_s))


if __name__ == "__main__":
    main()
