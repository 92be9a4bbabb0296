"""Prometheus metrics of one engine, in a registry of its own (no global default registry).

Counters are incremented per frame or per flush with counts, never per tick.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_FLUSH_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 1.0,
)
_RELOAD_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LOOP_PROBE_S = 0.05
"""The loop monitor's sleep; how late it wakes is the event loop's lag."""


class EngineMetrics:
    """Every metric runticker exports; pass it to the components that count."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ticks_in = Counter(
            "tickerproj_engine_ticks_in",
            "Ticks ingested into the pipeline.",
            ["source", "account"],
            registry=r,
        )
        self.order_updates = Counter(
            "tickerproj_engine_order_updates",
            "Kite order updates from the ticker sockets, by outcome (applied, duplicate: a copy "
            "from another socket, overflow: queue full, failed: database error; the last two "
            "ask for a sync).",
            ["outcome"],
            registry=r,
        )
        self.snapshots_out = Counter(
            "tickerproj_engine_snapshots_out", "Snapshots published.", registry=r
        )
        self.group_messages_out = Counter(
            "tickerproj_engine_group_messages_out",
            "Channel-layer group messages sent (one per group per flush).",
            registry=r,
        )
        self.flush_seconds = Histogram(
            "tickerproj_engine_flush_seconds",
            "Time a flush with changes takes to compute Greeks and JSON (publishing excluded).",
            buckets=_FLUSH_BUCKETS_S,
            registry=r,
        )
        self.publish_seconds = Histogram(
            "tickerproj_engine_publish_seconds",
            "Time to send one flush's group messages to the channel layer.",
            buckets=_FLUSH_BUCKETS_S,
            registry=r,
        )
        self.tick_to_publish_seconds = Histogram(
            "tickerproj_engine_tick_to_publish_seconds",
            "From the oldest tick of a flush arriving to its snapshots sent to the channel layer.",
            buckets=_FLUSH_BUCKETS_S,
            registry=r,
        )
        self.queued_ticks = Gauge(
            "tickerproj_engine_queued_ticks",
            "Decoded ticks waiting for the next flush (the event loop's queue to the pipeline).",
            registry=r,
        )
        self.pending_snapshots = Gauge(
            "tickerproj_engine_pending_snapshots",
            "Instruments changed since the last flush (the queue a flush drains).",
            registry=r,
        )
        self.loop_lag_seconds = Gauge(
            "tickerproj_engine_loop_lag_seconds",
            "Worst event-loop lag in the last second (a 50 ms sleep's oversleep).",
            registry=r,
        )
        self.reconnects = Gauge(
            "tickerproj_engine_kite_reconnects",
            "Kite WebSocket reconnects since the account's client started.",
            ["account"],
            registry=r,
        )
        self.malformed = Gauge(
            "tickerproj_engine_kite_malformed_parts",
            "Malformed parts of Kite messages (bad packets, frames, texts) skipped since the "
            "account's client started.",
            ["account"],
            registry=r,
        )
        self.dropped = Counter(
            "tickerproj_engine_dropped_messages",
            "Messages dropped, by reason (malformed frames, full channels, unknown tokens).",
            ["reason"],
            registry=r,
        )
        self.task_crashes = Counter(
            "tickerproj_engine_task_crashes", "Supervised task crashes.", ["task"], registry=r
        )
        self.instruments = Gauge(
            "tickerproj_engine_instruments",
            "Instruments this engine streams, per account ('mock' for the mock market).",
            ["account"],
            registry=r,
        )
        self.unassigned = Gauge(
            "tickerproj_engine_unassigned_subscriptions",
            "Active subscriptions no account can stream.",
            registry=r,
        )
        self.leases_held = Gauge(
            "tickerproj_engine_leases_held", "Account leases this engine holds.", registry=r
        )
        self.reloads = Counter(
            "tickerproj_engine_reloads", "Reloads of accounts and subscriptions.", ["trigger"],
            registry=r,
        )
        self.reload_seconds = Histogram(
            "tickerproj_engine_reload_seconds",
            "Time from a reload's start to its changes being applied.",
            buckets=_RELOAD_BUCKETS_S,
            registry=r,
        )
        self.bars_closed = Counter(
            "tickerproj_engine_bars_closed", "Underlying 1-minute bars closed.", registry=r
        )
        self.rest_fallback_requests = Counter(
            "tickerproj_engine_rest_fallback_requests",
            "Kite quote calls made for stalled connections, by account and outcome.",
            ["account", "outcome"],
            registry=r,
        )
        self.rest_fallback_accounts = Gauge(
            "tickerproj_engine_rest_fallback_accounts",
            "Accounts whose instruments are polled over REST while a socket is stalled.",
            registry=r,
        )
        self.recorded_frames = Counter(
            "tickerproj_engine_recorded_frames",
            "Raw Kite frames written to recordings, per account.",
            ["account"],
            registry=r,
        )
        self.recording_dropped = Counter(
            "tickerproj_engine_recording_dropped_frames",
            "Raw Kite frames not recorded because the recorder thread was too far behind.",
            ["account"],
            registry=r,
        )
        self.recorder_cpu_seconds = Counter(
            "tickerproj_engine_recorder_cpu_seconds",
            "CPU time of the recorder thread (compression and writes).",
            registry=r,
        )

    def serve(self, port: int, *, addr: str = "127.0.0.1"):
        """Expose /metrics on ``port`` (a daemon thread of prometheus_client's)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server


class LoopLagMonitor:
    """How late a short sleep wakes up: the event loop's lag, i.e. its backlog."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics
        #: The worst lag of the last full second.
        self.worst_ms = 0.0

    async def run(self) -> None:
        worst_s = 0.0
        last_report = time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(_LOOP_PROBE_S)
            worst_s = max(worst_s, time.monotonic() - before - _LOOP_PROBE_S)
            if time.monotonic() - last_report >= 1.0:
                # The worst lag of the last second: a scrape sees stalls, not their absence.
                self._metrics.loop_lag_seconds.set(worst_s)
                self.worst_ms = worst_s * 1000.0
                worst_s, last_report = 0.0, time.monotonic()
