"""The WebSocket API for browsers and programs (protocol v1, docs/websocket-protocol.md).

One :class:`TickerConsumer` per connection. It resolves what a client subscribes to (tokens,
``EXCHANGE:TRADINGSYMBOL`` or a whole chain) through the selectors, joins the channel-layer
groups those instruments publish to, asks the engines for the latest state of each, and then
forwards the engine's pre-serialised snapshot items, keeping only its own instruments.

Delivery is latest-wins under credit-based flow control. Every ``snapshots`` frame carries a
``seq``; the client acknowledges with ``{"action": "ack", "seq": n}``. At most ``send_window``
frames are unacknowledged at any time. While the window is full, arriving items only
overwrite the pending bytes of their token (a dict bounded by the connection's subscriptions)
and each overwrite counts as a drop. Daphne does not apply back-pressure to ASGI sends (it
buffers whatever it is given), so this window, not TCP, is what keeps memory per connection
bounded when a client stops reading: at most ``send_window`` frames in daphne's buffers plus
one item per subscribed instrument here.

Each connection re-joins its groups every few minutes (``group_refresh_s``, a third of the
layer's ``group_expiry``): channels-redis's RedisChannelLayer forgets a member that has not
re-joined within ``group_expiry``, which would otherwise leave a long-open page silently
frozen; a member left behind by a failed disconnect expires just as soon. When Redis restarts
it forgets every group at once: the process's :class:`~streaming.layer_watch.LayerRestartWatch`
sees that within a second and every connection re-joins then. On its RedisPubSubChannelLayer
(CHANNEL_LAYER_BACKEND=pubsub) the web process holds its groups and subscribes again after a
reconnect, and re-joining costs nothing.

Input is bounded before it costs anything (docs/security.md, H1): a :class:`BoundedInbox`
takes frames off daphne's unbounded per-connection queue as they arrive and closes a client
that lets too many pile up; an oversized frame is dropped unread; a frame larger than an ack
counts against the message rate before it is parsed; a subscribe naming more instruments than
the connection has room for is refused before its references are validated or looked up, so
the lookup on channels' shared database thread is bounded; and a :class:`ConnectionCounter`
caps the connections of one user and of one client address.

Order events (``{"action": "subscribe", "orders": ...}``) are not latest-wins: each one is
sent as it comes, outside the snapshot window (they are few and each one matters). A
connection joins ``orders.<account_id>`` only for accounts its user may see
(``accounts_visible_to``), and re-checks that at most every ``ORDERS_RECHECK_S`` while
events arrive, so a grant taken away in the admin stops the events within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice
from typing import Any

import orjson
import structlog
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import DatabaseError
from django.utils import timezone
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from accounts.order_selectors import accounts_visible_to
from accounts.positions import PositionsReader, accounts_for_positions
from accounts.revocation import WS_REVOKED_MESSAGE_TYPE, ws_auth_groups
from streaming import schema, status
from streaming.engine.universe import UNIVERSE_FIELDS, InstrumentUniverse, UniverseError
from streaming.greeks import IST
from streaming.health import heartbeat_list_fresh
from streaming.layer_watch import LayerRestartWatch
from streaming.protocol import (
    MAX_BARS_SUBSCRIPTIONS,
    MAX_TEXT_FRAME_BYTES,
    RECENT_BARS,
    SUBPROTOCOL,
    Ack,
    ChainSpec,
    CloseCode,
    ErrorCode,
    InstrumentRef,
    Ping,
    Positions,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    analytics_series_message,
    bar_message,
    bars_message,
    error_message,
    hello_message,
    order_frame,
    orders_subscribed_message,
    orders_unsubscribed_message,
    parse_client_message,
    pong_message,
    positions_message,
    positions_stopped_message,
    snapshots_frame,
    subscribed_messages,
    text_frame_bytes,
    unsubscribed_message,
)
from streaming.selectors import bar_list_recent, chain_minute_list_day
from streaming.snapshots import SnapshotReader
from subscriptions.models import Instrument
from subscriptions.selectors import (
    instrument_list_by_symbols,
    instrument_list_by_tokens,
    instrument_list_chain,
    instrument_nearest_future_price,
    subscription_tokens_active,
)
from subscriptions.underlyings import underlying_spot

log = structlog.get_logger(__name__)

MAX_ITEMS_PER_FRAME = 1000
"""A frame never carries more items, so a 9000-instrument subscribe becomes 9 frames (and the
window bounds bytes in flight, not only frames)."""
MAX_FRAME_BYTES = 512 * 1024
"""... and never more bytes of items (daphne refuses to send a message over 1 MiB)."""
MAX_UNRESOLVED_REPORTED = 100
"""An ``unknown_instrument`` error lists at most this many references."""
SMALL_FRAME_BYTES = 256
"""A frame up to this size (an ack, a ping) is parsed before it is counted, so that acks of
new frames stay free; a larger one is counted against the rate limit first."""
INBOX_MAX_BYTES = 4 * MAX_TEXT_FRAME_BYTES
"""Bytes of client frames waiting for the consumer before the connection is closed."""
ORDERS_RECHECK_S = 5.0
"""How stale a connection's knowledge of which accounts its user may see may get."""


def visible_account_labels(*, user: Any) -> dict[int, str]:
    """The broker accounts whose orders ``user`` may see: id -> label."""
    return dict(accounts_visible_to(user=user).values_list("id", "label"))


