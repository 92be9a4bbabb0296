"""``manage.py replay FILE...``: serve a recording through the Kite simulator's WebSocket.

Point runticker's account at the printed KITE_WS_URL with the printed api_key and access
token (as with ``kitesim``): it connects, subscribes, and consumes the recorded frames through
the live protocol. The replay starts at the first subscription and the command exits once the
last frame is sent, printing what it replayed; a damaged recording is replayed up to the damage
and the command then fails, naming the file, byte offset and frame number.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import signal

import structlog
from django.core.management.base import BaseCommand, CommandError

from streaming.kite.recording import RecordingError
from streaming.market import IST, SyntheticMarket
from streaming.sim.replay import ReplaySource
from streaming.sim.simulator import KiteSimulator

log = structlog.get_logger(__name__)


def parse_when(value: str) -> int:
    """An ISO 8601 time as epoch ns; without an offset it is India time (the market's)."""
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(
            f"expected an ISO 8601 time such as 2026-12-04T09:20:00+05:30, got {value!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=IST)
    return int(when.timestamp() * 1e9)


class Command(BaseCommand):
    help = (
        "Replay recorded Kite ticker frames (runticker's TICKER_RECORDING_DIR) through a "
        "simulated Kite WebSocket, for runticker to consume through the live protocol."
    )

    def add_arguments(self, parser):
        parser.add_argument("files", nargs="+", metavar="FILE",
                            help="recording files of one account (a rotation plays in order)")
        parser.add_argument("--speed", type=float, default=1.0,
                            help="time between frames divided by this (10: ten times faster)")
        parser.add_argument("--from", dest="start", default=None, metavar="T",
                            help="replay frames received at or after T (ISO 8601; no offset: IST)")
        parser.add_argument("--to", dest="end", default=None, metavar="T",
                            help="replay frames received at or before T")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8600, help="0 picks a free port")
        parser.add_argument("--api-key", default="replay")
        parser.add_argument("--access-token", default=None,
                            help="the token the account must present (default: random)")

    def handle(self, *args, **options):
        if not options["speed"] > 0:
            raise CommandError(f"--speed must be positive, got {options['speed']}")
        start_ns = parse_when(options["start"]) if options["start"] else None
        end_ns = parse_when(options["end"]) if options["end"] else None
        if start_ns is not None and end_ns is not None and end_ns < start_ns:
            raise CommandError("--to is before --from")
        try:
            source = ReplaySource(
                options["files"], speed=options["speed"], start_ns=start_ns, end_ns=end_ns
            )
        except RecordingError as exc:
            raise CommandError(str(exc)) from None
        try:
            for reader in source.readers:
                self.stdout.write(
                    f"{reader.path}: account {reader.header.account}, file "
                    f"{reader.header.file_index}, started {reader.header.started_at.isoformat()}"
                )
            sim = KiteSimulator(market=SyntheticMarket(seed=0), host=options["host"],
                                port=options["port"], replay=source)
            sim.register_account(api_key=options["api_key"], api_secret=secrets.token_hex(16),
                                 access_token=options["access_token"] or secrets.token_hex(16))
            try:
                completed = asyncio.run(self._serve(sim, options["api_key"]))
            except OSError as exc:
                raise CommandError(
                    f"replay could not listen on {options['host']}:{options['port']}: {exc}"
                ) from exc
        finally:
            source.close()
        if not completed:
            self.stdout.write(f"stopped after {source.sent} messages")
            return
        self.stdout.write(
            f"replayed {source.sent} messages ({source.binary_bytes_sent} bytes of binary "
            f"frames) at speed {source.speed:g}: sent in {source.achieved_s:.2f} s, recorded "
            f"pace {source.intended_s:.2f} s"
            + (f"; the recorder had dropped {source.gap_frames} frames" if source.gap_frames else "")
        )
        if source.damage is not None:
            raise CommandError(f"replay stopped at damage: {source.damage}")

    async def _serve(self, sim: KiteSimulator, api_key: str) -> bool:
        """Serve until the replay is done (True) or a signal stops it (False)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with sim:
            self.stdout.write(f"KITE_WS_URL={sim.ws_url}")
            # For the operator to put on the account: a local replay's token guards nothing.
            self.stdout.write(f"account api_key={api_key} access_token={sim.access_token(api_key)}")
            self.stdout.flush()
            finished = asyncio.create_task(sim.replay_finished.wait())
            stopped = asyncio.create_task(stop.wait())
            done, pending = await asyncio.wait({finished, stopped},
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            return finished in done
