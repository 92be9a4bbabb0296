"""End to end over real processes: a chain subscribed through the HTTP API streams from a real
``runticker`` (against the Kite simulator) to a WebSocket client through daphne.

The target is 2 s from the API's answer to a live snapshot of every new instrument (measured
1.5-1.8 s on the 2-core machine under load; the figure is printed). Speed figures are not
asserted (the issue's rule for benchmarks), so the test's bound is a generous deadline that
only a lost notice or a stuck reload would miss; benchmarks/api/ reports the figure.
"""

import asyncio
import time
import urllib.request
import uuid

import orjson
import pytest
import structlog
from django.contrib.auth import get_user_model
from websockets.asyncio.client import connect

from accounts.services import apitoken_create
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from subscriptions.models import Subscription
from tests.helpers import free_port, wait_until
from tests.streaming.engine.runtime_helpers import (
    ManagePy,
    instruments_from_market,
    make_account,
    subprocess_env,
    subscribe,
)
from tests.streaming.engine.test_runticker_e2e import Daphne, _http_ok

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.heavy]
log = structlog.get_logger(__name__)

STREAMS_DEADLINE_S = 15.0
STRIKES_EACH_SIDE = 2


@pytest.fixture
def world():
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    expiry = min(r["expiry"] for r in market.instruments
                 if r["name"] == "NIFTY" and r["instrument_type"] == "CE")  # fmt: skip
    future = [r["instrument_token"] for r in market.instruments
              if r["name"] == "NIFTY" and r["instrument_type"] == "FUT"]  # fmt: skip
    # The engine streams the index and futures already; the chain comes through the API.
    subscribe([market.index_token("NIFTY"), *future])
    make_account("acc1", api_key="k1", access_token="tok-acc1")
    user = get_user_model().objects.create_user(username="desk")
    _, key = apitoken_create(user=user, name="e2e", scopes=["read", "subscribe"])
    return {"expiry": expiry, "key": key}


def api_post(port: int, path: str, payload: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=orjson.dumps(payload), method="POST",
        headers={"Authorization": f"Token {key}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, orjson.loads(response.read())


async def subscribe_and_stream(port: int, world) -> tuple[float, set[int]]:
    """Seconds from the API's answer until every new instrument had a live snapshot."""
    async with connect(
        f"ws://127.0.0.1:{port}/ws/v1/",
        additional_headers=[("Authorization", f"Token {world['key']}")],
        subprotocols=["tickerproj.v1"],
    ) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))["type"] == "hello"
        await ws.send(orjson.dumps({"action": "subscribe", "id": "c", "chain": {
            "underlying": "NIFTY", "expiry": world["expiry"].isoformat()}}).decode())  # fmt: skip
        subscribed = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert subscribed["type"] == "subscribed"
        status, body = await asyncio.to_thread(
            api_post, port, "/api/v1/subscriptions/chain",
            {"underlying": "NIFTY", "expiries": [world["expiry"].isoformat()],
             "strikes_around_atm": STRIKES_EACH_SIDE, "mode": "full"},
            world["key"],
        )  # fmt: skip
        answered = time.monotonic()
        assert status == 201, body
        wanted = {s["instrument_token"] for s in body["subscriptions"]}
        got: set[int] = set()
        while not wanted <= got:
            left = answered + 30 - time.monotonic()
            assert left > 0, f"{len(wanted - got)} instruments never streamed"
            message = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=left))
            if message["type"] == "snapshots":
                got.update(s["token"] for s in message["data"] if s["is_mock"] is False
                           and s["token"] in wanted and s.get("ltp") is not None)  # fmt: skip
                await ws.send(orjson.dumps({"action": "ack", "seq": message["seq"]}).decode())
        return time.monotonic() - answered, wanted


def test_a_chain_subscribed_over_http_streams_from_runticker(world, tmp_path):
    sim = KiteSimulator(market=SyntheticMarket(seed=0), tick_interval_ms=200)
    sim.register_account(api_key="k1", api_secret="secret", access_token="tok-acc1")
    port = free_port()
    with SimulatorThread(sim) as simulator:
        env = subprocess_env(
            KITE_WS_URL=simulator.ws_url, KITE_API_ROOT=simulator.http_url,
            CHANNEL_LAYER_PREFIX=f"apie2e{uuid.uuid4().hex[:8]}",
        )  # fmt: skip
        engine = ManagePy(["runticker", "--no-mock"], env=env, log_path=tmp_path / "runticker.log")
        web = Daphne(port=port, env=env, log_path=tmp_path / "daphne.log")
        try:
            wait_until(lambda: simulator.call(sim.connection_count, "k1") == 1, timeout_s=60,
                       what="runticker connected to the simulator")  # fmt: skip
            wait_until(lambda: _http_ok(port), timeout_s=60, what="daphne serving")
            elapsed_s, wanted = asyncio.run(subscribe_and_stream(port, world))
            log.info("api_e2e.streamed", instruments=len(wanted), after_s=round(elapsed_s, 2))
            assert len(wanted) == 2 * (2 * STRIKES_EACH_SIDE + 1)
            assert Subscription.objects.filter(instrument_id__in=wanted, source="api").count() == len(wanted)
            assert elapsed_s <= STREAMS_DEADLINE_S, engine.output()[-2000:]
        finally:
            engine.stop()
            web.stop()
