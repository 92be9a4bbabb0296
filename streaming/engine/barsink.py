"""Where closed underlying bars go: the ``bars.<NAME>`` groups and the UnderlyingBar table.

The engine hands over the bars the aggregator closed (on a later minute's tick, or by the
clock); :class:`BarSink` publishes them and stores them, once a second, off the flush path.
A bar is queued for the database before it is published, so a failed publish never loses
it; while the database is away unsaved bars wait, bounded, and are retried.

When a save held live gap bars, or the first live bar of a token since this engine started
(after a takeover or a restart the minutes before it were nobody's), ``on_gaps`` is called,
in a thread: the edge queues the backfill task that fills them from Kite's history. Mock
bars never call it: the synthetic market has no history at Kite.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import structlog

from streaming.engine.bars import Bar
from streaming.engine.metrics import EngineMetrics
from streaming.engine.publisher import Publisher
from streaming.engine.store import (
    PermanentStoreError,
    StoreError,
    bars_save,
    bars_save_each,
    run_db,
)

log = structlog.get_logger(__name__)

MAX_UNSAVED_BARS = 100_000
"""Closed bars kept while the database is away (one a minute per underlying: days of them)."""


class BarSink:
    """Publishes and stores closed bars; ``run()`` is the supervised loop."""

    def __init__(
        self,
        *,
        publisher: Publisher,
        metrics: EngineMetrics,
        close_due: Callable[[], Awaitable[list[Bar]]],
        interval_s: float = 1.0,
        on_gaps: Callable[[], None] | None = None,
    ) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._close_due = close_due
        self._interval_s = interval_s
        self._pending: list[Bar] = []
        self._unsaved: list[dict[str, Any]] = []
        self._on_gaps = on_gaps
        self._saved_tokens: set[int] = set()

    def add(self, closed: list[Bar]) -> None:
        """Bars the aggregator closed on ticks (called on the event loop)."""
        self._pending.extend(closed)

    async def drain(self, closed: list[Bar], *, timeout_s: float = 5.0) -> None:
        """At shutdown: publish and store ``closed`` and everything pending, once, bounded."""
        self.add(closed)
        try:
            await asyncio.wait_for(self.step(), timeout=timeout_s)
        except TimeoutError:
            log.error("bars.drain_timeout", unsaved=len(self._unsaved), timeout_s=timeout_s)
        if self._unsaved:
            log.error("bars.lost_at_shutdown", bars=len(self._unsaved))

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.step()

    async def step(self) -> None:
        """Close due bars, publish what closed, store what is unsaved."""
        self._pending.extend(await self._close_due())
        closed, self._pending = self._pending, []
        if closed:
            self._metrics.bars_closed.inc(len(closed))
            self._unsaved.extend(bar.row() for bar in closed)
            try:
                await self._publisher.publish_bars(closed)
            except (redis.RedisError, OSError) as exc:
                self._metrics.dropped.labels("bar_publish_failed").inc(len(closed))
                log.warning("bars.publish_failed", bars=len(closed), error=repr(exc))
        if not self._unsaved:
            return
        rows = self._unsaved
        try:
            await run_db(bars_save, bars=rows)
        except PermanentStoreError as exc:
            # The same batch would fail on every retry: save what can be saved, one bar at
            # a time, and drop (count, log) the bars refused for good.
            log.warning("bars.batch_refused", bars=len(rows), error=repr(exc)[:300])
            try:
                refused = await run_db(bars_save_each, bars=rows)
            except StoreError as again:
                log.warning("bars.save_failed", bars=len(rows), error=repr(again))
                return
            for row, why in refused:
                log.error("bars.refused", instrument_id=row.get("instrument_id"),
                          start=str(row.get("start")), error=why)
            self._metrics.dropped.labels("bar_refused").inc(len(refused))
        except StoreError as exc:
            log.warning("bars.save_failed", bars=len(rows), error=repr(exc))
            if len(rows) > MAX_UNSAVED_BARS:
                # The database has been away for long: keep the newest, count the rest.
                self._metrics.dropped.labels("bar_backlog").inc(len(rows) - MAX_UNSAVED_BARS)
                del rows[:-MAX_UNSAVED_BARS]
            return
        self._unsaved = []
        await self._saved(rows)

    async def _saved(self, rows: list[dict[str, Any]]) -> None:
        live = [row for row in rows if not row["is_mock"]]
        tokens = {row["instrument_id"] for row in live}
        first = not tokens <= self._saved_tokens
        self._saved_tokens |= tokens
        if self._on_gaps is not None and (first or any(row["is_gap"] for row in live)):
            await asyncio.to_thread(self._on_gaps)
