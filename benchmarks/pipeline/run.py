"""Snapshot pipeline in one process: ingest + forwards + Greeks + JSON at 100k instruments.

Drives ``SnapshotPipeline`` with full-mode ticks from the synthetic market at a set rate
(default 100k ticks/s into about 100k instruments, flushed every 100 ms) and measures, in
CPU time so that other load on the machine inflates the figures less:

* ingest cost per tick and the capacity in ticks/s of one core (ingest + flush);
* flush time p50/p99 (CPU and wall), snapshots and Greeks per flush, the share of a core used
  at the set rate, for every group watched (worst case) and for a fraction of groups watched;
* the channel-layer cost per ``group_send`` (channels-redis, real Redis) and of refreshing the
  watched set, which bounds how many groups one engine can publish to;
* resident memory of the pipeline at this size;
* the named reference, side by side: the old service's design (one tick at a time: Greeks
  for that option, a dict, ``json.dumps``, one Redis PUBLISH per tick), measured here with our
  own Greeks so that the ratio is the design's, next to the old service's ~1000 ticks/s.

Run from the repository root (Redis on REDIS_URL, default redis://127.0.0.1:6379/0):

    uv run python benchmarks/pipeline/run.py [--instruments 100000] [--rate 100000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis
from channels_redis.core import RedisChannelLayer

from streaming.engine.pipeline import GroupBatch, SnapshotPipeline
from streaming.engine.publisher import Publisher
from streaming.engine.universe import InstrumentUniverse
from streaming.greeks import compute_greeks, years_to_expiry
from streaming.kite.codec import PACKET_FULL
from streaming.market import SyntheticMarket

OLD_SERVICE_TICKS_PER_S = 1000  # the old service's best, as its review reports it
INSTRUMENTS_PER_UNDERLYING = 190  # index + 3 futures + 3 expiries x 31 strikes x CE/PE
START_EPOCH_S = 1795149000.0  # a Friday, 10:00 IST


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


def build(instruments: int):
    extra = max(0, math.ceil((instruments - 380) / INSTRUMENTS_PER_UNDERLYING))
    now = START_EPOCH_S
    market = SyntheticMarket(seed=11, now_fn=lambda: now, extra_underlyings=extra, strikes_each_side=15)
    rows = market.instruments
    names = {market.spec(n).index_symbol: n for n in market.underlyings}
    rss_before = rss_mb()
    t0 = time.process_time()
    universe = InstrumentUniverse.from_rows(rows, index_underlyings=names)
    universe_s = time.process_time() - t0
    return market, universe, universe_s, rss_before


def sustained(market, universe, *, rate, seconds, flush_ms, frame, watched_fraction, seed):
    """Feed ``rate`` ticks/s for ``seconds`` of market time; returns the figures."""
    rng = np.random.default_rng(seed)
    pipeline = SnapshotPipeline(universe, r=0.065, stale_after_s=30.0)
    now = market.now_epoch_s
    # Prime: every instrument once, as after start-up.
    pipeline.ingest(market.ticks(market.tokens, mode="full"), is_mock=True, received_epoch_s=now)
    groups = universe.group_names
    if watched_fraction >= 1.0:
        watched = None
    else:
        pick = rng.random(len(groups)) < watched_fraction
        watched = frozenset(g for g, w in zip(groups, pick, strict=True) if w)
    pipeline.flush(now, watched=watched)
    per_flush = int(rate * flush_ms / 1000)
    flushes = int(seconds * 1000 / flush_ms)
    ingest_cpu = flush_cpu = 0.0
    flush_cpu_ms, flush_wall_ms, snapshots, greeks, batches = [], [], [], [], []
    ticks_in = 0
    for _ in range(flushes):
        now += flush_ms / 1000
        market.step(now)
        rows = np.sort(rng.choice(len(universe), per_flush, replace=False))
        ticks = market.ticks_at(rows, market.packet_lengths(rows, "full"))
        c0 = time.process_time()
        for start in range(0, per_flush, frame):
            pipeline.ingest(ticks[start : start + frame], is_mock=True, received_epoch_s=now)
        c1 = time.process_time()
        w1 = time.perf_counter()
        out = pipeline.flush(now, watched=watched)
        w2 = time.perf_counter()
        c2 = time.process_time()
        ingest_cpu += c1 - c0
        flush_cpu += c2 - c1
        flush_cpu_ms.append((c2 - c1) * 1000)
        flush_wall_ms.append((w2 - w1) * 1000)
        stats = pipeline.last_flush
        snapshots.append(stats.snapshots)
        greeks.append(stats.greeks)
        batches.append(len(out))
        ticks_in += per_flush
        assert pipeline.pending == 0
    cpu = ingest_cpu + flush_cpu
    return {
        "watched_groups": len(groups) if watched is None else len(watched),
        "groups": len(groups),
        "ticks": ticks_in,
        "ingest_us_per_tick": ingest_cpu / ticks_in * 1e6,
        "capacity_ticks_per_s": ticks_in / cpu,
        "core_share": cpu / (flushes * flush_ms / 1000),
        "flush_cpu_ms_p50": pct(flush_cpu_ms, 50),
        "flush_cpu_ms_p99": pct(flush_cpu_ms, 99),
        "flush_wall_ms_p50": pct(flush_wall_ms, 50),
        "flush_wall_ms_p99": pct(flush_wall_ms, 99),
        "snapshots_per_flush": float(np.mean(snapshots)),
        "greeks_per_flush": float(np.mean(greeks)),
        "batches_per_flush": float(np.mean(batches)),
        "pipeline": pipeline,
    }


def reference_per_tick(market, universe, redis_url: str, n: int) -> float:
    """The old design: per tick, Greeks of that option, a dict, json.dumps, one PUBLISH."""
    client = redis.Redis.from_url(redis_url)
    client.ping()
    options = np.flatnonzero(universe.is_option)[:n]
    rows = market.rows_of(universe.tokens[options])
    ticks = market.ticks_at(rows, PACKET_FULL)
    now = market.now_epoch_s
    forward = {c: float(market.spot(universe.underlyings[universe.chain_und[c]])) for c in set(universe.chain[options].tolist())}
    started = time.process_time()
    for i, slot in enumerate(options.tolist()):
        t = ticks[i]
        g = compute_greeks(
            price=float(t["last_price"]),
            forward=forward[int(universe.chain[slot])],
            strike=float(universe.strike[slot]),
            t_years=float(years_to_expiry(now_epoch_s=now, expiry_epoch_s=universe.expiry_epoch_s[slot])),
            is_call=bool(universe.is_call[slot]),
            r=0.065,
        )
        payload = {
            "instrument_token": int(t["instrument_token"]),
            "last_price": float(t["last_price"]),
            "volume": int(t["volume_traded"]),
            "oi": int(t["oi"]),
            "bid": float(t["depth_buy_price"][0]),
            "ask": float(t["depth_sell_price"][0]),
            "iv": float(g.iv),
            "delta": float(g.delta),
            "gamma": float(g.gamma),
            "theta": float(g.theta),
            "vega": float(g.vega),
            "rho": float(g.rho),
            "timestamp": int(t["exchange_timestamp"]),
        }
        client.publish("bench-pipeline-reference", json.dumps(payload))
    cpu = time.process_time() - started
    client.close()
    return n / cpu


async def channel_layer_cost(redis_url: str, group_names, rounds: int) -> dict[str, float]:
    """CPU per group_send on channels-redis (empty group, one member) and per refresh."""
    layer = RedisChannelLayer(hosts=[redis_url], prefix="bench-pipeline", capacity=100_000)
    consumer = await layer.new_channel()
    n = 50
    member_groups = [f"chain.BENCH.{i:08d}" for i in range(n)]
    empty_groups = [f"chain.EMPTY.{i:08d}" for i in range(n)]
    for g in member_groups:
        await layer.group_add(g, consumer)
    items = [b"x" * 500] * 20
    out: dict[str, float] = {}
    modes = {"seq": {"bulk": False, "max_concurrency": 1},
             "c8": {"bulk": False, "max_concurrency": 8},
             "bulk": {"bulk": True}}
    for label, names in (("empty", empty_groups), ("member", member_groups)):
        for mode, kwargs in modes.items():
            publisher = Publisher(layer, **kwargs)
            batches = [GroupBatch(group=g, tokens=list(range(20)), items=items) for g in names]
            await publisher.publish(batches)  # warm the pool
            c0 = time.process_time()
            w0 = time.perf_counter()
            for _ in range(rounds):
                await publisher.publish(batches)
            out[f"{label}_{mode}_cpu_us"] = (time.process_time() - c0) / (rounds * n) * 1e6
            out[f"{label}_{mode}_wall_us"] = (time.perf_counter() - w0) / (rounds * n) * 1e6
            await layer.flush()
            for g in member_groups:
                await layer.group_add(g, consumer)
    publisher = Publisher(layer)
    c0 = time.process_time()
    await publisher.refresh_watched(group_names)
    out["refresh_ms"] = (time.process_time() - c0) * 1000
    out["refresh_groups"] = len(group_names)
    await layer.flush()
    await layer.close_pools()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=100_000, help="ticks per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="market seconds per scenario")
    parser.add_argument("--flush-ms", type=int, default=100)
    parser.add_argument("--frame", type=int, default=500, help="ticks per ingest call")
    parser.add_argument("--watched", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--reference-ticks", type=int, default=3000)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()

    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}")
    market, universe, universe_s, rss_before = build(args.instruments)
    print(f"universe: {len(universe)} instruments, {len(universe.underlyings)} underlyings, "
          f"{len(universe.chain_und)} chains, {len(universe.group_names)} groups; "
          f"built in {universe_s * 1000:.0f} ms CPU")
    print(f"rate {args.rate} full-mode ticks/s, flush every {args.flush_ms} ms, "
          f"{args.frame} ticks per ingest call, {args.seconds:.0f} s per scenario")
    print()
    results = []
    rss_after = math.nan
    for i, fraction in enumerate(args.watched):
        r = sustained(market, universe, rate=args.rate, seconds=args.seconds,
                      flush_ms=args.flush_ms, frame=args.frame, watched_fraction=fraction, seed=i)
        if i == 0:
            rss_after = rss_mb()  # with one pipeline alive, every snapshot serialised and cached
        del r["pipeline"]
        results.append(r)
        print(f"watched groups {r['watched_groups']}/{r['groups']}:")
        print(f"  ingest             {r['ingest_us_per_tick']:.2f} us CPU per tick")
        print(f"  per flush          {r['snapshots_per_flush']:.0f} snapshots, "
              f"{r['greeks_per_flush']:.0f} Greeks, {r['batches_per_flush']:.0f} group batches")
        print(f"  flush              CPU p50 {r['flush_cpu_ms_p50']:.1f} ms, p99 {r['flush_cpu_ms_p99']:.1f} ms; "
              f"wall p50 {r['flush_wall_ms_p50']:.1f} ms, p99 {r['flush_wall_ms_p99']:.1f} ms")
        print(f"  core share         {r['core_share'] * 100:.0f} % of one core at {args.rate} ticks/s")
        print(f"  capacity           {r['capacity_ticks_per_s']:,.0f} ticks/s per core "
              f"({r['capacity_ticks_per_s'] / OLD_SERVICE_TICKS_PER_S:.0f}x the old service's ~1000)")
        print(f"  tick -> batch      at most {args.flush_ms + r['flush_wall_ms_p99']:.0f} ms "
              f"(flush interval + flush wall p99)")
    print()
    print(f"memory: process RSS {rss_after:.0f} MB; universe + pipeline (every snapshot cached) "
          f"about {rss_after - rss_before:.0f} MB of it, the rest is the synthetic market")

    ref = reference_per_tick(market, universe, args.redis_url, args.reference_ticks)
    best = max(r["capacity_ticks_per_s"] for r in results)
    worst = min(r["capacity_ticks_per_s"] for r in results)
    print()
    print(f"reference, old design measured here (per tick: Greeks, dict, json.dumps, PUBLISH): "
          f"{ref:,.0f} ticks/s per core")
    print(f"  pipeline / reference: {worst / ref:.0f}x (all groups watched) to {best / ref:.0f}x")

    layer = asyncio.run(channel_layer_cost(args.redis_url, list(universe.group_names), rounds=10))
    print()
    print("channel layer (channels-redis, real Redis), CPU per group message in this process,")
    print("50 groups of 20 snapshots per publish:")
    for label in ("empty", "member"):
        print(f"  {label:6} group: group_send {layer[f'{label}_seq_cpu_us']:.0f} us sequential, "
              f"{layer[f'{label}_c8_cpu_us']:.0f} us 8 concurrent; "
              f"bulk {layer[f'{label}_bulk_cpu_us']:.0f} us "
              f"(wall {layer[f'{label}_seq_wall_us']:.0f} / {layer[f'{label}_c8_wall_us']:.0f} / "
              f"{layer[f'{label}_bulk_wall_us']:.0f} us)")
    flushes_per_s = 1000 / args.flush_ms
    for mode, label in (("c8", "group_send x8"), ("bulk", "bulk")):
        per_send_s = layer[f"member_{mode}_cpu_us"] / 1e6
        print(f"  => {label:13}: one core publishes to about "
              f"{1 / (per_send_s * flushes_per_s):.0f} groups per flush at {flushes_per_s:.0f} "
              f"flushes/s; every group of this universe: "
              f"{len(universe.group_names) * per_send_s * flushes_per_s:.2f} cores")
    print(f"  refreshing the watched set ({layer['refresh_groups']} groups, one pipelined ZCARD "
          f"each): {layer['refresh_ms']:.1f} ms CPU")


if __name__ == "__main__":
    main()
