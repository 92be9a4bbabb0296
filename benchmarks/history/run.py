"""Historical Greeks end to end: GET /api/v1/history/<token> for 30 sessions of minute candles.

What runs, in one process: Django's test client calls the history view (auth, query
validation, the service, JSON with orjson); the service fetches the option's candles and its
future's candles from the Kite simulator over loopback HTTP (one request each, through the
validated REST client and its rate limiter, which spaces them by Kite's 3 requests/s),
matches them by timestamp, computes IV and Greeks for the whole range at once, and writes
the rows into PostgreSQL. Then the same request again,
served from PostgreSQL.

Reference, measured side by side in the same run on the same option: the old service's way,
candle by candle: for each option candle one historical request for the underlying's candle of
that minute, the Greeks of that one candle, and one ``update_or_create`` of its row. It is
timed on a sample of candles and extrapolated to the whole range (it says so when printing):
  - at Kite's historical rate limit (3 requests/s, what a real account allows);
  - without any rate limit (the simulator answers at once), the floor of that design.

Run from the repository root (PostgreSQL on 127.0.0.1 with trust auth; the benchmark creates
and migrates its own database ``bench_history``):

    uv run python benchmarks/history/run.py [--sessions 30] [--sample 200] [--limited-sample 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BENCH_DB = "bench_history"
os.environ.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{BENCH_DB}")
os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
os.environ.setdefault("FIELD_ENCRYPTION_KEYS", "mm3JPTf9TRR7OBOOigZVYZMNBLNeIIxHivuB6kCvdHE=")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ["REDIS_URL"] = ""  # in-process rate limiter: the benchmark needs no Redis
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")

TARGET_S = 1.0
TARGET_RATIO = 100.0
API_KEY, API_SECRET, ACCESS_TOKEN = "benchkey", "benchsecret", "benchtoken"


def ensure_database() -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')


def trading_days_back(end: dt.date, sessions: int) -> dt.date:
    day = end
    count = 0
    while True:
        if day.weekday() < 5:
            count += 1
            if count == sessions:
                return day
        day -= dt.timedelta(days=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30, help="trading sessions of minute candles")
    parser.add_argument("--sample", type=int, default=200, help="candles for the unlimited naive path")
    parser.add_argument("--limited-sample", type=int, default=30,
                        help="candles for the naive path at Kite's 3 requests/s")
    parser.add_argument("--repeat", type=int, default=3, help="cold runs (best and median shown)")
    args = parser.parse_args()

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    run(args)


def run(args: argparse.Namespace) -> None:
    import numpy as np
    import orjson
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from accounts.models import KiteAccount
    from streaming.greeks import IST, compute_greeks, expiry_close_epoch_s, years_to_expiry
    from streaming.kite.rest import KiteRateLimiter, KiteRestClient
    from streaming.kite.simulator import KiteSimulator, SimulatorThread
    from streaming.market import SyntheticMarket
    from subscriptions.models import CandleGreeks, HistoryCoverage, Instrument

    # A market whose clock stands at 15:30 IST of the last weekday: whole sessions only.
    today = timezone.now().astimezone(IST).date()
    last = today if today.weekday() < 5 else today - dt.timedelta(days=today.weekday() - 4)
    clock_s = dt.datetime.combine(last, dt.time(15, 30), tzinfo=IST).timestamp()
    market = SyntheticMarket(seed=11, now_fn=lambda: clock_s, expiries=2, strikes_each_side=10)
    first = trading_days_back(last, args.sessions)
    start = dt.datetime.combine(first, dt.time(9, 15), tzinfo=IST)
    end = dt.datetime.combine(last, dt.time(15, 30), tzinfo=IST)

    Instrument.objects.all().delete()
    Instrument.objects.bulk_create(
        Instrument(
            instrument_token=r["instrument_token"], exchange_token=int(r["exchange_token"]),
            tradingsymbol=r["tradingsymbol"], name=r["name"], expiry=r["expiry"], strike=r["strike"],
            tick_size=r["tick_size"], lot_size=r["lot_size"], instrument_type=r["instrument_type"],
            segment=r["segment"], exchange=r["exchange"],
        )
        for r in market.instruments
    )
    futures = dict(Instrument.objects.filter(name="NIFTY", instrument_type="FUT").values_list("expiry", "pk"))
    option = (
        Instrument.objects.filter(name="NIFTY", instrument_type="CE", expiry__in=list(futures))
        .filter(expiry__gt=last)
        .order_by("expiry", "strike")
        .filter(strike=26_000.0)
        .first()
    )
    future_token = futures[option.expiry]

    KiteAccount.objects.all().delete()
    KiteAccount.objects.create(label="bench", api_key=API_KEY, access_token=ACCESS_TOKEN,
                               token_expires_at=timezone.now() + dt.timedelta(hours=6))
    user_model = get_user_model()
    user_model.objects.filter(username="bench").delete()
    staff = user_model.objects.create_user("bench", is_staff=True)
    client = Client(HTTP_HOST="localhost")
    client.force_login(staff)

    sim = KiteSimulator(market=market, step_market=False, tick_interval_ms=60_000)
    sim.register_account(api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    with SimulatorThread(sim) as thread:
        settings.KITE_API_ROOT = thread.http_url
        query = {"from": start.isoformat(), "to": end.isoformat(), "interval": "minute"}
        url = f"/api/v1/history/{option.pk}"

        def clear() -> None:
            CandleGreeks.objects.filter(instrument=option).delete()
            HistoryCoverage.objects.filter(instrument=option).delete()

        clear()
        client.get(url, query)  # warm-up: numba kernels, connections, code paths
        cold, warm = [], []
        for _ in range(args.repeat):
            clear()
            t0 = time.perf_counter()
            response = client.get(url, query)
            cold.append(time.perf_counter() - t0)
            assert response.status_code == 200, response.content[:500]
            body = orjson.loads(response.content)
            assert body["source"] == "computed"
            t0 = time.perf_counter()
            again = client.get(url, query)
            warm.append(time.perf_counter() - t0)
            assert orjson.loads(again.content)["source"] == "stored"
        candles = body["candles"]
        n = len(candles)
        iv = np.array([np.nan if c["iv"] is None else c["iv"] for c in candles])
        requests_per_cold = 2

        # --- the reference: candle by candle, one underlying fetch and one write per candle ---
        def naive(sample: int, limiter: KiteRateLimiter) -> float:
            rest = KiteRestClient(api_key=API_KEY, access_token=ACCESS_TOKEN,
                                  api_root=thread.http_url, rate_limiter=limiter)
            opt = rest.historical(option.pk, start, end, "minute", oi=True)
            opt_s = opt.ts.astype("datetime64[s]").astype(np.int64)
            picks = np.linspace(0, len(opt_s) - 1, sample).astype(int)
            t0 = time.perf_counter()
            for i in picks:
                ts = dt.datetime.fromtimestamp(int(opt_s[i]), tz=IST)
                und = rest.historical(future_token, ts, ts + dt.timedelta(seconds=59), "minute")
                forward = float(und.close[0]) if len(und) else float("nan")
                g = compute_greeks(
                    price=float(opt.close[i]), forward=forward, strike=option.strike,
                    t_years=float(years_to_expiry(now_epoch_s=int(opt_s[i]) + 60,
                                                  expiry_epoch_s=expiry_close_epoch_s(option.expiry))),
                    is_call=True, r=settings.RISK_FREE_RATE,
                )
                CandleGreeks.objects.update_or_create(
                    instrument=option, interval="naive", ts=ts,
                    defaults={
                        "open": float(opt.open[i]), "high": float(opt.high[i]),
                        "low": float(opt.low[i]), "close": float(opt.close[i]),
                        "volume": int(opt.volume[i]), "oi": int(opt.oi[i]),
                        "underlying_price": forward, "forward": forward,
                        "iv": float(g.iv), "delta": float(g.delta), "gamma": float(g.gamma),
                        "theta": float(g.theta), "vega": float(g.vega), "rho": float(g.rho),
                        "flags": int(g.flags),
                    },
                )
            elapsed = time.perf_counter() - t0
            rest.close()
            CandleGreeks.objects.filter(instrument=option, interval="naive").delete()
            return elapsed

        unlimited = KiteRateLimiter(requests_per_s={"historical": 1e9})
        naive_free_s = naive(args.sample, unlimited)
        naive_limited_s = naive(args.limited_sample, KiteRateLimiter())
        clear()

    load = os.getloadavg()
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg_version = cursor.fetchone()[0]
    best, median = min(cold), statistics.median(cold)
    naive_free_total = naive_free_s / args.sample * n
    naive_limited_total = naive_limited_s / args.limited_sample * n
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus, "
          f"PostgreSQL {pg_version}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"option {option.tradingsymbol} ({option.pk}), future {future_token}, "
          f"{args.sessions} sessions {first} .. {last}: {n} minute candles, "
          f"{np.isfinite(iv).sum()} with an IV, median IV {np.nanmedian(iv):.4f}")
    print(f"endpoint cold (fetch {requests_per_cold} ranges, Greeks, store, JSON): "
          f"best {best * 1000:.0f} ms, median {median * 1000:.0f} ms over {args.repeat} runs "
          f"-> {n / best:,.0f} candles/s")
    print(f"endpoint warm (served from PostgreSQL): best {min(warm) * 1000:.0f} ms, "
          f"median {statistics.median(warm) * 1000:.0f} ms")
    print(f"reference candle by candle, no rate limit: {args.sample} candles in {naive_free_s:.2f} s "
          f"= {naive_free_s / args.sample * 1000:.1f} ms/candle, extrapolated to {n}: "
          f"{naive_free_total:.0f} s")
    print(f"reference candle by candle at Kite's 3 requests/s: {args.limited_sample} candles in "
          f"{naive_limited_s:.2f} s, extrapolated to {n}: {naive_limited_total / 60:.0f} min")
    print(f"speed-up (cold endpoint vs reference): {naive_free_total / best:,.0f}x without rate "
          f"limit, {naive_limited_total / best:,.0f}x at Kite's rate limit")
    print(f"targets: under {TARGET_S:.0f} s end to end -> {best:.2f} s: "
          f"{'PASS' if best < TARGET_S else 'FAIL'}; at least {TARGET_RATIO:.0f}x -> "
          f"{naive_free_total / best:,.0f}x: {'PASS' if naive_free_total / best >= TARGET_RATIO else 'FAIL'}")


if __name__ == "__main__":
    main()
