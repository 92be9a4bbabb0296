"""A loopback Kite Connect (HTTP + WebSocket on one port) with fault injection, for tests and demos.

``KiteSimulator`` speaks Kite's real protocol well enough that the official ``KiteConnect``
and ``KiteTicker`` run against it unchanged: REST under ``http_url`` (use as KITE_API_ROOT)
and the ticker under ``ws_url`` (use as KITE_WS_URL). A :class:`~streaming.market.SyntheticMarket`
drives the prices; the simulator's event loop is its one owner.

REST
    Kite's routes, envelope (``{"status": "success", "data": ...}``), error bodies
    (``{"status": "error", "message", "error_type"}``) and status codes: 403 TokenException,
    400 InputException, 429 NetworkException, 5xx. Requests carry ``X-Kite-Version: 3`` and
    ``Authorization: token api_key:access_token`` (the instrument dump and the session
    exchange need no token, as on Kite). ``fail_next``, ``corrupt_next``, ``drop_next`` and
    ``delay_next`` inject faults per route; ``drop_response_next`` handles the call and then
    drops the connection before answering (the order is placed, the client never learns it), named as in kiteconnect's ``KiteConnect._routes``
    ("market.quote", "market.historical", "api.token", "order.place", ...).

WebSocket
    ``ws_url?api_key=...&access_token=...``: 403 for a bad or expired token, 429 beyond
    ``MAX_CONNECTIONS_PER_API_KEY`` live connections per key. ``subscribe`` (quote mode, as
    Kite), ``mode`` and ``unsubscribe`` are honoured; beyond ``MAX_INSTRUMENTS_PER_CONNECTION``
    the extra tokens are refused with an error text message. Every ``tick_interval_ms`` each
    connection gets one binary frame with a packet for every subscribed instrument the market
    knows (split at ``max_packets_per_frame``); a one-byte heartbeat goes out when nothing else
    was sent for ``heartbeat_interval_ms``. Kite sends ticks only on change; the simulator
    sends every subscribed instrument every interval, which is the harder case for a client.
    Order updates are pushed as ``{"type": "order", "data": ...}`` text messages in Kite's
    shape (the postback document, with a blank ``checksum``).

Postbacks
    An account registered with a ``postback_url`` also gets each order update POSTed there as
    Kite's postback JSON, ``checksum`` = SHA-256 of ``order_id + order_timestamp +
    api_secret``, one at a time in order (``postbacks`` records each answer's HTTP status).
    As on Kite, an order's first OPEN state is not posted; COMPLETE, CANCELLED, REJECTED and
    every later change (UPDATE) are. ``mute_order_updates`` drops an account's order
    updates on both channels (the missed updates a sync must repair); ``replay_order_update``
    sends an order's earlier state again (replays and out-of-order delivery);
    ``disorder_postbacks`` posts each postback twice and each pair swapped.

Latency probe
    With ``latency_probe=True`` the ``last_trade_time`` field of every full-mode (184-byte)
    packet carries, instead of a time in seconds, the simulator's wall clock when it built the
    frame in **milliseconds since the epoch modulo 2**32** (``time.time_ns() // 10**6 &
    0xFFFFFFFF``). A benchmark computes the latency as ``(now_ms - probe) mod 2**32``.

Fault injection (WebSocket)
    ``drop_connections`` aborts TCP connections without a close frame; ``stall`` keeps sockets
    open but sends nothing (no ticks, heartbeats, text or pongs) until ``resume``
    (``stall_current`` only the sockets open now: a new connection streams);
    ``send_malformed`` queues a broken binary frame; ``expire_token`` invalidates the key's
    token, closes its connections and makes new upgrades fail with 403 until a new token is
    issued (``set_access_token`` or a session exchange).

Fault injection (history)
    ``omit_history(token, start_epoch_s, end_epoch_s)`` leaves that instrument's candles
    starting in the range out of every historical answer, as minutes Kite itself lacks.

Replay
    With ``replay=ReplaySource(...)`` (``streaming.sim.replay``) the ticker sends a recording
    instead of the market: once a connection has subscribed, each recorded message (tick
    frames, heartbeats, text) goes, byte for byte and at its recorded pace divided by the
    source's ``speed``, to the oldest live connection that has subscribed. The frames are
    what the recorded account was subscribed to, whatever the replaying client subscribes;
    the market still answers REST. ``replay_finished`` is set when the last message is sent;
    ``replay_start`` (an event) holds the replay back until it is set.

Approximations, documented so no one mistakes them for Kite's words: the texts of WebSocket
error messages and of the close reason on token expiry are the simulator's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeVar

import numpy as np
import orjson
import structlog
from aiohttp import ClientError, ClientSession, ClientTimeout, WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from yarl import URL

from streaming.kite.codec import (
    MAX_PACKETS_PER_FRAME,
    PACKET_FULL,
    encode_frame,
)
from streaming.kite.limits import (
    HISTORICAL_MAX_DAYS_PER_INTERVAL,
    HISTORICAL_REQUESTS_PER_S,
    MAX_CONNECTIONS_PER_API_KEY,
    MAX_INSTRUMENTS_PER_CONNECTION,
    MODE_QUOTE,
    OTHER_REQUESTS_PER_S,
    QUOTE_MAX_INSTRUMENTS_PER_CALL,
    QUOTE_REQUESTS_PER_S,
    Mode,
)
from streaming.kite.postback import postback_checksum
from streaming.market import IST, SyntheticMarket
from streaming.sim.replay import ReplaySource

__all__ = ["KiteSimulator", "SimulatorThread"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

WS_PATH: Final = "/ws"
LOGIN_PATH: Final = "/connect/login"
HEARTBEAT_FRAME: Final = b"\x00"
KITE_VERSION: Final = "3"
_PROBE_MASK: Final = 0xFFFFFFFF
_CLOSE_GOING_AWAY: Final = 1001
_CLOSE_POLICY_VIOLATION: Final = 1008
_SHUTDOWN_TIMEOUT_S: Final = 2.0
# How long a close waits for the peer's close frame (a stalled client must not hang stop()).
_CLOSE_TIMEOUT_S: Final = 2.0
_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
_REPLAY_POLL_S: Final = 0.01
_REPLAY_MAX_OUTBOX: Final = 64
_POSTBACK_TIMEOUT_S: Final = 10.0
_POSTBACK_QUEUE: Final = 10_000
#: How long a disordered postback waits for a later one to be swapped with.
_DISORDER_HOLD_S: Final = 0.5
_APP_ID: Final = 1234

TOKEN_ERROR_MESSAGE: Final = "Incorrect `api_key` or `access_token`."  # noqa: S105 - not a secret
RATE_ERROR_MESSAGE: Final = "Too many requests"
MAX_MODIFICATIONS_PER_ORDER: Final = 25
RMS_MARGIN_MESSAGE: Final = "Insufficient funds. Required margin is 95417.84 but available margin is 74251.80."
MODIFICATIONS_ERROR_MESSAGE: Final = "Maximum allowed order modifications exceeded."

# Which rate-limit bucket each route draws from (Kite's published per-second limits).
_QUOTE_ROUTES: Final = frozenset({"market.quote", "market.quote.ohlc", "market.quote.ltp"})
_HISTORICAL_ROUTES: Final = frozenset({"market.historical"})

_VARIETIES: Final = frozenset({"regular", "amo", "co", "iceberg", "auction"})


class KiteApiError(Exception):
    """An error the simulator answers with Kite's error envelope and HTTP status."""

    def __init__(self, *, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message


def _input_error(message: str) -> KiteApiError:
    return KiteApiError(status=400, error_type="InputException", message=message)


def _json_response(payload: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json"
    )


def _success(data: Any) -> web.Response:
    return _json_response({"status": "success", "data": data})


def _error_response(exc: KiteApiError) -> web.Response:
    return _json_response(
        {"status": "error", "message": exc.message, "data": None, "error_type": exc.error_type},
        status=exc.status,
    )


def _candle_epoch_s(stamp: str) -> float:
    """Epoch seconds of a candle's stamp as the market writes it (``2026-11-27T09:15:00+0530``)."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def _stamp(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, IST).strftime("%Y-%m-%d %H:%M:%S")


# --- validation of what clients send ---------------------------------------------------------


_InstrumentToken = Annotated[int, Field(ge=0, lt=1 << 32)]


class _SubscribeMessage(BaseModel):
    model_config = ConfigDict(frozen=True)
    a: Literal["subscribe", "unsubscribe"]
    v: list[_InstrumentToken]


class _ModeMessage(BaseModel):
    model_config = ConfigDict(frozen=True)
    a: Literal["mode"]
    v: tuple[Literal["ltp", "quote", "full"], list[_InstrumentToken]]


_CONTROL_MESSAGE: Final = TypeAdapter(
    Annotated[_SubscribeMessage | _ModeMessage, Field(discriminator="a")]
)


class _PlaceOrderForm(BaseModel):
    model_config = ConfigDict(extra="ignore")
    exchange: str
    tradingsymbol: str
    transaction_type: Literal["BUY", "SELL"]
    quantity: int = Field(gt=0)
    product: Literal["CNC", "NRML", "MIS", "MTF"]
    order_type: Literal["MARKET", "LIMIT", "SL", "SL-M"]
    price: float | None = Field(default=None, ge=0)
    trigger_price: float | None = Field(default=None, ge=0)
    validity: Literal["DAY", "IOC", "TTL"] = "DAY"
    disclosed_quantity: int = Field(default=0, ge=0)
    tag: str | None = Field(default=None, max_length=20, pattern="^[A-Za-z0-9]*$")
    market_protection: int = Field(default=0, ge=-1, le=100)


class _ModifyOrderForm(BaseModel):
    model_config = ConfigDict(extra="ignore")
    quantity: int | None = Field(default=None, gt=0)
    price: float | None = Field(default=None, ge=0)
    order_type: Literal["MARKET", "LIMIT", "SL", "SL-M"] | None = None
    trigger_price: float | None = Field(default=None, ge=0)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"Invalid `{where}`: {first['msg']}"


# --- accounts, faults, connections -----------------------------------------------------------


@dataclass(slots=True)
class _Account:
    api_key: str
    api_secret: str
    user_id: str
    access_token: str | None
    redirect_url: str | None = None
    postback_url: str | None = None
    updates_muted: bool = False
    request_tokens: set[str] = field(default_factory=set)
    orders: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # id -> history
    trades: list[dict[str, Any]] = field(default_factory=list)
    modifications: dict[str, int] = field(default_factory=dict)  # order id -> count
    attempts: int = 0
    ticks_sent: int = 0
    rate_windows: dict[str, deque[float]] = field(default_factory=dict)


@dataclass(slots=True)
class _Fault:
    kind: Literal["fail", "corrupt", "drop", "drop_response", "delay"]
    times: int
    status: int = 500
    error_type: str = "GeneralException"
    message: str = ""
    corruption: str = "truncated"
    delay_s: float = 0.0


@dataclass(slots=True)
class _Connection:
    """One live ticker WebSocket: its subscriptions and what the writer owes it."""

    id: int
    api_key: str
    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None
    subscriptions: dict[int, Mode] = field(default_factory=dict)
    outbox: deque[tuple[str, bytes | str]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # the outbox was emptied
    tick_due: bool = False
    groups: list[tuple[np.ndarray, int]] | None = None  # (market rows, packet length)
    last_sent_s: float = 0.0
    ticks_sent: int = 0
    frames_sent: int = 0

    def invalidate(self) -> None:
        self.groups = None

    def queue(self, kind: str, payload: bytes | str) -> None:
        self.outbox.append((kind, payload))
        self.wake.set()


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A snapshot of one live ticker connection, for tests."""

    id: int
    api_key: str
    subscriptions: dict[int, str]
    ticks_sent: int
    frames_sent: int


# --- the simulator ---------------------------------------------------------------------------


class KiteSimulator:
    """Loopback Kite Connect: REST and ticker on one port, driven by a SyntheticMarket.

    ``tick_interval_ms``: how often the market steps and every connection gets its ticks.
    ``heartbeat_interval_ms``: silence after which a one-byte heartbeat is sent (Kite: 1 s).
    ``max_packets_per_frame``: split a connection's ticks into frames of at most this many.
    ``latency_probe``: stamp the send time in full packets' ``last_trade_time`` (module doc).
    ``step_market``: False leaves the market still (tests that move it with ``set_spot``).
    ``enforce_rate_limits``: answer 429 beyond Kite's per-second REST limits per API key.
    ``require_kite_version``: refuse REST calls without ``X-Kite-Version: 3``, as Kite does.
    ``max_fill_quantity``: fill orders at most this many units per match (partial fills); the
    rest rests OPEN and is matched again after each market step.
    ``clock``: wall clock for order and session timestamps; ``monotonic_fn``: the
    rate-limit windows' clock (injectable so tests need not sleep).
    The market belongs to the simulator's event loop once started; from another thread go
    through :class:`SimulatorThread`.
    """

    def __init__(
        self,
        *,
        market: SyntheticMarket,
        tick_interval_ms: float = 250.0,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval_ms: float = 1000.0,
        max_packets_per_frame: int = MAX_PACKETS_PER_FRAME,
        latency_probe: bool = False,
        step_market: bool = True,
        enforce_rate_limits: bool = False,
        require_kite_version: bool = True,
        max_fill_quantity: int | None = None,
        clock: Callable[[], float] = time.time,
        monotonic_fn: Callable[[], float] = time.monotonic,
        replay: ReplaySource | None = None,
        replay_start: asyncio.Event | None = None,
    ) -> None:
        if tick_interval_ms <= 0 or heartbeat_interval_ms <= 0:
            raise ValueError(
                f"intervals must be positive: tick_interval_ms={tick_interval_ms} "
                f"heartbeat_interval_ms={heartbeat_interval_ms}"
            )
        if not 1 <= max_packets_per_frame <= MAX_PACKETS_PER_FRAME:
            raise ValueError(
                f"max_packets_per_frame must be in [1, {MAX_PACKETS_PER_FRAME}], "
                f"got {max_packets_per_frame}"
            )
        self.market = market
        self.tick_interval_ms = float(tick_interval_ms)
        self.heartbeat_interval_ms = float(heartbeat_interval_ms)
        self.max_packets_per_frame = int(max_packets_per_frame)
        self.latency_probe = latency_probe
        self.step_market = step_market
        self.enforce_rate_limits = enforce_rate_limits
        self.require_kite_version = require_kite_version
        self.max_fill_quantity = max_fill_quantity
        self._clock = clock
        self._monotonic = monotonic_fn
        self._host = host
        self._port = port
        self._accounts: dict[str, _Account] = {}
        self._connections: dict[int, _Connection] = {}
        self._next_connection_id = 1
        self._next_order_id = 250_000_000_000_000
        self._next_trade_id = 50_000_000
        self._faults: dict[str, deque[_Fault]] = {}
        self._unknown_attempts: dict[str, int] = {}
        self._stalled_all = False
        self._stalled_keys: set[str] = set()
        self._stalled_ids: set[int] = set()
        self._disordered_postbacks: set[str] = set()
        self._held_postback: dict[str, tuple[str, str, str, bytes]] = {}
        self._history_holes: dict[int, list[tuple[float, float]]] = {}
        self._runner: web.AppRunner | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._postback_task: asyncio.Task[None] | None = None
        self._postback_queue: asyncio.Queue[tuple[str, str, str, bytes]] | None = None
        self.postbacks: list[dict[str, Any]] = []
        """Each postback sent: url, order_id, status and the HTTP status (None: no answer)."""
        self._actual_port: int | None = None
        self.ticks_sent = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.rest_requests: dict[str, int] = {}
        self.replay = replay
        self._replay_start = replay_start
        self.replay_finished = asyncio.Event()
        self._subscribed = asyncio.Event()  # a connection subscribed (a replay may start)
        self.responses_dropped = 0
        self._rms_rejections: deque[str] = deque()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, serve and start ticking; the URLs are valid once this returns."""
        if self._runner is not None:
            raise RuntimeError("KiteSimulator already started")
        app = web.Application(middlewares=[self._errors_middleware])
        self._add_routes(app)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        # Binding our own socket makes port 0 work and tells us the port without private API.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            site = web.SockSite(runner, sock)
            await site.start()
        except OSError:
            sock.close()
            await runner.cleanup()
            raise
        self._actual_port = sock.getsockname()[1]
        self._runner = runner
        self._tick_task = asyncio.create_task(
            self._tick_loop() if self.replay is None else self._replay_loop(self.replay),
            name="kitesim.tick_loop",
        )
        self._postback_queue = asyncio.Queue(maxsize=_POSTBACK_QUEUE)
        self._postback_task = asyncio.create_task(
            self._postback_loop(self._postback_queue), name="kitesim.postbacks"
        )
        log.info("kitesim.started", http_url=self.http_url, ws_url=self.ws_url)

    async def stop(self) -> None:
        """Close every connection and the server; ticking stops."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        if self._postback_task is not None:
            self._postback_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._postback_task
            self._postback_task = None
        for conn in list(self._connections.values()):
            await conn.ws.close(code=_CLOSE_GOING_AWAY, message=b"simulator stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("kitesim.stopped", ticks_sent=self.ticks_sent, frames_sent=self.frames_sent)

    async def __aenter__(self) -> KiteSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._actual_port is None:
            raise RuntimeError("KiteSimulator not started: no port yet")
        return self._actual_port

    @property
    def http_url(self) -> str:
        """REST root (KITE_API_ROOT)."""
        return f"http://{self._host}:{self.port}"

    @property
    def login_url(self) -> str:
        """Kite's login page (KITE_LOGIN_URL): ``?api_key=...&v=3`` redirects with a request token."""
        return f"http://{self._host}:{self.port}{LOGIN_PATH}"

    @property
    def ws_url(self) -> str:
        """Ticker root (KITE_WS_URL); clients append ``?api_key=&access_token=``."""
        return f"ws://{self._host}:{self.port}{WS_PATH}"

    # --- accounts -------------------------------------------------------------------------

    def register_account(
        self,
        *,
        api_key: str,
        api_secret: str,
        access_token: str | None = None,
        user_id: str | None = None,
        redirect_url: str | None = None,
        postback_url: str | None = None,
    ) -> None:
        """Add an API key; ``access_token`` makes it logged in at once.

        ``redirect_url`` is the app's registered redirect: ``login_url`` sends the browser
        there with a fresh ``request_token``, as Kite's login page does after a login.
        ``postback_url``: where the app's order postbacks go (Kite's developer console).
        """
        if api_key in self._accounts:
            raise ValueError(f"api_key already registered: {api_key}")
        self._accounts[api_key] = _Account(
            api_key=api_key,
            api_secret=api_secret,
            user_id=user_id or f"ZS{len(self._accounts) + 1:04d}",
            access_token=access_token,
            redirect_url=redirect_url,
            postback_url=postback_url,
        )

    def set_postback_url(self, api_key: str, url: str | None) -> None:
        """Post the key's order updates to ``url`` from now on (None: no postbacks)."""
        self._account(api_key).postback_url = url

    def mute_order_updates(self, api_key: str, *, muted: bool = True) -> None:
        """Drop (or, ``muted=False``, send again) the key's order text frames and postbacks."""
        self._account(api_key).updates_muted = muted

    def disorder_postbacks(self, api_key: str, *, enabled: bool = True) -> None:
        """Post each of the key's postbacks twice, and each pair swapped: the later state
        arrives first, the earlier one after it (duplicates and reordering, as retries and
        parallel deliveries at Kite would). A postback with no successor within
        ``_DISORDER_HOLD_S`` goes out alone. ``enabled=False`` sends a held one at once."""
        if enabled:
            self._disordered_postbacks.add(api_key)
            return
        self._disordered_postbacks.discard(api_key)
        held = self._held_postback.pop(api_key, None)
        if held is not None:
            self._queue_postback(held)

    def issue_request_token(self, api_key: str) -> str:
        """What Kite's login redirect hands the app: a one-use token for ``/session/token``."""
        token = secrets.token_hex(16)
        self._account(api_key).request_tokens.add(token)
        return token

    def access_token(self, api_key: str) -> str | None:
        return self._account(api_key).access_token

    def set_access_token(self, api_key: str, token: str) -> None:
        """Make ``token`` the key's valid access token (the old one stops working)."""
        self._account(api_key).access_token = token

    def expire_token(self, api_key: str) -> int:
        """Invalidate the key's token, close its connections; returns how many were closed."""
        self._account(api_key).access_token = None
        closed = 0
        for conn in self._live(api_key):
            conn.queue("close", b"access token expired")
            closed += 1
        log.info("kitesim.token_expired", api_key=api_key, connections_closed=closed)
        return closed

    def _account(self, api_key: str) -> _Account:
        try:
            return self._accounts[api_key]
        except KeyError:
            raise KeyError(f"unknown api_key: {api_key}") from None

    def _authorised(self, api_key: str | None, access_token: str | None) -> _Account | None:
        account = self._accounts.get(api_key or "")
        if account is None or account.access_token is None or not access_token:
            return None
        if not secrets.compare_digest(account.access_token, access_token):
            return None
        return account

    # --- inspection -----------------------------------------------------------------------

    def _live(self, api_key: str | None) -> list[_Connection]:
        return [c for c in self._connections.values() if api_key is None or c.api_key == api_key]

    def connection_count(self, api_key: str | None = None) -> int:
        return len(self._live(api_key))

    def connection_attempts(self, api_key: str) -> int:
        """Every upgrade attempt with this key, including rejected ones."""
        account = self._accounts.get(api_key)
        return account.attempts if account else self._unknown_attempts.get(api_key, 0)

    def connections(self, api_key: str | None = None) -> list[ConnectionInfo]:
        return [
            ConnectionInfo(
                id=c.id,
                api_key=c.api_key,
                subscriptions=dict(c.subscriptions),
                ticks_sent=c.ticks_sent,
                frames_sent=c.frames_sent,
            )
            for c in self._live(api_key)
        ]

    def subscriptions(self, api_key: str | None = None) -> dict[int, str]:
        """token -> mode over the key's live connections (a later connection wins a clash)."""
        out: dict[int, str] = {}
        for conn in self._live(api_key):
            out.update(conn.subscriptions)
        return out

    def ticks_sent_to(self, api_key: str) -> int:
        return self._account(api_key).ticks_sent

    def orders(self, api_key: str) -> list[dict[str, Any]]:
        return [history[-1] for history in self._account(api_key).orders.values()]

    def order_history(self, api_key: str, order_id: str) -> list[dict[str, Any]]:
        """Every state the order went through, oldest first (as ``/orders/{order_id}``)."""
        return [dict(state) for state in self._account(api_key).orders[order_id]]

    # --- fault injection ------------------------------------------------------------------

    async def drop_connections(self, api_key: str | None = None) -> int:
        """Abort the TCP connections (no close frame), as a network failure would."""
        dropped = 0
        for conn in self._live(api_key):
            if conn.transport is not None:
                conn.transport.abort()
            self._connections.pop(conn.id, None)
            conn.wake.set()
            dropped += 1
        log.info("kitesim.dropped", api_key=api_key, connections=dropped)
        return dropped

    def stall(self, api_key: str | None = None) -> None:
        """Keep sockets open but send nothing (ticks, heartbeats, text, pongs) until resume()."""
        if api_key is None:
            self._stalled_all = True
        else:
            self._stalled_keys.add(api_key)

    def stall_current(self, api_key: str) -> int:
        """Stall the key's live sockets only (a half-dead path): new connections stream.

        Returns how many were stalled; ``resume`` ends it, and so does the socket's close.
        """
        ids = {conn.id for conn in self._live(api_key)}
        self._stalled_ids |= ids
        return len(ids)

    def resume(self) -> None:
        self._stalled_all = False
        self._stalled_keys.clear()
        self._stalled_ids.clear()
        for conn in self._connections.values():
            conn.wake.set()

    def clear_faults(self) -> None:
        """Forget every fault armed and not yet taken (REST faults, stalls, history holes,
        RMS rejections, muted order updates, disordered postbacks): the simulator behaves as
        Kite again."""
        self._faults.clear()
        self._history_holes.clear()
        self._rms_rejections.clear()
        for account in self._accounts.values():
            account.updates_muted = False
        for api_key in list(self._disordered_postbacks):
            self.disorder_postbacks(api_key, enabled=False)
        self.resume()

    def _is_stalled(self, conn: _Connection) -> bool:
        return self._stalled_all or conn.api_key in self._stalled_keys or conn.id in self._stalled_ids

    def omit_history(self, token: int, start_epoch_s: float, end_epoch_s: float) -> None:
        """Historical answers leave out ``token``'s candles starting in [start, end] (epoch s)."""
        self._history_holes.setdefault(int(token), []).append((start_epoch_s, end_epoch_s))

    def send_malformed(
        self,
        api_key: str | None = None,
        *,
        kind: Literal["truncated", "unknown_length", "count_exceeds", "text"] = "truncated",
    ) -> int:
        """Queue one broken frame to each live connection; returns how many got one."""
        frames: dict[str, tuple[str, bytes | str]] = {
            # The header promises a 184-byte packet but only 20 bytes follow.
            "truncated": ("binary", b"\x00\x01\x00\xb8" + b"\x01" * 20),
            # A 13-byte packet, which no Kite packet kind has.
            "unknown_length": ("binary", b"\x00\x01\x00\x0d" + b"\x02" * 13),
            # Three packets promised, one LTP packet present.
            "count_exceeds": ("binary", b"\x00\x03\x00\x08" + b"\x00\x03\xe9\x09\x00\x00\x27\x10"),
            "text": ("text", "{not json"),
        }
        item = frames[kind]
        targets = self._live(api_key)
        for conn in targets:
            conn.queue(*item)
        return len(targets)

    def push_text(self, api_key: str, payload: dict[str, Any]) -> int:
        """Send a text message (e.g. ``{"type": "message", "data": ...}``) to the key's sockets."""
        text = orjson.dumps(payload).decode()
        targets = self._live(api_key)
        for conn in targets:
            conn.queue("text", text)
        return len(targets)

    def _add_fault(self, route: str, fault: _Fault) -> None:
        self._faults.setdefault(route, deque()).append(fault)

    def fail_next(
        self,
        route: str,
        status: int = 500,
        error_type: str = "GeneralException",
        *,
        message: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` calls of ``route`` with Kite's error body and ``status``."""
        self._add_fault(
            route,
            _Fault(
                kind="fail",
                times=times,
                status=status,
                error_type=error_type,
                message=message or f"Simulated {error_type} ({status})",
            ),
        )

    def corrupt_next(
        self,
        route: str,
        *,
        kind: Literal["truncated", "wrong_shape", "html"] = "truncated",
        times: int = 1,
    ) -> None:
        """Answer the next calls of ``route`` with a malformed body.

        ``truncated``: JSON cut short; ``wrong_shape``: valid JSON whose data lacks every
        expected field; ``html``: a 502 page from a proxy in front of Kite.
        """
        self._add_fault(route, _Fault(kind="corrupt", times=times, corruption=kind))

    def drop_next(self, route: str, *, times: int = 1) -> None:
        """Close the next calls' TCP connections without an answer."""
        self._add_fault(route, _Fault(kind="drop", times=times))

    def reject_next_orders(self, message: str = RMS_MARGIN_MESSAGE, *, times: int = 1) -> None:
        """Accept the next ``times`` placements and reject the orders, as Kite's risk checks
        do, with ``message`` as their ``status_message``."""
        self._rms_rejections.extend([message] * times)

    def drop_response_next(self, route: str, *, times: int = 1) -> None:
        """Handle the next calls of ``route`` (an order is placed, modified or cancelled) and
        then close their TCP connections without the answer: Kite's ambiguous failure."""
        self._add_fault(route, _Fault(kind="drop_response", times=times))

    def delay_next(self, route: str, delay_s: float, *, times: int = 1) -> None:
        """Answer the next calls of ``route`` only after ``delay_s`` (for client timeouts)."""
        self._add_fault(route, _Fault(kind="delay", times=times, delay_s=delay_s))

    def _take_fault(self, route: str) -> _Fault | None:
        queue = self._faults.get(route)
        if not queue:
            return None
        fault = queue[0]
        fault.times -= 1
        if fault.times <= 0:
            queue.popleft()
        return fault

    # --- HTTP plumbing --------------------------------------------------------------------

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler):
        try:
            return await handler(request)
        except KiteApiError as exc:
            return _error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            error_type = "GeneralException"
            return _error_response(
                KiteApiError(status=exc.status, error_type=error_type, message=exc.reason)
            )

    def _add_routes(self, app: web.Application) -> None:
        e = self._endpoint
        app.router.add_get(WS_PATH, self._ws_handler)
        app.router.add_get(LOGIN_PATH, self._login_page)
        app.router.add_get("/instruments", e("market.instruments.all", self._instruments, auth=False))
        app.router.add_get(
            "/instruments/historical/{instrument_token}/{interval}",
            e("market.historical", self._historical),
        )
        app.router.add_get(
            "/instruments/{exchange}", e("market.instruments", self._instruments, auth=False)
        )
        app.router.add_get("/quote", e("market.quote", self._quote))
        app.router.add_get("/quote/ohlc", e("market.quote.ohlc", self._ohlc))
        app.router.add_get("/quote/ltp", e("market.quote.ltp", self._ltp))
        app.router.add_post("/session/token", e("api.token", self._session_token, auth=False))
        app.router.add_delete(
            "/session/token", e("api.token.invalidate", self._session_invalidate, auth=False)
        )
        app.router.add_get("/user/profile", e("user.profile", self._profile))
        app.router.add_get("/user/margins", e("user.margins", self._margins))
        app.router.add_get("/user/margins/{segment}", e("user.margins.segment", self._margins))
        app.router.add_get("/orders", e("orders", self._orders))
        app.router.add_get("/orders/{order_id}/trades", e("order.trades", self._order_trades))
        app.router.add_get("/orders/{order_id}", e("order.info", self._order_info))
        app.router.add_post("/orders/{variety}", e("order.place", self._place_order))
        app.router.add_put("/orders/{variety}/{order_id}", e("order.modify", self._modify_order))
        app.router.add_delete(
            "/orders/{variety}/{order_id}", e("order.cancel", self._cancel_order)
        )
        app.router.add_get("/trades", e("trades", self._trades))
        app.router.add_get("/portfolio/positions", e("portfolio.positions", self._positions))
        app.router.add_get("/portfolio/holdings", e("portfolio.holdings", self._holdings))

    def _endpoint(
        self,
        route: str,
        handler: Callable[[web.Request, _Account | None], Awaitable[web.StreamResponse]],
        *,
        auth: bool = True,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap a handler with the version check, faults, auth and rate limits of ``route``."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.rest_requests[route] = self.rest_requests.get(route, 0) + 1
            if self.require_kite_version and request.headers.get("X-Kite-Version") != KITE_VERSION:
                raise _input_error("Missing or invalid `X-Kite-Version` header; expected 3.")
            fault = self._take_fault(route)
            if fault is not None:
                if fault.kind == "delay":
                    await asyncio.sleep(fault.delay_s)
                elif fault.kind != "drop_response":
                    return self._faulty_response(request, fault)
            account = self._auth(request) if auth else None
            if account is not None and self.enforce_rate_limits:
                self._rate_limit(account, route)
            response = await handler(request, account)
            if fault is not None and fault.kind == "drop_response":
                self.responses_dropped += 1
                if request.transport is not None:
                    request.transport.abort()
                raise web.HTTPServiceUnavailable()  # never delivered: the socket is gone
            return response

        wrapped.__name__ = f"kitesim_{route.replace('.', '_')}"
        return wrapped

    def _faulty_response(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        if fault.kind == "fail":
            return _error_response(
                KiteApiError(status=fault.status, error_type=fault.error_type, message=fault.message)
            )
        if fault.kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPServiceUnavailable()  # never delivered: the socket is gone
        if fault.corruption == "html":
            return web.Response(
                status=502,
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        if fault.corruption == "wrong_shape":
            return _success({"unexpected": True})
        return web.Response(
            body=b'{"status": "success", "data": {"NSE:INFY": {"last_pri',
            content_type="application/json",
        )

    def _auth(self, request: web.Request) -> _Account:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        api_key, _, access_token = credentials.partition(":")
        account = self._authorised(api_key, access_token) if scheme == "token" else None
        if account is None:
            raise KiteApiError(status=403, error_type="TokenException", message=TOKEN_ERROR_MESSAGE)
        return account

    def _rate_limit(self, account: _Account, route: str) -> None:
        if route in _QUOTE_ROUTES:
            bucket, limit = "quote", QUOTE_REQUESTS_PER_S
        elif route in _HISTORICAL_ROUTES:
            bucket, limit = "historical", HISTORICAL_REQUESTS_PER_S
        else:
            bucket, limit = "other", OTHER_REQUESTS_PER_S
        window = account.rate_windows.setdefault(bucket, deque())
        now = self._monotonic()
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= limit:
            raise KiteApiError(status=429, error_type="NetworkException", message=RATE_ERROR_MESSAGE)
        window.append(now)

    # --- REST: market data ----------------------------------------------------------------

    async def _instruments(self, request: web.Request, _: _Account | None) -> web.Response:
        exchange = request.match_info.get("exchange")
        body = self.market.instruments_csv(exchange)
        return web.Response(text=body, content_type="text/csv")

    def _resolve(self, request: web.Request) -> list[tuple[str, int]]:
        keys = request.query.getall("i", [])
        if not keys:
            raise _input_error("No instruments specified (`i`).")
        if len(keys) > QUOTE_MAX_INSTRUMENTS_PER_CALL:
            raise _input_error(
                f"Too many instruments: got {len(keys)}, at most "
                f"{QUOTE_MAX_INSTRUMENTS_PER_CALL} per call."
            )
        out: list[tuple[str, int]] = []
        for key in keys:
            if key.isdigit():
                token = int(key)
                if self.market.has_token(token):
                    out.append((key, token))
                continue
            with contextlib.suppress(KeyError):  # Kite leaves unknown instruments out
                out.append((key, self.market.token_of(key)))
        return out

    async def _quote(self, request: web.Request, _: _Account | None) -> web.Response:
        resolved = self._resolve(request)
        quotes = self.market.quote([t for _, t in resolved])
        return _success({key: quotes[token] for key, token in resolved})

    async def _ohlc(self, request: web.Request, _: _Account | None) -> web.Response:
        resolved = self._resolve(request)
        quotes = self.market.quote([t for _, t in resolved])
        return _success(
            {
                key: {
                    "instrument_token": token,
                    "last_price": quotes[token]["last_price"],
                    "ohlc": quotes[token]["ohlc"],
                }
                for key, token in resolved
            }
        )

    async def _ltp(self, request: web.Request, _: _Account | None) -> web.Response:
        resolved = self._resolve(request)
        quotes = self.market.quote([t for _, t in resolved])
        return _success(
            {
                key: {"instrument_token": token, "last_price": quotes[token]["last_price"]}
                for key, token in resolved
            }
        )

    async def _historical(self, request: web.Request, _: _Account | None) -> web.Response:
        interval = request.match_info["interval"]
        max_days = HISTORICAL_MAX_DAYS_PER_INTERVAL.get(interval)
        if max_days is None:
            raise _input_error(f"Invalid `interval`: {interval}.")
        raw_token = request.match_info["instrument_token"]
        if not raw_token.isdigit() or not self.market.has_token(int(raw_token)):
            raise _input_error(f"invalid token: {raw_token}")
        start = self._parse_when(request.query.get("from"), "from")
        end = self._parse_when(request.query.get("to"), "to")
        if end < start:
            raise _input_error("Invalid `from` and `to` dates: `to` is before `from`.")
        if (end - start).days > max_days:
            raise _input_error(f"interval exceeds max limit: {max_days} days")
        oi = request.query.get("oi", "0") in ("1", "true")
        candles = self.market.historical(int(raw_token), start, end, interval, oi=oi)
        holes = self._history_holes.get(int(raw_token))
        if holes:
            candles = [
                c for c in candles
                if not any(lo <= _candle_epoch_s(c[0]) <= hi for lo, hi in holes)
            ]
        return _success({"candles": candles})

    @staticmethod
    def _parse_when(value: str | None, name: str) -> datetime:
        if not value:
            raise _input_error(f"Missing `{name}` date.")
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
            try:
                return datetime.strptime(value, fmt)
            except ValueError:
                continue
        raise _input_error(f"Invalid `{name}` date: {value!r}.")

    # --- REST: session and user -----------------------------------------------------------

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        """Stands in for a successful login on Kite's page: redirect with a request token."""
        api_key = request.query.get("api_key", "")
        account = self._accounts.get(api_key)
        if account is None:
            raise _input_error(f"Invalid `api_key`: {api_key!r}.")
        if not account.redirect_url:
            raise _input_error(f"No redirect URL registered for api_key {api_key!r}.")
        request_token = self.issue_request_token(api_key)
        target = URL(account.redirect_url).update_query(
            action="login", type="login", status="success", request_token=request_token
        )
        raise web.HTTPFound(location=str(target))

    async def _session_token(self, request: web.Request, _: _Account | None) -> web.Response:
        form = await request.post()
        api_key = str(form.get("api_key", ""))
        request_token = str(form.get("request_token", ""))
        checksum = str(form.get("checksum", ""))
        account = self._accounts.get(api_key)
        if account is None:
            raise KiteApiError(status=403, error_type="TokenException", message="Invalid `api_key`.")
        expected = hashlib.sha256(
            (api_key + request_token + account.api_secret).encode("utf-8")
        ).hexdigest()
        if not secrets.compare_digest(expected, checksum):
            raise KiteApiError(status=403, error_type="TokenException", message="Invalid `checksum`.")
        if request_token not in account.request_tokens:
            raise KiteApiError(
                status=403, error_type="TokenException", message="Token is invalid or has expired."
            )
        account.request_tokens.discard(request_token)
        account.access_token = secrets.token_hex(16)
        log.info("kitesim.session_created", api_key=api_key, user_id=account.user_id)
        return _success(
            {
                **self._user(account),
                "api_key": api_key,
                "access_token": account.access_token,
                "public_token": secrets.token_hex(16),
                "enctoken": secrets.token_hex(24),
                "refresh_token": "",
                "silo": "",
                "login_time": _stamp(self._clock()),
            }
        )

    async def _session_invalidate(self, request: web.Request, _: _Account | None) -> web.Response:
        api_key = request.query.get("api_key", "")
        access_token = request.query.get("access_token", "")
        account = self._authorised(api_key, access_token)
        if account is None:
            raise KiteApiError(status=403, error_type="TokenException", message=TOKEN_ERROR_MESSAGE)
        self.expire_token(api_key)
        return _success(True)

    @staticmethod
    def _user(account: _Account) -> dict[str, Any]:
        return {
            "user_id": account.user_id,
            "user_type": "individual",
            "email": f"{account.user_id.lower()}@example.invalid",
            "user_name": f"Simulated {account.user_id}",
            "user_shortname": account.user_id,
            "broker": "ZERODHA",
            "exchanges": ["NSE", "NFO", "BFO", "CDS", "BSE", "MCX", "BCD", "MF"],
            "products": ["CNC", "NRML", "MIS", "BO", "CO"],
            "order_types": ["MARKET", "LIMIT", "SL", "SL-M"],
            "avatar_url": None,
            "meta": {"demat_consent": "physical"},
        }

    async def _profile(self, _: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        return _success(self._user(account))

    async def _margins(self, request: web.Request, _: _Account | None) -> web.Response:
        def segment_margins() -> dict[str, Any]:
            cash = 1_000_000.0
            return {
                "enabled": True,
                "net": cash,
                "available": {
                    "adhoc_margin": 0,
                    "cash": cash,
                    "opening_balance": cash,
                    "live_balance": cash,
                    "collateral": 0,
                    "intraday_payin": 0,
                },
                "utilised": dict.fromkeys(
                    (
                        "debits",
                        "exposure",
                        "m2m_realised",
                        "m2m_unrealised",
                        "option_premium",
                        "payout",
                        "span",
                        "holding_sales",
                        "turnover",
                        "liquid_collateral",
                        "stock_collateral",
                        "delivery",
                    ),
                    0,
                ),
            }

        segment = request.match_info.get("segment")
        if segment is None:
            return _success({"equity": segment_margins(), "commodity": segment_margins()})
        if segment not in ("equity", "commodity"):
            raise _input_error(f"Invalid segment: {segment}.")
        return _success(segment_margins())

    # --- REST: orders and portfolio -------------------------------------------------------

    async def _place_order(self, request: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        variety = request.match_info["variety"]
        if variety not in _VARIETIES:
            raise _input_error(f"Invalid `variety`: {variety}.")
        try:
            form = _PlaceOrderForm.model_validate(dict(await request.post()))
        except ValidationError as exc:
            raise _input_error(_validation_message(exc)) from None
        key = f"{form.exchange}:{form.tradingsymbol}"
        try:
            token = self.market.token_of(key)
        except KeyError:
            raise _input_error(f"Invalid `tradingsymbol`: {key}.") from None
        instrument = self.market.instrument(token)
        if instrument["segment"] == "INDICES":
            raise _input_error(f"{key} is an index and cannot be traded.")
        lot = int(instrument["lot_size"]) or 1
        if form.quantity % lot:
            raise _input_error(f"Quantity should be a multiple of lot size {lot}.")
        if form.order_type in ("LIMIT", "SL") and not form.price:
            raise _input_error("`price` is required for LIMIT and SL orders.")
        if form.order_type in ("SL", "SL-M") and not form.trigger_price:
            raise _input_error("`trigger_price` is required for SL and SL-M orders.")
        order_id = str(self._next_order_id)
        self._next_order_id += 1
        now = _stamp(self._clock())
        order = {
            "placed_by": account.user_id,
            "order_id": order_id,
            "exchange_order_id": None,
            "parent_order_id": None,
            "status": "OPEN",
            "status_message": None,
            "status_message_raw": None,
            "order_timestamp": now,
            "exchange_update_timestamp": None,
            "exchange_timestamp": None,
            "variety": variety,
            "modified": False,
            "exchange": form.exchange,
            "tradingsymbol": form.tradingsymbol,
            "instrument_token": token,
            "order_type": form.order_type,
            "transaction_type": form.transaction_type,
            "validity": form.validity,
            "product": form.product,
            "quantity": form.quantity,
            "disclosed_quantity": form.disclosed_quantity,
            "price": form.price or 0,
            "trigger_price": form.trigger_price or 0,
            "average_price": 0,
            "filled_quantity": 0,
            "pending_quantity": form.quantity,
            "cancelled_quantity": 0,
            "market_protection": form.market_protection,
            "meta": {},
            "tag": form.tag,
            "guid": secrets.token_hex(8),
        }
        account.orders[order_id] = [{**order, "status": "PUT ORDER REQ RECEIVED"}]
        if self._rms_rejections:
            # Kite accepts the call and its risk checks reject the order a moment later.
            message = self._rms_rejections.popleft()
            order.update(status="REJECTED", status_message=message, status_message_raw=message,
                         pending_quantity=0)
        self._record_order(account, order)
        self._try_fill(account, order_id)
        return _success({"order_id": order_id})

    def _record_order(self, account: _Account, order: dict[str, Any]) -> None:
        account.orders[order["order_id"]].append(order)
        self._send_order_update(account, order)

    def replay_order_update(self, api_key: str, order_id: str, *, index: int = -1) -> None:
        """Send state ``index`` of the order's history again (an older one: out of order)."""
        account = self._account(api_key)
        self._send_order_update(account, account.orders[order_id][index], replay=True)

    def _send_order_update(
        self, account: _Account, order: dict[str, Any], *, replay: bool = False
    ) -> None:
        """One order change to the key's ticker sockets and, as Kite chooses, its postback URL."""
        if account.updates_muted:
            return
        update = {
            **order,
            "user_id": account.user_id,
            "unfilled_quantity": order["pending_quantity"],
            "app_id": _APP_ID,
        }
        self.push_text(account.api_key, {"type": "order", "data": {**update, "checksum": ""}})
        first_open = order["status"] == "OPEN" and not order["modified"] and not order["filled_quantity"]
        if account.postback_url is None or (first_open and not replay):
            return
        update["checksum"] = postback_checksum(
            order_id=order["order_id"],
            order_timestamp=order["order_timestamp"],
            api_secret=account.api_secret,
        )
        item = (account.postback_url, order["order_id"], order["status"], orjson.dumps(update))
        if account.api_key not in self._disordered_postbacks:
            self._queue_postback(item)
            return
        # Disordered: each postback twice, and each pair in swapped order (the later first).
        held = self._held_postback.pop(account.api_key, None)
        if held is None:
            self._held_postback[account.api_key] = item
            asyncio.get_running_loop().call_later(
                _DISORDER_HOLD_S, self._release_held_postback, account.api_key, item
            )
            return
        for queued in (item, item, held, held):
            self._queue_postback(queued)

    def _queue_postback(self, item: tuple[str, str, str, bytes]) -> None:
        assert self._postback_queue is not None, "order updates are sent only while started"
        try:
            self._postback_queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("kitesim.postback_dropped", order_id=item[1], reason="queue full")

    def _release_held_postback(self, api_key: str, item: tuple[str, str, str, bytes]) -> None:
        """A held postback with no later one to swap with goes out alone (twice) after a while."""
        if self._held_postback.get(api_key) is item:
            del self._held_postback[api_key]
            self._queue_postback(item)
            self._queue_postback(item)

    async def _postback_loop(self, queue: asyncio.Queue[tuple[str, str, str, bytes]]) -> None:
        """POST queued postbacks one at a time, in order, as raw JSON bodies (as Kite does)."""
        timeout = ClientTimeout(total=_POSTBACK_TIMEOUT_S)
        async with ClientSession(timeout=timeout) as session:
            while True:
                url, order_id, status, body = await queue.get()
                http_status: int | None = None
                try:
                    async with session.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as response:
                        http_status = response.status
                        await response.read()
                except (ClientError, TimeoutError) as exc:
                    log.warning("kitesim.postback_failed", order_id=order_id, error=str(exc)[:200])
                self.postbacks.append(
                    {"url": url, "order_id": order_id, "status": status, "http_status": http_status}
                )

    def _try_fill(self, account: _Account, order_id: str) -> None:
        """Fill an open order if the market is through its price (trigger orders rest).

        With ``max_fill_quantity`` a match fills at most that many (whole lots); the rest
        stays OPEN and is matched again on the next market step: partial fills, one trade each.
        """
        order = dict(account.orders[order_id][-1])
        if order["status"] != "OPEN" or order["order_type"] in ("SL", "SL-M"):
            return
        token = order["instrument_token"]
        last = float(self.market.quote([token])[token]["last_price"])
        buy = order["transaction_type"] == "BUY"
        if order["order_type"] == "LIMIT" and (
            (buy and order["price"] < last) or (not buy and order["price"] > last)
        ):
            return
        fill_price = last if order["order_type"] == "MARKET" else order["price"]
        fill_quantity = order["pending_quantity"]
        if self.max_fill_quantity is not None:
            lot = int(self.market.instrument(token)["lot_size"]) or 1
            fill_quantity = min(fill_quantity, max(lot, self.max_fill_quantity // lot * lot))
        now = _stamp(self._clock())
        exchange_order_id = str(int(order_id) + 100_000_000_000_000)
        filled = order["filled_quantity"] + fill_quantity
        order.update(
            status="COMPLETE" if filled == order["quantity"] else "OPEN",
            exchange_order_id=exchange_order_id,
            exchange_timestamp=order["exchange_timestamp"] or now,
            exchange_update_timestamp=now,
            average_price=round(
                (order["average_price"] * order["filled_quantity"] + fill_price * fill_quantity) / filled, 4
            ),
            filled_quantity=filled,
            pending_quantity=order["quantity"] - filled,
        )
        trade = {
            "trade_id": str(self._next_trade_id),
            "order_id": order_id,
            "exchange": order["exchange"],
            "tradingsymbol": order["tradingsymbol"],
            "instrument_token": token,
            "product": order["product"],
            "average_price": fill_price,
            "quantity": fill_quantity,
            "exchange_order_id": exchange_order_id,
            "transaction_type": order["transaction_type"],
            "fill_timestamp": now,
            "order_timestamp": now[11:],
            "exchange_timestamp": now,
        }
        self._next_trade_id += 1
        account.trades.append(trade)
        self._record_order(account, order)

    def _match_open_orders(self) -> None:
        """After a market step: match every resting order against the new prices."""
        for account in self._accounts.values():
            for order_id, history in list(account.orders.items()):
                if history[-1]["status"] == "OPEN":
                    self._try_fill(account, order_id)

    def _open_order(self, account: _Account, request: web.Request) -> dict[str, Any]:
        order_id = request.match_info["order_id"]
        history = account.orders.get(order_id)
        if history is None:
            raise _input_error(f"Couldn't find that `order_id`: {order_id}.")
        order = dict(history[-1])
        if order["variety"] != request.match_info["variety"]:
            raise _input_error(f"Invalid `variety` for order {order_id}.")
        if order["status"] != "OPEN":
            raise _input_error(f"Order {order_id} cannot be changed: it is {order['status']}.")
        return order

    async def _modify_order(self, request: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        order = self._open_order(account, request)
        try:
            form = _ModifyOrderForm.model_validate(dict(await request.post()))
        except ValidationError as exc:
            raise _input_error(_validation_message(exc)) from None
        changes = {k: v for k, v in form.model_dump().items() if v is not None}
        if account.modifications.get(order["order_id"], 0) >= MAX_MODIFICATIONS_PER_ORDER:
            raise KiteApiError(status=400, error_type="InputException", message=MODIFICATIONS_ERROR_MESSAGE)
        if "quantity" in changes:
            if changes["quantity"] < order["filled_quantity"]:
                raise _input_error("Quantity cannot be less than the filled quantity.")
            changes["pending_quantity"] = changes["quantity"] - order["filled_quantity"]
        account.modifications[order["order_id"]] = account.modifications.get(order["order_id"], 0) + 1
        order.update(changes, modified=True, order_timestamp=_stamp(self._clock()))
        self._record_order(account, order)
        self._try_fill(account, order["order_id"])
        return _success({"order_id": order["order_id"]})

    async def _cancel_order(self, request: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        order = self._open_order(account, request)
        order.update(
            status="CANCELLED",
            cancelled_quantity=order["pending_quantity"],
            pending_quantity=0,
            exchange_update_timestamp=_stamp(self._clock()),
        )
        self._record_order(account, order)
        return _success({"order_id": order["order_id"]})

    async def _orders(self, _: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        return _success([history[-1] for history in account.orders.values()])

    async def _order_info(self, request: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        order_id = request.match_info["order_id"]
        history = account.orders.get(order_id)
        if history is None:
            raise _input_error(f"Couldn't find that `order_id`: {order_id}.")
        return _success(history)

    async def _order_trades(self, request: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        order_id = request.match_info["order_id"]
        if order_id not in account.orders:
            raise _input_error(f"Couldn't find that `order_id`: {order_id}.")
        return _success([t for t in account.trades if t["order_id"] == order_id])

    async def _trades(self, _: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        return _success(list(account.trades))

    async def _positions(self, _: web.Request, account: _Account | None) -> web.Response:
        assert account is not None
        by_key: dict[tuple[int, str], dict[str, Any]] = {}
        for trade in account.trades:
            key = (trade["instrument_token"], trade["product"])
            p = by_key.setdefault(
                key,
                {"trade": trade, "buy_q": 0, "buy_v": 0.0, "sell_q": 0, "sell_v": 0.0},
            )
            side = "buy" if trade["transaction_type"] == "BUY" else "sell"
            p[f"{side}_q"] += trade["quantity"]
            p[f"{side}_v"] += trade["quantity"] * trade["average_price"]
        tokens = [token for token, _ in by_key]
        quotes = self.market.quote(tokens) if tokens else {}
        net = [self._position(p, quotes[token]) for (token, _), p in by_key.items()]
        return _success({"net": net, "day": [dict(p) for p in net]})

    @staticmethod
    def _position(p: dict[str, Any], quote: dict[str, Any]) -> dict[str, Any]:
        trade = p["trade"]
        buy_q, sell_q, buy_v, sell_v = p["buy_q"], p["sell_q"], p["buy_v"], p["sell_v"]
        quantity = buy_q - sell_q
        last = quote["last_price"]
        pnl = sell_v - buy_v + quantity * last
        buy_price = buy_v / buy_q if buy_q else 0
        sell_price = sell_v / sell_q if sell_q else 0
        return {
            "tradingsymbol": trade["tradingsymbol"],
            "exchange": trade["exchange"],
            "instrument_token": trade["instrument_token"],
            "product": trade["product"],
            "quantity": quantity,
            "overnight_quantity": 0,
            "multiplier": 1,
            "average_price": buy_price if quantity >= 0 else sell_price,
            "close_price": quote["ohlc"]["close"],
            "last_price": last,
            "value": sell_v - buy_v,
            "pnl": round(pnl, 2),
            "m2m": round(pnl, 2),
            "unrealised": round(pnl, 2),
            "realised": 0,
            "buy_quantity": buy_q,
            "buy_price": buy_price,
            "buy_value": buy_v,
            "buy_m2m": buy_v,
            "sell_quantity": sell_q,
            "sell_price": sell_price,
            "sell_value": sell_v,
            "sell_m2m": sell_v,
            "day_buy_quantity": buy_q,
            "day_buy_price": buy_price,
            "day_buy_value": buy_v,
            "day_sell_quantity": sell_q,
            "day_sell_price": sell_price,
            "day_sell_value": sell_v,
        }

    async def _holdings(self, _: web.Request, account: _Account | None) -> web.Response:
        return _success([])

    # --- WebSocket ------------------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        api_key = request.query.get("api_key", "")
        access_token = request.query.get("access_token", "")
        account = self._accounts.get(api_key)
        if account is not None:
            account.attempts += 1
        else:
            self._unknown_attempts[api_key] = self._unknown_attempts.get(api_key, 0) + 1
        if self._authorised(api_key, access_token) is None:
            log.info("kitesim.ws.rejected", api_key=api_key, status=403)
            return web.Response(status=403, text="403 Forbidden: invalid api_key or access_token")
        if self.connection_count(api_key) >= MAX_CONNECTIONS_PER_API_KEY:
            log.info("kitesim.ws.rejected", api_key=api_key, status=429)
            return web.Response(status=429, text="429 Too Many Requests: connection limit reached")
        ws = web.WebSocketResponse(
            autoping=False, compress=False, timeout=_CLOSE_TIMEOUT_S, max_msg_size=_MAX_MESSAGE_BYTES
        )
        conn = _Connection(
            id=self._next_connection_id, api_key=api_key, ws=ws, transport=request.transport
        )
        self._next_connection_id += 1
        # Registered before the first await, so concurrent upgrades see each other in the count.
        self._connections[conn.id] = conn
        try:
            await ws.prepare(request)
            log.info("kitesim.ws.connected", api_key=api_key, connection=conn.id)
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._writer(conn), name=f"kitesim.writer.{conn.id}")
                try:
                    await self._reader(conn)
                finally:
                    writer.cancel()
        except ConnectionError as exc:
            log.info("kitesim.ws.connection_lost", api_key=api_key, connection=conn.id, error=str(exc))
        finally:
            self._connections.pop(conn.id, None)
            self._stalled_ids.discard(conn.id)
            log.info(
                "kitesim.ws.closed", api_key=api_key, connection=conn.id, ticks_sent=conn.ticks_sent
            )
        return ws

    async def _reader(self, conn: _Connection) -> None:
        async for msg in conn.ws:
            if msg.type == WSMsgType.TEXT:
                self._control(conn, msg.data)
            elif msg.type == WSMsgType.PING:
                if not self._is_stalled(conn):
                    await conn.ws.pong(msg.data)
            elif msg.type == WSMsgType.ERROR:
                return
            if conn.id not in self._connections:
                return  # dropped by fault injection

    def _control(self, conn: _Connection, text: str) -> None:
        try:
            message = _CONTROL_MESSAGE.validate_json(text)
        except ValidationError:
            conn.queue("text", orjson.dumps({"type": "error", "data": "Invalid message"}).decode())
            return
        if isinstance(message, _ModeMessage):
            mode, tokens = message.v
            for token in tokens:
                if token in conn.subscriptions:
                    conn.subscriptions[token] = mode
        elif message.a == "unsubscribe":
            for token in message.v:
                conn.subscriptions.pop(token, None)
        else:
            refused = 0
            for token in message.v:
                if (
                    token not in conn.subscriptions
                    and len(conn.subscriptions) >= MAX_INSTRUMENTS_PER_CONNECTION
                ):
                    refused += 1
                    continue
                conn.subscriptions[token] = MODE_QUOTE
            if refused:
                conn.queue(
                    "text",
                    orjson.dumps(
                        {
                            "type": "error",
                            "data": f"Subscription limit of {MAX_INSTRUMENTS_PER_CONNECTION} "
                            f"instruments per connection exceeded; {refused} not subscribed",
                        }
                    ).decode(),
                )
            self._subscribed.set()
        conn.invalidate()

    async def _writer(self, conn: _Connection) -> None:
        """Send what the connection is owed: queued messages, due ticks, heartbeats."""
        try:
            await self._write_loop(conn)
        except ConnectionError as exc:  # the peer went away mid-send; the reader ends too
            log.info("kitesim.ws.send_failed", api_key=conn.api_key, connection=conn.id, error=str(exc))

    async def _write_loop(self, conn: _Connection) -> None:
        heartbeat_s = self.heartbeat_interval_ms / 1000.0
        conn.last_sent_s = time.monotonic()
        while conn.id in self._connections and not conn.ws.closed:
            stalled = self._is_stalled(conn)
            # Stalled, only a wake (a tick, resume, a close) can change anything: no timeout.
            timeout = None if stalled else heartbeat_s - (time.monotonic() - conn.last_sent_s)
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.wake.wait(), timeout=timeout)
            conn.wake.clear()
            if conn.id not in self._connections:
                return
            if self._is_stalled(conn):
                if any(kind == "close" for kind, _ in conn.outbox):  # an expired token still closes
                    await conn.ws.close(code=_CLOSE_POLICY_VIOLATION, message=b"access token expired")
                    return
                continue
            while conn.outbox:
                kind, payload = conn.outbox.popleft()
                if kind == "close":
                    await conn.ws.close(code=_CLOSE_POLICY_VIOLATION, message=payload)
                    return
                if kind == "text":
                    await conn.ws.send_str(payload)  # type: ignore[arg-type]
                else:
                    await conn.ws.send_bytes(payload)  # type: ignore[arg-type]
                conn.last_sent_s = time.monotonic()
            conn.drained.set()
            if conn.tick_due:
                conn.tick_due = False
                await self._send_ticks(conn)
            if time.monotonic() - conn.last_sent_s >= heartbeat_s:
                await conn.ws.send_bytes(HEARTBEAT_FRAME)
                conn.last_sent_s = time.monotonic()

    def _groups(self, conn: _Connection) -> list[tuple[np.ndarray, int]]:
        """The connection's known subscribed instruments as (market rows, packet length) runs."""
        if conn.groups is None:
            tokens = np.fromiter(conn.subscriptions.keys(), dtype=np.int64)
            modes = np.array(list(conn.subscriptions.values()), dtype="<U5")
            rows, known = self.market.locate(tokens)
            lengths = (
                self.market.packet_lengths(rows, modes[known])
                if len(rows)
                else np.zeros(0, np.uint16)
            )
            conn.groups = [
                (rows[lengths == length], int(length)) for length in np.unique(lengths).tolist()
            ]
        return conn.groups

    def build_frames(self, conn_groups: list[tuple[np.ndarray, int]]) -> list[bytes]:
        """Binary frames carrying one packet per row, at most ``max_packets_per_frame`` each."""
        probe = (time.time_ns() // 1_000_000) & _PROBE_MASK if self.latency_probe else None
        frames: list[bytes] = []
        parts: list[bytes] = []
        count = 0
        limit = self.max_packets_per_frame
        for rows, length in conn_groups:
            start = 0
            while start < len(rows):
                take = min(limit - count, len(rows) - start)
                ticks = self.market.ticks_at(rows[start : start + take], length)
                if probe is not None and length == PACKET_FULL:
                    ticks["last_trade_time"] = probe
                # Packets of one length encode as one numpy array; frames may mix kinds in
                # any order, so runs are concatenated after their own 2-byte headers.
                parts.append(encode_frame(ticks)[2:])
                count += take
                start += take
                if count == limit:
                    frames.append(count.to_bytes(2, "big") + b"".join(parts))
                    parts, count = [], 0
        if count:
            frames.append(count.to_bytes(2, "big") + b"".join(parts))
        return frames

    async def _send_ticks(self, conn: _Connection) -> None:
        groups = self._groups(conn)
        if not groups:
            return
        n = sum(len(rows) for rows, _ in groups)
        for frame in self.build_frames(groups):
            await conn.ws.send_bytes(frame)
            conn.frames_sent += 1
            self.frames_sent += 1
            self.bytes_sent += len(frame)
        conn.ticks_sent += n
        self.ticks_sent += n
        account = self._accounts.get(conn.api_key)
        if account is not None:
            account.ticks_sent += n
        conn.last_sent_s = time.monotonic()

    async def _tick_loop(self) -> None:
        """Step the market and mark a tick due on every connection, every tick interval."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            interval_s = self.tick_interval_ms / 1000.0
            deadline += interval_s
            delay = deadline - loop.time()
            if delay < 0:
                deadline = loop.time()  # behind: skip missed intervals rather than burst
            else:
                await asyncio.sleep(delay)
            if self.step_market:
                self.market.step()
                self._match_open_orders()
            for conn in self._connections.values():
                conn.tick_due = True
                conn.wake.set()

    # --- replay ---------------------------------------------------------------------------

    async def _drained(self, conn: _Connection) -> None:
        """Wait until the connection's writer has sent its outbox, or the connection is gone."""
        while conn.outbox and conn.id in self._connections:
            conn.drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.drained.wait(), timeout=_REPLAY_POLL_S)

    def _replay_target(self) -> _Connection | None:
        """The oldest live connection that has subscribed: it receives the recording."""
        return next((c for c in self._connections.values() if c.subscriptions), None)

    async def _replay_loop(self, replay: ReplaySource) -> None:
        """Send the recording's messages at their recorded pace (divided by its speed)."""
        loop = asyncio.get_running_loop()
        origin: tuple[float, int] | None = None  # (loop time, receive ns) the pace counts from
        if self._replay_start is not None:
            await self._replay_start.wait()
        for received_ns, message in replay.messages():
            if origin is not None:
                delay = origin[0] + (received_ns - origin[1]) / 1e9 / replay.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            conn = self._replay_target()
            while conn is None:
                # No one to send to (not yet subscribed, or reconnecting): wait, then go on
                # from here at the recorded pace rather than in a burst.
                self._subscribed.clear()
                await self._subscribed.wait()
                conn = self._replay_target()
                origin = None
            if origin is None:
                origin = (loop.time(), received_ns)
            if len(conn.outbox) >= _REPLAY_MAX_OUTBOX:
                await self._drained(conn)  # the writer is behind: queue no more than it sends
            is_text = isinstance(message, str)
            conn.queue("text" if is_text else "binary", message)
            replay.sent += 1
            replay.last_sent_s = time.monotonic()
            if replay.first_sent_s is None:
                replay.first_sent_s = replay.last_sent_s
            if not is_text:
                replay.binary_bytes_sent += len(message)
        if (conn := self._replay_target()) is not None:
            await self._drained(conn)
        log.info("kitesim.replay_finished", sent=replay.sent, damage=str(replay.damage or ""))
        self.replay_finished.set()


# --- a simulator for synchronous code --------------------------------------------------------


class SimulatorThread:
    """Run a KiteSimulator on its own event loop in a daemon thread, for synchronous callers.

    ``with SimulatorThread(sim) as t:`` starts it and exposes ``t.http_url`` / ``t.ws_url``.
    The market and the simulator belong to that loop: touch them only through ``t.call(fn,
    ...)`` (a plain function run on the loop) or ``t.run(coro)`` (a coroutine awaited there).
    """

    def __init__(self, sim: KiteSimulator, *, start_timeout_s: float = 10.0) -> None:
        self.sim = sim
        self._start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def http_url(self) -> str:
        return self.sim.http_url

    @property
    def ws_url(self) -> str:
        return self.sim.ws_url

    @property
    def login_url(self) -> str:
        return self.sim.login_url

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="kitesim", daemon=True)
        self._thread.start()
        if not self._started.wait(self._start_timeout_s):
            raise TimeoutError(f"KiteSimulator did not start within {self._start_timeout_s} s")
        if self._error is not None:
            raise RuntimeError("KiteSimulator failed to start") from self._error

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            await self.sim.start()
        except OSError as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            await self._stopped.wait()
        finally:
            await self.sim.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=self._start_timeout_s)
        self._loop = None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the simulator's loop and return its result."""

        async def on_loop() -> T:
            return fn(*args, **kwargs)

        return self.run(on_loop())

    def run(self, coro: Awaitable[T], *, timeout_s: float | None = None) -> T:
        """Await ``coro`` on the simulator's loop and return its result."""
        if self._loop is None:
            raise RuntimeError("SimulatorThread not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout=timeout_s or self._start_timeout_s)
