"""Helpers for the WebSocket API tests: a channels-redis layer per test, a small instrument
universe, logged-in users and a stand-in engine that answers snapshot requests."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.exceptions
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.test import Client
from prometheus_client import CollectorRegistry

from streaming import schema
from streaming.consumers import ConsumerSettings, WebSocketMetrics
from subscriptions.models import Instrument, Subscription
from tests.conftest import make_option

EXPIRY = dt.date(2030, 1, 29)
EXPIRY2 = dt.date(2030, 2, 26)
NIFTY_INDEX = 256265
NIFTY_FUT = 9_000_001
STRIKES = [24000.0 + 50 * i for i in range(11)]  # 24000 .. 24500, ATM band tests use 24250
ORIGIN = (b"origin", b"http://127.0.0.1:8000")


def option_token(strike: float, kind: str, expiry: dt.date = EXPIRY) -> int:
    base = 10_000_000 if expiry == EXPIRY else 20_000_000
    return base + int(strike) * 10 + (1 if kind == "CE" else 2)


def create_universe(*, subscribe: bool = True) -> dict[str, Any]:
    """NIFTY index, one future and two 11-strike chains, all subscribed (unless told not to)."""
    rows = [
        Instrument(
            instrument_token=NIFTY_INDEX,
            exchange_token=1001,
            tradingsymbol="NIFTY 50",
            name="NIFTY 50",
            instrument_type="EQ",
            segment="INDICES",
            exchange="NSE",
        ),
        Instrument(
            instrument_token=NIFTY_FUT,
            exchange_token=35000,
            tradingsymbol="NIFTY30JANFUT",
            name="NIFTY",
            expiry=EXPIRY,
            instrument_type="FUT",
            segment="NFO-FUT",
            exchange="NFO",
            last_price=24105.0,
        ),
    ]
    for expiry in (EXPIRY, EXPIRY2):
        for strike in STRIKES:
            for kind in ("CE", "PE"):
                rows.append(
                    make_option(
                        token=option_token(strike, kind, expiry),
                        name="NIFTY",
                        expiry=expiry,
                        strike=strike,
                        kind=kind,
                    )
                )
    Instrument.objects.bulk_create(rows)
    if subscribe:
        Subscription.objects.bulk_create(
            Subscription(instrument=r) for r in rows if r.instrument_token != option_token(24500, "PE")
        )
    return {r.instrument_token: r for r in rows}


def snapshot_item(token: int, *, ltp: float, **extra: Any) -> bytes:
    """A snapshot as the engine serialises it (only the fields these tests look at)."""
    return orjson.dumps({"v": 1, "token": token, "ltp": ltp, "is_mock": True, **extra})


def layers_with_prefix(prefix: str, *, backend: str | None = None) -> dict[str, Any]:
    """CHANNEL_LAYERS as settings build them (CHANNEL_LAYER_BACKEND's layer), with ``prefix``;
    ``backend`` "redis" forces channels-redis's RedisChannelLayer. On that layer the host is
    the plain URL, not the settings' ``socket_timeout`` host: with it a test loop's teardown
    hung cancelling a pending read (300 s) after a refused handshake."""
    if backend == "redis" or (backend is None and django_settings.CHANNEL_LAYER_BACKEND == "redis"):
        return {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {
            "hosts": [django_settings.REDIS_URL], "prefix": prefix, "capacity": 1000, "expiry": 10,
        }}}  # fmt: skip
    default = django_settings.CHANNEL_LAYERS["default"]
    return {"default": {**default, "CONFIG": {**default["CONFIG"], "prefix": prefix}}}


@pytest.fixture
def redis_layer(settings):
    """The channel layer the settings choose (real Redis), with a prefix of this test's own."""
    settings.CHANNEL_LAYERS = layers_with_prefix(f"test_web_{uuid.uuid4().hex[:12]}")
    return get_channel_layer()


@pytest.fixture
def core_redis_layer(settings):
    """channels-redis's RedisChannelLayer (CHANNEL_LAYER_BACKEND=redis), with its own prefix:
    for what only that layer has (group keys in Redis, group expiry)."""
    settings.CHANNEL_LAYERS = layers_with_prefix(f"test_web_{uuid.uuid4().hex[:12]}", backend="redis")
    return get_channel_layer()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="trader", password="pw-123456")


