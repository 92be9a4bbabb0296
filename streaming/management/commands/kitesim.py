"""``manage.py kitesim``: run the loopback Kite simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import secrets
import signal

import structlog
from django.core.management.base import BaseCommand, CommandError

from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator

log = structlog.get_logger(__name__)


class Command(BaseCommand):
    help = (
        "Serve a simulated Kite Connect (REST + ticker WebSocket) on one port, driven by a "
        "synthetic NIFTY/BANKNIFTY market. Prints the URLs for KITE_API_ROOT, KITE_WS_URL "
        "and KITE_LOGIN_URL."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8600, help="0 picks a free port")
        parser.add_argument("--api-key", default="kitesim")
        parser.add_argument("--api-secret", default="kitesim-secret")
        parser.add_argument(
            "--access-token", default=None, help="logged in with this token (default: random)"
        )
        parser.add_argument(
            "--account",
            action="append",
            default=[],
            metavar="KEY:SECRET[:TOKEN]",
            help="another API key (repeatable)",
        )
        parser.add_argument(
            "--redirect-url", default=None, help="where the simulated login page redirects"
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--tick-interval-ms", type=float, default=250.0)
        parser.add_argument("--expiries", type=int, default=3)
        parser.add_argument("--strikes-each-side", type=int, default=15)
        parser.add_argument("--extra-underlyings", type=int, default=0)
        parser.add_argument("--latency-probe", action="store_true")
        parser.add_argument("--enforce-rate-limits", action="store_true")

    def handle(self, *args, **options):
        accounts = [(options["api_key"], options["api_secret"], options["access_token"])]
        for spec in options["account"]:
            key, _, rest = spec.partition(":")
            secret, _, token = rest.partition(":")
            if not key or not secret:
                raise CommandError(f"--account expects KEY:SECRET[:TOKEN], got {spec!r}")
            accounts.append((key, secret, token or None))
        market = SyntheticMarket(
            seed=options["seed"],
            expiries=options["expiries"],
            strikes_each_side=options["strikes_each_side"],
            extra_underlyings=options["extra_underlyings"],
        )
        sim = KiteSimulator(
            market=market,
            tick_interval_ms=options["tick_interval_ms"],
            host=options["host"],
            port=options["port"],
            latency_probe=options["latency_probe"],
            enforce_rate_limits=options["enforce_rate_limits"],
        )
        for key, secret, token in accounts:
            sim.register_account(
                api_key=key,
                api_secret=secret,
                access_token=token or secrets.token_hex(16),
                redirect_url=options["redirect_url"],
            )
        try:
            asyncio.run(self._serve(sim, [key for key, _, _ in accounts]))
        except OSError as exc:
            raise CommandError(
                f"kitesim could not listen on {options['host']}:{options['port']}: {exc}"
            ) from exc

    async def _serve(self, sim: KiteSimulator, api_keys: list[str]) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with sim:
            self.stdout.write(f"KITE_API_ROOT={sim.http_url}")
            self.stdout.write(f"KITE_WS_URL={sim.ws_url}")
            self.stdout.write(f"KITE_LOGIN_URL={sim.login_url}")
            for key in api_keys:
                # Printed for the operator to paste into the account: a local simulator's
                # token guards nothing real.
                self.stdout.write(f"account api_key={key} access_token={sim.access_token(key)}")
            self.stdout.flush()
            await stop.wait()
            log.info("kitesim.stopping", ticks_sent=sim.ticks_sent)
