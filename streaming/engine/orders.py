"""Kite's order updates from the ticker sockets, handed off the event loop to the order service.

Kite pushes ``{"type": "order", "data": {...}}`` on every ticker socket of the account, so
with three connections one change arrives up to three times: :class:`OrderUpdateRelay`
drops the copies it saw recently, queues the rest (bounded) and applies them, each through
``apply(account_id, update)`` (the order service in a database thread, which is idempotent
and never moves an order backwards, so a copy that slips through changes nothing). An
apply waits mostly on PostgreSQL, so ``workers`` queues are drained side by side; one
order's updates always go to the same queue and keep their arrival order.

Updates sent while no socket was up are lost on this channel. So every successful connect
asks for a sync of the account (``request_sync``, the Celery job that reconciles orders,
trades and positions from Kite's books), at most once per ``sync_min_interval_s``; an
overflowing queue asks for one too instead of blocking the socket readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import structlog

from streaming.engine.metrics import EngineMetrics
from streaming.engine.store import StoreError
from streaming.kite.codec import OrderMessage

log = structlog.get_logger(__name__)

MAX_PENDING_UPDATES: Final = 10_000
APPLY_WORKERS: Final = 2
"""Half the engine's database threads (store.DB_THREADS): leases and heartbeats keep theirs."""
RECENT_UPDATES_REMEMBERED: Final = 4096
"""Copies of one change arrive within milliseconds of each other; this covers many seconds."""
SYNC_MIN_INTERVAL_S: Final = 10.0

ApplyUpdate = Callable[[int, dict[str, Any]], Awaitable[object]]
RequestSync = Callable[[int, str], Awaitable[object]]


class OrderUpdateRelay:
    """Ticker order updates -> the order service, in order, deduplicated, bounded, off the loop."""

    def __init__(
        self,
        *,
        apply: ApplyUpdate,
        metrics: EngineMetrics,
        request_sync: RequestSync | None = None,
        max_pending: int = MAX_PENDING_UPDATES,
        workers: int = APPLY_WORKERS,
        sync_min_interval_s: float = SYNC_MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._apply = apply
        self._metrics = metrics
        self._request_sync = request_sync
        self._queues: list[asyncio.Queue[tuple[int, dict[str, Any]]]] = [
            asyncio.Queue(max(1, max_pending // workers)) for _ in range(workers)
        ]
        self._recent: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        self._syncs_wanted: dict[int, str] = {}
        self._last_sync_at: dict[int, float] = {}
        self._sync_min_interval_s = sync_min_interval_s
        self._clock = clock
        self._wake = asyncio.Event()

    # --- called on the event loop by the ticker clients (never blocks) -----------------------

    def order_message(self, account_id: int, message: OrderMessage) -> None:
        """Queue one order update unless it is a copy of one seen recently."""
        update = message.data.model_dump(mode="json", exclude_none=False)
        key = (account_id, orjson.dumps(update, option=orjson.OPT_SORT_KEYS))
        if key in self._recent:
            self._recent.move_to_end(key)
            self._metrics.order_updates.labels("duplicate").inc()
            return
        self._recent[key] = None
        if len(self._recent) > RECENT_UPDATES_REMEMBERED:
            self._recent.popitem(last=False)
        order_key = update.get("order_id") or update.get("tag") or ""
        queue = self._queues[hash((account_id, order_key)) % len(self._queues)]
        try:
            queue.put_nowait((account_id, update))
        except asyncio.QueueFull:
            # Never block the socket reader: the sync reads Kite's order book instead.
            self._metrics.order_updates.labels("overflow").inc()
            log.warning("orders.update_queue_full", account_id=account_id, order_id=update["order_id"])
            self.sync_wanted(account_id, "queue_full")

    def connected(self, account_id: int, index: int, connects: int) -> None:
        """A ticker socket of the account came up: what it missed meanwhile needs a sync."""
        self.sync_wanted(account_id, "connect" if connects == 1 else "reconnect")

    def sync_wanted(self, account_id: int, reason: str) -> None:
        if self._request_sync is None:
            return
        self._syncs_wanted.setdefault(account_id, reason)
        self._wake.set()

    # --- supervised tasks ----------------------------------------------------------------------

    async def run(self) -> None:
        """Drain every queue, each applying its updates one at a time."""
        async with asyncio.TaskGroup() as tasks:
            for index, queue in enumerate(self._queues):
                tasks.create_task(self._drain(queue), name=f"orders.apply.{index}")

    async def _drain(self, queue: asyncio.Queue[tuple[int, dict[str, Any]]]) -> None:
        while True:
            account_id, update = await queue.get()
            try:
                await self._apply(account_id, update)
            except StoreError as exc:
                # The database is away: this update is not lost, Kite's order book has it.
                self._metrics.order_updates.labels("failed").inc()
                log.warning("orders.update_failed", account_id=account_id,
                            order_id=update["order_id"], error=str(exc)[:200])
                self.sync_wanted(account_id, "update_failed")
                continue
            self._metrics.order_updates.labels("applied").inc()

    async def run_syncs(self) -> None:
        """Ask for the wanted syncs, each account at most once per ``sync_min_interval_s``."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = self._clock()
            waits = []
            for account_id, reason in list(self._syncs_wanted.items()):
                due = self._last_sync_at.get(account_id, -self._sync_min_interval_s)
                due += self._sync_min_interval_s
                if now < due:
                    waits.append(due - now)
                    continue
                del self._syncs_wanted[account_id]
                self._last_sync_at[account_id] = now
                assert self._request_sync is not None
                await self._request_sync(account_id, reason)
                log.info("orders.sync_requested", account_id=account_id, reason=reason)
            if waits:
                # Until the earliest is due, or sooner if another account wants one.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(waits)):
                        await self._wake.wait()
                self._wake.set()

    @property
    def pending(self) -> int:
        return sum(queue.qsize() for queue in self._queues)
