"""``manage.py runpaper``: the paper desk, which fills resting paper orders on live snapshots.

Run one (a second waits on the ``paper-desk`` job lock and takes over when the first stops).
Settings are read once here. SIGTERM and SIGINT stop it; an order half-way is safe (each fill
is one transaction), and the next desk carries on from the stored orders.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.management.base import BaseCommand

from accounts.paper import PaperExchange
from accounts.paper_desk import PaperDesk
from streaming.locks import joblock_owner_id
from streaming.management.commands.runticker import set_application_name

log = structlog.get_logger(__name__)


class Command(BaseCommand):
    help = "Fill resting paper orders against the engines' live snapshots (run one)."

    def handle(self, *args, **options):
        set_application_name("runpaper")
        desk = PaperDesk(
            channel_layer=get_channel_layer(), exchange=PaperExchange.from_settings(),
            owner=joblock_owner_id("paper"), refresh_s=settings.PAPER_DESK_REFRESH_S,
        )  # fmt: skip
        asyncio.run(self._run(desk))

    async def _run(self, desk: PaperDesk) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(desk.run(), name="paper-desk")
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        log.info("paper.desk_started")
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("paper.desk_stopped", fills=desk.fills)