class WebSocketMetrics:
    """Prometheus metrics of the web process's WebSocket connections, in a registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections = Gauge(
            "tickerproj_ws_connections", "Open authenticated WebSocket connections.", registry=registry
        )
        self.frames_sent = Counter(
            "tickerproj_ws_frames_sent", "Snapshot frames sent to clients.", registry=registry
        )
        self.items_sent = Counter(
            "tickerproj_ws_items_sent", "Instrument snapshots sent to clients.", registry=registry
        )
        self.items_dropped = Counter(
            "tickerproj_ws_items_dropped",
            "Snapshots overwritten by a newer one of the same instrument before a slow client "
            "acknowledged enough frames to receive it (latest-wins).",
            registry=registry,
        )
        self.client_messages = Counter(
            "tickerproj_ws_client_messages",
            "Client messages received, by action (invalid ones as 'invalid', large ones the "
            "rate limit refused before reading them as 'unread').",
            ["action"],
            registry=registry,
        )
        self.errors = Counter(
            "tickerproj_ws_errors", "Error messages sent to clients, by code.", ["code"],
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """The consumer's limits, read once from Django settings at the edge (tickerproj/asgi.py)."""

    max_subscriptions: int
    max_messages_per_s: int
    send_window: int
    heartbeat_max_age_s: float
    flood_factor: int = 5
    """A client sending more than this many times the message limit in one second is closed."""
    group_refresh_s: float = 300.0
    """How often a connection re-joins its groups: channels-redis forgets a member after
    ``group_expiry`` and forgets every group when Redis restarts without persistence, and a
    trading desk keeps its chain page open for days. A third of ``WS_GROUP_EXPIRY_S``."""
    max_connections_per_user: int = 20
    max_connections_per_ip: int = 100
    positions_push_interval_s: float = 2.0
    positions_snapshot_timeout_s: float = 1.0
    layer_redis_url: str = ""
    """The channel layer's Redis, watched for a restart that forgot every group
    (streaming/layer_watch.py); empty: the in-memory layer, nothing to watch."""
    layer_prefix: str = "tickerproj"
    layer_check_s: float = 1.0
    """How often a process checks that Redis still has the layer's groups."""

    @classmethod
    def from_settings(cls, settings: Any) -> ConsumerSettings:
        return cls(
            max_subscriptions=settings.WS_MAX_SUBSCRIPTIONS,
            max_messages_per_s=settings.WS_MAX_MESSAGES_PER_S,
            send_window=settings.WS_SEND_WINDOW,
            heartbeat_max_age_s=settings.HEALTH_HEARTBEAT_MAX_AGE_S,
            group_refresh_s=settings.WS_GROUP_EXPIRY_S / 3,
            max_connections_per_user=settings.WS_MAX_CONNECTIONS_PER_USER,
            max_connections_per_ip=settings.WS_MAX_CONNECTIONS_PER_IP,
            positions_push_interval_s=settings.POSITIONS_PUSH_INTERVAL_S,
            positions_snapshot_timeout_s=settings.POSITIONS_SNAPSHOT_TIMEOUT_S,
            layer_redis_url=settings.REDIS_URL,
            layer_prefix=settings.CHANNEL_LAYER_PREFIX,
        )

    @property
    def inbox_max_messages(self) -> int:
        """Frames waiting for the consumer: more than a second's flood limit is a flood."""
        return self.max_messages_per_s * self.flood_factor

    def limits(self) -> dict[str, int]:
        return {
            "max_subscriptions": self.max_subscriptions,
            "max_messages_per_s": self.max_messages_per_s,
            "send_window": self.send_window,
            "max_items_per_frame": MAX_ITEMS_PER_FRAME,
        }


class Verdict(Enum):
    OK = "ok"
    LIMITED = "limited"
    FLOOD = "flood"


class MessageRateLimiter:
    """Counts one connection's messages in one-second windows.

    Hand-written rather than taken from ``limits``: its limiters key a shared storage, while
    here one integer per connection, owned by one task, is all the state there is.
    """

    def __init__(self, *, per_s: int, flood_factor: int, clock: Callable[[], float]) -> None:
        self._per_s = per_s
        self._flood = per_s * flood_factor
        self._clock = clock
        self._window_start = -1.0
        self._count = 0

    def hit(self) -> Verdict:
        now = self._clock()
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count > self._flood:
            return Verdict.FLOOD
        if self._count > self._per_s:
            return Verdict.LIMITED
        return Verdict.OK


class ConnectionCounter:
    """This web process's open WebSocket connections, per user and per client address.

    One per application (streaming/routing.py), shared by its consumers on the one event loop,
    so plain counters need no lock. Per process: N web processes allow N times the limits.
    """

    def __init__(self, *, per_user: int, per_ip: int) -> None:
        self._per_user = per_user
        self._per_ip = per_ip
        self._users: Tally[str] = Tally()
        self._ips: Tally[str] = Tally()

    def acquire(self, *, user: str, ip: str | None) -> str | None:
        """Count one more connection, or (counting nothing) say why it is refused."""
        if self._users[user] >= self._per_user:
            return f"this user already has {self._users[user]} open connections (limit {self._per_user})"
        if ip is not None and self._ips[ip] >= self._per_ip:
            return f"this address already has {self._ips[ip]} open connections (limit {self._per_ip})"
        self._users[user] += 1
        if ip is not None:
            self._ips[ip] += 1
        return None

    def release(self, *, user: str, ip: str | None) -> None:
        self._users[user] -= 1
        if self._users[user] <= 0:
            del self._users[user]
        if ip is not None:
            self._ips[ip] -= 1
            if self._ips[ip] <= 0:
                del self._ips[ip]


OVERFLOW_MESSAGE_TYPE = "inbox.overflow"


class BoundedInbox:
    """Takes one connection's frames off daphne's queue as they arrive, within bounds.

    daphne puts every client frame (up to its 1 MiB ``--websocket-max-message-size``) on an
    unbounded per-connection asyncio.Queue that the consumer empties one message at a time;
    while the consumer awaits a lookup, a client could pile frames up there without limit.
    This pump keeps that queue empty: an oversized frame becomes a small marker (its payload
    dropped unread), and when more than ``max_messages`` frames or ``max_bytes`` wait here the
    consumer is told once (``inbox.overflow``) and every later frame is discarded until the
    disconnect. Hand-written: channels and daphne have no per-connection inbound bound.
    """

    def __init__(
        self,
        upstream: Callable[[], Awaitable[dict[str, Any]]],
        *,
        max_messages: int,
        max_bytes: int,
        max_frame_bytes: int,
    ) -> None:
        self._upstream = upstream
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._max_frame_bytes = max_frame_bytes
        self._queue: asyncio.Queue[tuple[dict[str, Any], int]] = asyncio.Queue()
        self._bytes = 0
        self._overflowed = False

    async def pump(self) -> None:
        """Move frames from daphne to here until the disconnect (run as the consumer's task)."""
        while True:
            message = await self._upstream()
            size = 0
            if message.get("type") == "websocket.receive":
                if self._overflowed:
                    continue
                text = message.get("text")
                size = text_frame_bytes(text) if text is not None else len(message.get("bytes") or b"")
                if size > self._max_frame_bytes:
                    message, size = {"type": "websocket.receive", "oversized": size}, 0
                if (
                    self._queue.qsize() >= self._max_messages
                    or self._bytes + size > self._max_bytes
                ):
                    self._overflowed = True
                    message = {
                        "type": OVERFLOW_MESSAGE_TYPE,
                        "waiting": self._queue.qsize(),
                        "waiting_bytes": self._bytes,
                    }
                    size = 0
            self._bytes += size
            self._queue.put_nowait((message, size))
            if message.get("type") == "websocket.disconnect":
                return

    async def receive(self) -> dict[str, Any]:
        message, size = await self._queue.get()
        self._bytes -= size
        return message


