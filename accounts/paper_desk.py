"""The paper desk: resting paper orders fill on the engine's later snapshots (``runpaper``).

Why a process of its own, beside the engines, and not inside runticker's flush: the engine
publishes each instrument's changes to its channel-layer group anyway, so the desk is one more
listener, exactly like a browser, and the engine stays what it is (ticks in, snapshots out; no
order tables, no order writes on its database threads, no accounts import). It also works
whichever engine streams an instrument, and several engines never match one order. The cost
is one channel-layer hop (about a millisecond) between a snapshot and its fill.

Every ``refresh_s`` the desk re-reads the open paper orders, joins the groups of their
instruments and leaves the others; each ``snapshots.batch`` it receives is matched for the
orders of its tokens (:meth:`accounts.paper.PaperExchange.match`, which writes through the
order services). One desk matches at a time, by the ``paper-desk`` job lock: a second one
waits, so the quantity a snapshot shows is never handed out twice.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog
from channels.db import database_sync_to_async
from django.db import DatabaseError
from redis.exceptions import RedisError

from accounts.order_models import OPEN_STATUSES, Order
from accounts.paper import PaperExchange
from streaming import schema
from streaming.consumers import instrument_groups
from streaming.locks import joblock_acquire, joblock_release
from streaming.snapshots import SnapshotParseError, snapshot_parse
from subscriptions.selectors import instrument_list_by_tokens

log = structlog.get_logger(__name__)

LOCK_NAME = "paper-desk"


class PaperDesk:
    """One listener on the channel layer for the instruments of the open paper orders."""

    def __init__(
        self, *, channel_layer: Any, exchange: PaperExchange, owner: str, refresh_s: float,
        lock_ttl_s: float = 15.0, group_renew_s: float = 60.0,
    ) -> None:  # fmt: skip
        self._layer = channel_layer
        self._exchange = exchange
        self._owner = owner
        self._refresh_s = refresh_s
        self._lock_ttl_s = lock_ttl_s
        self._group_renew_s = group_renew_s
        self._book: dict[int, list[Order]] = {}
        self._groups: set[str] = set()
        self.fills = 0

    async def run(self) -> None:
        """Listen and match until cancelled."""
        channel = await self._layer.new_channel()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._refresh_loop(channel), name="paper-desk-refresh")
                tasks.create_task(self._receive_loop(channel), name="paper-desk-receive")
        finally:
            try:
                await database_sync_to_async(joblock_release)(name=LOCK_NAME, owner=self._owner)
            except DatabaseError as exc:
                log.warning("paper.lock_release_failed", error=str(exc)[:200])
            for group in self._groups:
                try:
                    await asyncio.wait_for(self._layer.group_discard(group, channel), timeout=2.0)
                except (TimeoutError, OSError, RedisError) as exc:
                    log.warning("paper.group_leave_failed", group=group, error=repr(exc)[:200])

    async def _refresh_loop(self, channel: str) -> None:
        renewed_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            renew = loop.time() - renewed_at >= self._group_renew_s
            try:
                await self._refresh(channel, renew=renew)
                if renew:
                    renewed_at = loop.time()
            except (DatabaseError, OSError, RedisError) as exc:
                # PostgreSQL or Redis away: the orders stay stored; the next round tries again.
                log.warning("paper.refresh_failed", error=str(exc)[:200])
            await asyncio.sleep(self._refresh_s)

    async def _refresh(self, channel: str, *, renew: bool) -> None:
        """Take the lock, read the book, join new groups (all of them when ``renew``: the
        layer forgets members after its group expiry) and leave the others."""
        held = await database_sync_to_async(joblock_acquire)(
            name=LOCK_NAME, owner=self._owner, ttl_s=self._lock_ttl_s
        )
        book, groups = await database_sync_to_async(self._read_book)() if held else ({}, set())
        for group in sorted(groups if renew else groups - self._groups):
            await self._layer.group_add(group, channel)
        for group in sorted(self._groups - groups):
            await self._layer.group_discard(group, channel)
        self._book, self._groups = book, groups

    @staticmethod
    def _read_book() -> tuple[dict[int, list[Order]], set[str]]:
        """The open paper orders by instrument (oldest first) and their instruments' groups."""
        book: dict[int, list[Order]] = defaultdict(list)
        orders = (
            Order.objects.filter(account__is_paper=True, status__in=OPEN_STATUSES,
                                 instrument_token__isnull=False, kite_order_id__isnull=False)
            .select_related("account").order_by("pk")
        )  # fmt: skip
        for order in orders:
            book[order.instrument_token].append(order)
        groups = instrument_groups(instrument_list_by_tokens(tokens=list(book)))
        return dict(book), set(groups.values())

    async def _receive_loop(self, channel: str) -> None:
        while True:
            try:
                message = await self._layer.receive(channel)
            except (OSError, RedisError) as exc:
                log.warning("paper.receive_failed", error=str(exc)[:200])
                await asyncio.sleep(self._refresh_s)
                continue
            kind = message.get("type")
            if kind != schema.SNAPSHOTS_BATCH_TYPE:
                # Chain groups also carry the chain's analytics, which the desk has no use for.
                if kind != schema.CHAIN_ANALYTICS_TYPE:
                    log.warning("paper.unexpected_message", type=str(kind)[:60])
                continue
            for token, item in zip(message["tokens"], message["items"], strict=False):
                orders = self._book.get(token)
                if not orders:
                    continue
                try:
                    snapshot = snapshot_parse(item)
                except SnapshotParseError as exc:
                    log.error("paper.bad_snapshot", token=token, error=str(exc)[:200])
                    continue
                try:
                    self._book[token] = await database_sync_to_async(self._match)(orders, snapshot)
                except DatabaseError as exc:
                    # Nothing half-written (each fill is one transaction): a later snapshot fills.
                    log.warning("paper.match_failed", token=token, error=str(exc)[:200])

    def _match(self, orders: list[Order], snapshot) -> list[Order]:
        """Match one instrument's open orders (all accounts, oldest first); what stays open."""
        changed = self._exchange.match(orders=orders, snapshot=snapshot)
        self.fills += sum(1 for o in changed if o.filled_quantity)
        if not changed:
            return orders
        still_open = Order.objects.filter(
            pk__in=[o.pk for o in orders], status__in=OPEN_STATUSES
        ).select_related("account").order_by("pk")  # fmt: skip
        return list(still_open)
