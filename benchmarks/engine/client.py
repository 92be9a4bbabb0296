"""Benchmark WebSocket clients: many connections in one process, each subscribed to its own
instruments through the real API (daphne + TickerConsumer), acking every frame, recording
for every snapshot received the token, its step signature and the receive time.

    python benchmarks/engine/client.py --url ws://127.0.0.1:8000/ws/v1/ --key KEY \\
        --plan plan.json --first 0 --count 50 --record-from T0 --until T1 --settle-until T2 \\
        --out rec.npz

With ``--layer`` it is instead one channel-layer member of the plan's ``layer_groups`` (no
daphne): the engine's side of the latency, from market step to the group message in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.engine.common import signature


class Recorder:
    """Snapshots received in [record_from, until], and the last one of each (connection,
    token) up to ``settle_until`` (after ``until`` the market stands still: convergence)."""

    def __init__(self, record_from: float, until: float, settle_until: float) -> None:
        self.record_from = record_from
        self.until = until
        self.settle_until = max(until, settle_until)
        self.last: dict[tuple[int, int], tuple[int, int, int, int, int]] = {}
        self.connected_conns: set[int] = set()
        self.reconnects = 0
        self.measured = 0
        self.tokens: list[int] = []
        self.conns: list[int] = []
        self.cols: list[tuple[int, int, int, int, int]] = []
        self.times: list[float] = []
        self.frames = 0
        self.snapshots = 0
        self.connected = 0
        self.errors: list[str] = []

    def add(self, snap: dict, now: float, conn: int = 0) -> None:
        self.snapshots += 1
        in_window = self.record_from <= now <= self.until
        self.measured += in_window
        if snap["exchange_ts"] is None or snap["bid_qty"] is None or snap["volume"] is None:
            return
        cols = (
            snap["exchange_ts"] // 1000,
            round(snap["ltp"] * 100.0),
            snap["bid_qty"],
            snap["ask_qty"],
            snap["volume"],
        )
        self.last[(conn, snap["token"])] = cols
        if not in_window:
            return
        self.tokens.append(snap["token"])
        self.conns.append(conn)
        self.cols.append(cols)
        self.times.append(now)


CONNECT_STAGGER_S = 0.01
"""Connection i of a process opens i x this after the first: 250 connections over 2.5 s, not
at one instant (daphne drops a WebSocket its application has not accepted within 5 s)."""
CONNECT_TRIES = 3


async def one_client(url: str, key: str, tokens: list[int], rec: Recorder, conn: int) -> None:
    await asyncio.sleep(conn * CONNECT_STAGGER_S)
    for attempt in range(1, CONNECT_TRIES + 1):
        try:
            await _one_connection(url, key, tokens, rec, conn)
            return
        except (OSError, InvalidMessage, InvalidStatus, TimeoutError):
            if attempt == CONNECT_TRIES or conn in rec.connected_conns:
                raise
            rec.reconnects += 1
            await asyncio.sleep(1.0)


async def _one_connection(url: str, key: str, tokens: list[int], rec: Recorder, conn: int) -> None:
    async with connect(
        url,
        additional_headers=[("Authorization", f"Token {key}")],
        subprotocols=["tickerproj.v1"],
        max_size=None,
        compression=None,
        open_timeout=60,
    ) as ws:
        hello = orjson.loads(await ws.recv())
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected hello, got {hello}")
        await ws.send(orjson.dumps({"action": "subscribe", "instruments": tokens}).decode())
        rec.connected += 1
        rec.connected_conns.add(conn)
        while time.time() < rec.settle_until:
            try:
                raw = await asyncio.wait_for(
                    ws.recv(), timeout=max(0.1, rec.settle_until - time.time())
                )
            except TimeoutError:
                break
            now = time.time()
            message = orjson.loads(raw)
            kind = message.get("type")
            if kind == "snapshots":
                rec.frames += 1
                for snap in message["data"]:
                    rec.add(snap, now, conn)
                await ws.send(f'{{"action":"ack","seq":{message["seq"]}}}')
            elif kind == "error":
                rec.errors.append(str(message)[:200])


async def layer_member(groups: list[str], rec: Recorder) -> None:
    """One channel in the groups, reading the engine's batches straight from Redis."""
    import django

    django.setup()
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()
    for group in groups:
        await layer.group_add(group, channel)
    rec.connected += 1
    while time.time() < rec.until:
        try:
            message = await asyncio.wait_for(
                layer.receive(channel), timeout=max(0.1, rec.until - time.time())
            )
        except TimeoutError:
            break
        now = time.time()
        rec.frames += 1
        for item in message.get("items", ()):
            rec.add(orjson.loads(item), now)


async def main(args, plan: dict) -> None:
    rec = Recorder(args.record_from, args.until, args.settle_until)
    if args.layer:
        results = await asyncio.gather(layer_member(plan["layer_groups"], rec),
                                       return_exceptions=True)
    else:
        clients = plan["clients"][args.first : args.first + args.count]
        results = await asyncio.gather(
            *(one_client(args.url, plan["key"], tokens, rec, i) for i, tokens in enumerate(clients)),
            return_exceptions=True,
        )
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    cols = np.asarray(rec.cols, dtype=np.int64).reshape(-1, 5)
    last_cols = np.asarray(list(rec.last.values()), dtype=np.int64).reshape(-1, 5)
    last_keys = np.asarray(list(rec.last), dtype=np.int64).reshape(-1, 2)
    np.savez(
        args.out,
        tokens=np.asarray(rec.tokens, dtype=np.int64),
        conns=np.asarray(rec.conns, dtype=np.int64),
        signatures=signature(*cols.T) if len(cols) else np.zeros(0, np.uint64),
        times=np.asarray(rec.times, dtype=np.float64),
        last_conns=last_keys[:, 0],
        last_tokens=last_keys[:, 1],
        last_signatures=signature(*last_cols.T) if len(last_cols) else np.zeros(0, np.uint64),
        measured=np.int64(rec.measured),
        frames=np.int64(rec.frames),
        snapshots=np.int64(rec.snapshots),
        connected=np.int64(rec.connected),
    )
    if failures or rec.errors or rec.reconnects:
        print(json.dumps({"failures": failures[:5], "errors": rec.errors[:5],
                          "connect_retries": rec.reconnects}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--layer", action="store_true")
    parser.add_argument("--record-from", type=float, required=True)
    parser.add_argument("--until", type=float, required=True)
    parser.add_argument("--settle-until", type=float, default=0.0,
                        help="stay connected until then, keeping the last snapshot per instrument")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    asyncio.run(main(arguments, json.loads(Path(arguments.plan).read_text())))
