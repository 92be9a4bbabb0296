"""The benchmark's Kite: a KiteSimulator process that also records, per market step, when the
step happened and the signature of every sampled instrument (see common.py).

    python benchmarks/engine/sim.py --port 0 --accounts 11 --extra-underlyings 163 \\
        --sample tokens.npy --out steps.npz

Prints ``READY <ws_url>`` once serving; on SIGUSR1 the market stops moving (the simulator
goes on sending the last state, so every client should converge to it); on SIGTERM writes
``--out`` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.engine.common import signature
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator


def build_market(args) -> SyntheticMarket:
    return SyntheticMarket(
        seed=args.seed,
        expiries=args.expiries,
        strikes_each_side=args.strikes_each_side,
        extra_underlyings=args.extra_underlyings,
    )


async def main(args) -> None:
    # Logs to stderr (stdout carries the READY line), warnings and above only.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    market = build_market(args)
    sample = np.load(args.sample) if args.sample else np.zeros(0, dtype=np.int64)
    rows = market.rows_of(sample) if len(sample) else np.zeros(0, dtype=np.int64)
    step_times: list[float] = []
    signatures: list[np.ndarray] = []
    original_step = market.step

    def recording_step(now_epoch_s=None):
        original_step(now_epoch_s)
        if len(rows):
            s = market.state_at(rows)
            signatures.append(
                signature(
                    s["exchange_timestamp"],
                    np.rint(s["last_price"] * 100.0),
                    s["bid_qty"][:, 0],
                    s["ask_qty"][:, 0],
                    s["volume_traded"],
                )
            )
            # Stamped after the signatures, just before the frames are built: where the
            # simulator's own latency probe would stamp them.
            step_times.append(time.time())

    # The simulator's tick loop calls market.step(); the instance attribute wins the lookup.
    market.step = recording_step
    sim = KiteSimulator(market=market, tick_interval_ms=args.interval_ms, port=args.port)
    for i in range(1, args.accounts + 1):
        sim.register_account(
            api_key=f"bench{i:02d}", api_secret="bench-secret", access_token=f"tok{i:02d}"  # noqa: S106
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(sim, "step_market", False))
    async with sim:
        print(f"READY {sim.ws_url} {sim.http_url}", flush=True)
        await stop.wait()
        sent = sim.ticks_sent
    np.savez(
        args.out,
        tokens=sample,
        times=np.asarray(step_times, dtype=np.float64),
        signatures=np.stack(signatures) if signatures else np.zeros((0, len(sample)), np.uint64),
        ticks_sent=np.int64(sent),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--accounts", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--expiries", type=int, default=3)
    parser.add_argument("--strikes-each-side", type=int, default=50)
    parser.add_argument("--extra-underlyings", type=int, default=163)
    parser.add_argument("--interval-ms", type=float, default=1000.0)
    parser.add_argument("--sample", default="")
    parser.add_argument("--out", required=True)
    asyncio.run(main(parser.parse_args()))
