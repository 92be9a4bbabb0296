"""Asyncio client for Kite's ticker WebSocket: one account, up to three connections.

Why not kiteconnect's ``KiteTicker``: it runs one global Twisted reactor per process (cannot
be restarted, cannot host many accounts beside asyncio code), never notices a silently dead
socket, ignores ``reconnect=False`` and, when the server accepts and then closes, reconnects
without bound. This client keeps Kite's wire protocol (``codec.py``) and replaces the rest:

- ``KiteTickerClient`` holds what the account wants (token -> mode), refuses anything beyond
  Kite's limits (``KiteLimitError``), and spreads it over up to three ``KiteConnection``s,
  filling the first before opening the next, and never moving a subscribed instrument.
- Each ``KiteConnection`` owns one socket at a time: it connects only while it has
  instruments, sends Kite's subscribe / mode / unsubscribe messages in batches, resubscribes
  every instrument in its mode after each reconnect, and backs off with exponential jitter
  (tenacity's wait strategies). Backoff resets only after a connection stayed up for
  ``backoff_reset_after_s``, so a server that accepts and closes is not hammered; such a
  connection that then drops reconnects at once (``wait_after_drop``: a jitter of at most
  0.25 s), so a network blip costs a fraction of a second, not the backoff's first step.
- A watchdog drops a socket on which nothing (not even Kite's one-byte heartbeat) arrived for
  ``watchdog_s``, and reconnects.
- HTTP 403 on the upgrade means the access token is expired or invalid: the client reports it
  once (``on_session_expired``) and no connection tries again until ``update_token`` brings a
  different token. HTTP 429 backs off on its own, longer schedule.

Every task the client starts is a child of ``run()`` (a TaskGroup); ``aclose()`` ends them.
The access token never appears in logs or errors (URLs are redacted).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

import numpy as np
import structlog
from tenacity import RetryCallState, wait_exponential_jitter, wait_random
from tenacity.wait import wait_base
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from streaming.kite.codec import (
    ErrorMessage,
    InfoMessage,
    KiteMessageError,
    OrderMessage,
    decode_frame,
    mode_message,
    parse_text_message,
    subscribe_message,
    unsubscribe_message,
)
from streaming.kite.limits import (
    MAX_CONNECTIONS_PER_API_KEY,
    MAX_INSTRUMENTS_PER_CONNECTION,
    MODES,
    Mode,
)
from streaming.kite.redaction import redact

__all__ = [
    "ClientHealth",
    "ConnectionHealth",
    "ConnectionState",
    "KiteConnection",
    "KiteLimitError",
    "KiteTickerClient",
    "SessionState",
]

log = structlog.get_logger(__name__)

KITE_VERSION_HEADER: Final = ("X-Kite-Version", "3")
USER_AGENT: Final = "tickerproj-kite-ticker"
# A full-mode frame of 3000 instruments is ~560 KB; leave room without accepting anything.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
_MAX_TOKEN: Final = 0xFFFFFFFF
_SESSION_HTTP_STATUSES: Final = frozenset({401, 403})
_RATE_LIMIT_HTTP_STATUS: Final = 429

class _RedactAccessToken(logging.Filter):
    """Strip access tokens from websockets' own debug logs (it logs the request line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# The logger handed to websockets; the filter sits on it so no handler set-up can bypass it.
_WIRE_LOG: Final = logging.getLogger("streaming.kite.ticker.wire")
_WIRE_LOG.addFilter(_RedactAccessToken())


class KiteLimitError(ValueError):
    """A subscription request beyond Kite's per-account WebSocket limits; nothing was applied."""

    def __init__(self, *, account: str, requested: int, limit: int, detail: str) -> None:
        self.account = account
        self.requested = requested
        self.limit = limit
        super().__init__(f"account {account}: {detail} (requested {requested}, limit {limit})")


class ConnectionState(enum.StrEnum):
    """Where one connection slot is in its life."""

    IDLE = "idle"  # no instruments allocated: no socket
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"  # waiting before the next attempt
    SESSION_EXPIRED = "session_expired"  # waiting for a new access token
    CLOSED = "closed"


