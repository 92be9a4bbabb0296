"""The engine's side of the channel layer: flush batches out, initial-state requests answered.

One message per group per flush, and only to groups somebody listens to. A channels-redis
``group_send`` costs four Redis round trips and about 0.2 ms of CPU for an empty group, 0.5 ms
for one with members (benchmarks/pipeline), so on channels-redis a flush is sent in bulk
(:class:`_RedisBulkSender`, the same messages in two pipelined round trips, about 0.07 ms per
group), and sending every chain of a 100k-instrument universe each flush would still cost a
large share of a core for nobody. :attr:`Publisher.watched` is the set of
groups with members, refreshed from the layer every few seconds
(:meth:`Publisher.refresh_watched`) and extended at once when a consumer asks for initial
state (a consumer joins its groups, then sends the request), so a new subscriber never
misses a change: everything before the request is in the initial state, everything after
goes to its groups.

Typical wiring (the engine runs each loop as a supervised task)::

    publisher = Publisher(channel_layer)
    await publisher.refresh_watched(pipeline.universe.group_names)    # every few seconds
    await publisher.publish(pipeline.flush(now, watched=publisher.watched))
    await publisher.publish_bars(bars)
    await publisher.serve_snapshot_requests(pipeline)                 # runs until cancelled
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import redis
import structlog
from channels.exceptions import ChannelFull
from channels_redis.pubsub import RedisPubSubChannelLayer

from streaming import schema
from streaming.engine.bars import Bar
from streaming.engine.pipeline import GroupBatch

__all__ = ["PublishError", "PublishResult", "Publisher"]

log = structlog.get_logger(__name__)

#: Concurrent group_sends per publish: enough to overlap Redis round trips, few enough not to
#: open a connection per group (channels-redis pools are unbounded).
DEFAULT_MAX_CONCURRENCY: Final = 8
#: Initial-state answers are split into messages of at most this many snapshots.
MAX_ITEMS_PER_REPLY: Final = 1000
#: How often the request loop renews its group membership, busy or idle (channels-redis drops
#: members after ``group_expiry``, one day by default).
DEFAULT_REQUEST_GROUP_RENEW_S: Final = 600.0

# What a send can fail with when Redis is unreachable or refuses: a broken connection is an
# OSError, a Redis-side failure a RedisError. Anything else is a bug and propagates.
_SEND_ERRORS: Final = (redis.RedisError, OSError)


# channels-redis's own group_send script (channels_redis/core.py, 4.x): add each message to its
# channel's sorted set unless the channel is at capacity. Keys may repeat: capacity is then
# checked against what the same call already added.
_GROUP_SEND_LUA: Final = """
    local over_capacity = 0
    local current_time = ARGV[#ARGV - 1]
    local expiry = ARGV[#ARGV]
    for i=1,#KEYS do
        if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
            redis.call('ZADD', KEYS[i], current_time, ARGV[i])
            redis.call('EXPIRE', KEYS[i], expiry)
        else
            over_capacity = over_capacity + 1
        end
    end
    return over_capacity
"""
_REDIS_LAYER_INTERNALS: Final = (
    "_group_key",
    "_map_channel_keys_to_connection",
    "connection",
    "consistent_hash",
    "expiry",
    "group_expiry",
)


class _RedisBulkSender:
    """channels-redis ``group_send`` for many groups at once: two pipelined round trips.

    ``RedisChannelLayer.group_send`` makes four round trips per group and costs about 0.4 ms
    of CPU in redis-py (benchmarks/pipeline), which caps one engine at a few hundred groups
    per flush. This does the same steps for a whole flush: one pipeline reads every group's
    members (after dropping expired ones, as group_send does), then per Redis host one
    pipeline expires old messages and runs group_send's own Lua script over every message.
    Each group still gets exactly one message per flush, byte-identical to group_send's, and
    consumers receive it with the layer's ordinary ``receive``. It relies on channels-redis
    internals (listed in ``_REDIS_LAYER_INTERNALS``, checked at construction); the publisher
    tests run it against the real layer, so an incompatible channels-redis fails there.
    """

    def __init__(self, layer: Any) -> None:
        self._layer = layer

    @staticmethod
    def supports(layer: Any) -> bool:
        return all(hasattr(layer, name) for name in _REDIS_LAYER_INTERNALS)

    async def send(self, messages: list[tuple[str, dict[str, Any]]]) -> int:
        """Send ``(group, message)`` pairs; returns how many channel messages were dropped
        because a consumer's channel was full."""
        layer = self._layer
        by_host: dict[int, list[tuple[str, dict[str, Any]]]] = collections.defaultdict(list)
        for group, message in messages:
            by_host[layer.consistent_hash(group)].append((group, message))
        members: dict[str, list[str]] = {}
        expired_before = int(time.time()) - int(layer.group_expiry)
        for index, host_messages in by_host.items():
            async with layer.connection(index).pipeline(transaction=False) as pipe:
                for group, _ in host_messages:
                    key = layer._group_key(group)
                    pipe.zremrangebyscore(key, min=0, max=expired_before)
                    pipe.zrange(key, 0, -1)
                replies = await pipe.execute()
            for (group, _), names in zip(host_messages, replies[1::2], strict=True):
                members[group] = [name.decode("utf8") for name in names]

        keys_of: dict[int, list[Any]] = collections.defaultdict(list)
        payload_of: dict[int, list[bytes]] = collections.defaultdict(list)
        capacity_of: dict[int, list[int]] = collections.defaultdict(list)
        for group, message in messages:
            names = members[group]
            if not names:
                continue
            connection_keys, key_message, key_capacity = layer._map_channel_keys_to_connection(
                names, message
            )
            for index, keys in connection_keys.items():
                keys_of[index].extend(keys)
                payload_of[index].extend(key_message[k] for k in keys)
                capacity_of[index].extend(key_capacity[k] for k in keys)

        dropped = 0
        for index, keys in keys_of.items():
            now = time.time()
            async with layer.connection(index).pipeline(transaction=False) as pipe:
                for key in dict.fromkeys(keys):
                    pipe.zremrangebyscore(key, min=0, max=int(now) - int(layer.expiry))
                pipe.eval(
                    _GROUP_SEND_LUA,
                    len(keys),
                    *keys,
                    *payload_of[index],
                    *capacity_of[index],
                    now,
                    layer.expiry,
                )
                replies = await pipe.execute()
            dropped += int(replies[-1])
        return dropped


_PUBSUB_LOOP_LAYER_INTERNALS: Final = ("_get_group_channel_name", "_get_shard")


class _PubSubBulkSender:
    """channels-redis ``RedisPubSubChannelLayer.group_send`` for many groups at once.

    The pub/sub layer's ``group_send`` is one PUBLISH per group, made one at a time under the
    shard's lock; this sends a whole flush as one pipeline of the same PUBLISHes per shard,
    with the layer's own serializer and group channel names, so members receive exactly what
    ``group_send`` would have sent them. Also answers which groups have a subscribed web
    process (PUBSUB NUMSUB). Relies on the layer's per-loop layer (``_get_layer``), its shards'
    Redis client (``_ensure_redis``, ``_redis``) and ``_PUBSUB_LOOP_LAYER_INTERNALS`` (checked
    on each use); the publisher tests run it
    against the real layer.
    """

    def __init__(self, layer: Any) -> None:
        self._layer = layer

    @staticmethod
    def supports(layer: Any) -> bool:
        return isinstance(layer, RedisPubSubChannelLayer)

    def _loop_layer(self) -> Any:
        loop_layer = self._layer._get_layer()
        missing = [n for n in _PUBSUB_LOOP_LAYER_INTERNALS if not hasattr(loop_layer, n)]
        if missing:
            raise RuntimeError(f"channels-redis's pub/sub layer has no {missing}: re-check the publisher")
        return loop_layer

    @staticmethod
    def _client(shard: Any) -> Any:
        shard._ensure_redis()
        return shard._redis

    async def send(self, messages: list[tuple[str, dict[str, Any]]]) -> int:
        """Send ``(group, message)`` pairs in order; returns 0 (pub/sub has no capacity)."""
        loop_layer = self._loop_layer()
        by_shard: dict[Any, list[tuple[str, bytes]]] = collections.defaultdict(list)
        for group, message in messages:
            channel = loop_layer._get_group_channel_name(group)
            by_shard[loop_layer._get_shard(channel)].append((channel, self._layer.serialize(message)))
        for shard, pairs in by_shard.items():
            async with self._client(shard).pipeline(transaction=False) as pipe:
                for channel, payload in pairs:
                    pipe.publish(channel, payload)
                await pipe.execute()
        return 0

    async def groups_with_subscribers(self, names: list[str]) -> set[str]:
        """Which of ``names`` some web process subscribes to: one PUBSUB NUMSUB per shard."""
        loop_layer = self._loop_layer()
        by_shard: dict[Any, dict[str, str]] = collections.defaultdict(dict)
        for name in names:
            channel = loop_layer._get_group_channel_name(name)
            by_shard[loop_layer._get_shard(channel)][channel] = name
        found: set[str] = set()
        for shard, group_of in by_shard.items():
            counts = await self._client(shard).pubsub_numsub(*group_of)
            for channel, subscribers in counts:
                key = channel.decode() if isinstance(channel, bytes) else channel
                if subscribers:
                    found.add(group_of[key])
        return found


class PublishError(RuntimeError):
    """Some group sends of one publish failed (all others were sent)."""

    def __init__(self, *, failed_groups: list[str], first_error: BaseException) -> None:
        self.failed_groups = failed_groups
        self.first_error = first_error
        super().__init__(
            f"{len(failed_groups)} group sends failed (first {failed_groups[0]!r}: "
            f"{type(first_error).__name__}: {first_error})"
        )


class PublishFailureLog:
    """Logs publish failures on state changes and as rates, not once per flush (10 a second).

    ``engine.publish_failed`` when publishing starts failing, ``engine.publish_failing`` at
    most every ``every_s`` while it goes on (groups dropped and their rate since the last
    line), ``engine.publish_recovered`` when a publish succeeds again.
    """

    def __init__(self, *, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._since: float | None = None
        self._logged_at = 0.0
        self._dropped_total = 0
        self._dropped_since_log = 0

    def failed(self, exc: PublishError) -> None:
        now = self._clock()
        dropped = len(exc.failed_groups)
        self._dropped_total += dropped
        self._dropped_since_log += dropped
        error = str(exc.first_error)[:200]
        if self._since is None:
            self._since = self._logged_at = now
            self._dropped_since_log = 0
            log.warning("engine.publish_failed", groups=dropped, error=error)
        elif now - self._logged_at >= self._every_s:
            log.warning("engine.publish_failing", for_s=round(now - self._since, 1),
                        groups_dropped=self._dropped_since_log,
                        groups_per_s=round(self._dropped_since_log / (now - self._logged_at), 1),
                        error=error)  # fmt: skip
            self._logged_at, self._dropped_since_log = now, 0

    def succeeded(self) -> None:
        if self._since is None:
            return
        log.info("engine.publish_recovered", after_s=round(self._clock() - self._since, 1),
                 groups_dropped=self._dropped_total)  # fmt: skip
        self._since, self._dropped_total, self._dropped_since_log = None, 0, 0


@dataclass(slots=True)
class PublishResult:
    """What one publish sent."""

    groups: int = 0
    snapshots: int = 0
    failed: list[str] = field(default_factory=list)


class _Pipeline(Protocol):
    """What the request loop needs of the pipeline: reads awaited off the event loop (the
    engine runs them on the pipeline's thread, between two flushes)."""

    async def latest(self, tokens: Iterable[int]) -> tuple[list[int], list[bytes]]: ...

    async def groups_of(self, tokens: Iterable[int]) -> set[str]: ...

    async def analytics_latest(self, groups: Iterable[str]) -> list[tuple[str, bytes]]: ...


class Publisher:
    """Sends snapshot batches and bars to a Channels layer; tracks which groups are watched."""

    def __init__(
        self,
        channel_layer: Any,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        bulk: bool | None = None,
        request_group_renew_s: float = DEFAULT_REQUEST_GROUP_RENEW_S,
    ) -> None:
        """``bulk`` (default: when the layer is channels-redis) sends a flush's batches with
        :class:`_RedisBulkSender`, or :class:`_PubSubBulkSender` on the pub/sub layer; otherwise each batch is one ``group_send``, up to
        ``max_concurrency`` at a time. ``request_group_renew_s`` is how often
        :meth:`serve_snapshot_requests` re-joins its group."""
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if request_group_renew_s <= 0:
            raise ValueError(f"request_group_renew_s must be > 0, got {request_group_renew_s}")
        self._request_group_renew_s = request_group_renew_s
        self._pubsub = _PubSubBulkSender(channel_layer) if _PubSubBulkSender.supports(channel_layer) else None
        bulk_sender = self._pubsub or (
            _RedisBulkSender(channel_layer) if _RedisBulkSender.supports(channel_layer) else None
        )
        if bulk and bulk_sender is None:
            raise ValueError(f"bulk sending needs channels-redis, got {type(channel_layer).__name__}")
        self._layer = channel_layer
        self._max_concurrency = max_concurrency
        self._bulk: _RedisBulkSender | _PubSubBulkSender | None = None if bulk is False else bulk_sender
        self.dropped_full = 0
        #: Groups with listeners; None until the first refresh (then every group is sent).
        self.watched: frozenset[str] | None = None
        self._marked_since_refresh: set[str] = set()
        self.requests_answered = 0
        self.requests_rejected = 0

    # --- watched groups ---------------------------------------------------------------------

    async def refresh_watched(self, groups: Iterable[str]) -> frozenset[str] | None:
        """Ask the layer which of ``groups`` have members; returns and stores the set.

        Supports channels-redis (one pipelined ZCARD per Redis host), its pub/sub layer (groups
        some web process subscribes to, one PUBSUB NUMSUB per host) and the in-memory layer.
        With another layer the set stays None and every group is sent.
        """
        names = list(groups)
        self._marked_since_refresh = set()
        members = await self._groups_with_members(names)
        if members is None:
            self.watched = None
            return None
        # A request answered while we waited may have marked groups we saw empty.
        self.watched = frozenset(members | self._marked_since_refresh)
        return self.watched

    def mark_watched(self, groups: Iterable[str]) -> None:
        """Treat ``groups`` as watched from now until the next refresh says otherwise."""
        new = set(groups)
        self._marked_since_refresh |= new
        if self.watched is not None and not new <= self.watched:
            self.watched = self.watched | new

    async def _groups_with_members(self, names: list[str]) -> set[str] | None:
        layer = self._layer
        if self._pubsub is not None:  # before the next test: this layer has a `groups` dict too
            return await self._pubsub.groups_with_subscribers(names)
        groups = getattr(layer, "groups", None)
        if isinstance(groups, dict):  # channels.layers.InMemoryChannelLayer
            return {name for name in names if groups.get(name)}
        # channels_redis.core.RedisChannelLayer keeps a group as a sorted set of channel names
        # at _group_key(group) on the host consistent_hash(group) picks. There is no public
        # API to count members, so this reads the same keys group_send reads; the tests run
        # it against the real layer so a change in channels-redis fails loudly.
        group_key = getattr(layer, "_group_key", None)
        if group_key is None or not hasattr(layer, "consistent_hash"):
            return None
        by_host: dict[int, list[str]] = collections.defaultdict(list)
        for name in names:
            by_host[layer.consistent_hash(name)].append(name)
        found: set[str] = set()
        for index, host_names in by_host.items():
            connection = layer.connection(index)
            async with connection.pipeline(transaction=False) as pipe:
                for name in host_names:
                    pipe.zcard(group_key(name))
                counts = await pipe.execute()
            found.update(name for name, count in zip(host_names, counts, strict=True) if count)
        return found

    # --- sending ----------------------------------------------------------------------------

    async def publish(self, batches: Sequence[GroupBatch]) -> PublishResult:
        """Send each batch to its group: one message per group (see the constructor).

        Every batch is tried; if any failed, raises :class:`PublishError` naming them.
        """
        result = PublishResult()
        if not batches:
            return result
        if self._bulk is not None:
            try:
                dropped = await self._bulk.send([(b.group, b.message()) for b in batches])
            except _SEND_ERRORS as exc:
                raise PublishError(failed_groups=[b.group for b in batches], first_error=exc) from exc
            if dropped:
                self.dropped_full += dropped
                log.info("publisher.channels_full", dropped=dropped, groups=len(batches))
            result.groups = len(batches)
            result.snapshots = sum(len(b.items) for b in batches)
            return result
        errors: list[BaseException] = []
        pending = iter(batches)

        async def worker() -> None:
            # The iterator is shared: each worker takes the next batch when it is free.
            for batch in pending:
                try:
                    await self._layer.group_send(batch.group, batch.message())
                except _SEND_ERRORS as exc:
                    result.failed.append(batch.group)
                    errors.append(exc)
                    continue
                result.groups += 1
                result.snapshots += len(batch.items)

        await asyncio.gather(*(worker() for _ in range(min(self._max_concurrency, len(batches)))))
        if errors:
            raise PublishError(failed_groups=result.failed, first_error=errors[0])
        return result

    async def publish_bars(self, bars: Sequence[Bar]) -> int:
        """Send each closed bar to its ``bars.<NAME>`` group, oldest first; returns the count."""
        for bar in bars:
            await self._layer.group_send(
                schema.bars_group(bar.name), schema.bar_closed_message(bar.item())
            )
        return len(bars)

    async def publish_analytics(self, messages: Sequence[tuple[str, bytes]]) -> int:
        """Send each chain's ``analytics`` message to its chain group; returns the count.

        Raises :class:`PublishError` naming the groups whose send failed (the rest were sent).
        """
        pairs = [(g, schema.chain_analytics_message(group=g, item=m)) for g, m in messages]
        if not pairs:
            return 0
        if self._bulk is not None:
            try:
                self.dropped_full += await self._bulk.send(pairs)
            except _SEND_ERRORS as exc:
                raise PublishError(failed_groups=[g for g, _ in pairs], first_error=exc) from exc
            return len(pairs)
        failed: list[str] = []
        first: BaseException | None = None
        for group, message in pairs:
            try:
                await self._layer.group_send(group, message)
            except _SEND_ERRORS as exc:
                failed.append(group)
                first = first or exc
        if first is not None:
            raise PublishError(failed_groups=failed, first_error=first)
        return len(pairs)

    async def send_initial(self, reply_to: str, tokens: list[int], items: list[bytes]) -> int:
        """Send the latest snapshots to one consumer channel, in messages of bounded size.

        Returns how many snapshots were sent; a full consumer channel drops the rest (the
        consumer is too slow and gets the next changes anyway) and is logged.
        """
        sent = 0
        for start in range(0, len(tokens), MAX_ITEMS_PER_REPLY):
            end = start + MAX_ITEMS_PER_REPLY
            message = schema.snapshots_batch_message(
                group="", tokens=tokens[start:end], items=items[start:end], initial=True
            )
            try:
                await self._layer.send(reply_to, message)
            except ChannelFull:
                log.warning("publisher.reply_channel_full", reply_to=reply_to, sent=sent, wanted=len(tokens))
                return sent
            sent += len(tokens[start:end])
        return sent

    async def answer_request(self, message: dict[str, Any], pipeline: _Pipeline) -> int:
        """Answer one ``snapshot.request``: mark its groups watched, send what we have."""
        try:
            request = schema.parse_snapshot_request(message)
        except schema.SnapshotRequestError as exc:
            self.requests_rejected += 1
            log.warning("publisher.bad_snapshot_request", reason=exc.reason)
            return 0
        # Watched first, then the snapshot: every flush that starts after mark_watched
        # publishes the groups' changes, and the snapshot is read after any flush that began
        # before it (the reads queue behind flushes on the pipeline's one thread), so every
        # change is either published or in the answer.
        self.mark_watched(await pipeline.groups_of(request.tokens))
        tokens, items = await pipeline.latest(request.tokens)
        self.requests_answered += 1
        if not tokens:
            return 0
        return await self.send_initial(request.reply_to, tokens, items)

    async def answer_analytics_request(self, message: dict[str, Any], pipeline: _Pipeline) -> int:
        """Answer one ``analytics.request``: the latest analytics of the chains we stream."""
        try:
            request = schema.parse_analytics_request(message)
        except schema.SnapshotRequestError as exc:
            self.requests_rejected += 1
            log.warning("publisher.bad_analytics_request", reason=exc.reason)
            return 0
        # Watched first, as for snapshots: the next changes of these chains are published.
        self.mark_watched(request.groups)
        sent = 0
        for group, item in await pipeline.analytics_latest(request.groups):
            try:
                await self._layer.send(
                    request.reply_to, schema.chain_analytics_message(group=group, item=item)
                )
            except ChannelFull:
                log.warning("publisher.reply_channel_full", reply_to=request.reply_to)
                break
            sent += 1
        self.requests_answered += 1
        return sent

    async def serve_snapshot_requests(self, pipeline: _Pipeline) -> None:
        """Answer initial-state requests until cancelled (run it as a supervised task)."""
        layer = self._layer
        # The default "specific" prefix: channels-redis reads all of a process's channels of
        # one prefix with a single BRPOP, so a second prefix would wait behind the first.
        channel = await layer.new_channel()
        await layer.group_add(schema.SNAPSHOT_REQUESTS_GROUP, channel)
        log.info("publisher.serving_requests", channel=channel)
        # Renewed on a clock in a task of its own, not on idleness and not by interrupting
        # receive(): a constantly busy loop would never renew and silently drop out of the group
        # after group_expiry, and cancelling channels-redis's receive mid-read can lose its
        # place in the layer's receive lock and hang the next receive.
        renewer = asyncio.create_task(
            self._renew_request_group(channel), name="snapshot-request-group-renewal"
        )
        try:
            while True:
                message = await layer.receive(channel)
                if message.get("type") == schema.SNAPSHOT_REQUEST_TYPE:
                    await self.answer_request(message, pipeline)
                elif message.get("type") == schema.ANALYTICS_REQUEST_TYPE:
                    await self.answer_analytics_request(message, pipeline)
                else:
                    log.warning("publisher.unexpected_message", type=str(message.get("type"))[:50])
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            # Bounded so that a dead Redis cannot hold shutdown.
            try:
                await asyncio.wait_for(
                    layer.group_discard(schema.SNAPSHOT_REQUESTS_GROUP, channel), timeout=2.0
                )
            except (TimeoutError, *_SEND_ERRORS) as exc:
                log.warning("publisher.request_group_leave_failed", error=repr(exc))

    async def _renew_request_group(self, channel: str) -> None:
        """Re-join the snapshot-request group every ``request_group_renew_s``, until cancelled."""
        while True:
            await asyncio.sleep(self._request_group_renew_s)
            try:
                await self._layer.group_add(schema.SNAPSHOT_REQUESTS_GROUP, channel)
            except _SEND_ERRORS as exc:
                # Redis is down: the next period tries again; the receive loop reports the outage.
                log.warning("publisher.request_group_renew_failed", error=repr(exc))
