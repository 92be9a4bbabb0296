"""Celery tasks of the streaming side: the gap backfill of underlying bars (thin: settings,
lock, one service call, the publish of what was filled)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import structlog
from asgiref.sync import async_to_sync
from celery import Task, shared_task
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from streaming import schema
from streaming.locks import run_locked
from streaming.services import FilledBar, bars_backfill
from subscriptions.clients import NoKiteSessionError, rest_client_for_service

log = structlog.get_logger(__name__)

BACKFILL_TASK: Final = "streaming.backfill_bars"
BACKFILL_TIME_LIMIT_S: Final = 300
#: A run queued while another holds the lock comes back this much later (its gaps may be
#: newer than the running one's read), a few times, before leaving them to the periodic run.
BUSY_RETRY_S: Final = 10
BUSY_RETRIES: Final = 3


def _publish(bars: list[FilledBar]) -> None:
    """Send filled minutes to ``bars.<NAME>`` as closed bars flagged ``backfilled``."""
    if not bars:
        return
    layer = get_channel_layer()
    messages = [
        (schema.bars_group(bar.name), schema.bar_closed_message(schema.encode_bar(
            token=bar.token, name=bar.name, start_epoch_s=bar.start_epoch_s, open=bar.open,
            high=bar.high, low=bar.low, close=bar.close, volume=bar.volume, ticks=0,
            is_gap=False, is_mock=False, backfilled=True,
        )))
        for bar in bars
    ]  # fmt: skip

    async def send_all() -> None:
        # One event loop (and one Redis connection) for the whole run, not one per bar.
        for group, message in messages:
            await layer.group_send(group, message)

    async_to_sync(send_all)()


@shared_task(
    name=BACKFILL_TASK,
    bind=True,
    soft_time_limit=BACKFILL_TIME_LIMIT_S - 30,
    time_limit=BACKFILL_TIME_LIMIT_S,
    max_retries=BUSY_RETRIES,
)
def backfill_bars(self: Task) -> dict[str, Any]:
    """Fill gap minutes of the last BACKFILL_LOOKBACK_H hours from Kite's minute candles.

    Queued by runticker when it stores gap bars or starts (a takeover), and run periodically.
    Minutes that ended less than BACKFILL_MIN_AGE_S ago wait for a later run.
    """

    def run() -> dict[str, Any]:
        now = timezone.now()
        try:
            client = rest_client_for_service(api_root=settings.KITE_API_ROOT,
                                             redis_url=settings.REDIS_URL)
        except NoKiteSessionError as exc:
            log.warning("backfill.skipped", error=str(exc))
            return {"skipped": str(exc)}
        with client:
            result = bars_backfill(
                client=client,
                since=now - dt.timedelta(hours=settings.BACKFILL_LOOKBACK_H),
                until=now - dt.timedelta(seconds=settings.BACKFILL_MIN_AGE_S + 60),
                now=timezone.now,
            )
        _publish(result.filled)
        return result.summary()

    outcome = run_locked(name="backfill_bars", time_limit_s=BACKFILL_TIME_LIMIT_S,
                         task_id=self.request.id or "", fn=run)
    busy = str(outcome.get("skipped", "")).startswith("lock ")
    if busy and self.request.retries < BUSY_RETRIES:
        raise self.retry(countdown=BUSY_RETRY_S)
    return outcome
