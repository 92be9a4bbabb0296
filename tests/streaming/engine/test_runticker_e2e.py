"""End to end over real processes: the Kite simulator streams, ``manage.py runticker`` runs,
daphne serves the WebSocket API, and a client receives snapshots with Greeks for its chain,
over real PostgreSQL and Redis. /health follows the engine: 200 while it streams, 503
``no_heartbeat`` after it stops, 200 again after a restart. SIGTERM releases the lease."""

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from websockets.asyncio.client import connect

from accounts.services import apitoken_create
from streaming.market import SyntheticMarket
from streaming.models import AccountLease
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from tests.helpers import free_port, wait_until
from tests.streaming.engine.runtime_helpers import (
    REPO,
    ManagePy,
    instruments_from_market,
    make_account,
    subprocess_env,
    subscribe,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.heavy]


class Daphne(ManagePy):
    def __init__(self, *, port: int, env, log_path):
        import subprocess

        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
             "tickerproj.asgi:application"],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )


@pytest.fixture
def world():
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    expiry = min(r["expiry"] for r in market.instruments
                 if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    nifty = [r["instrument_token"] for r in market.instruments
             if r["name"] == "NIFTY" and (r["expiry"] == expiry or r["instrument_type"] == "FUT")]
    chain = [r["instrument_token"] for r in market.instruments
             if r["name"] == "NIFTY" and r["expiry"] == expiry and r["instrument_type"] in ("CE", "PE")]
    subscribe([market.index_token("NIFTY"), *nifty])
    account = make_account("acc1", api_key="k1", access_token="tok-acc1")
    user = get_user_model().objects.create_user(username="trader", password="pw-123456")
    _token, key = apitoken_create(user=user, name="e2e")
    return {"expiry": expiry, "chain": set(chain), "account": account, "key": key}


async def read_snapshots(ws, wanted: set[int], *, timeout_s: float) -> dict[int, dict]:
    """Read frames (acking each) until every wanted token has a snapshot with an IV."""
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while not all(t in got and got[t]["iv"] is not None for t in wanted):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [t for t in wanted if t not in got or got[t]["iv"] is None]
            raise AssertionError(f"no snapshot with iv for {len(missing)} tokens: {missing[:5]}")
        message = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=left))
        if message["type"] == "snapshots":
            for snap in message["data"]:
                got[snap["token"]] = snap
            await ws.send(orjson.dumps({"action": "ack", "seq": message["seq"]}).decode())
    return got


def health(port: int) -> tuple[int, dict]:
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/health",
            headers={"Authorization": f"Bearer {os.environ['OPS_TOKEN']}"},  # the details
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 arrives as an HTTPError with the body
        return exc.code, json.loads(exc.read())


def test_simulator_runticker_daphne_client(world, tmp_path):
    sim = KiteSimulator(market=SyntheticMarket(seed=0), tick_interval_ms=200)
    sim.register_account(api_key="k1", api_secret="secret", access_token="tok-acc1")
    port = free_port()
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    with SimulatorThread(sim) as simulator:
        env = subprocess_env(
            KITE_WS_URL=simulator.ws_url,
            KITE_API_ROOT=simulator.http_url,
            CHANNEL_LAYER_PREFIX=prefix,
            TICKER_HEARTBEAT_INTERVAL_S="1",
            HEALTH_HEARTBEAT_MAX_AGE_S="4",
        )
        metrics_port = free_port()
        engine = ManagePy(["runticker", "--no-mock", "--metrics-port", str(metrics_port)],
                          env=env, log_path=tmp_path / "runticker.log")
        web = Daphne(port=port, env=env, log_path=tmp_path / "daphne.log")
        try:
            wait_until(lambda: simulator.call(sim.connection_count, "k1") == 1, timeout_s=120,
                       what="runticker connected to the simulator")
            wait_until(lambda: _http_ok(port), timeout_s=30, what="daphne serving")

            snapshots = asyncio.run(_client(port, world))
            for token in world["chain"]:
                snap = snapshots[token]
                assert snap["is_mock"] is False
                assert snap["kind"] in ("CE", "PE")
                assert snap["expiry"] == world["expiry"].isoformat()
                assert 0.01 < snap["iv"] < 2.0
                assert snap["forward"] > 0
                assert snap["delta"] is not None and snap["gamma"] is not None

            status, body = wait_until(
                lambda: (r := _healthy(port)) and r[1]["engines"][0]["accounts"] == ["acc1"] and r,
                timeout_s=15, what="/health 200 with acc1 streaming",
            )
            assert body["reasons"] == []
            # Prometheus metrics from the engine's own registry.
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                metrics = r.read().decode()
            ticks_in = [line for line in metrics.splitlines()
                        if line.startswith('tickerproj_engine_ticks_in_total{account="acc1"')]
            assert ticks_in and float(ticks_in[0].split()[-1]) > 0
            assert "tickerproj_engine_flush_seconds_bucket" in metrics
            # Its PostgreSQL sessions are named, so pg_stat_activity shows who is who.
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'runticker' AND datname = current_database()"
                )
                assert cursor.fetchone()[0] >= 1

            # SIGTERM: drains, exits cleanly and hands the lease back at once.
            assert engine.terminate() == 0, engine.output()[-3000:]
            assert not AccountLease.objects.filter(account=world["account"]).exists()
            assert simulator.call(sim.connection_count, "k1") == 0

            status, body = wait_until(lambda: _unhealthy(port), timeout_s=15, what="/health 503")
            assert status == 503
            assert "no_heartbeat" in [r["code"] for r in body["reasons"]]

            engine = ManagePy(["runticker", "--no-mock"], env=env,
                              log_path=tmp_path / "runticker2.log")
            status, body = wait_until(lambda: _healthy(port), timeout_s=30,
                                      what="/health back to 200")
            assert status == 200
        finally:
            engine.stop()
            web.stop()


def _http_ok(port: int) -> bool:
    try:
        health(port)
    except OSError:  # refused while daphne starts (URLError is an OSError)
        return False
    return True


def _healthy(port: int):
    status, body = health(port)
    return (status, body) if status == 200 else None


def _unhealthy(port: int):
    status, body = health(port)
    return (status, body) if status == 503 else None


async def _client(port: int, world) -> dict[int, dict]:
    async with connect(
        f"ws://127.0.0.1:{port}/ws/v1/",
        additional_headers=[("Authorization", f"Token {world['key']}")],
        subprotocols=["tickerproj.v1"],
    ) as ws:
        hello = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert hello["type"] == "hello"
        await ws.send(orjson.dumps({
            "action": "subscribe", "id": "c",
            "chain": {"underlying": "NIFTY", "expiry": world["expiry"].isoformat()},
        }).decode())
        return await read_snapshots(ws, world["chain"], timeout_s=30)
