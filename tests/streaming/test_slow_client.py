"""A client that stops reading for 30 s while 9000 instruments tick: daphne's memory stays
bounded (latest-wins, credit-based flow control), and once the client reads and acks again it
receives the latest state of every instrument.

A real daphne subprocess serves tickerproj.asgi over the real channels-redis layer; this test
publishes snapshot batches to the instruments' groups as fast as an engine would, and drives a
raw ``websockets`` client authenticated by API token.
"""

import asyncio
import datetime as dt
from pathlib import Path

import orjson
import pytest
import websockets

from accounts.services import apitoken_create
from streaming import schema
from subscriptions.models import Instrument
from tests.helpers import free_port
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import daphne_process, service_env
from tests.streaming.wsutil import layer_prefix as layer_prefix
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads"),
              pytest.mark.heavy]

EXPIRY = dt.date(2030, 1, 29)
CHAINS = 30
STRIKES_PER_CHAIN = 150  # x CE/PE = 300 instruments a chain, 9000 in all
PAUSE_S = 30.0
MAX_PAUSE_S = 180.0
ROUND_INTERVAL_S = 0.25  # every instrument changes 4 times a second
ITEM_PAD = b"x" * 200  # snapshots of a realistic size (~260 bytes)
# Bounds. Queuing what is published during the pause would take ~270 MB; the window allows at
# most 4 frames in flight plus one pending snapshot per instrument (~2.5 MB), and the rest is
# the allocator's noise.
MAX_GROWTH_BYTES = 30 * 1024 * 1024
MAX_LATE_GROWTH_BYTES = 8 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def item(token: int, value: int) -> bytes:
    return b'{"v":1,"token":%d,"ltp":%d,"pad":"%s"}' % (token, value, ITEM_PAD)


@pytest.fixture
def universe():
    rows = []
    groups: dict[str, list[int]] = {}
    for c in range(CHAINS):
        name = f"SLOW{c:02d}"
        group = schema.chain_group(name, EXPIRY)
        for s in range(STRIKES_PER_CHAIN):
            for k, kind in enumerate(("CE", "PE")):
                token = 70_000_000 + c * 1000 + s * 2 + k
                rows.append(
                    Instrument(
                        instrument_token=token,
                        exchange_token=token >> 8,
                        tradingsymbol=f"{name}30JAN{1000 + s * 10}{kind}",
                        name=name,
                        expiry=EXPIRY,
                        strike=1000.0 + s * 10,
                        instrument_type=kind,
                        segment="NFO-OPT",
                        exchange="NFO",
                    )
                )
                groups.setdefault(group, []).append(token)
    Instrument.objects.bulk_create(rows)
    return groups


METRICS_TOKEN = "slow-client-metrics-token-0123456789"


@pytest.fixture
def daphne(layer_prefix, universe, tmp_path):
    """daphne serving the project on the test database, as `daphne tickerproj.asgi:application`."""
    port = free_port()
    env = service_env(
        layer_prefix=layer_prefix, WS_MAX_SUBSCRIPTIONS="10000", WS_SEND_WINDOW="4", LOG_LEVEL="WARNING",
        OPS_TOKEN=METRICS_TOKEN,
    )
    server = daphne_process(port=port, env=env, log_dir=tmp_path).start(port=port)
    yield server, port
    server.stop()


async def publish_round(layer, groups: dict[str, list[int]], value: int) -> int:
    sent = 0
    for group, tokens in groups.items():
        items = [item(t, value) for t in tokens]
        await layer.group_send(
            group, schema.snapshots_batch_message(group=group, tokens=tokens, items=items)
        )
        sent += sum(map(len, items))
    return sent


async def metric(port: int, name: str) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + METRICS_TOKEN.encode() + b"\r\n\r\n"
    )
    body = (await reader.read()).decode()
    writer.close()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_client_that_stops_reading_costs_bounded_memory_and_gets_the_latest_state(
    daphne, universe, user
):
    from channels.db import database_sync_to_async
    from channels.layers import get_channel_layer

    proc, port = daphne
    _, key = await database_sync_to_async(apitoken_create)(user=user, name="slow")
    layer = get_channel_layer()
    tokens = [t for ts in universe.values() for t in ts]

    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/v1/",
        additional_headers={"Authorization": f"Token {key}"},
        max_size=None,
        max_queue=4,  # the library stops reading the socket once 4 frames wait
        ping_interval=None,
    ) as ws:
        assert orjson.loads(await ws.recv())["type"] == "hello"
        await ws.send(orjson.dumps({"action": "subscribe", "instruments": tokens}).decode())
        async with asyncio.timeout(60):
            parts = [orjson.loads(await ws.recv())]
            while parts[-1]["part"] < parts[-1]["parts"]:
                parts.append(orjson.loads(await ws.recv()))
        assert {p["type"] for p in parts} == {"subscribed"} and len(parts) == 5
        assert parts[-1]["subscriptions"] == len(tokens) == 9000

        latest: dict[int, int] = {}

        async def read_and_ack(until) -> None:
            while not until():
                msg = orjson.loads(await ws.recv())
                assert msg["type"] == "snapshots", msg
                for snap in msg["data"]:
                    assert snap["ltp"] >= latest.get(snap["token"], -1), "an older state after a newer one"
                    latest[snap["token"]] = snap["ltp"]
                await ws.send(orjson.dumps({"action": "ack", "seq": msg["seq"]}).decode())

        # Warm-up while reading: allocator pools, Redis connections and frames at full size.
        for value in range(1, 9):
            await publish_round(layer, universe, value)
            await asyncio.sleep(ROUND_INTERVAL_S)
        async with asyncio.timeout(60):
            await read_and_ack(lambda: len(latest) == 9000 and min(latest.values()) == 8)
        baseline = rss_bytes(proc.pid)

        # The client stops reading: no recv, no acks, for at least 30 s while everything
        # ticks, and until enough is published to show the bound (a loaded machine publishes
        # less per second; the deadline is a failure bound).
        loop = asyncio.get_running_loop()
        started = loop.time()
        value, published, samples = 8, 0, []
        while loop.time() - started < PAUSE_S or published <= 5 * MAX_GROWTH_BYTES:
            assert loop.time() - started < MAX_PAUSE_S, f"published only {published} bytes in {MAX_PAUSE_S} s"
            value += 1
            published += await publish_round(layer, universe, value)
            samples.append((loop.time() - started, rss_bytes(proc.pid)))
            await asyncio.sleep(ROUND_INTERVAL_S)
        paused_s = loop.time() - started
        peak = max(r for _, r in samples)
        mid = max(r for t, r in samples if t <= paused_s / 2)

        # The newest state, published while the client still does not read.
        final = value + 1000
        await publish_round(layer, universe, final)
        dropped = await metric(port, "tickerproj_ws_items_dropped_total")
        async with asyncio.timeout(60):
            await read_and_ack(lambda: len(latest) == 9000 and min(latest.values()) == final)

    growth = peak - baseline
    assert published > 5 * MAX_GROWTH_BYTES, f"published only {published} bytes"
    assert growth < MAX_GROWTH_BYTES, f"daphne grew {growth / 2**20:.1f} MiB (published {published / 2**20:.0f} MiB)"
    assert peak - mid < MAX_LATE_GROWTH_BYTES, (
        f"still growing in the second half: {(peak - mid) / 2**20:.1f} MiB"
    )
    assert dropped > 0.5 * 9000 * (value - 8), "intermediate snapshots were dropped, not queued"
