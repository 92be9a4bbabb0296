"""``manage.py demo``: the whole service in one process on embedded defaults (``make run``).

One process, one event loop: daphne's web server (the chain page, the admin, WebSockets), the
engine in mock mode (the synthetic market through the real pipeline: ticks -> state ->
Greeks -> publisher -> in-memory channel layer -> consumers) and the periodic jobs on their
Celery schedules. No PostgreSQL, no Redis: SQLite in ``var/`` and the in-memory channel layer.

Before serving it creates the schema, loads the synthetic market's instruments through the
same ``instruments_refresh`` service the Celery job uses for Kite's dump, subscribes every
instrument of it, and creates a ``demo`` superuser whose random password is kept in
``var/demo_password`` (so it stays the same across restarts).

daphne is embedded rather than spawned: its ``Server`` runs Twisted's asyncio reactor
(installed by the ``daphne`` app at start-up), so the engine and the job runner are plain
asyncio tasks on the reactor's loop, owned by one TaskGroup that the demo awaits on shutdown.
SIGINT or SIGTERM stops them (the engine drains and releases its lease), then the reactor;
a second signal stops the reactor at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from channels.layers import get_channel_layer
from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections, transaction
from django.utils import timezone
from prometheus_client import CollectorRegistry

from streaming.consumers import WebSocketMetrics
from streaming.engine.app import Engine, EngineConfig
from streaming.engine.metrics import EngineMetrics
from streaming.kite.rest import parse_instruments_csv
from streaming.kite.schemas import InstrumentRow
from streaming.market import SyntheticMarket
from streaming.nse_calendar import parse_holidays
from subscriptions.models import Instrument
from subscriptions.schedules import DEFAULT_SCHEDULES, JobSchedule, celery_schedule, run_inline
from subscriptions.selectors import subscription_tokens_active
from subscriptions.services import (
    InstrumentRefreshResult,
    instruments_refresh,
    subscription_activate,
)
from tickerproj.logging import configure_logging
from tickerproj.private_files import private_file_create

log = structlog.get_logger(__name__)

DEMO_USERNAME = "demo"
PASSWORD_FILE = "demo_password"  # noqa: S105 (a file name)
DEFAULT_EXPIRIES = 2
DEFAULT_STRIKES_EACH_SIDE = 20
JOBS_POLL_S = 1.0


# --- the demo universe --------------------------------------------------------------------------


class SyntheticInstrumentDump:
    """The synthetic market's instrument dump, shaped like KiteRestClient.instruments().

    Going through Kite's CSV format and its validating parser means the demo loads
    instruments exactly the way a real refresh does.
    """

    def __init__(self, market: SyntheticMarket) -> None:
        self._market = market

    def instruments(self, exchange: str | None = None) -> list[InstrumentRow]:
        return parse_instruments_csv(self._market.instruments_csv(exchange), endpoint="demo")


def demo_universe_load(*, market: SyntheticMarket) -> tuple[InstrumentRefreshResult, int]:
    """Load the market's instruments and subscribe all of them; returns what changed.

    Idempotent: on a restart the same day nothing is written; on another day the refresh
    retires the contracts the market no longer lists (and their subscriptions).
    """
    # force: the synthetic dump is the whole truth here, even if smaller than last time.
    result = instruments_refresh(client=SyntheticInstrumentDump(market), force=True)
    tokens = [int(t) for t in market.tokens]
    active = subscription_tokens_active(tokens=tokens)
    missing = [t for t in tokens if t not in active]
    with transaction.atomic():
        for instrument in Instrument.objects.filter(instrument_token__in=missing):
            subscription_activate(instrument=instrument)
    return result, len(missing)


def demo_user_ensure(*, username: str, password_file: Path) -> str:
    """A superuser for the demo; its random password lives in ``password_file`` (0600)."""
    if password_file.exists():
        password = password_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(9)
        private_file_create(password_file, password + "\n")
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(
        username=username, defaults={"is_staff": True, "is_superuser": True}
    )
    if created or not (user.is_staff and user.is_superuser and user.is_active):
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)
        user.save()
    elif not user.check_password(password):
        user.set_password(password)
        user.save()
    return password


# --- periodic jobs in-process -------------------------------------------------------------------


def _run_job_in_thread(spec: JobSchedule) -> Any:
    close_old_connections()
    try:
        return run_inline(spec)
    finally:
        close_old_connections()


class InProcessJobs:
    """Runs the periodic jobs on their Celery schedules in this process, one at a time.

    The demo has no broker, so this stands in for beat plus a one-process worker. Each job
    runs in a worker thread (the tasks are synchronous Django code); a job that fails is
    logged and runs again at its next due time, as it would under Celery.
    """

    def __init__(
        self,
        schedules: Sequence[JobSchedule] = DEFAULT_SCHEDULES,
        *,
        run_job: Callable[[JobSchedule], Any] = _run_job_in_thread,
        now: Callable[[], dt.datetime] = timezone.now,
        poll_s: float = JOBS_POLL_S,
    ) -> None:
        self._specs = list(schedules)
        self._run_job = run_job
        self._now = now
        self._poll_s = poll_s
        self.runs: dict[str, int] = {spec.name: 0 for spec in self._specs}

    async def run(self, stop: asyncio.Event) -> None:
        started = self._now()
        last_run = {spec.name: started for spec in self._specs}
        schedules = {spec.name: celery_schedule(spec) for spec in self._specs}
        while not stop.is_set():
            for spec in self._specs:
                due, _next_s = schedules[spec.name].is_due(last_run[spec.name])
                if due and not stop.is_set():
                    last_run[spec.name] = self._now()
                    await self._run_one(spec)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._poll_s)

    async def _run_one(self, spec: JobSchedule) -> None:
        self.runs[spec.name] += 1
        try:
            result = await asyncio.to_thread(self._run_job, spec)
        # Supervision boundary: a failed job is logged and runs again when next due.
        except Exception:
            log.exception("demo.job_failed", job=spec.name)
            return
        log.info("demo.job_done", job=spec.name, result=str(result)[:200])


# --- one process, one loop ----------------------------------------------------------------------


class DemoRunner:
    """Serves ``application`` with an embedded daphne and runs the engine and the jobs."""

    def __init__(
        self,
        *,
        application: Any,
        engine: Engine,
        jobs: InProcessJobs,
        host: str,
        port: int,
        on_ready: Callable[[], None],
    ) -> None:
        self._application = application
        self._engine = engine
        self._jobs = jobs
        self._host = host
        self._port = port
        self._on_ready = on_ready
        self._stop: asyncio.Event | None = None
        self._main: asyncio.Task | None = None
        self.exit_code = 0

    def run(self) -> int:
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server

        server = Server(
            application=self._application,
            endpoints=build_endpoint_description_strings(host=self._host, port=self._port),
            signal_handlers=False,
            ready_callable=self._ready,
        )
        server.run()
        if not server.listening_addresses:
            raise CommandError(f"cannot listen on {self._host}:{self._port} (in use?)")
        return self.exit_code

    def _ready(self) -> None:
        """Called by daphne once it listens, just before the reactor (and its loop) runs."""
        from twisted.internet import reactor

        loop: asyncio.AbstractEventLoop = reactor._asyncioEventloop
        self._stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)
        self._main = loop.create_task(self._services(), name="demo-services")
        self._main.add_done_callback(self._services_done)
        self._on_ready()

    def _on_signal(self) -> None:
        from twisted.internet import reactor

        assert self._stop is not None
        if self._stop.is_set():
            log.warning("demo.forced_stop")
            reactor.stop()
            return
        log.info("demo.stopping")
        self._stop.set()

    async def _services(self) -> None:
        assert self._stop is not None
        async with asyncio.TaskGroup() as group:
            group.create_task(self._engine.run(self._stop), name="engine")
            group.create_task(self._jobs.run(self._stop), name="jobs")

    def _services_done(self, task: asyncio.Task) -> None:
        from twisted.internet import reactor

        if task.cancelled():
            self.exit_code = 1
        elif (exc := task.exception()) is not None:
            self.exit_code = 1
            log.error("demo.crashed", error=repr(exc), exc_info=exc)
        if reactor.running:
            reactor.stop()


class Command(BaseCommand):
    help = (
        "Run the whole service in one process on embedded defaults (SQLite, in-memory channel "
        "layer, mock market): web server, engine and periodic jobs."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--expiries", type=int, default=DEFAULT_EXPIRIES, help="option expiries per underlying"
        )
        parser.add_argument(
            "--strikes-each-side",
            type=int,
            default=DEFAULT_STRIKES_EACH_SIDE,
            help="strikes each side of the money in each chain",
        )

    def handle(self, *args, **options):
        if not settings.EMBEDDED:
            raise CommandError(
                "the demo runs on embedded defaults only: unset DATABASE_URL (it creates its "
                "own SQLite database in TICKERPROJ_VAR_DIR and a demo superuser)"
            )
        if "LOG_JSON" not in os.environ:
            # Someone is reading this terminal: readable log lines unless JSON was asked for.
            configure_logging(json=False, level=settings.LOG_LEVEL)
        var_dir = Path(settings.VAR_DIR)
        self.stdout.write(f"Preparing the demo in {var_dir} ...")
        call_command("migrate", interactive=False, verbosity=0)
        holidays = parse_holidays(settings.MARKET_HOLIDAYS)
        market = SyntheticMarket(
            seed=settings.MOCK_MARKET_SEED,
            r=settings.RISK_FREE_RATE,
            holidays=holidays,
            expiries=options["expiries"],
            strikes_each_side=options["strikes_each_side"],
        )
        result, subscribed = demo_universe_load(market=market)
        log.info(
            "demo.universe_loaded",
            instruments=len(market.tokens),
            created=result.created,
            subscribed=subscribed,
        )
        password = demo_user_ensure(username=DEMO_USERNAME, password_file=var_dir / PASSWORD_FILE)

        # The engine streams the synthetic market whatever the time of day: with no Kite
        # account there is nothing live to stream, and the demo should always move.
        config = EngineConfig.from_settings(settings, force_mode="mock")
        engine_metrics = EngineMetrics()
        engine = Engine.build(
            config,
            channel_layer=get_channel_layer(),
            notifier=apps.get_app_config("streaming").change_notifier,
            metrics=engine_metrics,
            market=market,
        )
        from tickerproj.asgi import build_application

        application = build_application(
            metrics=WebSocketMetrics(CollectorRegistry()),
            extra_registries=[engine_metrics.registry],
        )
        host, port = options["host"], options["port"]
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104

        def ready() -> None:
            url = f"http://{shown_host}:{port}/"
            self.stdout.write(
                "\ntickerproj demo: mock market, embedded SQLite, no Redis.\n"
                f"Open {url} and log in as {DEMO_USERNAME} / {password}\n"
                f"Admin: {url}admin/   Health: {url}health   Metrics: {url}metrics\n"
                "Stop with Ctrl-C.\n"
            )
            self.stdout.flush()

        runner = DemoRunner(
            application=application,
            engine=engine,
            jobs=InProcessJobs(),
            host=host,
            port=port,
            on_ready=ready,
        )
        code = runner.run()
        if code:
            raise CommandError("the demo stopped after an error (see the log above)")
        self.stdout.write("Demo stopped.")
