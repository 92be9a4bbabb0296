"""The Procfile, run by honcho as `make prod-local` runs it, boots the production layout against
the Kite simulator: both web processes serve, one of the two engines streams the account, a
WebSocket client gets snapshots with Greeks, and beat's periodic job runs on the worker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from django.core.management import call_command
from websockets.asyncio.client import connect

from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread
from subscriptions.models import DriftReport
from tests.helpers import free_port, wait_until
from tests.streaming.engine.runtime_helpers import subprocess_env
from tests.streaming.engine.test_runticker_e2e import read_snapshots, world  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[1]


def procfile_processes() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(m.groups() for line in lines if (m := re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)))


def test_the_procfile_declares_two_webs_two_engines_one_worker_exactly_one_beat_and_one_paper_desk():
    commands = list(procfile_processes().values())
    assert sum("daphne " in c for c in commands) == 2
    assert sum("manage.py runticker" in c for c in commands) == 2
    assert sum(" worker" in c and "celery" in c for c in commands) == 1
    assert sum(" beat" in c and "celery" in c for c in commands) == 1
    assert sum("manage.py runpaper" in c for c in commands) == 1


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening yet
        return 0


async def _chain_snapshots(port: int, world) -> dict[int, dict]:  # noqa: F811 (the fixture's value)
    async with connect(
        f"ws://127.0.0.1:{port}/ws/v1/",
        additional_headers=[("Authorization", f"Token {world['key']}")],
        subprotocols=["tickerproj.v1"],
    ) as ws:
        hello = orjson.loads(await asyncio.wait_for(ws.recv(), timeout=30))
        assert hello["type"] == "hello"
        await ws.send(orjson.dumps({
            "action": "subscribe", "id": "c",
            "chain": {"underlying": "NIFTY", "expiry": world["expiry"].isoformat()},
        }).decode())
        return await read_snapshots(ws, world["chain"], timeout_s=60)


@pytest.mark.heavy
def test_honcho_runs_the_production_layout_against_the_simulator(world, redis_client, tmp_path):  # noqa: F811
    call_command("ensure_schedules")
    sim = KiteSimulator(market=SyntheticMarket(seed=0), tick_interval_ms=200)
    sim.register_account(api_key="k1", api_secret="secret", access_token="tok-acc1")
    ports = {
        name: str(free_port())
        for name in ("WEB1_PORT", "WEB2_PORT", "ENGINE1_METRICS_PORT", "ENGINE2_METRICS_PORT")
    }
    log_path = tmp_path / "honcho.log"
    with SimulatorThread(sim) as simulator, log_path.open("wb") as log:
        env = subprocess_env(
            KITE_WS_URL=simulator.ws_url,
            KITE_API_ROOT=simulator.http_url,
            CHANNEL_LAYER_PREFIX=f"procfile{uuid.uuid4().hex[:8]}",
            RUNTICKER_ARGS="--no-mock",  # live from the simulator whatever today's hours
            TICKER_HEARTBEAT_INTERVAL_S="1",
            CELERY_CONCURRENCY="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            **ports,
        )
        honcho = subprocess.Popen(
            [sys.executable, "-m", "honcho", "--no-colour", "start"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            for name in ("WEB1_PORT", "WEB2_PORT"):
                wait_until(lambda n=name: _status(int(ports[n]), "/health/ready") == 200
                           or honcho.poll() is not None,
                           timeout_s=120, interval_s=0.5, what=f"{name} ready")
                assert honcho.poll() is None, log_path.read_text()[-4000:]
            wait_until(lambda: simulator.call(sim.connection_count, "k1") == 1, timeout_s=90,
                       interval_s=0.5, what="one engine streaming the account")

            snapshots = asyncio.run(_chain_snapshots(int(ports["WEB1_PORT"]), world))
            for token in world["chain"]:
                assert snapshots[token]["is_mock"] is False
                assert 0.01 < snapshots[token]["iv"] < 2.0

            # Beat queued "Reconcile subscriptions" and the worker ran it.
            wait_until(lambda: DriftReport.objects.exists(), timeout_s=120, interval_s=0.5,
                       what="the reconcile job run by beat and the worker")
            # Two engines, one account: the other engine holds no connection to Kite.
            assert simulator.call(sim.connection_count, "k1") == 1
        finally:
            if honcho.poll() is None:
                honcho.send_signal(signal.SIGTERM)  # honcho stops every process it started
                try:
                    honcho.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(honcho.pid, signal.SIGKILL)
                    honcho.wait()
    output = log_path.read_text(errors="replace")
    started = re.findall(r"^\S+ system\s+\| (\w+)\.1 started \(pid=", output, flags=re.M)
    assert sorted(started) == ["beat", "engine1", "engine2", "paper", "web1", "web2", "worker"], output[-3000:]
