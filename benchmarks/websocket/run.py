"""WebSocket fan-out: TickerConsumer's batch handling against consumers that re-serialise.

Per connection, every engine batch is filtered to the connection's instruments and turned into
one frame. The consumer concatenates the engine's pre-serialised bytes; the references parse
each item and dump a new frame (with orjson, and with the standard library's json as Channels'
``send_json`` does). All three run in the same process, on the same batches, alternating
rounds; the best round of each is reported.

    uv run python benchmarks/websocket/run.py [--seconds 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")
for name in ("DATABASE_URL", "REDIS_URL"):
    os.environ.pop(name, None)
os.environ.setdefault("TICKERPROJ_VAR_DIR", tempfile.mkdtemp(prefix="bench_ws_"))
os.environ.setdefault("LOG_LEVEL", "WARNING")

import django  # noqa: E402

django.setup()

from prometheus_client import CollectorRegistry  # noqa: E402

from streaming.consumers import ConsumerSettings, TickerConsumer, WebSocketMetrics  # noqa: E402
from streaming.schema import SNAPSHOT_FIELDS  # noqa: E402

CHAIN_ITEMS = 400  # a NIFTY expiry: 200 strikes, CE and PE


def snapshot(token: int, step: int) -> bytes:
    """A snapshot with every schema field and realistic values (~470 bytes)."""
    values = {
        "v": 1, "token": token, "symbol": f"NIFTY26NOV{24000 + token % 200 * 50}CE",
        "exchange": "NFO", "name": "NIFTY", "kind": "CE", "expiry": "2026-11-24",
        "strike": 24000.0 + token % 200 * 50, "ltp": 112.35 + step * 0.05, "change": -3.71,
        "bid": 112.3, "ask": 112.4, "bid_qty": 1500, "ask_qty": 975, "volume": 1234567,
        "oi": 8901234, "iv": 0.109213, "delta": 0.523104, "gamma": 0.00150213,
        "theta": -16.5812, "vega": 9.66213, "rho": 4.12345, "forward": 26014.0512,
        "underlying": 26002.05, "flags": ["pair_iv"], "exchange_ts": 1795325263123,
        "is_mock": False,
    }  # fmt: skip
    assert tuple(values) == SNAPSHOT_FIELDS
    return orjson.dumps(values)


class Sink:
    """Stands in for daphne: counts what is sent and acks at once (a fast client)."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0


def make_consumer(subscribed: list[int], sink: Sink) -> TickerConsumer:
    config = ConsumerSettings(
        max_subscriptions=10_000, max_messages_per_s=20, send_window=4, heartbeat_max_age_s=15
    )
    consumer = TickerConsumer(config=config, metrics=WebSocketMetrics(CollectorRegistry()))
    consumer._open = True
    consumer._subs = {t: "chain.NIFTY.20261124" for t in subscribed}

    async def send(text_data: str) -> None:
        sink.frames += 1
        sink.bytes += len(text_data)
        consumer._acked = consumer._seq

    consumer.send = send
    return consumer


class ReparsingForwarder:
    """The reference: parse every item, keep the subscribed ones, dump a new frame."""

    def __init__(self, subscribed: list[int], sink: Sink, dumps) -> None:
        self.subs = set(subscribed)
        self.sink = sink
        self.dumps = dumps
        self.seq = 0

    async def snapshots_batch(self, message: dict) -> None:
        data = [d for d in map(orjson.loads, message["items"]) if d["token"] in self.subs]
        if data:
            self.seq += 1
            text = self.dumps({"type": "snapshots", "v": 1, "seq": self.seq, "data": data})
            self.sink.frames += 1
            self.sink.bytes += len(text)


def stdlib_dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def orjson_dumps(obj) -> str:
    return orjson.dumps(obj).decode()


async def measure(handler, batches: list[dict], seconds: float) -> float:
    """Items handled per second (items of the batches, subscribed or not)."""
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for message in batches:
            await handler.snapshots_batch(message)
            done += len(message["items"])
    return done / (time.perf_counter() - started)


async def main(seconds: float, rounds: int) -> None:
    tokens = list(range(1_000_001, 1_000_001 + CHAIN_ITEMS))
    batches = [
        {"type": "snapshots.batch", "group": "chain.NIFTY.20261124", "tokens": tokens,
         "items": [snapshot(t, step) for t in tokens]}
        for step in range(20)
    ]  # fmt: skip
    print(f"batches of {CHAIN_ITEMS} snapshots, {len(batches[0]['items'][0])} bytes each")
    print(f"{'subscribed':>12} {'ours items/s':>14} {'orjson re-dump':>15} {'json re-dump':>13}"
          f" {'vs orjson':>10} {'vs json':>8}")  # fmt: skip
    for share in (1.0, 0.25):
        subscribed = tokens[: int(len(tokens) * share)]
        best = {"ours": 0.0, "orjson": 0.0, "json": 0.0}
        for _ in range(rounds):
            handlers = {
                "ours": make_consumer(subscribed, Sink()),
                "orjson": ReparsingForwarder(subscribed, Sink(), orjson_dumps),
                "json": ReparsingForwarder(subscribed, Sink(), stdlib_dumps),
            }
            for name, handler in handlers.items():
                rate = await measure(handler, batches, seconds / rounds / 3)
                best[name] = max(best[name], rate)
        print(
            f"{f'{share:.0%} of chain':>12} {best['ours']:>14,.0f} {best['orjson']:>15,.0f} "
            f"{best['json']:>13,.0f} {best['ours'] / best['orjson']:>9.1f}x "
            f"{best['ours'] / best['json']:>7.1f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds))
