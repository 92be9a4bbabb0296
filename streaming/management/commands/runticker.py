"""``manage.py runticker``: the engine process (Kite streams, Greeks, bars, publishing).

Settings are read once here and passed in as values. SIGTERM and SIGINT set a stop event:
the engine drains, closes its Kite connections, writes a final heartbeat and releases its
account leases at once so another process takes them over without waiting for expiry.
That drain is bounded: TICKER_SHUTDOWN_BOUND_S after the signal the process exits whatever
it waits on (a frozen PostgreSQL can pin a database thread, which would hold the exit).
Every ticker connect of an account queues the Celery order sync of that account (with
a broker; on embedded defaults there is none and no sync is asked for).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any

import structlog
from channels.layers import get_channel_layer
from django.apps import apps
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from kombu.exceptions import OperationalError as BrokerUnavailable

from streaming.engine.app import Engine
from streaming.engine.config import EngineConfig
from streaming.engine.leases import make_engine_id
from streaming.engine.market_hours import EngineMode
from streaming.engine.metrics import EngineMetrics
from streaming.engine.orders import RequestSync
from streaming.tasks import backfill_bars

log = structlog.get_logger(__name__)

APPLICATION_NAME = "runticker"
# TICKER_SHUTDOWN_BOUND_S (30 s) is well above the drain's own bounded steps (client closes
# 3 s, bars 5 s, lease and heartbeat writes 5 s each); it catches what is not bounded there: a
# database thread pinned by a frozen server holds the interpreter's exit.
EXIT_AFTER_BOUND = 70
"""Exit status when the bound forced the exit."""


def build_engine(
    *,
    force_mode: EngineMode | None = None,
    engine_id: str | None = None,
    account_labels: list[str] | None = None,
    metrics: EngineMetrics | None = None,
    channel_layer: Any = None,
    request_order_sync: RequestSync | None = None,
) -> Engine:
    """The engine from this process's settings (runticker, and the demo running it in-process).

    On embedded defaults (no REDIS_URL) change notices come from the in-process notifier.
    """
    config = EngineConfig.from_settings(
        settings, engine_id=engine_id, force_mode=force_mode, account_labels=account_labels
    )
    notifier = None if settings.REDIS_URL else apps.get_app_config("streaming").change_notifier
    return Engine.build(
        config,
        channel_layer=channel_layer or get_channel_layer(),
        notifier=notifier,
        metrics=metrics,
        # Embedded defaults have no broker; the deployment's worker fills the gaps.
        request_backfill=None if settings.EMBEDDED else backfill_requester(
            countdown_s=settings.BACKFILL_MIN_AGE_S + 1
        ),
        request_order_sync=request_order_sync,
    )


def backfill_requester(*, countdown_s: float):
    """Queue the gap backfill once Kite's candles of the gap minutes have settled."""

    def request() -> None:
        try:
            backfill_bars.apply_async(countdown=countdown_s)
        except (BrokerUnavailable, OSError) as exc:
            # The periodic run fills the gaps anyway; nothing is lost by a missed request.
            log.warning("backfill.request_failed", error=repr(exc)[:300])

    return request


#: A sync asked for on a reconnect and not started within this long is dropped (the next
#: reconnect or the schedule asks again).
ORDER_SYNC_EXPIRES_S = 120


def celery_order_sync() -> RequestSync:
    """Queue ``accounts.sync_orders`` for one account (the broker call runs off the loop)."""
    from accounts.models import OrderSyncRun
    from accounts.tasks import sync_orders

    async def request(account_id: int, reason: str) -> None:
        try:
            await asyncio.to_thread(
                sync_orders.apply_async,
                kwargs={"account_id": account_id, "trigger": OrderSyncRun.Trigger.RECONNECT},
                expires=ORDER_SYNC_EXPIRES_S,
            )
        except (BrokerUnavailable, OSError) as exc:
            log.warning("orders.sync_request_failed", account_id=account_id, reason=reason,
                        error=str(exc)[:200])

    return request


def set_application_name(name: str) -> None:
    """Name our PostgreSQL sessions (pg_stat_activity) before any connection opens."""
    for conn in connections.all():
        if conn.vendor != "postgresql":
            continue
        conn.close()
        close_pool = getattr(conn, "close_pool", None)
        if close_pool is not None:
            close_pool()
        conn.settings_dict.setdefault("OPTIONS", {})["application_name"] = name


class Command(BaseCommand):
    help = (
        "Stream Kite ticks for the accounts this process holds a lease on, compute Greeks and "
        "publish snapshots; outside market hours (or with --mock) drive the same pipeline from "
        "the synthetic market."
    )

    def add_arguments(self, parser):
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--mock", action="store_true", help="stream the mock market only")
        mode.add_argument(
            "--no-mock", action="store_true", help="stream live even outside market hours"
        )
        parser.add_argument(
            "--engine-id",
            default="",
            help="prefix of this process's engine id (default: host:pid); a random suffix is "
            "always appended, so two processes given the same value never share leases",
        )
        parser.add_argument(
            "--metrics-port", type=int, default=0, help="serve Prometheus metrics (0: off)"
        )
        parser.add_argument(
            "--metrics-addr", default="127.0.0.1", help="address for the metrics server"
        )
        parser.add_argument(
            "--accounts",
            default="",
            help="comma-separated account labels this process may stream (default: all)",
        )

    def handle(self, *args, **options):
        set_application_name(APPLICATION_NAME)
        force_mode: EngineMode | None = None
        if options["mock"]:
            force_mode = "mock"
        elif options["no_mock"]:
            force_mode = "live"
        labels = [s.strip() for s in options["accounts"].split(",") if s.strip()] or None
        metrics = EngineMetrics()
        if options["metrics_port"]:
            try:
                metrics.serve(options["metrics_port"], addr=options["metrics_addr"])
            except OSError as exc:
                raise CommandError(
                    f"cannot serve metrics on {options['metrics_addr']}:{options['metrics_port']}: "
                    f"{exc}"
                ) from exc
        engine = build_engine(
            force_mode=force_mode,
            engine_id=make_engine_id(prefix=options["engine_id"]),
            account_labels=labels,
            metrics=metrics,
            request_order_sync=(
                None if settings.CELERY_BROKER_URL == "memory://" else celery_order_sync()
            ),
        )
        asyncio.run(self._run(engine, shutdown_bound_s=settings.TICKER_SHUTDOWN_BOUND_S))

    async def _run(self, engine: Engine, *, shutdown_bound_s: float) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = threading.Timer(shutdown_bound_s, _exit_after_bound, args=(shutdown_bound_s,))
        deadline.daemon = True

        def on_signal() -> None:
            stop.set()
            if not deadline.is_alive():
                deadline.start()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        await engine.run(stop)


def _exit_after_bound(bound_s: float) -> None:
    log.error("engine.shutdown_bound_exceeded", bound_s=bound_s)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_AFTER_BOUND)
