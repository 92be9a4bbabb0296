"""Chain analytics per flush: 3 expiries x 101 strikes, every chain due on every flush.

The engine's own path on the pipeline thread (streaming.engine.chain_analytics): the OI
baselines and changed-chain marks of a flush (``observe``), then the ``analytics`` message of
each due chain (summary, rows with build-up, term structure, JSON), pinned to one CPU. The clock advances by the
analytics interval each round, so every chain is due every time: the worst case (in the
engine a chain is due at most once a second). Also times the once-a-minute sample of every
chain (``minute_rows``). Run from the repository root:

    uv run python benchmarks/analytics/run.py [--rounds 300] [--strikes 101] [--expiries 3]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from streaming.engine.chain_analytics import ChainAnalytics  # noqa: E402
from streaming.engine.pipeline import SnapshotPipeline  # noqa: E402
from streaming.engine.universe import InstrumentUniverse  # noqa: E402
from streaming.greeks import IST, black76_price, years_to_expiry  # noqa: E402
from streaming.kite.codec import TICK_DTYPE  # noqa: E402

SPOT = 24_000.0
RATE = 0.065
STEP = 50.0
NOW_S = dt.datetime(2026, 11, 20, 11, 0, tzinfo=IST).timestamp()


def build(n_expiries: int, n_strikes: int):
    """A NIFTY universe (index, one future per expiry, CE/PE per strike) and its first ticks."""
    first = dt.date(2026, 11, 24)
    expiries = [first + dt.timedelta(days=7 * i) for i in range(n_expiries)]
    strikes = SPOT + STEP * (np.arange(n_strikes) - n_strikes // 2)
    rows = [{"instrument_token": 256265, "tradingsymbol": "NIFTY 50", "name": "NIFTY 50",
             "exchange": "NSE", "segment": "INDICES", "instrument_type": "EQ", "expiry": None,
             "strike": 0.0, "lot_size": 1}]  # fmt: skip
    token = 1_000_000
    options = []
    for e, expiry in enumerate(expiries):
        rows.append({"instrument_token": token, "tradingsymbol": f"NIFTY{e}FUT", "name": "NIFTY",
                     "exchange": "NFO", "segment": "NFO-FUT", "instrument_type": "FUT",
                     "expiry": expiry, "strike": 0.0, "lot_size": 75})  # fmt: skip
        token += 1
        for k in strikes.tolist():
            for kind in ("CE", "PE"):
                rows.append({"instrument_token": token, "tradingsymbol": f"NIFTY{e}{int(k)}{kind}",
                             "name": "NIFTY", "exchange": "NFO", "segment": "NFO-OPT",
                             "instrument_type": kind, "expiry": expiry, "strike": k,
                             "lot_size": 75})  # fmt: skip
                options.append((token, e, k, kind == "CE"))
                token += 1
    universe = InstrumentUniverse.from_rows(rows)
    tokens = np.array([o[0] for o in options], dtype=np.int64)
    strike = np.array([o[2] for o in options])
    is_call = np.array([o[3] for o in options])
    chain = np.array([o[1] for o in options])
    t = years_to_expiry(now_epoch_s=NOW_S, expiry_epoch_s=universe.chain_expiry_epoch_s[chain])
    forward = SPOT * np.exp(RATE * t)
    sigma = 0.13 + 0.4 * ((strike - forward) / forward) ** 2
    price = np.maximum(np.round(black76_price(forward=forward, strike=strike, t_years=t,
                                              sigma=sigma, r=RATE, is_call=is_call) / 0.05) * 0.05,
                       0.05)  # fmt: skip
    futures = np.array([r["instrument_token"] for r in rows if r["instrument_type"] == "FUT"])
    return universe, tokens, price, futures, forward[:: 2 * n_strikes]


def ticks_for(tokens, price, oi, rng):
    t = np.zeros(tokens.size, dtype=TICK_DTYPE)
    t["instrument_token"] = tokens
    t["packet_length"] = 184
    t["tradable"] = True
    t["last_price"] = price
    t["close"] = price * (1 + rng.normal(0, 0.05, tokens.size))
    t["volume_traded"] = rng.integers(1000, 100_000, tokens.size)
    t["oi"] = oi
    t["depth_buy_price"][:, 0] = np.maximum(price - 0.05, 0.05)
    t["depth_sell_price"][:, 0] = price + 0.05
    t["depth_buy_quantity"][:, 0] = 75
    t["depth_sell_quantity"][:, 0] = 150
    t["exchange_timestamp"] = int(NOW_S)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--strikes", type=int, default=101)
    parser.add_argument("--expiries", type=int, default=3)
    parser.add_argument("--changed", type=int, default=60, help="options that tick per flush")
    args = parser.parse_args()
    # One core, as the engine's one pipeline thread has: no migrations between CPUs.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = np.random.default_rng(7)
    universe, tokens, price, futures, forwards = build(args.expiries, args.strikes)
    pipeline = SnapshotPipeline(universe, r=RATE, stale_after_s=30.0)
    analytics = ChainAnalytics(interval_s=1.0, iv_window_days=365)
    oi = rng.integers(10_000, 5_000_000, tokens.size)
    fut = np.zeros(futures.size, dtype=TICK_DTYPE)
    fut["instrument_token"] = futures
    fut["packet_length"] = 184
    fut["tradable"] = True
    fut["last_price"] = np.round(forwards / 0.05) * 0.05
    fut["exchange_timestamp"] = int(NOW_S)
    pipeline.ingest(np.concatenate([fut, ticks_for(tokens, price, oi, rng)]), is_mock=False,
                    received_epoch_s=NOW_S)  # fmt: skip
    pipeline.flush(NOW_S)
    analytics.observe(pipeline, NOW_S)
    analytics.due(pipeline, NOW_S, None)

    wall, cpu, sizes, minute_wall = [], [], [], []
    now = NOW_S
    for _ in range(args.rounds):
        now += 1.0
        pick = rng.choice(tokens.size, args.changed, replace=False)
        oi[pick] += rng.integers(-5000, 5000, pick.size)
        moved = price[pick] * (1 + rng.normal(0, 0.01, pick.size))
        pipeline.ingest(ticks_for(tokens[pick], np.round(moved / 0.05) * 0.05, oi[pick], rng),
                        is_mock=False, received_epoch_s=now)  # fmt: skip
        pipeline.flush(now)
        w0, c0 = time.perf_counter(), time.thread_time()
        analytics.observe(pipeline, now)
        messages = analytics.due(pipeline, now, None)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.thread_time() - c0)
        sizes.append(sum(len(m) for _, m in messages))
        assert len(messages) == args.expiries, "every chain is due every round"
        w0 = time.perf_counter()
        analytics.minute_rows(pipeline, now + 60 * len(minute_wall))
        minute_wall.append(time.perf_counter() - w0)

    def ms(values, q=None):
        values = sorted(values)
        if q is None:
            return statistics.median(values) * 1000
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    print(f"chain analytics: {args.expiries} expiries x {args.strikes} strikes "
          f"({tokens.size} options), every chain due each flush, {args.changed} options ticking")  # fmt: skip
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}, {args.rounds} rounds")
    print(f"per flush (observe + {args.expiries} messages): wall median {ms(wall):.3f} ms, "
          f"p95 {ms(wall, 0.95):.3f} ms, max {max(wall) * 1000:.3f} ms")
    print(f"per flush CPU time (thread_time): median {ms(cpu):.3f} ms, p95 {ms(cpu, 0.95):.3f} ms, "
          f"mean {statistics.mean(cpu) * 1000:.3f} ms, total {sum(cpu):.3f} s")
    print(f"messages: {statistics.mean(sizes) / args.expiries / 1024:.1f} KiB per chain")
    print(f"minute sample of every chain (once a minute): wall median {ms(minute_wall):.3f} ms")
    target = 2.0
    for name, values in (("wall", wall), ("CPU", cpu)):
        verdict = "meets" if ms(values) <= target else "MISSES"
        print(f"target <= {target} ms per flush: {name} median {verdict} it")


if __name__ == "__main__":
    main()
