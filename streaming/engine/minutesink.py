"""Where chains' minute samples go: the ChainMinute table; and the daily history back to the
engine's chain analytics, for IV rank and IV percentile.

The pipeline thread samples every chain once a minute (ChainAnalytics.minute_rows); this loop
stores the samples off the flush path, a few seconds later, and reloads the earlier days' ATM
IV when the engine starts and when the day (IST) changes. While the database is away unsaved
samples wait, bounded, and are retried; a history that cannot be read leaves IV rank null.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import numpy as np
import structlog

from streaming.engine.chain_analytics import HistoryKey, trading_day
from streaming.engine.metrics import EngineMetrics
from streaming.engine.store import (
    PermanentStoreError,
    StoreError,
    chain_minute_daily_iv,
    chain_minutes_save,
    run_db,
)

log = structlog.get_logger(__name__)

MAX_UNSAVED_MINUTES: Final = 50_000
"""Samples kept while the database is away (one a minute per chain: hours of a large universe)."""


class ChainMinuteSink:
    """Stores minute samples and keeps the analytics' daily history fresh; ``run()`` loops."""

    def __init__(
        self,
        *,
        metrics: EngineMetrics,
        set_history: Callable[[Mapping[HistoryKey, np.ndarray]], Awaitable[None]],
        window_days: int,
        clock: Callable[[], float],
        interval_s: float = 5.0,
    ) -> None:
        self._metrics = metrics
        self._set_history = set_history
        self._window_days = window_days
        self._clock = clock
        self._interval_s = interval_s
        self._unsaved: list[dict[str, Any]] = []
        self._history_day: int | None = None

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Samples the pipeline thread took (called on the event loop)."""
        self._unsaved.extend(rows)
        self._bound()

    def _bound(self) -> None:
        if len(self._unsaved) > MAX_UNSAVED_MINUTES:
            dropped = len(self._unsaved) - MAX_UNSAVED_MINUTES
            self._metrics.dropped.labels("chain_minute_backlog").inc(dropped)
            del self._unsaved[:dropped]

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self._interval_s)

    async def step(self) -> None:
        """Store what is unsaved; reload the history on a new day."""
        if self._unsaved:
            rows, self._unsaved = self._unsaved, []
            try:
                await run_db(chain_minutes_save, rows=rows)
            except PermanentStoreError as exc:
                # The same rows would fail on every retry: counted and dropped.
                log.error("chain_minutes.refused", rows=len(rows), error=repr(exc)[:300])
                self._metrics.dropped.labels("chain_minute_refused").inc(len(rows))
            except StoreError as exc:
                log.warning("chain_minutes.save_failed", rows=len(rows), error=repr(exc)[:300])
                # Kept, oldest first, with what add() appended meanwhile.
                self._unsaved = rows + self._unsaved
                self._bound()
        day = trading_day(self._clock())
        if day != self._history_day:
            today = dt.date(1970, 1, 1) + dt.timedelta(days=day)
            try:
                daily = await run_db(
                    chain_minute_daily_iv, today=today, window_days=self._window_days
                )
            except StoreError as exc:
                log.warning("chain_minutes.history_failed", error=repr(exc)[:300])
                return
            await self._set_history(
                {key: np.asarray(values, dtype=np.float64) for key, values in daily.items()}
            )
            self._history_day = day
            log.info("chain_minutes.history_loaded", chains=len(daily))

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)