# --- resolving what a client asks for ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedInstrument:
    token: int
    group: str
    exchange: str
    tradingsymbol: str
    description: dict[str, Any]


@dataclass(slots=True)
class Resolution:
    instruments: list[ResolvedInstrument] = field(default_factory=list)
    unresolved: list[Any] = field(default_factory=list)
    chain: dict[str, Any] | None = None
    bars: dict[str, list[bytes]] = field(default_factory=dict)
    """Underlying name -> its recent bars' JSON, oldest first."""
    unknown_bars: list[str] = field(default_factory=list)
    series: list[dict[str, Any]] | None = None
    """The chain's intraday series (``analytics_series`` points), when a chain resolved."""


def instrument_kind(instrument: Instrument) -> str:
    """CE / PE / FUT / EQ / INDEX, as in the snapshot schema."""
    if instrument.segment == "INDICES":
        return "INDEX"
    return instrument.instrument_type


def _describe(instrument: Instrument, *, group: str, streamed: bool) -> ResolvedInstrument:
    kind = instrument_kind(instrument)
    return ResolvedInstrument(
        token=instrument.instrument_token,
        group=group,
        exchange=instrument.exchange,
        tradingsymbol=instrument.tradingsymbol,
        description={
            "token": instrument.instrument_token,
            "exchange": instrument.exchange,
            "tradingsymbol": instrument.tradingsymbol,
            "name": instrument.name,
            "kind": kind,
            "expiry": instrument.expiry.isoformat() if instrument.expiry else None,
            "strike": instrument.strike if instrument.is_option else None,
            "streamed": streamed,
        },
    )


def _universe_row(instrument: Instrument) -> dict[str, Any]:
    return {f: getattr(instrument, f) for f in UNIVERSE_FIELDS}


def instrument_groups(instruments: Sequence[Instrument]) -> dict[int, str]:
    """The channel-layer group each instrument publishes to, computed exactly as the engine
    does (through InstrumentUniverse); instruments the engine could not place are left out."""
    try:
        universe = InstrumentUniverse.from_rows(_universe_row(i) for i in instruments)
    except UniverseError:
        # One bad row (e.g. an option without expiry): place the others one by one.
        return _groups_one_by_one(instruments)
    return {i.instrument_token: universe.group_of(i.instrument_token) for i in instruments}


def _groups_one_by_one(instruments: Sequence[Instrument]) -> dict[int, str]:
    groups = {}
    for i in instruments:
        try:
            universe = InstrumentUniverse.from_rows([_universe_row(i)])
        except UniverseError as exc:
            log.warning("ws.instrument_unplaceable", token=i.instrument_token, error=str(exc))
            continue
        groups[i.instrument_token] = universe.group_of(i.instrument_token)
    return groups


def reference_price(
    *, underlying: str, expiry: dt.date, heartbeat_max_age_s: float, now: dt.datetime
) -> tuple[float | None, str | None]:
    """The price that decides the at-the-money strike, and where it came from.

    In order: the engines' forward for this expiry, their underlying price (both fresh by
    ``streaming.status.live_prices``), the stored price of the nearest future. None when
    nothing is known.
    """
    parsed = status.parse_heartbeats(
        heartbeat_list_fresh(since=now - dt.timedelta(seconds=heartbeat_max_age_s))
    )
    for exc in parsed.errors:
        log.error("ws.engine_status_invalid", engine=exc.engine_id, error=exc.error)
    # The page shows what the engines stream, mock prices included.
    live = status.live_prices(parsed.statuses, now_s=now.timestamp(),
                              max_age_s=heartbeat_max_age_s, include_mock=True).get(underlying)
    quote = live.for_expiry(expiry) if live is not None else None
    if quote is not None:
        return quote
    today = timezone.localdate(now)  # the exchange's date (TIME_ZONE is Asia/Kolkata)
    future = instrument_nearest_future_price(underlying=underlying, on_or_after=today)
    if future is not None:
        return future, "future"
    return None, None


