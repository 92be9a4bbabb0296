"""The pipeline's worker: the inbox of decoded frames and the pipeline's one thread.

The event loop reads sockets and only queues arrays here (:meth:`PipelineWorker.enqueue`);
one "pipeline" thread owns the snapshot pipeline and the bar aggregator and does all their
work in order: ingest and flush (:meth:`flush`, with the chain analytics that are due),
universe installs (:meth:`install`), closing due bars, and the initial-state reads of new
subscribers (:attr:`reads`). So a 100 ms flush of
100k instruments never stops the loop, and nothing needs a lock: a read runs between two
flushes, never during one, and never blocks the loop while a flush runs.

:class:`TickIntake` is the feeds' side: the Kite clients' and the mock feed's callbacks,
counting frames per account before they are queued.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from streaming.engine.bars import Bar, BarAggregator
from streaming.engine.chain_analytics import ChainAnalytics, HistoryKey
from streaming.engine.flush_trigger import FlushTrigger
from streaming.engine.metrics import EngineMetrics
from streaming.engine.pipeline import GroupBatch, SnapshotPipeline
from streaming.engine.universe import InstrumentUniverse

_FLUSH_SAMPLES = 200
"""Recent flush durations kept for the status document's flush_ms_p50."""
MAX_INBOX_BYTES = 64 * 1024 * 1024
"""Bytes of decoded frames queued for the pipeline thread beyond which the oldest are dropped.

A tick is 336 bytes decoded: 64 MiB is about 200k ticks, seconds of a busy market's backlog.
A count of ticks let a stalled pipeline thread pile up hundreds of megabytes."""


@dataclass(frozen=True, slots=True)
class FlushOutcome:
    """What the pipeline thread hands back to the event loop after one flush."""

    pending: int
    batches: list[GroupBatch]
    bars: list[Bar]
    unknown: int
    compute_s: float
    oldest_received: float | None
    analytics: list[tuple[str, bytes]]
    """(chain group, ``analytics`` message) of the chains due this flush."""
    minutes: list[dict[str, Any]]
    """ChainMinute rows, on the first flush of each minute."""
    next_due_in: float | None = None
    """Seconds until time alone gives a flush work (a forward going stale, a chain refresh,
    analytics waiting for their interval); None when nothing waits on the clock."""


class PipelineReads:
    """The pipeline's read side for the snapshot-request loop: awaited, run on its thread."""

    def __init__(self, worker: PipelineWorker) -> None:
        self._worker = worker

    async def latest(self, tokens: Iterable[int]) -> tuple[list[int], list[bytes]]:
        return await self._worker.on_thread(self._worker._pipeline.latest, list(tokens))

    async def groups_of(self, tokens: Iterable[int]) -> set[str]:
        return await self._worker.on_thread(self._worker._pipeline.groups_of, list(tokens))

    async def analytics_latest(self, groups: Iterable[str]) -> list[tuple[str, bytes]]:
        worker = self._worker
        return await worker.on_thread(
            worker._analytics.latest, worker._pipeline, list(groups), worker._clock()
        )


