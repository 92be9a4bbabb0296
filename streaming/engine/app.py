"""The engine: wires allocator, connections, pipeline, publisher, mock feed, leases, reloader,
heartbeat and metrics together, and runs them under one supervisor until told to stop.

``Engine`` owns the wiring and the steps that need several collaborators at once: the reload
(load, allocate, write back, apply), the flush (queued ticks into the pipeline on its worker
thread, then publishing), lease and mode changes, and the heartbeat's state. Every
collaborator is passed in or built in :meth:`Engine.build` from an :class:`EngineConfig` read
once from settings, so a test builds exactly the graph it needs.

Threads: the event loop reads sockets, queues decoded frames and talks to Redis; one
"pipeline" worker thread owns the pipeline and bar aggregator (ingest, Greeks, JSON, universe
changes), so a 100 ms flush of 100k instruments never stops the loop; database calls run in
worker threads (store.run_db).

What streams where:
- live mode: every account this process holds a lease on streams its allocation over its
  Kite connections; nothing is mocked;
- mock mode (outside market hours with mock enabled, or ``--mock``): no Kite connection; the
  synthetic market drives the instruments of the accounts this process holds, plus, for the
  one process holding the mock-pool lock, the subscriptions no account can stream (so the
  demo with no accounts at all still shows every subscription).
The pipeline's universe is exactly what this process streams, so it never answers a snapshot
request with state it stopped receiving.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from streaming.control import ChangeNotifier, control_channel
from streaming.engine.allocator import Allocation, allocate
from streaming.engine.bars import Bar, BarAggregator
from streaming.engine.barsink import BarSink
from streaming.engine.connections import ClientFactory, ConnectionManager
from streaming.engine.heartbeat import HeartbeatWriter
from streaming.engine.leases import LeaseManager, make_engine_id
from streaming.engine.market_hours import EngineMode, MarketHours, ModePolicy, parse_holidays
from streaming.engine.metrics import EngineMetrics
from streaming.engine.mockfeed import MockFeed
from streaming.engine.pipeline import GroupBatch, SnapshotPipeline
from streaming.engine.publisher import Publisher, PublishError
from streaming.engine.reloader import (
    LocalNoticeListener,
    RedisNoticeListener,
    Reloader,
    ReloadTrigger,
)
from streaming.engine.store import (
    AccountRow,
    World,
    account_expire_session,
    assignments_save,
    instruments_load,
    run_db,
    world_load,
)
from streaming.engine.supervisor import Supervisor
from streaming.engine.universe import InstrumentUniverse
from streaming.market import SyntheticMarket

log = structlog.get_logger(__name__)

_FLUSH_SAMPLES = 200
"""Recent flush durations kept for the heartbeat's flush_ms_p50."""
_BARS_INTERVAL_S = 1.0
_LOOP_PROBE_S = 0.05
"""The loop monitor's sleep; how late it wakes is the event loop's lag."""
_WATCHED_REFRESH_S = 2.0
"""How often the publisher re-reads which groups have listeners."""
_MAX_INBOX_TICKS = 2_000_000
"""Ticks queued for the pipeline thread beyond which the oldest frames are dropped."""