def _resolve_chain(
    spec: ChainSpec, *, heartbeat_max_age_s: float, now: dt.datetime
) -> tuple[list[Instrument], dict[str, Any] | None]:
    options = list(instrument_list_chain(underlying=spec.underlying, expiry=spec.expiry))
    if not options:
        return [], None
    strikes = sorted({o.strike for o in options})
    price, source = reference_price(
        underlying=spec.underlying,
        expiry=spec.expiry,
        heartbeat_max_age_s=heartbeat_max_age_s,
        now=now,
    )
    if price is None:
        # Nothing known about the price: the middle of the listed strikes is the best guess.
        price, source = strikes[len(strikes) // 2], "strikes"
    atm_index = min(range(len(strikes)), key=lambda i: abs(strikes[i] - price))
    if spec.strikes_around_atm is not None:
        n = spec.strikes_around_atm
        kept = set(strikes[max(0, atm_index - n) : atm_index + n + 1])
        options = [o for o in options if o.strike in kept]
    info = {
        "underlying": spec.underlying,
        "expiry": spec.expiry.isoformat(),
        "strikes_around_atm": spec.strikes_around_atm,
        "atm_strike": strikes[atm_index],
        "reference_price": price,
        "reference": source,
        "strikes": sorted({o.strike for o in options}),
    }
    return options, info


def recent_bar_items(*, name: str) -> list[bytes] | None:
    """The recent stored bars of an underlying's spot as bar JSON; None for an unknown name."""
    spot = underlying_spot(name=name)
    if spot is None:
        return None
    return [
        schema.encode_bar(
            token=bar.instrument_id,
            name=name,
            start_epoch_s=int(bar.start.timestamp()),
            open=bar.open,
            high=bar.high,
            low=bar.low,
            close=bar.close,
            volume=bar.volume,
            ticks=bar.tick_count,
            is_gap=bar.is_gap,
            is_mock=bar.is_mock,
            backfilled=bar.backfilled,
        )
        for bar in bar_list_recent(instrument_token=spot.instrument_token, limit=RECENT_BARS)
    ]


def chain_series(*, underlying: str, expiry: dt.date, now: dt.datetime) -> list[dict[str, Any]]:
    """Today's (IST) stored minutes of a chain as ``analytics_series`` points."""
    rows = chain_minute_list_day(underlying=underlying, expiry=expiry, day=now.astimezone(IST).date())
    return [
        {
            "ts": int(row.minute.timestamp()) * 1000,
            "atm_iv": row.atm_iv,
            "straddle": row.straddle,
            "pcr_oi": row.pcr_oi,
        }
        for row in rows
    ]


def resolve_selection(
    *,
    refs: Sequence[InstrumentRef],
    chain: ChainSpec | None,
    heartbeat_max_age_s: float,
    bars: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> Resolution:
    """Instruments, chain and bars named by a subscribe message, with what could not be found
    (sync, DB)."""
    now = now or dt.datetime.now(dt.UTC)
    result = Resolution()
    for name in bars:
        items = recent_bar_items(name=name)
        if items is None:
            result.unknown_bars.append(name)
        else:
            result.bars[name] = items
    found: dict[int, Instrument] = {}
    tokens = [r.token for r in refs if r.token is not None]
    if tokens:
        by_token = {i.instrument_token: i for i in instrument_list_by_tokens(tokens=tokens)}
        found.update(by_token)
        result.unresolved.extend(t for t in dict.fromkeys(tokens) if t not in by_token)
    keys = [(r.exchange, r.tradingsymbol) for r in refs if r.token is None]
    if keys:
        by_key = {
            (i.exchange, i.tradingsymbol): i for i in instrument_list_by_symbols(keys=keys)
        }
        for key in dict.fromkeys(keys):
            if key in by_key:
                found[by_key[key].instrument_token] = by_key[key]
            else:
                result.unresolved.append(f"{key[0]}:{key[1]}")
    if chain is not None:
        options, result.chain = _resolve_chain(
            chain, heartbeat_max_age_s=heartbeat_max_age_s, now=now
        )
        if not options:
            result.unresolved.append(
                {"underlying": chain.underlying, "expiry": chain.expiry.isoformat()}
            )
        else:
            result.series = chain_series(
                underlying=options[0].name, expiry=chain.expiry, now=now
            )
        found.update((o.instrument_token, o) for o in options)
    streamed = subscription_tokens_active(tokens=list(found))
    groups = instrument_groups(list(found.values()))
    result.instruments = [
        _describe(found[t], group=groups[t], streamed=t in streamed) for t in found if t in groups
    ]
    result.unresolved.extend(t for t in found if t not in groups)
    return result


# --- the consumer -----------------------------------------------------------------------------


class TickerConsumer(AsyncWebsocketConsumer):
    """One WebSocket connection: subscriptions, flow-controlled snapshots, errors, never a crash."""

    def __init__(
        self,
        *,
        config: ConsumerSettings,
        metrics: WebSocketMetrics,
        connections: ConnectionCounter,
        layer_watch: LayerRestartWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._config = config
        self._metrics = metrics
        self._connections = connections
        self._layer_watch = layer_watch
        self._holder: tuple[str, str | None] | None = None  # (user, ip) counted in _connections
        self._limiter = MessageRateLimiter(
            per_s=config.max_messages_per_s, flood_factor=config.flood_factor, clock=clock
        )
        self._open = False
        self._counted = False
        self._subs: dict[int, str] = {}  # token -> group
        self._symbols: dict[tuple[str, str], int] = {}  # (exchange, symbol) -> token
        self._group_refs: dict[str, int] = {}  # group -> subscribed tokens in it
        self._pending: dict[int, bytes] = {}  # token -> latest unsent item
        self._chains: set[str] = set()  # chain groups subscribed as chains: they get analytics
        self._pending_analytics: dict[str, str] = {}  # chain group -> latest unsent analytics
        self._bars: dict[str, str] = {}  # bars group -> underlying name as followed
        self._seq = 0  # last frame sent
        self._acked = 0  # last frame acknowledged
        self._dropped = 0
        self._frames = 0
        self._refresher: asyncio.Task | None = None
        self._positions: asyncio.Task | None = None
        self._positions_seq = 0
        self._auth_groups: list[str] = []
        self._orders: dict[int, str] = {}  # account id -> its orders group
        self._orders_checked_at = 0.0
        self._clock = clock
        self._log = log

    # Channels' dispatch closes stale DB connections (a thread hop) before every message; the
    # snapshot hot path never touches the database and resolve_selection runs through
    # database_sync_to_async, which does that itself.
    async def dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "snapshots.batch":
            await self.snapshots_batch(message)
        elif kind == schema.ORDER_EVENT_TYPE:
            await self.order_event(message)
        elif kind == schema.CHAIN_ANALYTICS_TYPE:
            await self.chain_analytics(message)
        elif kind == schema.BAR_CLOSED_TYPE:
            await self.bar_closed(message)
        elif kind == "websocket.receive":
            await self.websocket_receive(message)
        elif kind == "websocket.connect":
            await self.websocket_connect(message)
        elif kind == "websocket.disconnect":
            await self.websocket_disconnect(message)
        elif kind == OVERFLOW_MESSAGE_TYPE:
            await self._inbox_overflow(message)
        elif kind == WS_REVOKED_MESSAGE_TYPE:
            await self._credential_revoked(message)
        else:
            # Another component's message sent to this channel: not ours to act on.
            self._log.warning("ws.unexpected_message", type=str(kind)[:60])

    # --- connection life ----------------------------------------------------------------------

    async def connect(self) -> None:
        offered = self.scope.get("subprotocols") or []
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        await self.accept(subprotocol)
        user = self.scope.get("user")
        auth = self.scope.get("auth_method", "session")
        self._log = log.bind(auth=auth, client=_client_label(self.scope))
        if self.scope.get("token_via_subprotocol") and subprotocol is None:
            await self._refuse(
                ErrorCode.SUBPROTOCOL_REQUIRED,
                f"a token sent as a subprotocol must come with the {SUBPROTOCOL!r} subprotocol",
                CloseCode.SUBPROTOCOL_REQUIRED,
            )
            return
        if user is None or not user.is_authenticated:
            why = {
                "invalid_token": "invalid or revoked API token",
                "scope_missing": "the API token lacks the 'read' scope",
            }.get(self.scope.get("auth_error"), "log in, or send an API token")
            await self._refuse(ErrorCode.UNAUTHORIZED, why, CloseCode.UNAUTHORIZED)
            return
        holder = (str(user.pk), self.scope["client"][0] if self.scope.get("client") else None)
        if (refused := self._connections.acquire(user=holder[0], ip=holder[1])) is not None:
            await self._refuse(
                ErrorCode.TOO_MANY_CONNECTIONS, refused, CloseCode.TOO_MANY_CONNECTIONS
            )
            return
        self._holder = holder
        self._open = True
        self._counted = True
        # Revoking the token, deactivating the user or logging out closes this socket.
        self._auth_groups = ws_auth_groups(self.scope)
        for group in self._auth_groups:
            await self.channel_layer.group_add(group, self.channel_name)
        # Owned by this consumer: cancelled and awaited when it disconnects or is cancelled.
        self._refresher = asyncio.create_task(
            self._refresh_groups(), name=f"ws-group-refresh:{self.channel_name}"
        )
        self._metrics.connections.inc()
        self._log = self._log.bind(user=user.get_username())
        self._log.info("ws.connected")
        await self.send(
            text_data=hello_message(user=user.get_username(), auth=auth, limits=self._config.limits())
        )

    async def _credential_revoked(self, message: dict[str, Any]) -> None:
        self._log.info("ws.credential_revoked", reason=str(message.get("reason"))[:60])
        await self._refuse(ErrorCode.UNAUTHORIZED, str(message.get("reason")), CloseCode.UNAUTHORIZED)
        await self.disconnect(CloseCode.UNAUTHORIZED)

    async def _refuse(self, code: ErrorCode, message: str, close_code: int) -> None:
        self._log.info("ws.refused", code=str(code))
        await self._send_error(code, message)
        await self.close(close_code)

    async def __call__(self, scope, receive, send) -> None:
        inbox = BoundedInbox(
            receive,
            max_messages=self._config.inbox_max_messages,
            max_bytes=INBOX_MAX_BYTES,
            max_frame_bytes=MAX_TEXT_FRAME_BYTES,
        )
        # Owned here: cancelled and awaited below, whatever ends the connection.
        pump = asyncio.create_task(inbox.pump(), name="ws-inbox")
        try:
            await super().__call__(scope, inbox.receive, send)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            # Also when daphne cancels the application instead of sending a disconnect.
            if self._counted:
                try:
                    await self.disconnect(1006)
                except (OSError, RedisError) as exc:
                    self._log.warning("ws.cleanup_failed", error=str(exc)[:200])
            await self._stop_refresher()
            await self._stop_positions()

    async def _stop_refresher(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def disconnect(self, code: int) -> None:
        self._open = False
        await self._stop_refresher()
        await self._stop_positions()
        groups = [*self._group_refs, *self._bars, *self._auth_groups, *self._orders.values()]
        self._group_refs.clear()
        self._bars.clear()
        self._chains.clear()
        self._pending_analytics.clear()
        self._auth_groups = []
        self._orders.clear()
        self._subs.clear()
        self._pending.clear()
        if self._counted:
            # Counted off first: a Redis error below must not leave the gauge or the caps high.
            self._counted = False
            self._metrics.connections.dec()
            if self._holder is not None:
                self._connections.release(user=self._holder[0], ip=self._holder[1])
                self._holder = None
            self._log.info(
                "ws.disconnected", code=code, frames=self._frames, dropped=self._dropped
            )
        failed, error = 0, ""
        for group in groups:
            # Every group is tried: one Redis error must not leave the others joined (what
            # is left expires after group_expiry).
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except (OSError, RedisError) as exc:
                failed += 1
                error = str(exc)[:200]
        if failed:
            self._log.warning("ws.group_discard_failed", groups=failed, error=error)

    async def _layer_generation(self) -> int:
        return 0 if self._layer_watch is None else await self._layer_watch.generation()

    async def _refresh_groups(self) -> None:
        """Re-join this connection's groups every ``group_refresh_s``, at once when Redis has
        forgotten them (a restart, seen by the layer watch), for as long as it lives; a
        re-join that meets a Redis error is tried again at the next check."""
        config = self._config
        generation = await self._layer_generation()
        due = time.monotonic() + config.group_refresh_s
        while True:
            await asyncio.sleep(min(config.layer_check_s, config.group_refresh_s))
            seen = await self._layer_generation()
            if seen == generation and time.monotonic() < due:
                continue
            if await self._rejoin_groups():
                generation, due = seen, time.monotonic() + config.group_refresh_s

    async def _rejoin_groups(self) -> bool:
        """Join every group of this connection again; False when Redis did not answer."""
        groups = [*self._group_refs, *self._bars]
        try:
            for group in [*self._auth_groups, *self._orders.values()]:
                await self.channel_layer.group_add(group, self.channel_name)
            for group in groups:
                if self._joined(group):
                    await self.channel_layer.group_add(group, self.channel_name)
            # Left while we were re-joining it: leave again, so nothing leaks.
            for group in groups:
                if not self._joined(group):
                    await self.channel_layer.group_discard(group, self.channel_name)
        except (OSError, RedisError) as exc:
            # Redis is away; the next check re-joins what this one could not.
            self._log.warning("ws.group_refresh_failed", error=str(exc)[:200])
            return False
        return True

    def _joined(self, group: str) -> bool:
        return group in self._group_refs or group in self._bars

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        await self.disconnect(message.get("code", 1006))
        raise StopConsumer

    # --- client messages ----------------------------------------------------------------------

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        if not self._open:
            return  # refused or closing: the client's last words need no answer
        text = message.get("text")
        if "oversized" in message:
            self._metrics.client_messages.labels("invalid").inc()
            if await self._admit():
                await self._send_error(
                    ErrorCode.MESSAGE_TOO_LARGE,
                    f"message of {message['oversized']} bytes exceeds {MAX_TEXT_FRAME_BYTES}; "
                    "it was not read",
                    limit=MAX_TEXT_FRAME_BYTES,
                )
            return
        if text is None:
            self._metrics.client_messages.labels("invalid").inc()
            if await self._admit():
                await self._send_error(
                    ErrorCode.INVALID_MESSAGE,
                    "binary frames are not supported; send JSON objects as text frames",
                )
            return
        # Counted before the parse, which costs in proportion to the frame's size.
        admitted = len(text) > SMALL_FRAME_BYTES
        if admitted and not await self._admit():
            self._metrics.client_messages.labels("unread").inc()
            return
        try:
            msg = parse_client_message(
                text,
                subscribe_room=max(0, self._config.max_subscriptions - len(self._subs)),
                held_tokens=self._subs,
                held_symbols=self._symbols,
            )
        except ProtocolError as exc:
            self._metrics.client_messages.labels("invalid").inc()
            if admitted or await self._admit():
                detail = exc.detail
                if exc.code is ErrorCode.TOO_MANY_SUBSCRIPTIONS:
                    detail = {**detail, "limit": self._config.max_subscriptions,
                              "subscriptions": len(self._subs)}
                await self._send_error(exc.code, exc.message, request_id=exc.request_id, **detail)
            return
        self._metrics.client_messages.labels(msg.action).inc()
        if isinstance(msg, Ack) and self._acked < msg.seq <= self._seq:
            # Acks of new frames are free: their rate is bounded by the server's own sends.
            self._acked = msg.seq
            await self._pump()
            return
        if not admitted and not await self._admit():
            return
        if isinstance(msg, Ack):
            if msg.seq > self._seq:
                await self._send_error(
                    ErrorCode.INVALID_MESSAGE,
                    f"ack of seq {msg.seq}, but the last frame sent is {self._seq}",
                )
            # An ack at or below the last one changes nothing.
        elif isinstance(msg, Ping):
            await self.send(
                text_data=pong_message(request_id=msg.id, server_ts_ms=time.time_ns() // 1_000_000)
            )
        elif isinstance(msg, Subscribe):
            await self._subscribe(msg)
        elif isinstance(msg, Unsubscribe):
            await self._unsubscribe(msg)
        elif isinstance(msg, Positions):
            await self._start_positions(msg)

    async def _admit(self) -> bool:
        """Count one message against the rate limit; False (after answering) if refused."""
        verdict = self._limiter.hit()
        if verdict is Verdict.OK:
            return True
        if verdict is Verdict.LIMITED:
            await self._send_error(
                ErrorCode.RATE_LIMITED,
                f"more than {self._config.max_messages_per_s} messages per second; "
                "this message was ignored",
            )
            return False
        self._log.warning("ws.flood", limit_per_s=self._config.max_messages_per_s)
        await self._close_flooded(
            f"more than {self._config.max_messages_per_s * self._config.flood_factor} "
            "messages in one second; closing"
        )
        return False

    async def _inbox_overflow(self, message: dict[str, Any]) -> None:
        """Too many frames waited unread (docs/security.md, H1): close the connection."""
        if not self._open:
            return
        self._log.warning(
            "ws.inbox_overflow", waiting=message.get("waiting"), waiting_bytes=message.get("waiting_bytes")
        )
        await self._close_flooded(
            f"more than {self._config.inbox_max_messages} messages or {INBOX_MAX_BYTES} bytes "
            "sent faster than they could be handled; closing"
        )

    async def _close_flooded(self, why: str) -> None:
        await self._send_error(ErrorCode.FLOOD, why)
        self._open = False
        await self.close(CloseCode.FLOOD)

    async def _send_error(
        self, code: ErrorCode, message: str, *, request_id: Any = None, **detail: Any
    ) -> None:
        self._metrics.errors.labels(str(code)).inc()
        await self.send(text_data=error_message(code, message, request_id=request_id, **detail))

    async def _join_groups(self, groups: list[str], *, request_id: Any) -> bool:
        """Join ``groups``; on a channel-layer error say so and return False (nothing is
        recorded as subscribed; a group joined before the error expires by group_expiry)."""
        try:
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)
        except (OSError, RedisError) as exc:
            self._log.warning("ws.subscribe_failed", error=str(exc)[:200])
            await self._send_error(
                ErrorCode.UNAVAILABLE,
                "the stream is unavailable (channel layer error); nothing was subscribed, "
                "try again",
                request_id=request_id,
            )
            return False
        return True

    async def _subscribe(self, msg: Subscribe) -> None:
        if msg.orders is not None:
            await self._subscribe_orders(msg)
            return
        bars = list(dict.fromkeys(msg.bars))
        new_bars = [n for n in bars if schema.bars_group(n) not in self._bars]
        if len(self._bars) + len(new_bars) > MAX_BARS_SUBSCRIPTIONS:
            await self._send_error(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"{len(self._bars)} underlyings' bars followed + {len(new_bars)} requested "
                f"exceeds the limit of {MAX_BARS_SUBSCRIPTIONS} per connection; nothing was "
                "subscribed",
                request_id=msg.id,
                limit=MAX_BARS_SUBSCRIPTIONS,
                bars=len(self._bars),
                requested=len(new_bars),
            )
            return
        try:
            # On channels' one shared database thread: bounded work, since a subscribe names
            # at most the connection's room (WS_MAX_SUBSCRIPTIONS) of new instruments and
            # MAX_BARS_PER_MESSAGE underlyings.
            res = await database_sync_to_async(resolve_selection)(
                refs=msg.instruments,
                chain=msg.chain,
                bars=bars,
                heartbeat_max_age_s=self._config.heartbeat_max_age_s,
            )
        except DatabaseError as exc:
            self._log.warning("ws.resolve_failed", error=str(exc)[:200])
            await self._send_error(
                ErrorCode.UNAVAILABLE,
                "the instrument database is unavailable; try again",
                request_id=msg.id,
            )
            return
        new = [i for i in res.instruments if i.token not in self._subs]
        limit = self._config.max_subscriptions
        if len(self._subs) + len(new) > limit:
            await self._send_error(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"{len(self._subs)} subscribed + {len(new)} requested exceeds the limit of "
                f"{limit} per connection; nothing was subscribed",
                request_id=msg.id,
                limit=limit,
                subscriptions=len(self._subs),
                requested=len(new),
            )
            return
        joined = sorted({i.group for i in new} - set(self._group_refs))
        bar_groups = {schema.bars_group(n): n for n in res.bars if schema.bars_group(n) not in self._bars}
        if not await self._join_groups([*joined, *bar_groups], request_id=msg.id):
            return
        for inst in new:
            self._subs[inst.token] = inst.group
            self._symbols[(inst.exchange, inst.tradingsymbol)] = inst.token
            self._group_refs[inst.group] = self._group_refs.get(inst.group, 0) + 1
        self._bars.update(bar_groups)
        chain_group = None
        if msg.chain is not None and res.chain is not None:
            chain_group = schema.chain_group(name=msg.chain.underlying, expiry=msg.chain.expiry)
            if chain_group in self._group_refs:
                self._chains.add(chain_group)
            else:
                chain_group = None  # no option of it could be placed: nothing to analyse
        if res.instruments or res.bars:
            for reply in subscribed_messages(
                request_id=msg.id,
                instruments=[i.description for i in res.instruments],
                chain=res.chain,
                unresolved=res.unresolved,
                subscriptions=len(self._subs),
                bars=sorted(self._bars.values()),
            ):
                await self.send(text_data=reply)
        if res.unresolved:
            await self._send_error(
                ErrorCode.UNKNOWN_INSTRUMENT,
                f"{len(res.unresolved)} instrument(s) not found",
                request_id=msg.id,
                instruments=res.unresolved[:MAX_UNRESOLVED_REPORTED],
            )
        if res.unknown_bars:
            await self._send_error(
                ErrorCode.UNKNOWN_UNDERLYING,
                f"{len(res.unknown_bars)} underlying(s) have no index or equity to take bars "
                "from; they are not followed",
                request_id=msg.id,
                bars=res.unknown_bars,
            )
        for name, items in res.bars.items():
            await self.send(text_data=bars_message(underlying=name, items=items))
        if chain_group is not None and msg.chain is not None:
            await self.send(
                text_data=analytics_series_message(
                    underlying=msg.chain.underlying, expiry=msg.chain.expiry, points=res.series or []
                )
            )
        if res.instruments:
            await self._request_state(msg, tokens=[i.token for i in res.instruments], chain_group=chain_group)

    async def _request_state(self, msg: Subscribe, *, tokens: list[int], chain_group: str | None) -> None:
        """Ask the engines for the current state (and a chain's analytics): they answer this
        channel."""
        try:
            await self.channel_layer.group_send(
                schema.SNAPSHOT_REQUESTS_GROUP,
                schema.snapshot_request_message(reply_to=self.channel_name, tokens=tokens),
            )
            if chain_group is not None:
                await self.channel_layer.group_send(
                    schema.SNAPSHOT_REQUESTS_GROUP,
                    schema.analytics_request_message(
                        reply_to=self.channel_name, groups=[chain_group]
                    ),
                )
        except (OSError, RedisError) as exc:
            # Subscribed: later changes arrive; only the initial state is missing.
            self._log.warning("ws.snapshot_request_failed", error=str(exc)[:200])
            await self._send_error(
                ErrorCode.UNAVAILABLE,
                "subscribed, but the current state could not be requested; it arrives "
                "with the next change",
                request_id=msg.id,
            )

    async def _unsubscribe(self, msg: Unsubscribe) -> None:
        if msg.orders is not None or (msg.all and self._orders):
            accounts = list(self._orders) if msg.orders is True or msg.all else msg.orders
            await self._leave_orders(accounts)
            await self.send(
                text_data=orders_unsubscribed_message(request_id=msg.id, accounts=self._orders)
            )
            if msg.orders is not None:
                return
        if msg.all:
            removed = list(self._subs)
            bar_groups = list(self._bars)
        else:
            removed = self._tokens_named(msg.instruments)
            bar_groups = [g for g in map(schema.bars_group, msg.bars) if g in self._bars]
            if msg.chain is not None:
                group = schema.chain_group(name=msg.chain.underlying, expiry=msg.chain.expiry)
                removed.extend(t for t, g in self._subs.items() if g == group)
                self._chains.discard(group)
                self._pending_analytics.pop(group, None)
        left = []
        gone = []
        for token in dict.fromkeys(removed):
            group = self._subs.pop(token, None)
            if group is None:
                continue
            gone.append(token)
            self._pending.pop(token, None)
            refs = self._group_refs[group] - 1
            if refs == 0:
                del self._group_refs[group]
                left.append(group)
                self._chains.discard(group)
                self._pending_analytics.pop(group, None)
            else:
                self._group_refs[group] = refs
        if gone:
            gone_set = set(gone)
            self._symbols = {k: t for k, t in self._symbols.items() if t not in gone_set}
        bars_gone = [self._bars.pop(g) for g in dict.fromkeys(bar_groups)]
        for group in [*left, *bar_groups]:
            await self.channel_layer.group_discard(group, self.channel_name)
        await self.send(
            text_data=unsubscribed_message(
                request_id=msg.id,
                tokens=gone,
                subscriptions=len(self._subs),
                bars=bars_gone,
            )
        )

    def _tokens_named(self, refs: Iterable[InstrumentRef]) -> list[int]:
        tokens = []
        for ref in refs:
            if ref.token is not None:
                tokens.append(ref.token)
            elif (token := self._symbols.get((ref.exchange, ref.tradingsymbol))) is not None:
                tokens.append(token)
        return tokens

    # --- order events -------------------------------------------------------------------------

    async def _visible_accounts(self) -> dict[int, str]:
        visible = await database_sync_to_async(visible_account_labels)(user=self.scope["user"])
        self._orders_checked_at = self._clock()
        return visible

    async def _subscribe_orders(self, msg: Subscribe) -> None:
        try:
            visible = await self._visible_accounts()
        except DatabaseError as exc:
            self._log.warning("ws.orders_resolve_failed", error=str(exc)[:200])
            await self._send_error(
                ErrorCode.UNAVAILABLE, "the account database is unavailable; try again",
                request_id=msg.id,
            )
            return
        if msg.orders is True:
            wanted = set(visible)
        else:
            unknown = sorted(set(msg.orders) - set(visible))
            if unknown:
                # Not found and not visible read the same: no account's existence leaks.
                await self._send_error(
                    ErrorCode.UNKNOWN_ACCOUNT,
                    f"{len(unknown)} account(s) not found or not visible to you; nothing was "
                    "subscribed",
                    request_id=msg.id,
                    accounts=unknown,
                )
                return
            wanted = set(msg.orders)
        joined = {aid: schema.orders_group(aid) for aid in sorted(wanted - set(self._orders))}
        if not await self._join_groups(list(joined.values()), request_id=msg.id):
            return
        self._orders.update(joined)
        await self.send(
            text_data=orders_subscribed_message(
                request_id=msg.id,
                accounts=[{"id": aid, "label": visible.get(aid, "")} for aid in sorted(self._orders)],
            )
        )

    async def _leave_orders(self, accounts: Iterable[int]) -> None:
        for aid in list(accounts):
            group = self._orders.pop(aid, None)
            if group is not None:
                await self.channel_layer.group_discard(group, self.channel_name)

    async def order_event(self, message: dict[str, Any]) -> None:
        """Send one order event of a subscribed account the user (still) may see."""
        account = message.get("account")
        if not self._open or account not in self._orders:
            return
        if self._clock() - self._orders_checked_at > ORDERS_RECHECK_S:
            try:
                visible = await self._visible_accounts()
            except DatabaseError as exc:
                # Not knowing is not seeing: the event is withheld, the next one asks again.
                self._log.warning("ws.orders_recheck_failed", error=str(exc)[:200])
                return
            lost = [aid for aid in self._orders if aid not in visible]
            if lost:
                self._log.info("ws.orders_access_lost", accounts=lost)
                await self._leave_orders(lost)
                await self.send(
                    text_data=orders_unsubscribed_message(request_id=None, accounts=self._orders)
                )
            if account not in self._orders:
                return
        await self.send(text_data=order_frame(account_id=account, item=message["item"]))

    # --- positions ----------------------------------------------------------------------------

    async def _start_positions(self, msg: Positions) -> None:
        """Replace any running positions push with the one asked for (or just stop it)."""
        await self._stop_positions()
        if not msg.enabled:
            await self.send(text_data=positions_stopped_message(request_id=msg.id))
            return
        # Owned by this consumer: cancelled and awaited on a new request and on disconnect.
        self._positions = asyncio.create_task(
            self._push_positions(msg), name=f"ws-positions:{self.channel_name}"
        )

    async def _stop_positions(self) -> None:
        task, self._positions = self._positions, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _push_positions(self, msg: Positions) -> None:
        """Every ``positions_push_interval_s``: the positions document, as the API's."""
        user = self.scope["user"]
        reader = PositionsReader(kite_ttl_s=self._config.positions_push_interval_s)
        snapshots = SnapshotReader(
            self.channel_layer, timeout_s=self._config.positions_snapshot_timeout_s
        )
        while True:
            try:
                accounts = await database_sync_to_async(accounts_for_positions)(
                    user=user, account_id=msg.account_id
                )
                if accounts is None:
                    await self._send_error(
                        ErrorCode.ACCOUNT_NOT_VISIBLE,
                        f"no account {msg.account_id} visible to you; no positions are pushed",
                        request_id=msg.id,
                    )
                    return
                loaded = await database_sync_to_async(reader.load)(accounts=accounts)
                latest = await snapshots.latest(loaded.streamed)
            except (DatabaseError, OSError, RedisError) as exc:
                self._log.warning("ws.positions_failed", error=str(exc)[:200])
                await self._send_error(
                    ErrorCode.UNAVAILABLE, "positions are unavailable now; retrying",
                    request_id=msg.id,
                )
            else:
                self._positions_seq += 1
                await self.send(text_data=positions_message(
                    request_id=msg.id, seq=self._positions_seq,
                    document=reader.assemble(loaded, latest),
                ))  # fmt: skip
            await asyncio.sleep(self._config.positions_push_interval_s)

    # --- snapshots ----------------------------------------------------------------------------

    async def snapshots_batch(self, message: dict[str, Any]) -> None:
        """Keep the latest item of each subscribed token; send what the window allows."""
        if not self._open:
            return
        subs = self._subs
        pending = self._pending
        dropped = 0
        # Not strict: a malformed engine message is truncated, it does not crash every client.
        for token, item in zip(message["tokens"], message["items"], strict=False):
            if token in subs:
                if token in pending:
                    dropped += 1
                pending[token] = item
        if dropped:
            self._dropped += dropped
            self._metrics.items_dropped.inc(dropped)
        await self._pump()

    async def chain_analytics(self, message: dict[str, Any]) -> None:
        """A chain's analytics: kept latest-wins per chain, sent while the window is open."""
        group = message.get("group")
        item = message.get("item")
        if not self._open or group not in self._chains or not isinstance(item, bytes):
            return
        if group in self._pending_analytics:
            self._dropped += 1
            self._metrics.items_dropped.inc()
        self._pending_analytics[group] = item.decode()
        await self._pump()

    async def bar_closed(self, message: dict[str, Any]) -> None:
        """A closed bar of an underlying this connection follows: forwarded as it is."""
        item = message.get("item")
        if not self._open or not isinstance(item, bytes):
            return
        try:
            name = orjson.loads(item)["name"]
            group = schema.bars_group(name)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self._log.error("ws.bar_invalid", item=item[:200])
            return
        followed = self._bars.get(group)
        if followed is not None:
            await self.send(text_data=bar_message(underlying=followed, item=item))

    async def _pump(self) -> None:
        """Send frames of pending items while fewer than send_window are unacknowledged,
        then the pending analytics (which need no ack but wait while the window is full)."""
        await self._pump_snapshots()
        if self._pending_analytics and self._seq - self._acked < self._config.send_window:
            waiting, self._pending_analytics = self._pending_analytics, {}
            for text in waiting.values():
                await self.send(text_data=text)

    async def _pump_snapshots(self) -> None:
        pending = self._pending
        while pending and self._seq - self._acked < self._config.send_window:
            items = []
            size = 0
            for token in list(islice(pending, MAX_ITEMS_PER_FRAME)):
                item = pending[token]
                if size + len(item) > MAX_FRAME_BYTES and items:
                    break
                del pending[token]
                if len(item) > MAX_FRAME_BYTES:
                    # daphne cannot send it; an engine bug, not a reason to drop the client.
                    self._log.error("ws.item_too_large", token=token, size=len(item))
                    continue
                items.append(item)
                size += len(item)
            if not items:
                continue
            self._seq += 1
            self._frames += 1
            await self.send(text_data=snapshots_frame(seq=self._seq, items=items))
            self._metrics.frames_sent.inc()
            self._metrics.items_sent.inc(len(items))


def _client_label(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None
