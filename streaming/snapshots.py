"""Reading the engines' latest snapshots from outside the engine (web, Celery, the paper desk).

One way, the one browsers already use: send a ``snapshot.request`` to
``engine.snapshot_requests`` with a fresh reply channel and collect the ``initial`` batches
every engine answers with (docs/snapshot-schema.md). Nothing new runs in the engine, nothing
is cached here, and the answer is the pipeline's own latest state, read between two flushes.
Several engines may answer parts and none says "that is all", so :meth:`SnapshotReader.latest`
returns as soon as every token asked for has arrived, or what it has after ``timeout_s``
(a token no engine streams is simply absent).

Only the fields a reader outside the engine acts on are parsed (:class:`LiveSnapshot`);
unknown keys are ignored, as the version policy allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import orjson
import structlog
from channels_redis.pubsub import RedisPubSubChannelLayer
from pydantic import BaseModel, ConfigDict, ValidationError

from streaming import schema

log = structlog.get_logger(__name__)


class LiveSnapshot(BaseModel):
    """The parts of one snapshot (schema v1) that trading and positions read."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int
    token: int
    symbol: str
    exchange: str
    name: str
    kind: str
    expiry: str | None = None
    strike: float | None = None
    ltp: float
    bid: float | None = None
    ask: float | None = None
    bid_qty: int | None = None
    ask_qty: int | None = None
    iv: float | None = None
    delta: float | None = None
    gamma: float | None = None
    theta: float | None = None
    vega: float | None = None
    underlying: float | None = None
    flags: list[str] = []
    exchange_ts: int | None = None
    is_mock: bool

    @property
    def is_option(self) -> bool:
        return self.kind in ("CE", "PE")


class SnapshotParseError(ValueError):
    """An engine item that is not a version-1 snapshot."""


def snapshot_parse(item: bytes) -> LiveSnapshot:
    """One engine item (pre-serialised JSON) as a :class:`LiveSnapshot`."""
    try:
        snapshot = LiveSnapshot.model_validate(orjson.loads(item))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise SnapshotParseError(f"invalid snapshot item {item[:120]!r}: {exc}") from exc
    if snapshot.v != schema.SCHEMA_VERSION:
        raise SnapshotParseError(
            f"snapshot of token {snapshot.token} has schema v{snapshot.v}, "
            f"expected v{schema.SCHEMA_VERSION}"
        )
    return snapshot


async def channel_release(layer: Any, channel: str) -> None:
    """Let go of a channel from ``new_channel()`` that nobody will read again, and whose last
    receive was not cancelled (that already let it go).

    channels-redis's RedisPubSubChannelLayer subscribes each new channel in this process until
    a receive on it is cancelled (its one clean-up path: channels has no delete_channel), so a
    read per request would leave a subscription and a queue behind each time. Other layers
    hold nothing for a channel (its messages expire).
    """
    if not isinstance(layer, RedisPubSubChannelLayer):
        return
    while True:
        waiter = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0)
        if waiter.done():
            waiter.result()  # a late answer, dropped; wait again for the cancellable receive
            continue
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return


class SnapshotReader:
    """Asks the engines for the latest snapshots of some tokens over a channel layer."""

    def __init__(self, channel_layer: Any, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._layer = channel_layer
        self._timeout_s = timeout_s

    async def latest(self, tokens: Iterable[int]) -> dict[int, LiveSnapshot]:
        """Latest snapshot per token the engines have; absent tokens are not in the result.

        Raises the channel layer's errors (``OSError``, ``redis.RedisError``) when Redis is away.
        """
        wanted = {int(t) for t in tokens}
        if not wanted:
            return {}
        layer = self._layer
        # A channel of its own per call: abandoning it at the deadline (a cancelled receive)
        # is then harmless, and a late answer lands on a channel nobody reads (it expires).
        channel = await layer.new_channel()
        await layer.group_send(
            schema.SNAPSHOT_REQUESTS_GROUP,
            schema.snapshot_request_message(reply_to=channel, tokens=sorted(wanted)),
        )
        found: dict[int, LiveSnapshot] = {}
        if not await self._answers(channel, wanted, found):
            await channel_release(layer, channel)
        return found

    async def _answers(self, channel: str, wanted: set[int], found: dict[int, LiveSnapshot]) -> bool:
        """Collect answers into ``found``; True when a receive was cancelled at the deadline
        (which is what lets go of the channel on the pub/sub layer)."""
        layer = self._layer
        deadline = time.monotonic() + self._timeout_s
        while not wanted <= found.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                message = await asyncio.wait_for(layer.receive(channel), timeout=left)
            except TimeoutError:
                return True
            if message.get("type") != schema.SNAPSHOTS_BATCH_TYPE:
                continue
            # Not strict, and a bad item is skipped: one engine's bug must not fail the read.
            for token, item in zip(message.get("tokens", ()), message.get("items", ()), strict=False):
                if token in wanted:
                    try:
                        found[token] = snapshot_parse(item)
                    except SnapshotParseError as exc:
                        log.error("snapshots.bad_item", token=token, error=str(exc)[:200])
        return False
