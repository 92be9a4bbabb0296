"""The engine: one runticker process, wired from its parts and run under one supervisor.

:meth:`Engine.build` builds every collaborator from an :class:`EngineConfig` read once from
settings (a test passes its own client factory, market, clock or metrics), and ``Engine``
keeps the wiring, the run and the shutdown, and the mode:

- :class:`~streaming.engine.worker.PipelineWorker` owns the inbox and the pipeline thread
  (flushes, universe installs, initial-state reads); :class:`~streaming.engine.worker.TickIntake` is
  the feeds' callback that queues frames there;
- :class:`~streaming.engine.planner.StreamPlanner` owns accounts, modes, allocation and the
  plan: what to stream live and what to mock;
- the publisher sends each flush's batches to the channel layer; the heartbeat writes the
  status document (:mod:`streaming.status`).

Threads: the event loop reads sockets, queues decoded frames and talks to Redis; the
pipeline thread computes; database calls run in worker threads (store.run_db).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import structlog

from streaming.control import ChangeNotifier
from streaming.engine.bars import BarAggregator
from streaming.engine.barsink import BarSink
from streaming.engine.chain_analytics import ChainAnalytics
from streaming.engine.config import EngineConfig
from streaming.engine.connections import ClientFactory, ConnectionManager
from streaming.engine.fallback import QuoteClientFactory, RestFallback
from streaming.engine.flush_trigger import FlushTrigger
from streaming.engine.heartbeat import HeartbeatWriter
from streaming.engine.leases import LeaseManager
from streaming.engine.market_hours import EngineMode, MarketHours, ModePolicy
from streaming.engine.metrics import EngineMetrics, LoopLagMonitor
from streaming.engine.minutesink import ChainMinuteSink
from streaming.engine.mockfeed import MockFeed
from streaming.engine.orders import OrderUpdateRelay, RequestSync
from streaming.engine.pipeline import SnapshotPipeline
from streaming.engine.planner import ApplyRequests, StreamPlanner
from streaming.engine.publisher import Publisher, PublishError, PublishFailureLog
from streaming.engine.recorder import FrameRecorder
from streaming.engine.reloader import (
    LocalNoticeListener,
    RedisNoticeListener,
    Reloader,
    ReloadTrigger,
)
from streaming.engine.store import AccountRow, order_update_apply, run_db_publishing
from streaming.engine.supervisor import Supervisor
from streaming.engine.universe import InstrumentUniverse
from streaming.engine.worker import PipelineWorker, TickIntake
from streaming.kite.rest import KiteRateLimiter, KiteRestClient
from streaming.market import SyntheticMarket
from streaming.schema import InstrumentKind
from streaming.status import EngineStatus

log = structlog.get_logger(__name__)

_WATCHED_REFRESH_S = 2.0
"""How often the publisher re-reads which groups have listeners."""


def _quote_client_factory(config: EngineConfig) -> QuoteClientFactory:
    """REST clients for the fallback: each account's own key, on the shared rate limiter."""
    limiter = KiteRateLimiter.from_redis_url(config.redis_url)

    def build(account: AccountRow) -> KiteRestClient:
        # One attempt: the fallback's next call, a second later, is the retry.
        return KiteRestClient(api_key=account.api_key, access_token=account.access_token,
                              api_root=config.kite_api_root, rate_limiter=limiter,
                              retry_attempts=1)

    return build


def _index_tokens(universe: InstrumentUniverse) -> frozenset[int]:
    return frozenset(universe.tokens[universe.kind == InstrumentKind.INDEX].tolist())


