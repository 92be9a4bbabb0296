"""How many full-mode ticks per second the Kite simulator delivers to a real client.

    uv run python benchmarks/simulator/run.py            # the default run (~40 s)
    uv run python benchmarks/simulator/run.py --seconds 5 --intervals 100

One process serves (KiteSimulator on a SyntheticMarket); a second process is the client:
WebSocket connections (the `websockets` library) that subscribe in full mode and decode
every frame with streaming.kite.codec.decode_frame, as the pipeline would. For each tick
interval the client counts ticks over a fixed window after a warm-up, and reads the latency
probe (send time stamped in last_trade_time, see simulator.py).

Figures printed, measured side by side in the same run:
- reference: the simulator's in-process ceiling, frames built and encoded with no socket;
- delivered: ticks/s the client received and decoded, against the 100k/s goal and the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from streaming.kite.codec import decode_frame, mode_message, subscribe_message
from streaming.kite.limits import MAX_CONNECTIONS_PER_API_KEY
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator

GOAL_TICKS_PER_S = 100_000
TOKENS_PER_CONNECTION = 3000
PROBE_MASK = 0xFFFFFFFF


# --- client (runs in its own process) -------------------------------------------------------


async def client_main(ws_url: str, plan: list[dict], warmup_s: float, seconds: float) -> dict:
    from websockets.asyncio.client import connect

    counts = {"ticks": 0, "frames": 0, "bytes": 0}
    latencies: list[np.ndarray] = []
    measuring = asyncio.Event()
    done = asyncio.Event()

    async def one(spec: dict) -> None:
        url = f"{ws_url}?api_key={spec['api_key']}&access_token={spec['access_token']}"
        async with connect(url, max_size=None, compression=None, ping_interval=None) as ws:
            await ws.send(subscribe_message(spec["tokens"]))
            await ws.send(mode_message("full", spec["tokens"]))
            while not done.is_set():
                try:
                    async with asyncio.timeout(0.5):
                        message = await ws.recv()
                except TimeoutError:
                    continue
                if not isinstance(message, bytes) or len(message) < 2:
                    continue
                frame = decode_frame(message)
                if measuring.is_set():
                    full = frame.ticks[frame.ticks["packet_length"] == 184]
                    counts["ticks"] += len(frame.ticks)
                    counts["frames"] += 1
                    counts["bytes"] += len(message)
                    if len(full):
                        now_ms = (time.time_ns() // 1_000_000) & PROBE_MASK
                        probe = full["last_trade_time"][:1].astype(np.int64)
                        latencies.append((now_ms - probe) % (PROBE_MASK + 1))

    async def clock() -> float:
        await asyncio.sleep(warmup_s)
        measuring.set()
        start = time.perf_counter()
        await asyncio.sleep(seconds)
        done.set()
        return time.perf_counter() - start

    async with asyncio.TaskGroup() as tg:
        for spec in plan:
            tg.create_task(one(spec))
        timer = tg.create_task(clock())
    elapsed = timer.result()
    lat = np.concatenate(latencies) if latencies else np.zeros(1)
    return {
        **counts,
        "seconds": elapsed,
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
    }


# --- server side ----------------------------------------------------------------------------


def make_market() -> SyntheticMarket:
    # 12 underlyings x 4 expiries x 151 strikes x 2 = 14.5k options: room for 4 full connections.
    return SyntheticMarket(seed=1, extra_underlyings=10, expiries=4, strikes_each_side=75)


def make_plan(market: SyntheticMarket, connections: int) -> tuple[list[dict], list[tuple[str, str]]]:
    tradable = [r["instrument_token"] for r in market.instruments if r["segment"] == "NFO-OPT"]
    needed = connections * TOKENS_PER_CONNECTION
    if len(tradable) < needed:
        raise SystemExit(f"market too small: {len(tradable)} options for {needed} subscriptions")
    accounts = [
        (f"bench{i}", f"token{i}")
        for i in range(-(-connections // MAX_CONNECTIONS_PER_API_KEY))
    ]
    plan = []
    for c in range(connections):
        api_key, token = accounts[c // MAX_CONNECTIONS_PER_API_KEY]
        plan.append(
            {
                "api_key": api_key,
                "access_token": token,
                "tokens": tradable[c * TOKENS_PER_CONNECTION : (c + 1) * TOKENS_PER_CONNECTION],
            }
        )
    return plan, accounts


def reference_ceiling(market: SyntheticMarket, plan: list[dict], seconds: float) -> float:
    """Ticks/s of frame building + encoding alone (plus a market step per round), no sockets."""
    sim = KiteSimulator(market=market, latency_probe=True)
    groups = []
    for spec in plan:
        rows = market.rows_of(spec["tokens"])
        groups.append([(rows, 184)])
    ticks = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        market.step(market.now_epoch_s + 0.1)
        for g in groups:
            for frame in sim.build_frames(g):
                ticks += int.from_bytes(frame[:2], "big")
    return ticks / (time.perf_counter() - start)


async def serve_and_measure(
    market: SyntheticMarket,
    plan: list[dict],
    accounts: list[tuple[str, str]],
    *,
    interval_ms: float,
    warmup_s: float,
    seconds: float,
) -> dict:
    sim = KiteSimulator(market=market, tick_interval_ms=interval_ms, latency_probe=True)
    for api_key, token in accounts:
        sim.register_account(api_key=api_key, api_secret="s", access_token=token)  # noqa: S106
    async with sim:
        cpu_start = time.process_time()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            sim.ws_url,
            json.dumps(plan),
            str(warmup_s),
            str(seconds),
            stdout=subprocess.PIPE,
        )
        stdout, _ = await process.communicate()
        server_cpu_s = time.process_time() - cpu_start
        if process.returncode != 0:
            raise SystemExit(f"client failed with exit code {process.returncode}")
    result = json.loads(stdout)
    result["server_cpu_s"] = server_cpu_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--intervals", type=float, nargs="+", default=[100.0, 50.0, 25.0, 10.0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--client", nargs=4, metavar=("WS_URL", "PLAN", "WARMUP", "SECONDS"))
    args = parser.parse_args()
    if args.client:
        ws_url, plan, warmup, seconds = args.client
        result = asyncio.run(client_main(ws_url, json.loads(plan), float(warmup), float(seconds)))
        print(json.dumps(result))
        return

    # The simulator logs connections at info level; the table is what this run is for.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    market = make_market()
    plan, accounts = make_plan(market, args.connections)
    subscribed = args.connections * TOKENS_PER_CONNECTION
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print(f"market: {len(market.instruments)} instruments; {args.connections} connections x "
          f"{TOKENS_PER_CONNECTION} full-mode instruments = {subscribed} subscribed")
    ceiling = reference_ceiling(make_market(), plan, seconds=3.0)
    print(f"reference  in-process build+encode ceiling: {ceiling:>10,.0f} ticks/s "
          f"({ceiling / GOAL_TICKS_PER_S:.2f}x the 100k goal)")
    big = SyntheticMarket(seed=1, extra_underlyings=48, expiries=4, strikes_each_side=125)
    start = time.perf_counter()
    for i in range(20):
        big.step(big.now_epoch_s + 0.1 * (i + 1))
    step_ms = (time.perf_counter() - start) / 20 * 1000
    print(f"market.step on {len(big.instruments):,} instruments (walk, reprice, trades): "
          f"{step_ms:.1f} ms")
    print()
    print(f"{'interval':>9} {'offered/s':>10} {'delivered/s':>12} {'vs goal':>8} {'vs ceiling':>10} "
          f"{'MB/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'server cpu':>10}")
    for interval_ms in args.intervals:
        result = asyncio.run(
            serve_and_measure(
                make_market(), plan, accounts,
                interval_ms=interval_ms, warmup_s=args.warmup, seconds=args.seconds,
            )
        )
        rate = result["ticks"] / result["seconds"]
        offered = subscribed * 1000.0 / interval_ms
        wall_s = args.warmup + args.seconds
        print(
            f"{interval_ms:>7.0f}ms {offered:>10,.0f} {rate:>12,.0f} "
            f"{rate / GOAL_TICKS_PER_S:>7.2f}x {rate / ceiling:>9.2f}x "
            f"{result['bytes'] / result['seconds'] / 1e6:>7.1f} "
            f"{result['latency_p50_ms']:>7.1f} {result['latency_p99_ms']:>7.1f} "
            f"{result['server_cpu_s'] / wall_s:>9.0%}"
        )


if __name__ == "__main__":
    main()
