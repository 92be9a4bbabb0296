"""REST fallback: Kite's quote API keeps prices flowing while an account's socket is stalled.

When a connection that has instruments has received nothing (not even Kite's one-second
heartbeat) for ``after_s``, or has been reconnecting that long, :class:`RestFallback` polls
its instruments with ``/quote``: chunks of at most ``QUOTE_MAX_INSTRUMENTS_PER_CALL``
instruments, each chunk at most once a second, spread over the keys of every account this
engine streams (each account's key makes one call at a time, paced by the shared rate
limiter: Kite's 1 quote request/s per api_key, counted with every other process's quote
calls on that key). A stalled account's instruments so refresh faster the more accounts
lend their budget, and no key ever goes past its limit.

The quotes become ticks (``TICK_DTYPE`` rows, as the codec would decode them) queued through
the normal snapshot path, so IV and Greeks are computed as usual; their snapshots carry
``rest_fallback: true``. They do not feed the 1-minute bars: a stalled minute stays a gap
and is filled from Kite's historical candles (``streaming.services.bars_backfill``).

When the socket is back the account's polling stops at the next check (``check_interval_s``),
a call still in flight is dropped unread, and the flag is cleared from its instruments.
Quote errors are counted and logged, never raised: the next call is the retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog

from streaming.engine.connections import ConnectionManager
from streaming.engine.metrics import EngineMetrics
from streaming.engine.store import AccountRow
from streaming.kite.codec import PACKET_FULL, PACKET_INDEX_FULL, empty_ticks
from streaming.kite.limits import QUOTE_MAX_INSTRUMENTS_PER_CALL, QUOTE_REQUESTS_PER_S
from streaming.kite.rest import KiteError
from streaming.kite.schemas import Quote
from streaming.kite.ticker import ConnectionState, SessionState

log = structlog.get_logger(__name__)

DEFAULT_CHECK_INTERVAL_S = 0.25
"""How often connection health is read: the delay before polling starts and stops."""


class QuoteClient(Protocol):
    """What the fallback needs of a Kite REST client (``streaming.kite.rest.KiteRestClient``)."""

    def quote(self, instruments: list[str]) -> Mapping[str, Quote]: ...

    def close(self) -> None: ...


QuoteClientFactory = Callable[[AccountRow], QuoteClient]


def quotes_to_ticks(quotes: Mapping[str, Quote], *, index_tokens: frozenset[int]) -> np.ndarray:
    """Quotes as decoded ticks: full packets (index full for indices), best bid/ask first."""
    ticks = empty_ticks(len(quotes))
    for row, q in enumerate(quotes.values()):
        t = ticks[row]
        is_index = q.instrument_token in index_tokens
        t["instrument_token"] = q.instrument_token
        t["packet_length"] = PACKET_INDEX_FULL if is_index else PACKET_FULL
        t["tradable"] = not is_index
        t["is_index"] = is_index
        t["last_price"] = q.last_price
        t["open"], t["high"], t["low"], t["close"] = q.ohlc.open, q.ohlc.high, q.ohlc.low, q.ohlc.close
        t["change"] = q.net_change or 0.0
        t["volume_traded"] = q.volume or 0
        t["last_traded_quantity"] = q.last_quantity or 0
        t["average_traded_price"] = q.average_price or 0.0
        t["total_buy_quantity"] = q.buy_quantity or 0
        t["total_sell_quantity"] = q.sell_quantity or 0
        t["oi"], t["oi_day_high"], t["oi_day_low"] = q.oi or 0, q.oi_day_high or 0, q.oi_day_low or 0
        if q.timestamp is not None:
            t["exchange_timestamp"] = int(q.timestamp.timestamp())
        if q.last_trade_time is not None:
            t["last_trade_time"] = int(q.last_trade_time.timestamp())
        if q.depth is not None and not is_index:
            for side, levels in (("buy", q.depth.buy), ("sell", q.depth.sell)):
                for k, level in enumerate(levels[: t[f"depth_{side}_price"].shape[0]]):
                    t[f"depth_{side}_price"][k] = level.price
                    t[f"depth_{side}_quantity"][k] = level.quantity
                    t[f"depth_{side}_orders"][k] = level.orders
    return ticks


@dataclass
class _Polling:
    """One stalled account: its instruments in chunks, when each chunk is due, what was polled."""

    label: str
    tokens: list[int]
    due_s: dict[int, float] = field(default_factory=dict)  # chunk index -> next poll (monotonic)
    polled: set[int] = field(default_factory=set)

    def chunk(self, index: int) -> list[int]:
        size = QUOTE_MAX_INSTRUMENTS_PER_CALL
        return self.tokens[index * size : (index + 1) * size]

    def next_due(self, now: float) -> int | None:
        """The chunk waiting longest among those due, or None."""
        chunks = max(1, -(-len(self.tokens) // QUOTE_MAX_INSTRUMENTS_PER_CALL))
        due = [(self.due_s.get(i, float("-inf")), i) for i in range(chunks)]
        at, index = min(due)
        return index if at <= now else None


@dataclass
class _Call:
    """A quote call in flight on one account's key, for one stalled account's chunk."""

    target: int
    polling: _Polling
    task: asyncio.Task[None]


class RestFallback:
    """Polls the instruments of stalled connections over REST; ``run()`` is the supervised loop.

    Each stalled account's instruments are cut into chunks of at most 500; a chunk is polled at
    most once a second, by whichever account's key is free (every running account with an
    active session, stalled or not, lends its own 1 call/s): the load is spread over the
    accounts, and a stalled account's instruments refresh faster the more accounts there are.
    """

    def __init__(
        self,
        *,
        connections: ConnectionManager,
        accounts: Callable[[], Mapping[int, AccountRow]],
        client_factory: QuoteClientFactory,
        index_tokens: Callable[[], frozenset[int]],
        on_ticks: Callable[[int, np.ndarray], None],
        clear_flags: Callable[[list[int]], Awaitable[None]],
        metrics: EngineMetrics,
        after_s: float,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connections = connections
        self._accounts = accounts
        self._client_factory = client_factory
        self._index_tokens = index_tokens
        self._on_ticks = on_ticks
        self._clear_flags = clear_flags
        self._metrics = metrics
        self._after_s = float(after_s)
        self._check_interval_s = check_interval_s
        self._monotonic = monotonic
        self._polling: dict[int, _Polling] = {}
        self._calls: dict[int, _Call] = {}  # caller account -> its call in flight
        self._clients: dict[int, tuple[str, QuoteClient]] = {}  # account -> (fingerprint, client)
        # (account, connection) -> when it was first seen down without ever having a message.
        self._down_since: dict[tuple[int, int], float] = {}
        self._turn = 0  # round robin over stalled accounts

    @property
    def polling(self) -> dict[int, list[int]]:
        """Accounts polled now and their instruments."""
        return {aid: list(p.tokens) for aid, p in self._polling.items()}

    async def run(self) -> None:
        try:
            while True:
                await self.step()
                await asyncio.sleep(self._check_interval_s)
        finally:
            for aid in list(self._polling):
                await self._stop(aid)
            for _, client in self._clients.values():
                client.close()
            self._clients.clear()

    def stalled(self) -> tuple[dict[int, tuple[str, list[int]]], list[int]]:
        """Accounts with a stalled connection (label, those connections' instruments), and the
        accounts whose key can make calls (running, session active), in order."""
        now = self._monotonic()
        out: dict[int, tuple[str, list[int]]] = {}
        callers: list[int] = []
        seen: set[tuple[int, int]] = set()
        for aid, (label, health) in sorted(self._connections.connection_health().items()):
            if health.session is SessionState.ACTIVE:
                callers.append(aid)
            tokens: list[int] = []
            for conn in health.connections:
                if not conn.instruments or conn.state in (
                    ConnectionState.IDLE, ConnectionState.SESSION_EXPIRED, ConnectionState.CLOSED
                ):
                    continue
                key = (aid, conn.index)
                if conn.state is ConnectionState.CONNECTED and (
                    conn.last_message_age_s is not None and conn.last_message_age_s < self._after_s
                ):
                    continue
                if conn.last_message_age_s is not None:
                    silent_s = conn.last_message_age_s
                else:  # never connected yet: count from when this loop first saw it down
                    seen.add(key)
                    silent_s = now - self._down_since.setdefault(key, now)
                if silent_s >= self._after_s:
                    tokens.extend(self._connections.tokens_on(aid, conn.index))
            if tokens:
                out[aid] = (label, tokens)
        self._down_since = {k: v for k, v in self._down_since.items() if k in seen}
        return out, callers

    async def step(self) -> None:
        """Start polling newly stalled accounts, stop those whose socket is back, poll."""
        stalled, callers = self.stalled()
        for aid in [a for a in self._polling if a not in stalled]:
            await self._stop(aid)
        for aid, (label, tokens) in stalled.items():
            polling = self._polling.get(aid)
            if polling is None:
                polling = self._polling[aid] = _Polling(label=label, tokens=tokens)
                log.warning("rest_fallback.started", account=label, instruments=len(tokens))
            if polling.tokens != tokens:
                polling.tokens, polling.due_s = tokens, {}
        for caller, call in list(self._calls.items()):
            if call.task.done():
                del self._calls[caller]
                call.task.result()  # a bug in a call surfaces here, to the supervisor
        self._metrics.rest_fallback_accounts.set(len(self._polling))
        if not self._polling:
            return
        now = self._monotonic()
        for caller in callers:
            if caller in self._calls:
                continue
            picked = self._next_chunk(now)
            if picked is None:
                break
            target, polling, index = picked
            polling.due_s[index] = now + 1.0 / QUOTE_REQUESTS_PER_S
            task = asyncio.create_task(
                self._poll_once(caller, target, polling, polling.chunk(index)),
                name=f"rest_fallback:{polling.label}:{index}",
            )
            self._calls[caller] = _Call(target=target, polling=polling, task=task)

    def _next_chunk(self, now: float) -> tuple[int, _Polling, int] | None:
        """The next due chunk, taking the stalled accounts in turn."""
        targets = sorted(self._polling)
        for offset in range(len(targets)):
            target = targets[(self._turn + offset) % len(targets)]
            polling = self._polling[target]
            index = polling.next_due(now)
            if index is not None:
                self._turn = (self._turn + offset + 1) % len(targets)
                return target, polling, index
        return None

    async def _stop(self, aid: int) -> None:
        polling = self._polling.pop(aid)
        for caller, call in list(self._calls.items()):
            if call.target == aid:
                del self._calls[caller]
                call.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call.task
        if polling.polled:
            await self._clear_flags(sorted(polling.polled))
        log.info("rest_fallback.stopped", account=polling.label, polled=len(polling.polled))

    def _client(self, account: AccountRow) -> QuoteClient:
        held = self._clients.get(account.account_id)
        if held is not None and held[0] == account.token_fingerprint:
            return held[1]
        if held is not None:
            held[1].close()
        client = self._client_factory(account)
        self._clients[account.account_id] = (account.token_fingerprint, client)
        return client

    async def _poll_once(self, caller: int, target: int, polling: _Polling, chunk: list[int]) -> None:
        """One quote call on ``caller``'s key for a chunk of ``target``'s instruments."""
        account = self._accounts().get(caller)
        if account is None or not chunk:
            return
        client = self._client(account)
        try:
            # In a thread: the client blocks on the shared limiter's slot, then on HTTP.
            quotes = await asyncio.to_thread(client.quote, [str(t) for t in chunk])
        except KiteError as exc:
            self._metrics.rest_fallback_requests.labels(account.label, "error").inc()
            log.warning("rest_fallback.quote_failed", account=account.label, for_account=polling.label,
                        instruments=len(chunk), error=str(exc)[:300])
            return
        self._metrics.rest_fallback_requests.labels(account.label, "ok").inc()
        if self._polling.get(target) is not polling:
            return  # the socket came back while the call was in flight: its data is dropped
        if quotes:
            ticks = quotes_to_ticks(quotes, index_tokens=self._index_tokens())
            polling.polled.update(int(t) for t in ticks["instrument_token"])
            self._on_ticks(target, ticks)