class Engine:
    """One runticker process: ``Engine.build(config, ...)``, then ``await engine.run(stop)``."""

    def __init__(
        self,
        *,
        config: EngineConfig,
        metrics: EngineMetrics,
        supervisor: Supervisor,
        worker: PipelineWorker,
        intake: TickIntake,
        planner: StreamPlanner,
        publisher: Publisher,
        bar_sink: BarSink,
        minute_sink: ChainMinuteSink,
        connections: ConnectionManager,
        recorder: FrameRecorder,
        orders: OrderUpdateRelay,
        mock_feed: MockFeed,
        leases: LeaseManager,
        heartbeat: HeartbeatWriter,
        policy: ModePolicy,
        trigger: ReloadTrigger,
        applies: ApplyRequests,
        notices: RedisNoticeListener | LocalNoticeListener | None,
        loop_lag: LoopLagMonitor,
        rest_fallback: RestFallback | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.engine_id = config.engine_id
        self.metrics = metrics
        self.supervisor = supervisor
        self.worker = worker
        self.intake = intake
        self.planner = planner
        self.publisher = publisher
        self.bar_sink = bar_sink
        self.minute_sink = minute_sink
        self.connections = connections
        self.recorder = recorder
        self.orders = orders
        self.mock_feed = mock_feed
        self.leases = leases
        self.heartbeat = heartbeat
        self.policy = policy
        self.trigger = trigger
        self.applies = applies
        self.notices = notices
        self.loop_lag = loop_lag
        self.rest_fallback = rest_fallback
        self.publish_failures = PublishFailureLog()
        self._clock = clock
        self.mode: EngineMode = policy.mode_at(clock())
        intake.live = self.mode == "live"
        self.started = asyncio.Event()
        self.reloaded = asyncio.Event()
        self._apply_lock = asyncio.Lock()
        self._ticks_at_last_beat = 0
        self._last_beat_monotonic = time.monotonic()
        self._reload_count = 0
        self._stopped = False

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        config: EngineConfig,
        *,
        channel_layer: Any,
        notifier: ChangeNotifier | None = None,
        client_factory: ClientFactory | None = None,
        metrics: EngineMetrics | None = None,
        market: SyntheticMarket | None = None,
        request_backfill: Callable[[], None] | None = None,
        request_order_sync: RequestSync | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Engine:
        """The production graph from a config, each part built once, callbacks running down.

        ``request_backfill`` is called (in a thread) when stored bars hold gap minutes or a
        token's first bar after start (a takeover): the edge queues the backfill task.
        ``request_order_sync(account_id, reason)`` asks for a sync of the account's orders
        (runticker: the Celery job) after each ticker connect; without it, none is asked for.
        """
        metrics = metrics or EngineMetrics()
        supervisor = Supervisor(
            on_crash=lambda name, _owner, _exc: metrics.task_crashes.labels(name).inc()
        )
        pipeline = SnapshotPipeline(InstrumentUniverse.empty(), r=config.risk_free_rate,
                                    stale_after_s=config.stale_underlying_s)
        analytics = ChainAnalytics(interval_s=config.analytics_interval_s,
                                   iv_window_days=config.analytics_iv_window_days)
        flush_trigger = FlushTrigger(min_window_s=config.flush_window_ms / 1000.0,
                                     cap_s=config.flush_interval_ms / 1000.0)
        worker = PipelineWorker(pipeline=pipeline, bars=BarAggregator({}), metrics=metrics,
                                analytics=analytics, clock=clock, flush_trigger=flush_trigger)
        intake = TickIntake(worker=worker, metrics=metrics)

        async def apply_order_update(account_id: int, update: dict[str, Any]) -> None:
            await run_db_publishing(order_update_apply, account_id=account_id, update=update)

        orders = OrderUpdateRelay(
            apply=apply_order_update, metrics=metrics, request_sync=request_order_sync
        )
        recorder = FrameRecorder(directory=config.recording_dir,
                                 max_file_bytes=config.recording_max_file_bytes,
                                 max_total_bytes=config.recording_max_total_bytes,
                                 zstd_level=config.recording_zstd_level, metrics=metrics)
        connections = ConnectionManager(supervisor=supervisor, ws_url=config.kite_ws_url,
                                        watchdog_s=config.watchdog_s, metrics=metrics,
                                        client_factory=client_factory, recorder=recorder,
                                        orders=orders)
        market = market or SyntheticMarket(
            seed=config.mock_seed, r=config.risk_free_rate, holidays=config.holidays
        )
        mock_feed = MockFeed(
            market=market, sink=intake.mock_ticks, interval_s=config.mock_interval_ms / 1000.0
        )
        applies = ApplyRequests(intake=intake, connections=connections)
        leases = LeaseManager(owner=config.engine_id, ttl_s=config.lease_ttl_s,
                              on_acquired=applies.lease_acquired, on_lost=applies.lease_lost,
                              on_mock_pool=applies.mock_pool)
        trigger = ReloadTrigger(debounce_s=config.reload_debounce_ms / 1000.0,
                                safety_interval_s=config.safety_reload_s)
        publisher = Publisher(channel_layer)
        planner = StreamPlanner(
            connections=connections, leases=leases, worker=worker, intake=intake,
            mock_feed=mock_feed, supervisor=supervisor, trigger=trigger, metrics=metrics,
            account_labels=config.account_labels,
        )
        rest_fallback = None
        if config.rest_fallback_after_s > 0:
            rest_fallback = RestFallback(
                connections=connections,
                accounts=lambda: planner.accounts,
                client_factory=_quote_client_factory(config),
                index_tokens=lambda: _index_tokens(worker.universe),
                on_ticks=intake.rest_ticks,
                clear_flags=worker.clear_rest_fallback,
                metrics=metrics,
                after_s=config.rest_fallback_after_s,
            )
        notices: RedisNoticeListener | LocalNoticeListener | None = None
        if config.redis_url:
            notices = RedisNoticeListener(
                redis_url=config.redis_url, channel=config.control_channel, trigger=trigger
            )
        elif notifier is not None:
            notices = LocalNoticeListener(notifier=notifier, trigger=trigger)
        return cls(
            config=config, metrics=metrics, supervisor=supervisor, worker=worker, intake=intake,
            planner=planner,
            publisher=publisher,
            bar_sink=BarSink(publisher=publisher, metrics=metrics, close_due=worker.close_due_bars,
                             on_gaps=request_backfill),
            minute_sink=ChainMinuteSink(metrics=metrics, set_history=worker.set_analytics_history,
                                        window_days=config.analytics_iv_window_days, clock=clock),
            connections=connections, recorder=recorder, orders=orders,
            mock_feed=mock_feed, leases=leases,
            heartbeat=HeartbeatWriter(
                engine_id=config.engine_id, interval_s=config.heartbeat_interval_s,
                started_at=dt.datetime.now(dt.UTC),
            ),
            policy=ModePolicy(hours=MarketHours(holidays=config.holidays,
                                                always_open=config.market_always_open),
                              mock_enabled=config.mock_enabled, force=config.force_mode),
            trigger=trigger, applies=applies, notices=notices, loop_lag=LoopLagMonitor(metrics),
            rest_fallback=rest_fallback, clock=clock,
        )

    # --- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stream until ``stop`` is set, then drain, close connections and release leases."""
        self.trigger.bind_loop(asyncio.get_running_loop())
        labels = self.config.account_labels
        log.info("engine.starting", engine_id=self.engine_id, mode=self.mode,
                 accounts=sorted(labels) if labels else "all")
        sup = self.supervisor
        try:
            # The reloader loads at once; the lease loop learns which accounts to want from it.
            reloader = Reloader(trigger=self.trigger, reload=self.reload)
            sup.spawn("reloader", reloader.run, owner="engine")
            sup.spawn("leases", self.leases.run, owner="engine")
            sup.spawn("applier", self._apply_loop, owner="engine")
            if self.notices is not None:
                sup.spawn("notices", self.notices.run, owner="engine")
            sup.spawn("flush", self._flush_loop, owner="pipeline")
            sup.spawn("loop_monitor", self.loop_lag.run, owner="engine")
            sup.spawn("snapshot_requests",
                      lambda: self.publisher.serve_snapshot_requests(self.worker.reads),
                      owner="publisher")
            sup.spawn("watched_groups", self._watched_loop, owner="publisher")
            sup.spawn("bars", self.bar_sink.run, owner="bars")
            sup.spawn("order_updates", self.orders.run, owner="orders")
            sup.spawn("order_syncs", self.orders.run_syncs, owner="orders")
            sup.spawn("chain_minutes", self.minute_sink.run, owner="bars")
            sup.spawn("mode", self._mode_loop, owner="engine")
            if self.rest_fallback is not None:
                sup.spawn("rest_fallback", self.rest_fallback.run, owner="engine")
            sup.spawn("heartbeat", lambda: self.heartbeat.run(self.status), owner="engine")
            if self.mode == "mock":
                sup.spawn("mock_feed", self.mock_feed.run, owner="mock")
            self.started.set()
            log.info("engine.started", engine_id=self.engine_id, mode=self.mode)
            await stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Drain: stop feeds and connections, flush once more, release leases, last heartbeat."""
        log.info("engine.stopping", engine_id=self.engine_id)
        closed = False
        try:
            # The lease loop goes first so it cannot take an account back while we close.
            await self.supervisor.stop("leases")
            await self.connections.stop_all()
            closed = True
            # Every frame received is in its recording before the process goes.
            await asyncio.to_thread(self.recorder.close)
            await self.supervisor.shutdown()
            try:
                await self._flush_once()
                # Every bar, the open minute included, is stored before the process goes.
                await self.bar_sink.drain(await self.worker.close_all_bars())
            # The last flush is best effort (its ticks are gone with the process anyway), but
            # its failure is told, and it must not keep the leases from being handed over.
            except Exception:
                log.error("engine.final_flush_failed", engine_id=self.engine_id, exc_info=True)
        finally:
            if closed:
                # Handed over at once: another process need not wait for the rows to expire.
                await self.leases.release_all()
            else:
                # Sockets may still be open: let the leases expire rather than invite a
                # second process to open a 4th connection on an api_key.
                log.error("engine.leases_left_to_expire", engine_id=self.engine_id)
            self.worker.shutdown()
            self.planner.clear()
            # The last word: this engine streams nothing now (/health stops counting it).
            self._stopped = True
            await self.heartbeat.write_once(self.status())
        log.info("engine.stopped", engine_id=self.engine_id)

    # --- flush and publish ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        """Flush when the worker's trigger says (streaming.engine.flush_trigger)."""
        await self.worker.flush_trigger.run(self._flush_once)

    async def _flush_once(self) -> float | None:
        """Compute what arrived (pipeline thread), then send one message per watched group.

        Only flushes with work are timed (an idle flush is free and would hide the busy
        ones in the percentiles): ``flush_seconds`` is the computation, ``publish_seconds``
        the channel-layer sends. Returns the seconds until time alone gives a flush work.
        """
        outcome = await self.worker.flush(self.publisher.watched)
        self.metrics.pending_snapshots.set(outcome.pending)
        if outcome.unknown:
            self.metrics.dropped.labels("unknown_token").inc(outcome.unknown)
        if outcome.bars:
            self.bar_sink.add(outcome.bars)
        if outcome.minutes:
            self.minute_sink.add(outcome.minutes)
        if outcome.analytics:
            await self._publish_analytics(outcome.analytics)
        if outcome.pending:
            self.metrics.flush_seconds.observe(outcome.compute_s)
        batches = outcome.batches
        computed = time.perf_counter()
        if not batches:
            return outcome.next_due_in
        try:
            result = await self.publisher.publish(batches)
        except PublishError as exc:
            # Redis away: this flush's changes are lost for those groups; the next change
            # of each instrument publishes again. Counted, and the loop carries on.
            self.metrics.dropped.labels("publish_failed").inc(len(exc.failed_groups))
            self.publish_failures.failed(exc)
        else:
            self.publish_failures.succeeded()
            self.metrics.group_messages_out.inc(result.groups)
            self.metrics.snapshots_out.inc(result.snapshots)
        self.metrics.publish_seconds.observe(time.perf_counter() - computed)
        if outcome.oldest_received is not None:
            self.metrics.tick_to_publish_seconds.observe(self._clock() - outcome.oldest_received)
        return outcome.next_due_in

    async def _publish_analytics(self, messages: list[tuple[str, bytes]]) -> None:
        try:
            sent = await self.publisher.publish_analytics(messages)
        except PublishError as exc:
            # As for snapshots: lost for those chains until their next change.
            self.metrics.dropped.labels("analytics_publish_failed").inc(len(exc.failed_groups))
            self.publish_failures.failed(exc)
        else:
            self.metrics.group_messages_out.inc(sent)

    async def _watched_loop(self) -> None:
        """Refresh which groups have listeners, so nobody's groups are not serialised."""
        while True:
            await self.publisher.refresh_watched(self.worker.universe.group_names)
            await asyncio.sleep(_WATCHED_REFRESH_S)

    # --- reload and apply -------------------------------------------------------------------

    async def reload(self, reason: str) -> None:
        """Load accounts and subscriptions, allocate, write back, apply the diff."""
        started = time.perf_counter()
        result = await self.planner.reload()
        await self.apply()
        elapsed = time.perf_counter() - started
        self._reload_count += 1
        self.metrics.reloads.labels(reason).inc()
        self.metrics.reload_seconds.observe(elapsed)
        self.metrics.unassigned.set(len(result.allocation.unassigned))
        self.reloaded.set()
        log.info(
            "engine.reloaded",
            reason=reason,
            subscriptions=result.subscriptions,
            assigned=result.allocation.assigned_count,
            unassigned=len(result.allocation.unassigned),
            rows_written=result.rows_written,
            held=sorted(self.planner.label(a) for a in self.leases.held),
            streamed=len(self.planner.plan.tokens()),
            duration_ms=round(elapsed * 1000, 1),
        )

    async def apply(self) -> None:
        """Make connections, mock feed and pipeline match the allocation, leases and mode."""
        async with self._apply_lock:
            await self.planner.apply_plan(self.mode)

    async def _apply_loop(self) -> None:
        while True:
            await self.applies.next()
            try:
                await self.apply()
            except Exception:
                # Not lost: the supervisor restarts this loop, which applies again.
                self.applies.request()
                raise

    # --- mode -------------------------------------------------------------------------------

    async def _mode_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.mode_check_interval_s)
            mode = self.policy.mode_at(self._clock())
            if mode != self.mode:
                await self.switch_mode(mode)

    async def switch_mode(self, mode: EngineMode) -> None:
        """Change between live and mock; the pipeline resets a slot when its source changes.

        ``self.mode`` changes only once the switch is done: if it fails, the mode loop
        (restarted by the supervisor) still sees the old mode and tries again. The apply lock
        is held throughout so that no apply for the old mode runs in between.
        """
        log.info("engine.mode_changing", engine_id=self.engine_id, old=self.mode, new=mode)
        async with self._apply_lock:
            if mode == "live":
                await self.supervisor.stop("mock_feed")
            await self.planner.apply_plan(mode)
            if mode == "mock" and not self.supervisor.is_running("mock_feed"):
                await self.connections.stop_all()
                self.supervisor.spawn("mock_feed", self.mock_feed.run, owner="mock")
            old, self.mode = self.mode, mode
            self.intake.live = mode == "live"
        log.info("engine.mode_changed", engine_id=self.engine_id, old=old, new=mode)

    # --- the status document ----------------------------------------------------------------

    def status(self) -> EngineStatus:
        """This engine's status document, rates counted since the previous call."""
        now = time.monotonic()
        since_last_s = max(now - self._last_beat_monotonic, 1e-6)
        ticks_total = self.intake.ticks_total
        ticks_per_s = (ticks_total - self._ticks_at_last_beat) / since_last_s
        self._ticks_at_last_beat, self._last_beat_monotonic = ticks_total, now
        plan = self.planner.plan
        return EngineStatus(
            engine_id=self.engine_id,
            mode="stopped" if self._stopped else self.mode,
            market_open=self.policy.hours.is_open(self._clock()),
            accounts=self.planner.account_statuses(mode=self.mode, since_last_s=since_last_s),
            tasks=self.supervisor.states(),
            underlyings=self.worker.underlyings,
            streamed_count=len(plan.tokens()),
            mocked_count=len(plan.mock),
            unassigned_count=len(self.planner.allocation.unassigned),
            holds_mock_pool=self.leases.holds_mock_pool,
            flush_ms_p50=self.worker.flush_ms_p50,
            loop_lag_ms=round(self.loop_lag.worst_ms, 1),
            ticks_per_s=round(ticks_per_s, 1),
            reloads=self._reload_count,
        )