@dataclass(frozen=True)
class EngineConfig:
    """Every setting the engine uses, read once at the edge (the command or the demo)."""

    engine_id: str
    flush_interval_ms: int = 100
    heartbeat_interval_s: float = 2.0
    lease_ttl_s: float = 15.0
    watchdog_s: float = 10.0
    risk_free_rate: float = 0.065
    stale_underlying_s: float = 30.0
    mock_enabled: bool = True
    force_mode: EngineMode | None = None
    holidays: frozenset[dt.date] = frozenset()
    kite_ws_url: str = "wss://ws.kite.trade"
    redis_url: str = ""
    #: Redis pub/sub channel of change notices (streaming.control.control_channel).
    control_channel: str = ""
    account_labels: frozenset[str] | None = None
    mock_interval_ms: int = 250
    mock_seed: int = 0
    reload_debounce_ms: int = 200
    safety_reload_s: float = 60.0
    mode_check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.redis_url and not self.control_channel:
            raise ValueError("an engine on Redis needs its control channel")

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        engine_id: str | None = None,
        force_mode: EngineMode | None = None,
        account_labels: Iterable[str] | None = None,
    ) -> EngineConfig:
        labels = frozenset(account_labels) if account_labels else None
        return cls(
            engine_id=engine_id or make_engine_id(),
            flush_interval_ms=settings.TICKER_FLUSH_INTERVAL_MS,
            heartbeat_interval_s=settings.TICKER_HEARTBEAT_INTERVAL_S,
            lease_ttl_s=settings.TICKER_LEASE_TTL_S,
            watchdog_s=settings.TICKER_WATCHDOG_S,
            risk_free_rate=settings.RISK_FREE_RATE,
            stale_underlying_s=settings.TICKER_STALE_UNDERLYING_S,
            mock_enabled=settings.MOCK_MARKET_ENABLED,
            force_mode=force_mode,
            holidays=parse_holidays(settings.MARKET_HOLIDAYS),
            kite_ws_url=settings.KITE_WS_URL,
            redis_url=settings.REDIS_URL,
            control_channel=control_channel(settings.CHANNEL_LAYER_PREFIX),
            account_labels=labels,
            mock_interval_ms=settings.MOCK_TICK_INTERVAL_MS,
            mock_seed=settings.MOCK_MARKET_SEED,
            reload_debounce_ms=settings.TICKER_RELOAD_DEBOUNCE_MS,
            safety_reload_s=settings.TICKER_SAFETY_RELOAD_S,
        )


@dataclass
class _AccountStats:
    """Per-account counters the tick callback keeps (counts, never per-tick records)."""

    ticks: int = 0
    last_tick_monotonic: float | None = None
    ticks_at_last_beat: int = 0
    rate_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _FlushOutcome:
    """What the pipeline thread hands back to the event loop after one flush."""

    pending: int
    batches: list[GroupBatch]
    bars: list[Bar]
    unknown: int
    compute_s: float
    oldest_received: float | None


class _LockedReads:
    """The pipeline's read side for the snapshot-request loop, behind the pipeline lock."""

    def __init__(self, pipeline: SnapshotPipeline, lock: threading.Lock) -> None:
        self._pipeline = pipeline
        self._lock = lock

    def latest(self, tokens: Iterable[int]) -> tuple[list[int], list[bytes]]:
        with self._lock:
            return self._pipeline.latest(tokens)

    def groups_of(self, tokens: Iterable[int]) -> set[str]:
        with self._lock:
            return self._pipeline.groups_of(tokens)


@dataclass
class StreamPlan:
    """What this process streams: per held account its connections, and what it mocks."""

    accounts: dict[int, list[dict[int, str]]] = field(default_factory=dict)
    mock: dict[int, str] = field(default_factory=dict)

    def tokens(self) -> set[int]:
        out = set(self.mock)
        for conns in self.accounts.values():
            for conn in conns:
                out.update(conn)
        return out


def plan_streams(
    *,
    allocation: Allocation,
    modes: Mapping[int, str],
    held: Iterable[int],
    mode: EngineMode,
    holds_mock_pool: bool,
) -> StreamPlan:
    """The pure decision of what to stream live and what to mock, from the allocation."""
    plan = StreamPlan()
    held_set = set(held)
    if mode == "live":
        for aid in sorted(held_set):
            conns = allocation.connections.get(aid)
            plan.accounts[aid] = [dict(c) for c in conns] if conns else []
        return plan
    for aid in sorted(held_set):
        for conn in allocation.connections.get(aid, ()):
            plan.mock.update(conn)
    if holds_mock_pool:
        for token in allocation.unassigned:
            plan.mock[token] = modes.get(token, "full")
    return plan


