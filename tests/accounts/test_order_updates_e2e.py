"""Order updates end to end over real processes: the Kite simulator, ``manage.py runticker``,
daphne, a Celery worker and PostgreSQL.

The simulator sends each order change as a ticker text frame (to runticker) and as a
postback (to daphne); both reach ``order_apply_update``, so a WebSocket client following
``orders`` sees each state once, forwards only. A forged postback is refused and changes
nothing. Updates the simulator withholds are repaired by the sync that runticker asks for
on its reconnect. A client never sees an account it may not see, and no secret reaches a log.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from django.db import connections
from websockets.asyncio.client import connect

from accounts.brokers import broker_for
from accounts.models import KiteAccount, Order, OrderSyncRun
from accounts.services import account_set_session, apitoken_create
from streaming.kite.postback import postback_checksum
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from subscriptions.models import Instrument
from tests.helpers import free_port, wait_until
from tests.streaming.engine.runtime_helpers import instruments_from_market, subscribe
from tests.streaming.wsutil import (
    ROOT,
    ServiceProcess,
    daphne_process,
    service_env,
)
from tests.streaming.wsutil import layer_prefix as layer_prefix

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.heavy]

API_KEY = "e2e-key"
API_SECRET = "e2e-api-secret-5d1e"  # a test secret, scanned for in the logs
ACCESS_TOKEN = "e2e-access-token-88c3"


@pytest.fixture
def desk(django_user_model):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    option = Instrument.objects.filter(name="NIFTY", instrument_type="CE").order_by("strike").first()
    subscribe([market.index_token("NIFTY"), option.instrument_token])
    account = KiteAccount.objects.create(label="live-1", api_key=API_KEY, api_secret=API_SECRET)
    account = account_set_session(account=account, access_token=ACCESS_TOKEN)
    alice = django_user_model.objects.create_user(username="alice", password="pw-123456")
    bob = django_user_model.objects.create_user(username="bob", password="pw-123456")
    account.traders.add(alice)
    _, alice_key = apitoken_create(user=alice, name="e2e")
    _, bob_key = apitoken_create(user=bob, name="e2e")
    return {"account": account, "option": option, "alice": alice_key, "bob": bob_key}


def place_market(account: KiteAccount, option: Instrument, tag: str) -> str:
    return broker_for(account=account).place_order(params={
        "variety": "regular", "exchange": option.exchange, "tradingsymbol": option.tradingsymbol,
        "transaction_type": "BUY", "order_type": "MARKET", "product": "NRML", "validity": "DAY",
        "quantity": option.lot_size, "tag": tag,
    })  # fmt: skip


def post_raw(port: int, body: bytes) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/kite/postback", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class OrdersClient:
    """A WebSocket client following ``orders``, collecting the order frames it receives."""

    def __init__(self, port: int, key: str) -> None:
        self._url = f"ws://127.0.0.1:{port}/ws/v1/"
        self._key = key
        self.frames: list[dict] = []
        self.subscribed: dict | None = None

    async def __aenter__(self) -> OrdersClient:
        self._cm = connect(self._url, additional_headers=[("Authorization", f"Token {self._key}")],
                           subprotocols=["tickerproj.v1"])
        self.ws = await self._cm.__aenter__()
        assert orjson.loads(await asyncio.wait_for(self.ws.recv(), 10))["type"] == "hello"
        await self.ws.send(orjson.dumps({"action": "subscribe", "orders": True}).decode())
        self.subscribed = orjson.loads(await asyncio.wait_for(self.ws.recv(), 10))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._cm.__aexit__(*exc)

    async def read_until(self, predicate, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            assert left > 0, f"not met within {timeout_s} s; frames: {self.frames}"
            message = orjson.loads(await asyncio.wait_for(self.ws.recv(), left))
            if message["type"] == "order":
                self.frames.append(message)

    async def fence(self) -> None:
        """Read everything the server sent before the answer to a ping."""
        await self.ws.send(orjson.dumps({"action": "ping", "id": "fence"}).decode())
        while True:
            message = orjson.loads(await asyncio.wait_for(self.ws.recv(), 10))
            if message["type"] == "pong":
                return
            if message["type"] == "order":
                self.frames.append(message)

    def statuses(self, order_id: str) -> list[str]:
        return [f["data"]["status"] for f in self.frames if f["data"]["kite_order_id"] == order_id]


def test_live_updates_postbacks_and_the_reconnect_sync_reach_only_visible_clients(
    desk, layer_prefix, celery_worker, settings, tmp_path, caplog
):
    account, option = desk["account"], desk["option"]
    sim = KiteSimulator(market=SyntheticMarket(seed=0), tick_interval_ms=200)
    port = free_port()
    sim.register_account(
        api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN,
        postback_url=f"http://127.0.0.1:{port}/api/v1/kite/postback",
    )
    with SimulatorThread(sim) as simulator:
        settings.KITE_API_ROOT = simulator.http_url
        env = service_env(layer_prefix=layer_prefix, KITE_WS_URL=simulator.ws_url,
                          KITE_API_ROOT=simulator.http_url, LOG_JSON="true")
        web = daphne_process(port=port, env=env, log_dir=tmp_path).start(port=port)
        engine = ServiceProcess(
            "runticker", [sys.executable, str(ROOT / "manage.py"), "runticker", "--no-mock"],
            env, tmp_path,
        ).start()
        try:
            with caplog.at_level(logging.INFO), ThreadPoolExecutor(1) as db:
                try:
                    asyncio.run(_scenario(simulator, sim, port, account, option, desk, db))
                finally:
                    db.submit(connections.close_all).result()
        finally:
            engine.stop()
            web.stop()
    logs = "\n".join([engine.tail(10**7), web.tail(10**7),
                      *(f"{r.getMessage()} {r.msg!r}" for r in caplog.records)])
    assert "postback.refused" in logs and "order_sync.done" in logs
    for secret in (API_SECRET, ACCESS_TOKEN):
        assert secret not in logs


async def _scenario(simulator, sim, port, account, option, desk, db) -> None:
    loop = asyncio.get_running_loop()

    def orm(fn, *args, **kwargs):
        """The ORM on one thread of our own, whose connection the test closes at the end."""
        return loop.run_in_executor(db, lambda: fn(*args, **kwargs))

    def wait(predicate, what, timeout_s=60):
        return orm(wait_until, predicate, timeout_s=timeout_s, what=what)

    await wait(lambda: simulator.call(sim.connection_count, API_KEY) >= 1, "runticker connected")
    await wait(lambda: OrderSyncRun.objects.filter(account=account, status="ok").exists(),
               "the sync runticker asked for on connect")

    async with OrdersClient(port, desk["alice"]) as alice, OrdersClient(port, desk["bob"]) as bob:
        assert [a["id"] for a in alice.subscribed["accounts"]] == [account.pk]
        assert bob.subscribed["accounts"] == []

        # Live: ticker frames (runticker) and postbacks (daphne) of one order.
        first = await asyncio.to_thread(place_market, account, option, "e2eA")
        await alice.read_until(lambda: "COMPLETE" in alice.statuses(first), timeout_s=60)
        await wait(lambda: any(p["order_id"] == first and p["status"] == "COMPLETE"
                               for p in simulator.call(lambda: list(sim.postbacks))),
                   "the COMPLETE postback answered")
        assert all(p["http_status"] == 200 for p in simulator.call(lambda: list(sim.postbacks)))
        order = await orm(Order.objects.get, account=account, kite_order_id=first)
        sources = {h["source"] for h in order.status_history}
        assert order.status == "COMPLETE" and sources <= {"ticker", "postback"}

        # A forged postback (not signed with the account's secret): 403, nothing changes.
        forged = simulator.call(sim.order_history, API_KEY, first)[-1]
        forged.update(status="CANCELLED", user_id="ZS0001")
        forged["checksum"] = postback_checksum(order_id=first, order_timestamp=forged["order_timestamp"],
                                               api_secret="not-the-secret")
        assert await asyncio.to_thread(post_raw, port, orjson.dumps(forged)) == 403

        # Withheld updates: the reconnect's sync finds the order and records the repair.
        simulator.call(sim.mute_order_updates, API_KEY)
        missed = await asyncio.to_thread(place_market, account, option, "e2eB")
        assert not await orm(Order.objects.filter(account=account, kite_order_id=missed).exists)
        last_run = await orm(lambda: OrderSyncRun.objects.filter(account=account).latest("pk").pk)
        simulator.run(sim.drop_connections(API_KEY))
        await alice.read_until(lambda: "COMPLETE" in alice.statuses(missed), timeout_s=90)

        def repairs():
            return [
                (run.trigger, run.status)
                for run in OrderSyncRun.objects.filter(account=account, pk__gt=last_run)
                if any(c.get("order_id") == missed and c["kind"] == "order" for c in run.corrections)
            ]

        # The order is pushed as the sync applies it; the run records it when it finishes.
        assert await wait(repairs, "the repair recorded") == [("reconnect", "ok")]

        await alice.fence()
        assert alice.statuses(first) == ["OPEN", "COMPLETE"]  # each state once, forwards only
        assert alice.statuses(missed) == ["COMPLETE"]
        await bob.fence()
        assert bob.frames == []
        final = await orm(Order.objects.get, account=account, kite_order_id=first)
        assert final.status == "COMPLETE"
