"""One Kite ticker client per account this engine streams, each a supervised task.

The :class:`ConnectionManager` starts an account's client when the engine gains its lease,
hands it new per-connection subscriptions on every reload (the client sends only the
difference, so untouched instruments keep streaming), gives it a new access token after a
login, and stops it, awaited, when the lease is lost or the account is no longer streamable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import structlog

from streaming.engine.metrics import EngineMetrics
from streaming.engine.store import AccountRow
from streaming.engine.supervisor import Supervisor

log = structlog.get_logger(__name__)


class TickerClient(Protocol):
    """What the engine needs of a Kite ticker client (streaming.kite.ticker)."""

    async def run(self) -> None: ...

    def set_subscriptions(self, connections: Sequence[Mapping[int, str]]) -> None: ...

    def update_token(self, access_token: str) -> None: ...

    def health(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


ClientFactory = Callable[..., TickerClient]
"""Builds a client: (account, ws_url, watchdog_s, on_ticks, on_session_expired, on_reconnect)."""


def default_client_factory(
    *,
    account: AccountRow,
    ws_url: str,
    watchdog_s: float,
    on_ticks: Callable[[np.ndarray], None],
    on_session_expired: Callable[[str], None],
    on_reconnect: Callable[[], None],
) -> TickerClient:
    from streaming.kite.ticker import KiteTickerClient

    return KiteTickerClient(
        api_key=account.api_key,
        access_token=account.access_token,
        ws_url=ws_url,
        watchdog_s=watchdog_s,
        on_ticks=on_ticks,
        on_session_expired=on_session_expired,
        on_reconnect=on_reconnect,
        label=account.label,
    )


class _Running:
    __slots__ = ("client", "label", "reconnects", "token_fingerprint")

    def __init__(self, client: TickerClient, label: str, token_fingerprint: str) -> None:
        self.client = client
        self.label = label
        self.token_fingerprint = token_fingerprint
        self.reconnects = 0


class ConnectionManager:
    """Starts, updates and stops the per-account ticker clients under the supervisor."""

    def __init__(
        self,
        *,
        supervisor: Supervisor,
        ws_url: str,
        watchdog_s: float,
        on_ticks: Callable[[int, np.ndarray], None],
        on_session_expired: Callable[[int, str], None],
        metrics: EngineMetrics,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._ws_url = ws_url
        self._watchdog_s = watchdog_s
        self._on_ticks = on_ticks
        self._on_session_expired = on_session_expired
        self._metrics = metrics
        self._factory = client_factory or default_client_factory
        self._running: dict[int, _Running] = {}

    def running(self) -> set[int]:
        return set(self._running)

    def ensure(self, account: AccountRow, connections: Sequence[Mapping[int, str]]) -> None:
        """Stream ``connections`` (token -> mode per connection) on the account's client.

        Synchronous on purpose: the caller checks the lease and starts the client with no
        await in between, so a lease lost meanwhile cannot be followed by a late start.
        """
        aid = account.account_id
        running = self._running.get(aid)
        if running is None:
            running = self._start(account)
        elif running.token_fingerprint != account.token_fingerprint:
            log.info("connections.token_updated", account=account.label)
            running.client.update_token(account.access_token)
            running.token_fingerprint = account.token_fingerprint
        running.client.set_subscriptions(connections)

    def _start(self, account: AccountRow) -> _Running:
        aid = account.account_id
        label = account.label

        def on_ticks(ticks: np.ndarray) -> None:
            self._on_ticks(aid, ticks)

        def on_session_expired(reason: str) -> None:
            self._on_session_expired(aid, reason)

        def on_reconnect() -> None:
            state = self._running.get(aid)
            if state is not None:
                state.reconnects += 1
            self._metrics.reconnects.labels(label).inc()

        client = self._factory(
            account=account,
            ws_url=self._ws_url,
            watchdog_s=self._watchdog_s,
            on_ticks=on_ticks,
            on_session_expired=on_session_expired,
            on_reconnect=on_reconnect,
        )
        running = _Running(client, label, account.token_fingerprint)
        self._running[aid] = running
        self._supervisor.spawn(f"kite:{label}", client.run, owner=f"account:{label}")
        log.info("connections.started", account=label)
        return running

    async def stop(self, account_id: int) -> None:
        """Close the account's client and wait for it; a no-op if it is not running."""
        running = self._running.pop(account_id, None)
        if running is None:
            return
        try:
            await self._supervisor.stop(f"kite:{running.label}")
        finally:
            await running.client.close()
        log.info("connections.stopped", account=running.label)

    async def stop_all(self) -> None:
        for aid in list(self._running):
            await self.stop(aid)

    def states(self) -> dict[int, dict[str, Any]]:
        """Per account: state, connections, reconnects, from the clients themselves."""
        out: dict[int, dict[str, Any]] = {}
        for aid, running in self._running.items():
            health = dict(running.client.health())
            health.setdefault("reconnects", running.reconnects)
            task = self._supervisor.state(f"kite:{running.label}")
            if task is not None and task.state in ("restarting", "failed"):
                health["state"] = "error"
            out[aid] = health
        return out