class SessionState(enum.StrEnum):
    """Whether the account's access token is usable for the ticker."""

    ACTIVE = "active"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class ConnectionHealth:
    """A snapshot of one connection slot for /health and metrics."""

    index: int
    state: ConnectionState
    instruments: int  # allocated to this connection
    subscribed: int  # told to Kite on the current socket
    connect_attempts: int
    reconnects: int  # successful connects after the first
    last_message_age_s: float | None
    ticks_received: int
    frames_received: int
    heartbeats_received: int
    malformed_parts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ClientHealth:
    """A snapshot of one account's ticker client."""

    account: str
    session: SessionState
    instruments: int
    connections: tuple[ConnectionHealth, ...]

    @property
    def ticks_received(self) -> int:
        return sum(c.ticks_received for c in self.connections)


class _Outcome(enum.Enum):
    """How one connection attempt / socket lifetime ended."""

    CLOSING = "closing"  # the client is shutting down
    IDLE = "idle"  # no instruments left: socket closed on purpose
    EXPIRED = "expired"  # HTTP 401/403 on the upgrade
    RATE_LIMITED = "rate_limited"  # HTTP 429 on the upgrade
    FAILED = "failed"  # could not connect
    DROPPED = "dropped"  # was connected, then lost (closed, reset, watchdog)


TicksCallback = Callable[[np.ndarray], Awaitable[None] | None]
TextCallback = Callable[[OrderMessage | ErrorMessage | InfoMessage], Awaitable[None] | None]
SessionExpiredCallback = Callable[[], Awaitable[None] | None]
RawFrameCallback = Callable[[bytes | str], None]
"""Gets every message as received (binary frames, heartbeats, text); must not block."""
ConnectedCallback = Callable[[int, int], Awaitable[None] | None]


