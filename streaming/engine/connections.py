"""One Kite ticker client per account this engine streams, each a supervised task.

The :class:`ConnectionManager` starts an account's client when the engine gains its lease,
hands it new per-connection subscriptions on every reload (the client sends only the
difference, so untouched instruments keep streaming), gives it a new access token after a
login, and stops it, awaited, when the lease is lost or the account is no longer streamable.
For an account whose ``record_frames`` is on, the client's raw frames also go to the
:class:`~streaming.engine.recorder.FrameRecorder` (switched on and off at reloads).
Each client's order text frames and connects go to the engine's
:class:`~streaming.engine.orders.OrderUpdateRelay`, tagged with the account.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import structlog

from streaming.engine.metrics import EngineMetrics
from streaming.engine.orders import OrderUpdateRelay
from streaming.engine.recorder import FrameRecorder, RawFrameSink
from streaming.engine.store import AccountRow
from streaming.engine.supervisor import Supervisor
from streaming.kite.codec import ErrorMessage, InfoMessage, OrderMessage
from streaming.kite.ticker import (
    ClientHealth,
    ConnectionState,
    KiteTickerClient,
    RawFrameCallback,
    SessionState,
)

log = structlog.get_logger(__name__)


class TickerClient(Protocol):
    """What the engine needs of a Kite ticker client (``streaming.kite.ticker``)."""

    async def run(self) -> None: ...

    async def set_subscriptions(self, wanted: Mapping[int, str]) -> None: ...

    async def update_token(self, access_token: str) -> None: ...

    def health(self) -> ClientHealth: ...

    def tokens_on(self, index: int) -> list[int]: ...

    async def aclose(self) -> None: ...


ClientFactory = Callable[..., TickerClient]
"""Builds a client: keyword arguments account, ws_url, watchdog_s, on_ticks, on_session_expired,
on_raw_frame, on_text, on_connected."""


def default_client_factory(
    *,
    account: AccountRow,
    ws_url: str,
    watchdog_s: float,
    on_ticks: Callable[[np.ndarray], None],
    on_session_expired: Callable[[], None],
    on_raw_frame: RawFrameCallback | None = None,
    on_text: Callable[[OrderMessage | ErrorMessage | InfoMessage], None] | None = None,
    on_connected: Callable[[int, int], None] | None = None,
) -> TickerClient:
    return KiteTickerClient(
        api_key=account.api_key,
        access_token=account.access_token,
        ws_url=ws_url,
        watchdog_s=watchdog_s,
        on_ticks=on_ticks,
        on_session_expired=on_session_expired,
        on_raw_frame=on_raw_frame,
        on_text=on_text,
        on_connected=on_connected,
        account=account.label,
    )


def client_state(health: ClientHealth) -> dict[str, Any]:
    """A client's health as the heartbeat reports an account."""
    wanted = [c for c in health.connections if c.instruments]
    up = [c for c in wanted if c.state is ConnectionState.CONNECTED]
    if health.session is SessionState.EXPIRED:
        state = "session_expired"
    elif len(up) == len(wanted):
        state = "streaming"
    else:
        state = "connecting"
    return {
        "state": state,
        "connections": sum(c.state is ConnectionState.CONNECTED for c in health.connections),
        "reconnects": sum(c.reconnects for c in health.connections),
        "session": "expired" if health.session is SessionState.EXPIRED else "ok",
        "malformed": sum(c.malformed_parts for c in health.connections),
        "last_error": next((c.last_error for c in health.connections if c.last_error), None),
    }


class _FrameTap:
    """A client's raw-frame callback: hands frames to the recorder while the account records."""

    __slots__ = ("sink",)

    def __init__(self) -> None:
        self.sink: RawFrameSink | None = None

    def __call__(self, message: bytes | str) -> None:
        if self.sink is not None:
            self.sink(message)


class _Running:
    __slots__ = ("client", "label", "tap", "token_fingerprint", "token_issued_at")

    def __init__(self, client: TickerClient, account: AccountRow, tap: _FrameTap) -> None:
        self.client = client
        self.tap = tap
        self.label = account.label
        self.token_fingerprint = account.token_fingerprint
        self.token_issued_at = account.token_issued_at


