"""Shared set-up for the runtime tests: instruments from the synthetic market, accounts,
subscriptions, waiting on conditions, and runticker subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from django.conf import settings
from django.db import connection

from accounts.models import KiteAccount
from streaming.market import SyntheticMarket
from subscriptions.models import Instrument, Subscription
from tests.conftest import instrument_rows_from_market

REPO = Path(__file__).resolve().parents[3]


def instruments_from_market(market: SyntheticMarket) -> list[Instrument]:
    """Save every instrument of the market (as Kite's dump would list them)."""
    rows = instrument_rows_from_market(market)
    Instrument.objects.bulk_create(rows, batch_size=2000)
    return rows


def subscribe(tokens: Iterable[int], *, mode: str = "full", pinned: KiteAccount | None = None):
    return Subscription.objects.bulk_create(
        [Subscription(instrument_id=t, mode=mode, pinned_account=pinned) for t in tokens],
        batch_size=2000,
    )


def make_account(label: str, *, api_key: str, access_token: str) -> KiteAccount:
    from accounts.services import account_set_session

    account = KiteAccount.objects.create(label=label, api_key=api_key, api_secret="secret")
    return account_set_session(account=account, access_token=access_token)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a manage.py subprocess on this test's database and Redis db."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": (
                f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/"
                f"{connection.settings_dict['NAME']}"
            ),
            "REDIS_URL": settings.REDIS_URL,
            "LOG_JSON": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class ManagePy:
    """A ``manage.py`` subprocess whose output goes to a file (read it on failure)."""

    def __init__(self, args: list[str], *, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, *, timeout_s: float = 20.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        try:
            if self.alive():
                self.terminate()
        except subprocess.TimeoutExpired:
            self.kill()
        finally:
            if not self._log.closed:
                self._log.close()


class InProcessEngine:
    """A simulator and an engine on the test's event loop, over the configured channel layer.

    ``async with InProcessEngine(accounts={"acc1": "k1"}) as h:`` starts both; ``h.sim``,
    ``h.engine`` and ``h.layer`` are then live. ``sim``: a simulator of the test's own (a
    replaying one) instead of one on the synthetic market.
    """

    def __init__(self, *, accounts: dict[str, str], market_seed: int = 0,
                 tick_interval_ms: float = 100.0, force_mode: str = "live",
                 client_factory=None, clock=None, market: SyntheticMarket | None = None,
                 sim=None, sim_options: dict | None = None, build_options: dict | None = None,
                 request_order_sync=None, **config):
        from channels.layers import get_channel_layer

        from streaming.sim.simulator import KiteSimulator

        self.sim = sim or KiteSimulator(
            market=market or SyntheticMarket(seed=market_seed), tick_interval_ms=tick_interval_ms,
            **(sim_options or {}),
        )
        self._build_options = build_options or {}
        for label, key in accounts.items():
            self.sim.register_account(api_key=key, api_secret="secret", access_token=f"tok-{label}")
        self.layer = get_channel_layer()
        self._config = {"force_mode": force_mode, "lease_ttl_s": 6.0, **config}
        self.engine = None
        self._client_factory = client_factory
        self._clock = clock
        self._request_order_sync = request_order_sync
        self._stop = asyncio.Event()
        self._task = None

    async def __aenter__(self) -> InProcessEngine:
        from streaming.control import control_channel
        from streaming.engine.app import Engine
        from streaming.engine.config import EngineConfig
        from streaming.engine.leases import make_engine_id

        await self.sim.start()
        config = EngineConfig(
            engine_id=make_engine_id(),
            kite_ws_url=self.sim.ws_url,
            kite_api_root=self.sim.http_url,
            redis_url=settings.REDIS_URL,
            control_channel=control_channel(settings.CHANNEL_LAYER_PREFIX),
            **self._config,
        )
        extra = {"clock": self._clock} if self._clock is not None else {}
        extra.update(self._build_options)
        if self._request_order_sync is not None:
            extra["request_order_sync"] = self._request_order_sync
        self.engine = Engine.build(
            config, channel_layer=self.layer, client_factory=self._client_factory, **extra
        )
        self._task = asyncio.create_task(self.engine.run(self._stop), name="test-engine")
        await asyncio.wait_for(self.engine.started.wait(), timeout=60)
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        try:
            # Failure bounds for a loaded machine (stress-ng beside the suite), not speed claims.
            await asyncio.wait_for(self._task, timeout=60)
        finally:
            await self.sim.stop()

    async def listen(self, *groups: str) -> Listener:
        # The default prefix on purpose: channels-redis serialises receives of process-local
        # channels behind one lock per prefix family, so a second prefix would starve.
        channel = await self.layer.new_channel()
        for group in groups:
            await self.layer.group_add(group, channel)
        return Listener(self.layer, channel)


class Listener:
    """A channel in some groups; collects the latest snapshot per token as messages arrive."""

    def __init__(self, layer, channel: str) -> None:
        self.layer = layer
        self.channel = channel
        self.latest: dict[int, dict] = {}
        self.received_at: dict[int, float] = {}
        self.messages = 0

    async def drain(self, duration_s: float) -> None:
        """Receive for ``duration_s`` seconds."""
        import orjson

        deadline = time.monotonic() + duration_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(self.layer.receive(self.channel), timeout=left)
            except TimeoutError:
                return
            if message["type"] != "snapshots.batch":
                continue  # a chain's analytics, on the same group
            self.messages += 1
            now = time.monotonic()
            for token, item in zip(message["tokens"], message["items"], strict=True):
                self.latest[token] = orjson.loads(item)
                self.received_at[token] = now

    async def until(self, predicate: Callable[[], object], *, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met within {timeout_s} s")
            await self.drain(0.1)