async def _maybe_await(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result


def _sole(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside (possibly nested) groups of one, else the group itself."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group


def _checked_ws_url(url: str) -> str:
    """``url`` if websockets can connect to it, checked before any credential is added to it
    (websockets' InvalidURI quotes the whole URL, which would then hold the access token)."""
    try:
        parse_uri(url)
    except InvalidURI:
        raise ValueError(f"KITE_WS_URL must be a ws:// or wss:// URL, got {url[:200]!r}") from None
    if "?" in url or "#" in url:
        raise ValueError(f"KITE_WS_URL must not carry a query or fragment, got {url[:200]!r}")
    return url


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class KiteConnection:
    """One WebSocket slot of an account: at most ``max_instruments`` instruments, one socket.

    Created and driven by ``KiteTickerClient``; not used on its own.
    """

    def __init__(self, *, client: KiteTickerClient, index: int) -> None:
        self._client = client
        self.index = index
        self.state = ConnectionState.IDLE
        # What the account wants on this connection (written by the client's allocation).
        self.desired: dict[int, Mode] = {}
        # What Kite has been told on the current socket; empty whenever a new socket opens.
        self._sent: dict[int, Mode] = {}
        self._wake = asyncio.Event()  # desired / session / closing changed
        self._dirty = asyncio.Event()  # desired changed while connected
        self._closed_on_purpose = False  # set by the syncer before it closes the socket
        self._opening: asyncio.Timeout | None = None  # the pending upgrade's deadline
        self._connected_at: float | None = None
        self.connect_attempts = 0
        self.connects = 0
        self.ticks_received = 0
        self.frames_received = 0
        self.heartbeats_received = 0
        self.malformed_parts = 0
        self.last_message_at: float | None = None
        self.last_error: str | None = None

    def _log(self):
        return log.bind(account=self._client.account, connection=self.index)

    def notify(self) -> None:
        """Wake the slot: its instruments, the session or the client's state changed."""
        self._wake.set()
        self._dirty.set()
        if self._client.closing and self._opening is not None:
            # Shutting down: end a pending upgrade now rather than after connect_timeout_s.
            self._opening.reschedule(asyncio.get_running_loop().time())

    def health(self, now: float) -> ConnectionHealth:
        age = None if self.last_message_at is None else max(0.0, now - self.last_message_at)
        return ConnectionHealth(
            index=self.index,
            state=self.state,
            instruments=len(self.desired),
            subscribed=len(self._sent),
            connect_attempts=self.connect_attempts,
            reconnects=max(0, self.connects - 1),
            last_message_age_s=age,
            ticks_received=self.ticks_received,
            frames_received=self.frames_received,
            heartbeats_received=self.heartbeats_received,
            malformed_parts=self.malformed_parts,
            last_error=self.last_error,
        )

    # --- the slot's life ------------------------------------------------------------------

    async def run(self) -> None:
        """Connect whenever there is work, reconnect with backoff, until the client closes."""
        client = self._client
        failures = 0  # consecutive attempts that failed or did not stay up long enough
        try:
            while True:
                await self._wait_until_wanted()
                if client.closing:
                    return
                token, generation = client._credentials()
                self._connected_at = None
                outcome = await self._connect_and_stream(token)
                if outcome is _Outcome.CLOSING:
                    return
                if outcome is _Outcome.IDLE:
                    failures = 0
                    continue
                if outcome is _Outcome.EXPIRED:
                    failures = 0
                    await client._session_rejected(generation, connection=self.index)
                    continue
                # A socket that stayed up long enough was a success: reconnect at once and
                # start the backoff over. One the server accepted and soon closed was not, or
                # a server that accepts and closes would be hammered at the shortest delay.
                if (
                    self._connected_at is not None
                    and client._clock() - self._connected_at >= client.backoff_reset_after_s
                ):
                    failures = 0
                    delay_s = float(client._wait_after_drop(_attempt(1)))
                else:
                    failures += 1
                    wait = (
                        client._wait_rate_limited
                        if outcome is _Outcome.RATE_LIMITED
                        else client._wait
                    )
                    delay_s = float(wait(_attempt(failures)))
                self.state = ConnectionState.BACKOFF
                self._log().warning(
                    "kite.ws.retry",
                    outcome=outcome.value,
                    error=self.last_error,
                    attempt=failures,
                    delay_s=round(delay_s, 3),
                )
                await client._sleep_unless_closing(delay_s)
        finally:
            self.state = ConnectionState.CLOSED

    async def _wait_until_wanted(self) -> None:
        client = self._client
        while not client.closing:
            if client.session is SessionState.EXPIRED:
                self.state = ConnectionState.SESSION_EXPIRED
            elif self.desired:
                return
            else:
                self.state = ConnectionState.IDLE
            self._wake.clear()
            await self._wake.wait()

    async def _connect_and_stream(self, token: str) -> _Outcome:
        client = self._client
        self.connect_attempts += 1
        self.state = ConnectionState.CONNECTING
        try:
            async with asyncio.timeout(client.connect_timeout_s) as self._opening:
                ws = await connect(
                    client._url(token),
                    additional_headers=[KITE_VERSION_HEADER],
                    user_agent_header=USER_AGENT,
                    compression=None,
                    open_timeout=None,  # the timeout around this call, which aclose() can cut
                    close_timeout=client.close_timeout_s,
                    # Kite sends a heartbeat every second; our watchdog on incoming data
                    # replaces websockets' ping/pong keepalive (Kite need not answer pings).
                    ping_interval=None,
                    max_size=MAX_MESSAGE_BYTES,
                    proxy=client.proxy,
                    logger=_WIRE_LOG,
                )
        except InvalidStatus as exc:
            status = exc.response.status_code
            self.last_error = f"HTTP {status} on upgrade"
            if status in _SESSION_HTTP_STATUSES:
                return _Outcome.EXPIRED
            if status == _RATE_LIMIT_HTTP_STATUS:
                return _Outcome.RATE_LIMITED
            return _Outcome.FAILED
        except InvalidURI:
            # Its text is the whole URL, token included: never let it travel.
            self.last_error = f"invalid WebSocket URL {client.ws_url!r}"
            return _Outcome.FAILED
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            if client.closing:
                return _Outcome.CLOSING
            detail = str(exc) or f"no upgrade within {client.connect_timeout_s} s"
            self.last_error = redact(f"{type(exc).__name__}: {detail}", token)
            return _Outcome.FAILED
        finally:
            self._opening = None
        if client.closing:
            await ws.close()
            return _Outcome.CLOSING
        self.connects += 1
        self._connected_at = client._clock()
        self.state = ConnectionState.CONNECTED
        self.last_error = None
        self.last_message_at = client._clock()
        self._sent = {}
        self._closed_on_purpose = False
        self._dirty.set()
        self._log().info("kite.ws.connected", instruments=len(self.desired), connects=self.connects)
        if client._on_connected is not None:
            await _maybe_await(client._on_connected(self.index, self.connects))
        try:
            async with asyncio.TaskGroup() as tasks:
                syncer = tasks.create_task(
                    self._sync_loop(ws), name=f"kite.sync.{client.account}.{self.index}"
                )
                outcome = await self._read_loop(ws, token)
                syncer.cancel()
        except BaseExceptionGroup as group:
            raise _sole(group) from None
        finally:
            self._sent = {}
            await ws.close()
        return outcome

    # --- receiving ------------------------------------------------------------------------

    async def _read_loop(self, ws: ClientConnection, token: str) -> _Outcome:
        client = self._client
        watchdog_s = client.watchdog_s
        while True:
            try:
                async with asyncio.timeout(watchdog_s):
                    message = await ws.recv()
            except TimeoutError:
                self.last_error = f"no data for {watchdog_s} s (watchdog)"
                self._log().warning("kite.ws.watchdog", silent_s=watchdog_s)
                # A dead peer would not answer a close handshake: drop the socket at once.
                ws.transport.abort()
                return _Outcome.DROPPED
            except ConnectionClosed as exc:
                if client.closing:
                    return _Outcome.CLOSING
                if self._closed_on_purpose:
                    return _Outcome.IDLE
                self.last_error = redact(f"closed: {exc}", token)
                return _Outcome.DROPPED
            self.last_message_at = client._clock()
            if client._on_raw_frame is not None:
                client._on_raw_frame(message)
            if isinstance(message, bytes):
                await self._on_binary(message)
            else:
                await self._on_text(message)

    async def _on_binary(self, message: bytes) -> None:
        frame = decode_frame(message)
        if frame.heartbeat:
            self.heartbeats_received += 1
            return
        if frame.malformed:
            self.malformed_parts += frame.malformed
            self._log().warning(
                "kite.ws.malformed_frame",
                parts=frame.malformed,
                reasons=sorted(set(frame.malformed_reasons)),
                frame_bytes=len(message),
                ticks_kept=len(frame.ticks),
            )
        if len(frame.ticks):
            self.frames_received += 1
            self.ticks_received += len(frame.ticks)
            await _maybe_await(self._client._on_ticks(frame.ticks))

    async def _on_text(self, text: str) -> None:
        try:
            message = parse_text_message(text)
        except KiteMessageError as exc:
            self.malformed_parts += 1
            self._log().warning("kite.ws.malformed_text", reason=exc.reason, excerpt=exc.excerpt)
            return
        if isinstance(message, ErrorMessage):
            self._log().warning("kite.ws.error_message", message=message.data)
        if self._client._on_text is not None:
            await _maybe_await(self._client._on_text(message))

    # --- sending --------------------------------------------------------------------------

    async def _sync_loop(self, ws: ClientConnection) -> None:
        """Keep Kite's view of this socket's subscriptions equal to ``desired``."""
        client = self._client
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if client.closing or not self.desired:
                self._closed_on_purpose = True
                await ws.close()  # the reader sees the close and reports why
                return
            try:
                await self._send_diff(ws)
            except ConnectionClosed:
                return  # the reader sees the close and reports it

    async def _send_diff(self, ws: ClientConnection) -> None:
        desired = dict(self.desired)
        sent = self._sent
        batch = self._client.batch_size
        removed = [token for token in sent if token not in desired]
        added = [token for token in desired if token not in sent]
        for chunk in _chunks(removed, batch):
            await ws.send(unsubscribe_message(chunk))
            for token in chunk:
                del sent[token]
        # Kite subscribes in quote mode; a mode message then sets each token's wanted mode.
        for chunk in _chunks(added, batch):
            await ws.send(subscribe_message(chunk))
        by_mode: dict[Mode, list[int]] = {}
        for token, mode in desired.items():
            if sent.get(token) != mode:
                by_mode.setdefault(mode, []).append(token)
        for mode, tokens in by_mode.items():
            for chunk in _chunks(tokens, batch):
                await ws.send(mode_message(mode, chunk))
                for token in chunk:
                    sent[token] = mode
        if removed or added or by_mode:
            self._log().info(
                "kite.ws.subscriptions_sent",
                unsubscribed=len(removed),
                subscribed=len(added),
                mode_changes={mode: len(tokens) for mode, tokens in by_mode.items()},
                total=len(sent),
            )


def _attempt(number: int) -> RetryCallState:
    """A tenacity retry state carrying only the attempt number, which its waits read."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = number
    return state


class KiteTickerClient:
    """Kite's ticker for one account: up to 3 connections x 3000 instruments, kept alive.

    ``on_ticks(ticks)`` gets each binary frame's decoded ``TICK_DTYPE`` array (never one call
    per tick); ``on_text(message)`` each validated order / error / message text frame;
    ``on_session_expired()`` is called once when Kite refuses the token (HTTP 401/403), after
    which nothing reconnects until ``update_token`` brings a different token;
    ``on_raw_frame(message)`` (plain function, must not block: it is on the tick path) each
    message exactly as received, before decoding, for recording.
    ``on_connected(index, connects)`` after each successful upgrade of connection ``index``
    (order updates sent while no socket was up are lost: the engine asks for a sync). Callbacks may be
    plain functions or coroutines; they run on the client's event loop, and an exception from
    one ends ``run()`` (a consumer bug is not a network fault to retry).

    ``wait`` / ``wait_rate_limited`` / ``wait_after_drop``: tenacity wait strategies for
    reconnect delays after failures, after HTTP 429, and after the drop of a connection that
    had stayed up ``backoff_reset_after_s`` (a working server: reconnect at once, jittered so
    many connections do not arrive in one instant). ``clock``: monotonic seconds (for health
    and backoff reset).
    """

    def __init__(
        self,
        *,
        api_key: str,
        access_token: str,
        ws_url: str,
        on_ticks: TicksCallback,
        on_session_expired: SessionExpiredCallback,
        on_text: TextCallback | None = None,
        on_raw_frame: RawFrameCallback | None = None,
        on_connected: ConnectedCallback | None = None,
        account: str | None = None,
        watchdog_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        close_timeout_s: float = 2.0,
        backoff_reset_after_s: float = 5.0,
        wait: wait_base | None = None,
        wait_rate_limited: wait_base | None = None,
        wait_after_drop: wait_base | None = None,
        max_connections: int = MAX_CONNECTIONS_PER_API_KEY,
        max_instruments_per_connection: int = MAX_INSTRUMENTS_PER_CONNECTION,
        batch_size: int = MAX_INSTRUMENTS_PER_CONNECTION,
        proxy: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        if not 1 <= max_connections <= MAX_CONNECTIONS_PER_API_KEY:
            raise ValueError(
                f"max_connections must be in [1, {MAX_CONNECTIONS_PER_API_KEY}] "
                f"(Kite's limit per API key), got {max_connections}"
            )
        if not 1 <= max_instruments_per_connection <= MAX_INSTRUMENTS_PER_CONNECTION:
            raise ValueError(
                "max_instruments_per_connection must be in "
                f"[1, {MAX_INSTRUMENTS_PER_CONNECTION}] (Kite's limit), "
                f"got {max_instruments_per_connection}"
            )
        for name, value in (
            ("watchdog_s", watchdog_s),
            ("connect_timeout_s", connect_timeout_s),
            ("close_timeout_s", close_timeout_s),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.api_key = api_key
        self.account = account or api_key
        self.ws_url = _checked_ws_url(ws_url)
        self.watchdog_s = float(watchdog_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.close_timeout_s = float(close_timeout_s)
        self.backoff_reset_after_s = float(backoff_reset_after_s)
        self.batch_size = int(batch_size)
        self.proxy = proxy
        self.max_instruments_per_connection = int(max_instruments_per_connection)
        self._wait = wait or wait_exponential_jitter(multiplier=1.0, max=60.0, jitter=1.0)
        self._wait_rate_limited = wait_rate_limited or wait_exponential_jitter(
            multiplier=5.0, max=120.0, jitter=2.0
        )
        self._wait_after_drop = wait_after_drop or wait_random(0.0, 0.25)
        self._on_ticks = on_ticks
        self._on_text = on_text
        self._on_raw_frame = on_raw_frame
        self._on_connected = on_connected
        self._on_session_expired = on_session_expired
        self._clock = clock
        self._access_token = access_token
        self._token_generation = 0
        self.session = SessionState.ACTIVE
        self.closing = False
        self._closing_event = asyncio.Event()
        self._running = False
        self._stopped = asyncio.Event()
        self._stopped.set()
        self.connections = tuple(
            KiteConnection(client=self, index=i) for i in range(max_connections)
        )
        self._allocation: dict[int, int] = {}  # token -> connection index

    def __repr__(self) -> str:
        return f"KiteTickerClient(account={self.account!r}, session={self.session.value})"

    # --- what the account wants -----------------------------------------------------------

    @property
    def capacity(self) -> int:
        return len(self.connections) * self.max_instruments_per_connection

    def subscriptions(self) -> dict[int, Mode]:
        """A copy of every wanted instrument and its mode."""
        out: dict[int, Mode] = {}
        for conn in self.connections:
            out.update(conn.desired)
        return out

    def tokens_on(self, index: int) -> list[int]:
        """The instruments wanted on connection ``index`` (the REST fallback polls them)."""
        return list(self.connections[index].desired)

    async def set_subscriptions(self, wanted: Mapping[int, Mode]) -> None:
        """Make ``wanted`` (token -> mode) the account's whole subscription set.

        Raises ``KiteLimitError`` (and changes nothing) beyond the connection limits, and
        ``ValueError`` for an unknown mode or a token outside uint32. Live connections send
        the difference at once; the rest is sent whenever a socket (re)opens.
        """
        clean = self._validated(wanted)
        if len(clean) > self.capacity:
            raise KiteLimitError(
                account=self.account,
                requested=len(clean),
                limit=self.capacity,
                detail=(
                    f"Kite allows {len(self.connections)} connections x "
                    f"{self.max_instruments_per_connection} instruments per API key"
                ),
            )
        # Sticky first fit: an instrument stays on its connection; new ones fill the lowest
        # connection with room, so the account opens no more sockets than it needs.
        counts = [0] * len(self.connections)
        allocation: dict[int, int] = {}
        for token in clean:
            index = self._allocation.get(token)
            if index is not None:
                allocation[token] = index
                counts[index] += 1
        index = 0
        for token in clean:
            if token in allocation:
                continue
            while counts[index] >= self.max_instruments_per_connection:
                index += 1
            allocation[token] = index
            counts[index] += 1
        per_connection: list[dict[int, Mode]] = [{} for _ in self.connections]
        for token, mode in clean.items():
            per_connection[allocation[token]][token] = mode
        self._allocation = allocation
        for conn, desired in zip(self.connections, per_connection, strict=True):
            if desired != conn.desired:
                conn.desired = desired
                conn.notify()

    async def subscribe(self, tokens: Iterable[int], mode: Mode) -> None:
        """Add ``tokens`` in ``mode`` (or move them to ``mode``), keeping the rest."""
        wanted = self.subscriptions()
        wanted.update(dict.fromkeys(tokens, mode))
        await self.set_subscriptions(wanted)

    async def set_mode(self, tokens: Iterable[int], mode: Mode) -> None:
        """Change the mode of already subscribed ``tokens``."""
        wanted = self.subscriptions()
        tokens = list(tokens)
        unknown = [t for t in tokens if t not in wanted]
        if unknown:
            raise ValueError(
                f"account {self.account}: cannot set mode of unsubscribed tokens {unknown[:10]}"
                + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            )
        wanted.update(dict.fromkeys(tokens, mode))
        await self.set_subscriptions(wanted)

    async def unsubscribe(self, tokens: Iterable[int]) -> None:
        """Drop ``tokens``; unknown ones are ignored."""
        wanted = self.subscriptions()
        for token in tokens:
            wanted.pop(token, None)
        await self.set_subscriptions(wanted)

    def _validated(self, wanted: Mapping[int, Mode]) -> dict[int, Mode]:
        clean: dict[int, Mode] = {}
        for raw_token, mode in wanted.items():
            token = int(raw_token)
            if not 0 < token <= _MAX_TOKEN:
                raise ValueError(f"account {self.account}: instrument token {raw_token!r} not in uint32")
            if mode not in MODES:
                raise ValueError(
                    f"account {self.account}: mode {mode!r} for token {token}, expected one of {MODES}"
                )
            clean[token] = mode
        return clean

    # --- the session ----------------------------------------------------------------------

    async def update_token(self, access_token: str) -> None:
        """Use a new access token from now on; resumes connecting after an expired session.

        The same token again changes nothing: a token Kite refused stays refused.
        """
        if not access_token or access_token == self._access_token:
            return
        self._access_token = access_token
        self._token_generation += 1
        was = self.session
        self.session = SessionState.ACTIVE
        log.info("kite.ws.token_updated", account=self.account, session_was=was.value)
        for conn in self.connections:
            conn.notify()

    def _credentials(self) -> tuple[str, int]:
        return self._access_token, self._token_generation

    def _url(self, access_token: str) -> str:
        # The query kiteconnect's KiteTicker sends, encoded: a token's characters cannot make
        # the URL invalid, and the base URL was checked without it (_checked_ws_url).
        query = urlencode({"api_key": self.api_key, "access_token": access_token})
        return f"{self.ws_url}?{query}"

    async def _session_rejected(self, generation: int, *, connection: int) -> None:
        if generation != self._token_generation or self.session is SessionState.EXPIRED:
            return  # a newer token arrived meanwhile, or already reported
        self.session = SessionState.EXPIRED
        log.warning("kite.ws.session_expired", account=self.account, connection=connection)
        for conn in self.connections:
            conn.notify()
        await _maybe_await(self._on_session_expired())

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every connection slot until ``aclose()``; owns all of the client's tasks."""
        if self._running:
            raise RuntimeError(f"KiteTickerClient for {self.account} is already running")
        if self.closing:
            raise RuntimeError(f"KiteTickerClient for {self.account} is closed")
        self._running = True
        self._stopped.clear()
        log.info("kite.ws.client_started", account=self.account, instruments=len(self._allocation))
        try:
            async with asyncio.TaskGroup() as tasks:
                for conn in self.connections:
                    tasks.create_task(conn.run(), name=f"kite.connection.{self.account}.{conn.index}")
        except BaseExceptionGroup as group:
            # One failing slot (a callback's bug) cancels the others; surface the exception
            # itself rather than a group of one.
            raise _sole(group) from None
        finally:
            self._running = False
            self._stopped.set()
            log.info("kite.ws.client_stopped", account=self.account)

    async def aclose(self) -> None:
        """Close every socket cleanly and end ``run()``; waits until it has returned."""
        self.closing = True
        self._closing_event.set()
        for conn in self.connections:
            conn.notify()
        await self._stopped.wait()

    async def _sleep_unless_closing(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._closing_event.wait()
        except TimeoutError:
            return

    # --- observation ----------------------------------------------------------------------

    def health(self) -> ClientHealth:
        now = self._clock()
        return ClientHealth(
            account=self.account,
            session=self.session,
            instruments=len(self._allocation),
            connections=tuple(conn.health(now) for conn in self.connections),
        )