class ConnectionManager:
    """Starts, updates and stops the per-account ticker clients under the supervisor."""

    def __init__(
        self,
        *,
        supervisor: Supervisor,
        ws_url: str,
        watchdog_s: float,
        metrics: EngineMetrics,
        client_factory: ClientFactory | None = None,
        recorder: FrameRecorder | None = None,
        orders: OrderUpdateRelay | None = None,
        close_timeout_s: float = 3.0,
    ) -> None:
        self._supervisor = supervisor
        self._ws_url = ws_url
        self._watchdog_s = watchdog_s
        self._metrics = metrics
        self._factory = client_factory or default_client_factory
        self._recorder = recorder
        self._orders = orders
        self._close_timeout_s = close_timeout_s
        self._running: dict[int, _Running] = {}

    def running(self) -> set[int]:
        return set(self._running)

    def recorded(self) -> set[int]:
        """The accounts whose raw frames are being recorded."""
        return {aid for aid, running in self._running.items() if running.tap.sink is not None}

    def token_in_use(self, account_id: int) -> tuple[str, dt.datetime | None] | None:
        """Fingerprint and issue time of the token the account's client streams with."""
        running = self._running.get(account_id)
        if running is None:
            return None
        return running.token_fingerprint, running.token_issued_at

    def start(
        self,
        account: AccountRow,
        *,
        on_ticks: Callable[[int, np.ndarray], None],
        on_session_expired: Callable[[int, str], None],
    ) -> None:
        """Start the account's client if it is not running (no await: see the planner's apply).

        ``on_ticks(account_id, ticks)`` gets each decoded frame, ``on_session_expired
        (account_id, reason)`` Kite's refusal of the token.
        """
        if account.account_id not in self._running:
            running = self._start(account, on_ticks, on_session_expired)
            self._set_recording(running, account)

    async def update(self, account: AccountRow, wanted: Mapping[int, str]) -> None:
        """Stream ``wanted`` (token -> mode) on the running client; it sends only the diff."""
        running = self._running.get(account.account_id)
        if running is None:
            return
        self._set_recording(running, account)
        if running.token_fingerprint != account.token_fingerprint:
            log.info("connections.token_updated", account=account.label)
            running.token_fingerprint = account.token_fingerprint
            running.token_issued_at = account.token_issued_at
            await running.client.update_token(account.access_token)
        await running.client.set_subscriptions(wanted)

    def _start(
        self,
        account: AccountRow,
        on_ticks: Callable[[int, np.ndarray], None],
        on_session_expired: Callable[[int, str], None],
    ) -> _Running:
        aid = account.account_id
        label = account.label

        def account_ticks(ticks: np.ndarray) -> None:
            on_ticks(aid, ticks)

        def account_expired() -> None:
            on_session_expired(aid, "Kite refused the access token on the ticker (HTTP 403)")

        tap = _FrameTap()
        hooks: dict[str, Callable[..., None]] = {}
        if (orders := self._orders) is not None:

            def account_text(message: OrderMessage | ErrorMessage | InfoMessage) -> None:
                if isinstance(message, OrderMessage):
                    orders.order_message(aid, message)

            def account_connected(index: int, connects: int) -> None:
                orders.connected(aid, index, connects)

            hooks = {"on_text": account_text, "on_connected": account_connected}
        client = self._factory(
            account=account,
            ws_url=self._ws_url,
            watchdog_s=self._watchdog_s,
            on_ticks=account_ticks,
            on_session_expired=account_expired,
            on_raw_frame=tap,
            **hooks,
        )
        running = _Running(client, account, tap)
        self._running[aid] = running
        self._supervisor.spawn(f"kite:{label}", client.run, owner=f"account:{label}")
        log.info("connections.started", account=label)
        return running

    async def stop(self, account_id: int) -> None:
        """Close the account's sockets and wait until its client has stopped."""
        running = self._running.pop(account_id, None)
        if running is None:
            return
        try:
            # A clean close first (close frames); a client stuck past the timeout is cancelled.
            await asyncio.wait_for(running.client.aclose(), timeout=self._close_timeout_s)
        except TimeoutError:
            log.warning("connections.close_timeout", account=running.label)
        finally:
            await self._supervisor.stop(f"kite:{running.label}")
            self._stop_recording(running)
        log.info("connections.stopped", account=running.label)

    def _set_recording(self, running: _Running, account: AccountRow) -> None:
        """Record the account's raw frames exactly while its ``record_frames`` is on."""
        if self._recorder is None:
            return
        if account.record_frames and running.tap.sink is None:
            running.tap.sink = self._recorder.open(account=running.label)
        elif not account.record_frames:
            self._stop_recording(running)

    def _stop_recording(self, running: _Running) -> None:
        if running.tap.sink is not None and self._recorder is not None:
            running.tap.sink = None
            self._recorder.stop_account(account=running.label)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(aid) for aid in list(self._running)))

    def connection_health(self) -> dict[int, tuple[str, ClientHealth]]:
        """Per running account: its label and its client's health (the REST fallback reads it)."""
        return {aid: (r.label, r.client.health()) for aid, r in self._running.items()}

    def tokens_on(self, account_id: int, index: int) -> list[int]:
        """The instruments wanted on one of an account's connections; none if it stopped."""
        running = self._running.get(account_id)
        return running.client.tokens_on(index) if running is not None else []

    def states(self) -> dict[int, dict[str, Any]]:
        """Per account: state, connections, reconnects and session, from the clients."""
        out: dict[int, dict[str, Any]] = {}
        for aid, running in self._running.items():
            state = client_state(running.client.health())
            task = self._supervisor.state(f"kite:{running.label}")
            if task is not None and task.state in ("restarting", "failed"):
                state["state"] = "error"
            out[aid] = state
        return out
