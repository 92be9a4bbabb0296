"""Redis Sentinel: a clear start-up error for a master no sentinel knows, and a failover while
runticker streams and a WebSocket client is connected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_cluster import MASTER_NAME, RedisCluster

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster(tmp_path):
    cluster = RedisCluster(tmp_path).start()
    yield cluster
    cluster.stop()


def _setup(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('started')"],
        cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "tickerproj.settings", **env},
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_a_master_no_sentinel_knows_stops_start_up_naming_it(cluster):
    bad = _setup({**cluster.env(), "REDIS_SENTINEL_MASTER": "no-such-master"})
    assert bad.returncode != 0
    assert "no sentinel knows a reachable master 'no-such-master'" in bad.stderr
    assert f"127.0.0.1:{cluster.sentinel_port}" in bad.stderr
    good = _setup(cluster.env())
    assert good.returncode == 0 and "started" in good.stdout, good.stderr[-2000:]


def test_a_bad_sentinel_address_is_a_clear_error():
    bad = _setup({"REDIS_SENTINELS": "127.0.0.1", "REDIS_SENTINEL_MASTER": MASTER_NAME})
    assert bad.returncode != 0
    assert "REDIS_SENTINELS: '127.0.0.1' is not host:port" in bad.stderr


# --- failover while streaming --------------------------------------------------------------------

import asyncio  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import orjson  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from streaming.control import ChangeNotifier, control_channel  # noqa: E402
from streaming.market import SyntheticMarket  # noqa: E402
from streaming.models import AccountLease, EngineHeartbeat  # noqa: E402
from streaming.sim.simulator import KiteSimulator, SimulatorThread  # noqa: E402
from subscriptions.models import Instrument, Subscription  # noqa: E402
from tests.helpers import free_port, wait_until  # noqa: E402
from tests.streaming.engine.runtime_helpers import ManagePy, subprocess_env  # noqa: E402
from tests.streaming.engine.test_runticker_e2e import Daphne, world  # noqa: E402, F401
from tickerproj.redis_connection import SentinelTarget, sentinel_url  # noqa: E402

RESUME_WITHIN_S = 10.0


class ChainClient:
    """A WebSocket client of the chain that reconnects (as the browser page does) when closed."""

    def __init__(self, port: int, world) -> None:  # noqa: F811
        self.port, self.world = port, world
        self.snapshot_times: list[float] = []
        self.reconnects = -1

    async def _session(self) -> None:
        async with connect(
            f"ws://127.0.0.1:{self.port}/ws/v1/",
            additional_headers=[("Authorization", f"Token {self.world['key']}")],
            subprotocols=["tickerproj.v1"], open_timeout=10,
        ) as ws:
            self.reconnects += 1
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "hello"
            await ws.send(orjson.dumps({"action": "subscribe", "id": "c", "chain": {
                "underlying": "NIFTY", "expiry": self.world["expiry"].isoformat()}}).decode())
            while True:
                message = orjson.loads(await ws.recv())
                if message["type"] == "snapshots":
                    self.snapshot_times.append(time.monotonic())
                    await ws.send(orjson.dumps({"action": "ack", "seq": message["seq"]}).decode())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._session()
            except (ConnectionClosed, OSError, TimeoutError):
                await asyncio.sleep(0.2)

    def snapshots_after(self, t: float) -> int:
        return sum(1 for s in self.snapshot_times if s > t)


pytestmark_failover = pytest.mark.django_db(transaction=True)


@pytest.mark.heavy
@pytestmark_failover
def test_streaming_and_subscriptions_resume_after_a_failover(cluster, world, tmp_path, record_property):  # noqa: F811
    target = SentinelTarget(sentinels=(("127.0.0.1", cluster.sentinel_port),), master_name=MASTER_NAME)
    prefix = f"sent{uuid.uuid4().hex[:8]}"
    sim = KiteSimulator(market=SyntheticMarket(seed=0), tick_interval_ms=200)
    sim.register_account(api_key="k1", api_secret="secret", access_token="tok-acc1")
    subscriptions_before = Subscription.objects.count()
    port = free_port()
    with SimulatorThread(sim) as simulator:
        env = subprocess_env(
            KITE_WS_URL=simulator.ws_url, KITE_API_ROOT=simulator.http_url, CHANNEL_LAYER_PREFIX=prefix,
            TICKER_HEARTBEAT_INTERVAL_S="1", TICKER_SAFETY_RELOAD_S="600", **cluster.env(),
        )
        env.pop("REDIS_URL")
        engine = ManagePy(["runticker", "--no-mock"], env=env, log_path=tmp_path / "runticker.log")
        web = Daphne(port=port, env=env, log_path=tmp_path / "daphne.log")
        try:
            wait_until(lambda: simulator.call(sim.connection_count, "k1") == 1, timeout_s=60,
                       what="runticker connected to the simulator")

            async def scenario() -> tuple[float, ChainClient]:
                client = ChainClient(port, world)
                stop = asyncio.Event()
                task = asyncio.create_task(client.run(stop), name="chain-client")
                try:
                    await _until(lambda: client.snapshot_times, 60, "snapshots before the failover")
                    killed_at = time.monotonic()
                    new_port = await asyncio.to_thread(cluster.kill_master)
                    assert new_port == cluster.replica_port
                    await _until(lambda: client.snapshots_after(time.monotonic() - 0.5) >= 1
                                 and client.snapshot_times[-1] > killed_at + 0.1,
                                 RESUME_WITHIN_S + 15, "snapshots after the failover")
                    return killed_at, client
                finally:
                    stop.set()
                    task.cancel()

            killed_at, client = asyncio.run(scenario())
            # The longest silence the client saw across the failover.
            gaps = [b - a for a, b in zip(client.snapshot_times, client.snapshot_times[1:], strict=False)
                    if b > killed_at]
            assert max(gaps) <= RESUME_WITHIN_S, f"no snapshot for {max(gaps):.1f} s"
            record_property("longest_snapshot_gap_s", round(max(gaps), 2))
            record_property("client_reconnects", client.reconnects)

            # A subscription made after the failover reaches the engine through the new master.
            streamed = _streamed_count()
            extra = Instrument.objects.filter(name="BANKNIFTY", instrument_type="FUT").first()
            Subscription.objects.create(instrument=extra)
            notified_at = time.monotonic()
            ChangeNotifier(redis_url=sentinel_url(target), channel=control_channel(prefix)).notify()
            wait_until(lambda: _streamed_count() == streamed + 1, timeout_s=RESUME_WITHIN_S,
                       what="the engine streaming the new subscription")
            assert time.monotonic() - notified_at <= RESUME_WITHIN_S
            record_property("new_subscription_streamed_after_s", round(time.monotonic() - notified_at, 2))
            # Nothing lost from the database: the subscriptions, and the engine's lease.
            assert Subscription.objects.count() == subscriptions_before + 1
            assert AccountLease.objects.filter(account=world["account"]).exists()
        finally:
            web.stop()
            engine.stop()


def _streamed_count() -> int:
    beat = EngineHeartbeat.objects.order_by("-updated_at").first()
    return int(beat.state.get("streamed_count") or 0) if beat else 0


async def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        await asyncio.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_celery_runs_a_job_through_the_sentinel_master(cluster, tmp_path):
    """The worker's broker and results on the master the sentinel names (settings' sentinel:// form)."""
    from celery import Celery

    env = subprocess_env(LOG_LEVEL="WARNING", **cluster.env())
    env.pop("REDIS_URL")
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tickerproj", "--quiet", "worker", "--pool", "solo",
         "-n", f"sentinel-{cluster.sentinel_port}@%h"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"sentinel://127.0.0.1:{cluster.sentinel_port}/0"
    client = Celery("sentinel-client", broker=url, backend=url)
    client.conf.broker_transport_options = {"master_name": MASTER_NAME}
    client.conf.result_backend_transport_options = {"master_name": MASTER_NAME}
    try:
        result = client.send_task("accounts.expire_sessions")
        assert result.get(timeout=90) == {"expired": []}, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        worker.terminate()
        worker.wait(30)