class PipelineWorker:
    """Owns the pipeline and the bar aggregator; every change to them runs on its one thread."""

    def __init__(
        self,
        *,
        pipeline: SnapshotPipeline,
        bars: BarAggregator,
        metrics: EngineMetrics,
        analytics: ChainAnalytics | None = None,
        clock: Callable[[], float] = time.time,
        max_inbox_bytes: int = MAX_INBOX_BYTES,
        flush_trigger: FlushTrigger | None = None,
    ) -> None:
        self._pipeline = pipeline
        #: Told of every change queued here; decides when the engine flushes.
        self.flush_trigger = flush_trigger or FlushTrigger()
        self._bars = bars
        self._analytics = analytics or ChainAnalytics()
        self._metrics = metrics
        self._clock = clock
        self._max_inbox_bytes = max_inbox_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        # (ticks, is_mock, received, rest_fallback) per queued frame.
        self._inbox: list[tuple[np.ndarray, bool, float, bool]] = []
        self._inbox_ticks = 0
        self._inbox_bytes = 0
        self._flush_ms: deque[float] = deque(maxlen=_FLUSH_SAMPLES)
        self._underlyings: dict[str, Any] = {}
        self._underlyings_at = float("-inf")
        self.reads = PipelineReads(self)

    @property
    def universe(self) -> InstrumentUniverse:
        return self._pipeline.universe

    @property
    def underlyings(self) -> dict[str, Any]:
        """Per underlying: price, exchange time and forwards, at most a second old."""
        return self._underlyings

    @property
    def flush_ms_p50(self) -> float | None:
        return round(statistics.median(self._flush_ms), 2) if self._flush_ms else None

    def enqueue(self, ticks: np.ndarray, *, is_mock: bool, rest_fallback: bool = False) -> None:
        """Queue one decoded frame for the next flush (event loop; only appends).

        ``rest_fallback``: ticks built from Kite's quote API during a stall; they update the
        snapshots (flagged) but not the bars, which the historical backfill fills.
        """
        self._inbox.append((ticks, is_mock, self._clock(), rest_fallback))
        self.flush_trigger.changed()
        self._inbox_ticks += len(ticks)
        self._inbox_bytes += ticks.nbytes
        while self._inbox_bytes > self._max_inbox_bytes and len(self._inbox) > 1:
            # The pipeline thread has fallen far behind: drop the oldest frames (their
            # instruments' later ticks supersede them), count them, and carry on.
            old, _, _, _ = self._inbox.pop(0)
            self._inbox_ticks -= len(old)
            self._inbox_bytes -= old.nbytes
            self._metrics.dropped.labels("inbox_overflow").inc(len(old))

    @property
    def inbox_bytes(self) -> int:
        return self._inbox_bytes

    async def flush(self, watched: Any) -> FlushOutcome:
        """Ingest what arrived and compute Greeks and JSON for what changed, on the thread."""
        self._metrics.queued_ticks.set(self._inbox_ticks)
        inbox, self._inbox, self._inbox_ticks, self._inbox_bytes = self._inbox, [], 0, 0
        outcome = await self.on_thread(self._compute, inbox, self._clock(), watched)
        if outcome.pending:
            self._flush_ms.append(outcome.compute_s * 1000.0)
        return outcome

    async def install(self, universe: InstrumentUniverse) -> None:
        """Make ``universe`` the one the pipeline streams, between two flushes."""
        await self.on_thread(self._install, universe)

    async def clear_rest_fallback(self, tokens: list[int]) -> None:
        """Their socket is back: drop the ``rest_fallback`` flag of ``tokens``' snapshots."""
        await self.on_thread(self._pipeline.clear_rest_fallback, tokens)
        self.flush_trigger.changed()

    async def set_analytics_history(self, history: Mapping[HistoryKey, np.ndarray]) -> None:
        await self.on_thread(self._analytics.set_history, history)

    async def close_due_bars(self) -> list[Bar]:
        return await self.on_thread(self._bars.close_due, self._clock())

    async def close_all_bars(self) -> list[Bar]:
        """Close every bar in progress, the open minute included (shutdown)."""
        return await self.on_thread(self._bars.close_all)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)

    async def on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run pipeline work on its one thread, in order, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _compute(
        self, inbox: list[tuple[np.ndarray, bool, float, bool]], now: float, watched: Any
    ) -> FlushOutcome:
        started = time.perf_counter()
        unknown = 0
        bars: list[Bar] = []
        for ticks, is_mock, received, rest_fallback in inbox:
            unknown += self._pipeline.ingest(
                ticks, is_mock=is_mock, received_epoch_s=received, rest_fallback=rest_fallback
            ).unknown
            if not rest_fallback:
                bars.extend(self._bars.ingest(ticks, is_mock=is_mock, received_epoch_s=received))
        pending = self._pipeline.pending
        batches = self._pipeline.flush(now, watched=watched)
        self._analytics.observe(self._pipeline, now)
        analytics = self._analytics.due(self._pipeline, now, watched)
        minutes = self._analytics.minute_rows(self._pipeline, now)
        if now - self._underlyings_at >= 1.0:
            self._underlyings = self._pipeline.underlying_summary()
            self._underlyings_at = now
        return FlushOutcome(
            pending=pending,
            batches=batches,
            bars=bars,
            unknown=unknown,
            compute_s=time.perf_counter() - started,
            oldest_received=min((r for _, _, r, _ in inbox), default=None),
            analytics=analytics,
            minutes=minutes,
            next_due_in=_earliest(
                self._pipeline.next_due_in(now), self._analytics.next_due_in(now, watched)
            ),
        )

    def _install(self, universe: InstrumentUniverse) -> None:
        self._pipeline.set_universe(universe)
        self._bars.set_sources(universe.spot_tokens())
        self._underlyings = self._pipeline.underlying_summary()


def _earliest(*delays: float | None) -> float | None:
    known = [d for d in delays if d is not None]
    return min(known) if known else None


@dataclass
class AccountTicks:
    """Per-account counters the tick callback keeps (counts, never per-tick records)."""

    ticks: int = 0
    last_tick_monotonic: float | None = None
    ticks_at_last_beat: int = 0
    rate_per_s: float = 0.0


class TickIntake:
    """The feeds' callbacks: count each frame, drop live frames outside live mode, queue it."""

    def __init__(self, *, worker: PipelineWorker, metrics: EngineMetrics) -> None:
        self._worker = worker
        self._metrics = metrics
        #: Set by the engine's mode switch: live frames are taken only in live mode.
        self.live = False
        self.accounts: dict[int, AccountTicks] = {}
        #: Account labels for the metrics, kept by the planner on each reload.
        self.labels: dict[int, str] = {}
        self.ticks_total = 0

    def live_ticks(self, account_id: int, ticks: np.ndarray) -> None:
        """The Kite clients' tick callback: one decoded frame, queued for the next flush."""
        n = len(ticks)
        if not self.live:
            # A frame in flight when the market closed: mock owns the slots now.
            self._metrics.dropped.labels("live_in_mock_mode").inc(n)
            return
        stats = self.accounts.setdefault(account_id, AccountTicks())
        stats.ticks += n
        stats.last_tick_monotonic = time.monotonic()
        label = self.labels.get(account_id, f"#{account_id}")
        self._metrics.ticks_in.labels("live", label).inc(n)
        self.ticks_total += n
        self._worker.enqueue(ticks, is_mock=False)

    def rest_ticks(self, account_id: int, ticks: np.ndarray) -> None:
        """The REST fallback's quotes of a stalled account, as ticks (flagged ``rest_fallback``)."""
        if not self.live:
            self._metrics.dropped.labels("live_in_mock_mode").inc(len(ticks))
            return
        label = self.labels.get(account_id, f"#{account_id}")
        self._metrics.ticks_in.labels("rest", label).inc(len(ticks))
        self.ticks_total += len(ticks)
        self._worker.enqueue(ticks, is_mock=False, rest_fallback=True)

    def mock_ticks(self, ticks: np.ndarray) -> None:
        self._metrics.ticks_in.labels("mock", "mock").inc(len(ticks))
        self.ticks_total += len(ticks)
        self._worker.enqueue(ticks, is_mock=True)

    def reset_account(self, account_id: int) -> None:
        self.accounts[account_id] = AccountTicks()