class Engine:
    """One runticker process: run it with ``await engine.run(stop_event)``."""

    def __init__(
        self,
        *,
        config: EngineConfig,
        channel_layer: Any,
        metrics: EngineMetrics,
        supervisor: Supervisor,
        pipeline: SnapshotPipeline,
        publisher: Publisher,
        bars: BarAggregator,
        connections: ConnectionManager,
        mock_feed: MockFeed,
        policy: ModePolicy,
        trigger: ReloadTrigger,
        notifier: ChangeNotifier | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.engine_id = config.engine_id
        self.channel_layer = channel_layer
        self.metrics = metrics
        self.supervisor = supervisor
        self.pipeline = pipeline
        self.publisher = publisher
        self.bars = bars
        self.connections = connections
        self.mock_feed = mock_feed
        self.policy = policy
        self.trigger = trigger
        self._notifier = notifier
        self._clock = clock
        self.leases = LeaseManager(
            owner=config.engine_id,
            ttl_s=config.lease_ttl_s,
            on_acquired=self._on_lease_acquired,
            on_lost=self._on_lease_lost,
            on_mock_pool=self._on_mock_pool,
        )
        self.heartbeat = HeartbeatWriter(
            engine_id=config.engine_id,
            interval_s=config.heartbeat_interval_s,
            state_fn=self.heartbeat_state,
            started_at=dt.datetime.now(dt.UTC),
        )
        self.mode: EngineMode = policy.mode_at(clock())
        self.started = asyncio.Event()
        self.reloaded = asyncio.Event()
        self._accounts: dict[int, AccountRow] = {}
        self._modes: dict[int, str] = {}
        self._allocation = Allocation()
        self._plan = StreamPlan()
        self._instrument_rows: dict[int, dict[str, Any]] = {}
        self._account_stats: dict[int, _AccountStats] = {}
        #: Accounts whose token Kite refused -> that token's fingerprint (never logged).
        self._expired: dict[int, str] = {}
        self._apply_lock = asyncio.Lock()
        self._flush_ms: deque[float] = deque(maxlen=_FLUSH_SAMPLES)
        self._ticks_total = 0
        self._ticks_at_last_beat = 0
        self._last_beat_monotonic = time.monotonic()
        self._ticks_per_s = 0.0
        self._reload_count = 0
        self._apply_wanted = asyncio.Event()
        # The pipeline and bar aggregator belong to one worker thread (flushes, universe
        # changes); the event loop only queues ticks. The lock keeps the few synchronous
        # readers (snapshot requests) from seeing a flush half done.
        self._pipeline_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._pipeline_lock = threading.Lock()
        self._inbox: list[tuple[np.ndarray, bool, float]] = []
        self._inbox_ticks = 0
        self._underlyings: dict[str, Any] = {}
        self._underlyings_at = float("-inf")
        self._loop_lag_ms = 0.0
        self._stopped = False
        self.bar_sink = BarSink(
            publisher=publisher,
            metrics=metrics,
            close_due=lambda: self._in_pipeline_thread(self._close_due_bars, self._clock()),
            interval_s=_BARS_INTERVAL_S,
        )

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
        clock: Callable[[], float] = time.time,
    ) -> Engine:
        """The production graph from a config; tests pass their own collaborators."""
        metrics = metrics or EngineMetrics()
        supervisor = Supervisor(
            on_crash=lambda name, _owner, _exc: metrics.task_crashes.labels(name).inc()
        )
        pipeline = SnapshotPipeline(
            InstrumentUniverse.empty(),
            r=config.risk_free_rate,
            stale_after_s=config.stale_underlying_s,
        )
        engine_box: list[Engine] = []

        def on_ticks(account_id: int, ticks: np.ndarray) -> None:
            engine_box[0].ingest_live(account_id, ticks)

        def on_session_expired(account_id: int, reason: str) -> None:
            engine_box[0].session_expired(account_id, reason)

        connections = ConnectionManager(
            supervisor=supervisor,
            ws_url=config.kite_ws_url,
            watchdog_s=config.watchdog_s,
            on_ticks=on_ticks,
            on_session_expired=on_session_expired,
            metrics=metrics,
            client_factory=client_factory,
        )
        market = market or SyntheticMarket(
            seed=config.mock_seed, r=config.risk_free_rate, holidays=config.holidays
        )

        def mock_sink(ticks: np.ndarray) -> None:
            engine_box[0].ingest_mock(ticks)

        mock_feed = MockFeed(
            market=market, sink=mock_sink, interval_s=config.mock_interval_ms / 1000.0
        )
        policy = ModePolicy(
            hours=MarketHours(holidays=config.holidays),
            mock_enabled=config.mock_enabled,
            force=config.force_mode,
        )
        trigger = ReloadTrigger(
            debounce_s=config.reload_debounce_ms / 1000.0,
            safety_interval_s=config.safety_reload_s,
        )
        engine = cls(
            config=config,
            channel_layer=channel_layer,
            metrics=metrics,
            supervisor=supervisor,
            pipeline=pipeline,
            publisher=Publisher(channel_layer),
            bars=BarAggregator({}),
            connections=connections,
            mock_feed=mock_feed,
            policy=policy,
            trigger=trigger,
            notifier=notifier,
            clock=clock,
        )
        engine_box.append(engine)
        return engine

    # --- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stream until ``stop`` is set, then drain, close connections and release leases."""
        self.trigger.bind_loop(asyncio.get_running_loop())
        log.info(
            "engine.starting",
            engine_id=self.engine_id,
            mode=self.mode,
            accounts=sorted(self.config.account_labels) if self.config.account_labels else "all",
        )
        sup = self.supervisor
        try:
            # The reloader loads at once; the lease loop learns which accounts to want from it.
            reloader = Reloader(trigger=self.trigger, reload=self.reload)
            sup.spawn("reloader", reloader.run, owner="engine")
            sup.spawn("leases", self.leases.run, owner="engine")
            sup.spawn("applier", self._apply_loop, owner="engine")
            if self.config.redis_url:
                listener = RedisNoticeListener(redis_url=self.config.redis_url,
                                               channel=self.config.control_channel,
                                               trigger=self.trigger)
                sup.spawn("notices", listener.run, owner="engine")
            elif self._notifier is not None:
                local = LocalNoticeListener(notifier=self._notifier, trigger=self.trigger)
                sup.spawn("notices", local.run, owner="engine")
            sup.spawn("flush", self._flush_loop, owner="pipeline")
            sup.spawn("loop_monitor", self._loop_monitor, owner="engine")
            sup.spawn(
                "snapshot_requests",
                lambda: self.publisher.serve_snapshot_requests(
                    _LockedReads(self.pipeline, self._pipeline_lock)
                ),
                owner="publisher",
            )
            sup.spawn("watched_groups", self._watched_loop, owner="publisher")
            sup.spawn("bars", self.bar_sink.run, owner="bars")
            sup.spawn("mode", self._mode_loop, owner="engine")
            sup.spawn("heartbeat", self.heartbeat.run, owner="engine")
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
            await self.supervisor.shutdown()
            try:
                await self._flush_once()
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
            self._pipeline_executor.shutdown(wait=True)
            self._plan = StreamPlan()
            # The last word: this engine streams nothing now (/health stops counting it).
            self._stopped = True
            await self.heartbeat.write_once()
        log.info("engine.stopped", engine_id=self.engine_id)

    # --- ticks in ---------------------------------------------------------------------------

    # Ticks are queued here on the event loop and ingested by the next flush in the pipeline
    # thread: the loop only appends arrays, so a long flush never stops it reading sockets.

    def ingest_live(self, account_id: int, ticks: np.ndarray) -> None:
        """The Kite clients' tick callback: one decoded frame, queued for the next flush."""
        if self.mode != "live":
            # A frame in flight when the market closed: mock owns the slots now.
            self.metrics.dropped.labels("live_in_mock_mode").inc(len(ticks))
            return
        n = len(ticks)
        stats = self._account_stats.setdefault(account_id, _AccountStats())
        stats.ticks += n
        stats.last_tick_monotonic = time.monotonic()
        self.metrics.ticks_in.labels("live", self._label(account_id)).inc(n)
        self._enqueue(ticks, is_mock=False)

    def ingest_mock(self, ticks: np.ndarray) -> None:
        self.metrics.ticks_in.labels("mock", "mock").inc(len(ticks))
        self._enqueue(ticks, is_mock=True)

    def _enqueue(self, ticks: np.ndarray, *, is_mock: bool) -> None:
        self._ticks_total += len(ticks)
        self._inbox.append((ticks, is_mock, self._clock()))
        self._inbox_ticks += len(ticks)
        while self._inbox_ticks > _MAX_INBOX_TICKS and len(self._inbox) > 1:
            # The pipeline thread has fallen far behind: drop the oldest frames (their
            # instruments' later ticks supersede them), count them, and carry on.
            old, _, _ = self._inbox.pop(0)
            self._inbox_ticks -= len(old)
            self.metrics.dropped.labels("inbox_overflow").inc(len(old))

    # --- flush and publish ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        interval_s = self.config.flush_interval_ms / 1000.0
        next_at = time.monotonic() + interval_s
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flush_once()
            next_at += interval_s
            if next_at < time.monotonic():
                # Behind by more than an interval: do not burst to catch up.
                next_at = time.monotonic() + interval_s

    async def _loop_monitor(self) -> None:
        """How late a short sleep wakes up: the event loop's lag, i.e. its backlog."""
        worst_s = 0.0
        last_report = time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(_LOOP_PROBE_S)
            worst_s = max(worst_s, time.monotonic() - before - _LOOP_PROBE_S)
            if time.monotonic() - last_report >= 1.0:
                # The worst lag of the last second: a scrape sees stalls, not their absence.
                self.metrics.loop_lag_seconds.set(worst_s)
                self._loop_lag_ms = worst_s * 1000.0
                worst_s, last_report = 0.0, time.monotonic()

    async def _flush_once(self) -> None:
        """Ingest what arrived, compute Greeks and JSON for what changed (pipeline thread),
        then send one message per watched group (event loop).

        Only flushes with work are timed (an idle flush is free and would hide the busy
        ones in the percentiles): ``flush_seconds`` is the computation, ``publish_seconds``
        the channel-layer sends.
        """
        self.metrics.queued_ticks.set(self._inbox_ticks)
        inbox, self._inbox, self._inbox_ticks = self._inbox, [], 0
        outcome = await self._in_pipeline_thread(
            self._compute, inbox, self._clock(), self.publisher.watched
        )
        self.metrics.pending_snapshots.set(outcome.pending)
        if outcome.unknown:
            self.metrics.dropped.labels("unknown_token").inc(outcome.unknown)
        if outcome.bars:
            self.bar_sink.add(outcome.bars)
        if outcome.pending:
            self.metrics.flush_seconds.observe(outcome.compute_s)
            self._flush_ms.append(outcome.compute_s * 1000.0)
        batches = outcome.batches
        computed = time.perf_counter()
        if not batches:
            return
        try:
            result = await self.publisher.publish(batches)
        except PublishError as exc:
            # Redis away: this flush's changes are lost for those groups; the next change
            # of each instrument publishes again. Counted, and the loop carries on.
            self.metrics.dropped.labels("publish_failed").inc(len(exc.failed_groups))
            log.warning("engine.publish_failed", groups=len(exc.failed_groups),
                        error=str(exc.first_error))
        else:
            self.metrics.group_messages_out.inc(result.groups)
            self.metrics.snapshots_out.inc(result.snapshots)
        self.metrics.publish_seconds.observe(time.perf_counter() - computed)
        if outcome.oldest_received is not None:
            self.metrics.tick_to_publish_seconds.observe(self._clock() - outcome.oldest_received)

    def _compute(
        self, inbox: list[tuple[np.ndarray, bool, float]], now: float, watched: Any
    ) -> _FlushOutcome:
        """The pipeline thread's part of a flush; the lock keeps sync readers out."""
        with self._pipeline_lock:
            started = time.perf_counter()
            unknown = 0
            bars: list[Bar] = []
            for ticks, is_mock, received in inbox:
                unknown += self.pipeline.ingest(
                    ticks, is_mock=is_mock, received_epoch_s=received
                ).unknown
                bars.extend(self.bars.ingest(ticks, is_mock=is_mock, received_epoch_s=received))
            pending = self.pipeline.pending
            batches = self.pipeline.flush(now, watched=watched)
            if now - self._underlyings_at >= 1.0:
                self._underlyings = self.pipeline.underlying_summary()
                self._underlyings_at = now
            return _FlushOutcome(
                pending=pending,
                batches=batches,
                bars=bars,
                unknown=unknown,
                compute_s=time.perf_counter() - started,
                oldest_received=min((r for _, _, r in inbox), default=None),
            )

    async def _in_pipeline_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run pipeline work on its one thread, in order, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pipeline_executor, fn, *args)

    def _close_due_bars(self, now: float) -> list[Bar]:
        with self._pipeline_lock:
            return self.bars.close_due(now)

    # --- watched groups -------------------------------------------------------------------

    async def _watched_loop(self) -> None:
        """Refresh which groups have listeners, so nobody's groups are not serialised."""
        while True:
            await self.publisher.refresh_watched(self.pipeline.universe.group_names)
            await asyncio.sleep(_WATCHED_REFRESH_S)

    # --- reload -----------------------------------------------------------------------------

    async def reload(self, reason: str) -> None:
        """Load accounts and subscriptions, allocate, write back, apply the diff."""
        started = time.perf_counter()
        world: World = await run_db(world_load)
        self._accounts = {a.account_id: a for a in world.accounts}
        self._modes = {s.token: s.mode for s in world.subscriptions}
        # Pure work over up to 100k rows: in a thread, off the loop that reads the ticks.
        allocation = await asyncio.to_thread(
            lambda: allocate(
                subscriptions=[s.wish() for s in world.subscriptions],
                accounts=[a.info() for a in world.accounts],
                previous=self._allocation,
            )
        )
        written = await run_db(
            assignments_save, allocation=allocation, subscriptions=world.subscriptions
        )
        self._allocation = allocation
        for aid, refused in list(self._expired.items()):
            account = self._accounts.get(aid)
            # Only a new token lifts the expiry: a load that ran before the 403 was recorded
            # still says "streamable" with the refused token.
            if account is not None and account.streamable and account.token_fingerprint != refused:
                del self._expired[aid]  # a new login
        self.leases.set_wanted(self._wanted_accounts())
        await self.apply()
        elapsed = time.perf_counter() - started
        self._reload_count += 1
        self.metrics.reloads.labels(reason).inc()
        self.metrics.reload_seconds.observe(elapsed)
        self.metrics.unassigned.set(len(allocation.unassigned))
        self.reloaded.set()
        log.info(
            "engine.reloaded",
            reason=reason,
            subscriptions=len(world.subscriptions),
            assigned=allocation.assigned_count,
            unassigned=len(allocation.unassigned),
            rows_written=written,
            held=sorted(self._label(a) for a in self.leases.held),
            streamed=len(self._plan.tokens()),
            duration_ms=round(elapsed * 1000, 1),
        )

    def _wanted_accounts(self) -> set[int]:
        labels = self.config.account_labels
        return {
            a.account_id
            for a in self._accounts.values()
            if a.streamable and (labels is None or a.label in labels)
        }

    async def apply(self) -> None:
        """Make connections, mock feed and pipeline match the allocation, leases and mode."""
        async with self._apply_lock:
            await self._apply_locked(self.mode)

    async def _apply_locked(self, mode: EngineMode) -> None:
        """:meth:`apply` for ``mode``, with ``_apply_lock`` held by the caller."""
        plan = plan_streams(
            allocation=self._allocation,
            modes=self._modes,
            held=self.leases.held,
            mode=mode,
            holds_mock_pool=self.leases.holds_mock_pool,
        )
        await self._set_universe(plan.tokens())
        # Live: start, update or stop each account's client; untouched tokens keep streaming.
        for aid in list(self.connections.running()):
            if aid not in plan.accounts:
                await self.connections.stop(aid)
        for aid, conns in plan.accounts.items():
            account = self._accounts.get(aid)
            if account is None or not account.streamable or aid in self._expired:
                await self.connections.stop(aid)
                continue
            # The lease is checked right before the start, with no await in between: a
            # lease lost while this apply waited on the database is never restarted.
            if not self.leases.holds(aid):
                continue
            self.connections.start(account)
            wanted: dict[int, str] = {}
            for conn in conns:
                wanted.update(conn)
            await self.connections.update(account, wanted)
        self.mock_feed.set_tokens(plan.mock)
        self._plan = plan
        for aid in plan.accounts:
            self.metrics.instruments.labels(self._label(aid)).set(
                sum(len(c) for c in plan.accounts[aid])
            )
        self.metrics.instruments.labels("mock").set(len(plan.mock))
        self.metrics.leases_held.set(len(self.leases.held))

    async def _set_universe(self, tokens: set[int]) -> None:
        current = self.pipeline.universe
        if len(current) == len(tokens) and set(current.tokens.tolist()) == tokens:
            return
        missing = [t for t in tokens if t not in self._instrument_rows]
        if missing:
            for row in await run_db(instruments_load, tokens=missing):
                self._instrument_rows[row["instrument_token"]] = row
        rows = [self._instrument_rows[t] for t in tokens if t in self._instrument_rows]
        # Building 100k instruments' arrays and JSON prefixes takes about a second of pure
        # work: done in a thread so the loop keeps reading ticks and renewing leases.
        universe = await asyncio.to_thread(InstrumentUniverse.from_rows, rows)
        await self._in_pipeline_thread(self._install_universe, universe)
        # Rows of instruments we no longer stream are not kept: the cache tracks the universe.
        self._instrument_rows = {t: self._instrument_rows[t] for t in tokens
                                 if t in self._instrument_rows}

    def _install_universe(self, universe: InstrumentUniverse) -> None:
        with self._pipeline_lock:
            self.pipeline.set_universe(universe)
            self.bars.set_sources(universe.spot_tokens())
            self._underlyings = self.pipeline.underlying_summary()

    # --- leases, session expiry and mode ------------------------------------------------------

    # The lease loop calls these; they never wait on engine work (an apply can take a second
    # at 100k instruments), so renewals keep their rhythm.

    async def _on_lease_acquired(self, account_id: int) -> None:
        self._account_stats[account_id] = _AccountStats()
        self.request_apply()

    async def _on_lease_lost(self, account_id: int) -> None:
        # Connections first: another process may take the account as soon as the row lapses.
        await self.connections.stop(account_id)
        self.request_apply()

    async def _on_mock_pool(self, held: bool) -> None:
        self.request_apply()

    def request_apply(self) -> None:
        """Ask the applier task for an apply; requests while one runs coalesce into one more."""
        self._apply_wanted.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._apply_wanted.wait()
            # Cleared before the apply so that requests made while it runs get one more.
            self._apply_wanted.clear()
            try:
                await self.apply()
            except Exception:
                # Not lost: the supervisor restarts this loop, which applies again.
                self._apply_wanted.set()
                raise

    def session_expired(self, account_id: int, reason: str) -> None:
        """Kite refused the token (403): record it, release the account, reallocate."""
        label = self._label(account_id)
        log.warning("engine.session_expired", account=label, reason=reason)
        in_use = self.connections.token_in_use(account_id)
        if in_use is None:
            account = self._accounts.get(account_id)
            if account is None:
                return
            in_use = (account.token_fingerprint, account.token_issued_at)
        fingerprint, issued_at = in_use
        self._expired[account_id] = fingerprint
        name = f"expire:{label}"
        if not self.supervisor.is_running(name):
            self.supervisor.spawn(
                name, lambda: self._expire(account_id, reason, issued_at),
                owner=f"account:{label}", restart=False,
            )

    async def _expire(self, account_id: int, reason: str, issued_at: dt.datetime | None) -> None:
        await self.connections.stop(account_id)
        await run_db(account_expire_session, account_id=account_id, reason=reason,
                     token_issued_at=issued_at)
        self.trigger.notify()

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
            await self._apply_locked(mode)
            if mode == "mock" and not self.supervisor.is_running("mock_feed"):
                await self.connections.stop_all()
                self.supervisor.spawn("mock_feed", self.mock_feed.run, owner="mock")
            old, self.mode = self.mode, mode
        log.info("engine.mode_changed", engine_id=self.engine_id, old=old, new=mode)

    # --- state for the heartbeat ------------------------------------------------------------

    def _label(self, account_id: int) -> str:
        account = self._accounts.get(account_id)
        return account.label if account else f"#{account_id}"

    def heartbeat_state(self) -> dict[str, Any]:
        now = time.monotonic()
        dt_s = max(now - self._last_beat_monotonic, 1e-6)
        self._ticks_per_s = (self._ticks_total - self._ticks_at_last_beat) / dt_s
        self._ticks_at_last_beat = self._ticks_total
        self._last_beat_monotonic = now
        accounts: dict[str, dict[str, Any]] = {}
        conn_states = self.connections.states()
        for aid in sorted(self.leases.held | set(self._expired)):
            account = self._accounts.get(aid)
            stats = self._account_stats.setdefault(aid, _AccountStats())
            stats.rate_per_s = (stats.ticks - stats.ticks_at_last_beat) / dt_s
            stats.ticks_at_last_beat = stats.ticks
            conn = conn_states.get(aid, {})
            if "reconnects" in conn:
                self.metrics.reconnects.labels(self._label(aid)).set(conn["reconnects"])
            expired = aid in self._expired
            if expired:
                state = "session_expired"
            elif self.mode == "mock":
                state = "stopped"
            else:
                state = conn.get("state", "connecting")
            accounts[self._label(aid)] = {
                "account_id": aid,
                "state": state,
                "connections": conn.get("connections", 0),
                "instruments": sum(len(c) for c in self._plan.accounts.get(aid, ())),
                "ticks_per_s": round(stats.rate_per_s, 1),
                "last_tick_age_s": (
                    None
                    if stats.last_tick_monotonic is None
                    else round(now - stats.last_tick_monotonic, 1)
                ),
                "reconnects": conn.get("reconnects", 0),
                "session": "expired" if expired or (account and not account.streamable)
                else "ok",
            }
        underlyings = self._underlyings
        return {
            "mode": "stopped" if self._stopped else self.mode,
            "market_open": self.policy.hours.is_open(self._clock()),
            "engine_id": self.engine_id,
            "accounts": accounts,
            "tasks": self.supervisor.states(),
            "underlyings": underlyings,
            "streamed_count": len(self._plan.tokens()),
            "mocked_count": len(self._plan.mock),
            "unassigned_count": len(self._allocation.unassigned),
            "holds_mock_pool": self.leases.holds_mock_pool,
            "flush_ms_p50": round(statistics.median(self._flush_ms), 2) if self._flush_ms else None,
            "loop_lag_ms": round(self._loop_lag_ms, 1),
            "ticks_per_s": round(self._ticks_per_s, 1),
            "reloads": self._reload_count,
        }