def session_cookie_for(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    return (b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={cookie}".encode())


def staff_user(username: str = "ops"):
    return get_user_model().objects.create_user(username=username, password="pw", is_staff=True)


def make_config(**overrides: Any) -> ConsumerSettings:
    values = {
        "max_subscriptions": 100,
        "max_messages_per_s": 50,
        "send_window": 4,
        "heartbeat_max_age_s": 15.0,
    }
    values.update(overrides)
    return ConsumerSettings(**values)


def make_app(
    config: ConsumerSettings | None = None, clock: Callable[[], float] | None = None, ops_access=None
):
    """The project's ASGI application with fresh metrics; returns (app, metrics)."""
    from tickerproj.asgi import build_application

    metrics = WebSocketMetrics(CollectorRegistry())
    extra = {"clock": clock} if clock is not None else {}
    if ops_access is not None:
        extra["ops_access"] = ops_access
    return build_application(metrics=metrics, config=config or make_config(), **extra), metrics


async def ws_connect(app, *, headers=(), subprotocols=None, path="/ws/v1/"):
    """An accepted, greeted communicator (the hello is read and returned)."""
    comm = WebsocketCommunicator(app, path, headers=list(headers), subprotocols=subprotocols)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    hello = await recv(comm)
    assert hello["type"] == "hello", hello
    return comm, hello


async def recv(comm: WebsocketCommunicator, wait_s: float = 5) -> dict[str, Any]:
    return orjson.loads(await comm.receive_from(wait_s))


async def recv_until(
    comm: WebsocketCommunicator, pred: Callable[[dict], bool], wait_s: float = 5
) -> dict[str, Any]:
    """The first message matching ``pred`` within ``wait_s`` (others are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        remaining = deadline - loop.time()
        assert remaining > 0, "no matching message before the deadline"
        msg = await recv(comm, wait_s=remaining)
        if pred(msg):
            return msg


async def expect_close(comm: WebsocketCommunicator, wait_s: float = 5) -> int:
    out = await comm.receive_output(wait_s)
    assert out["type"] == "websocket.close", out
    return out.get("code")


async def send(comm: WebsocketCommunicator, message: dict[str, Any]) -> None:
    await comm.send_to(text_data=orjson.dumps(message).decode())


class FakeEngine:
    """Answers ``snapshot.request`` on the real channel layer like a runticker would (and
    records ``analytics.request``, for which it has no analytics)."""

    def __init__(self, layer, latest: dict[int, bytes]) -> None:
        self.layer = layer
        self.latest = latest
        self.requests: list[dict] = []
        self._task: asyncio.Task | None = None
        self._channel = ""

    async def __aenter__(self) -> FakeEngine:
        self._channel = await self.layer.new_channel()
        await self.layer.group_add(schema.SNAPSHOT_REQUESTS_GROUP, self._channel)
        self._task = asyncio.create_task(self._serve(), name="fake-engine")
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        # redis-py's read timeout context can turn the cancellation of a blocking receive
        # into its own TimeoutError: either way the fake engine has stopped.
        with contextlib.suppress(asyncio.CancelledError, redis.exceptions.TimeoutError):
            await self._task
        await self.layer.group_discard(schema.SNAPSHOT_REQUESTS_GROUP, self._channel)

    async def _serve(self) -> None:
        while True:
            message = await self.layer.receive(self._channel)
            self.requests.append(message)
            if message["type"] == schema.ANALYTICS_REQUEST_TYPE:
                continue
            request = schema.parse_snapshot_request(message)
            tokens = [t for t in request.tokens if t in self.latest]
            if tokens:
                await self.layer.send(
                    request.reply_to,
                    schema.snapshots_batch_message(
                        group="", tokens=tokens, items=[self.latest[t] for t in tokens], initial=True
                    ),
                )


async def publish(layer, group: str, items: dict[int, bytes]) -> None:
    await layer.group_send(
        group,
        schema.snapshots_batch_message(group=group, tokens=list(items), items=list(items.values())),
    )


# --- real processes (daphne, runticker) on the test database --------------------------------

ROOT = Path(__file__).resolve().parents[2]


def service_env(*, layer_prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a service process on this test's database, Redis db and layer prefix."""
    db = django_settings.DATABASES["default"]
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_URL": django_settings.REDIS_URL,
        "CHANNEL_LAYER_PREFIX": layer_prefix,
        # Plain http on loopback in tests: cookies without the Secure flag.
        "SESSION_COOKIE_SECURE": "false",
        **extra,
    }
    env.pop("TEST_DATABASE_NAME", None)
    return env


@pytest.fixture
def layer_prefix(settings) -> str:
    """A channel-layer prefix shared by this test process and the service processes it starts
    (both on the layer the settings choose)."""
    prefix = f"test_web_{uuid.uuid4().hex[:10]}"
    settings.CHANNEL_LAYERS = layers_with_prefix(prefix)
    return prefix


class ServiceProcess:
    """One subprocess (daphne or runticker) with its output in a log file; stop() is graceful."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *, port: int | None = None, wait_s: float = 90) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        log.close()
        if port is not None:
            deadline = time.monotonic() + wait_s
            while True:
                assert self.proc.poll() is None, (
                    f"{self.name} exited with {self.proc.returncode}: {self.tail()}"
                )
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert time.monotonic() < deadline, f"{self.name} not listening: {self.tail()}"
                time.sleep(0.1)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def daphne_process(*, port: int, env: dict[str, str], log_dir: Path) -> ServiceProcess:
    return ServiceProcess(
        "daphne",
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tickerproj.asgi:application"],
        env,
        log_dir,
    )


@pytest.fixture
async def close_db_threads():
    """Close the database connection that async ORM calls leave open in asgiref's sync thread.

    Django's async ORM runs queries on one shared worker thread and never closes its
    connection; left open, it keeps the test database busy and its teardown fails.
    """
    yield
    from asgiref.sync import sync_to_async
    from django.db import connections

    await sync_to_async(connections.close_all)()
