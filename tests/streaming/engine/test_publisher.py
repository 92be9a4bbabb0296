"""The publisher on a real channels-redis layer: one group_send per group, watched groups,
initial-state requests, bars, and failures that name what was not sent."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import orjson
import pytest
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from streaming import schema
from streaming.engine.bars import Bar
from streaming.engine.chain_analytics import ChainAnalytics
from streaming.engine.pipeline import GroupBatch, SnapshotPipeline
from streaming.engine.publisher import (
    MAX_ITEMS_PER_REPLY,
    Publisher,
    PublishError,
    PublishFailureLog,
)
from streaming.engine.universe import InstrumentUniverse
from streaming.protocol import AnalyticsMessage
from tests.helpers import async_wait_until, cancel_until_done
from tests.streaming.engine.builders import (
    E1,
    NIFTY_FUT,
    NIFTY_INDEX,
    NOW_S,
    InlineReads,
    nifty_rows,
    option_token,
    tick,
    ticks,
)

# A deadline for what must arrive, not a speed claim: generous for a loaded machine.
RECEIVE_TIMEOUT_S = 30.0
CE = option_token(E1, 26000.0, "CE")
PE = option_token(E1, 26000.0, "PE")
CHAIN_E1 = "chain.NIFTY.20261124"


@pytest.fixture
async def layer():
    layer = RedisChannelLayer(hosts=[settings.REDIS_URL], prefix="test-pipeline")
    await layer.flush()
    yield layer
    await layer.flush()
    await layer.close_pools()


def pipeline_with_data():
    p = SnapshotPipeline(InstrumentUniverse.from_rows(nifty_rows()), r=0.065, stale_after_s=30.0)
    p.ingest(
        ticks(tick(NIFTY_INDEX, 26000.0, length=32), tick(NIFTY_FUT, 26050.0), tick(CE, 120.0), tick(PE, 70.0)),
        is_mock=False,
        received_epoch_s=NOW_S,
    )
    return p


async def receive(layer, channel):
    return await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT_S)


async def channel_is_empty(layer, channel):
    """No message waits on ``channel`` (channels-redis has no non-blocking receive: read the
    length of the channel's queue)."""
    connection = layer.connection(layer.consistent_hash(channel))
    return await connection.zcard(layer.prefix + layer.non_local_name(channel)) == 0


# Conditions on Redis: nothing to await on, so they are polled (a predicate returns a coroutine).
until = partial(async_wait_until, timeout_s=RECEIVE_TIMEOUT_S, interval_s=0.01)


@pytest.mark.parametrize("bulk", [True, False])
async def test_one_message_per_group_reaches_the_groups_members(layer, bulk):
    p = pipeline_with_data()
    consumer = await layer.new_channel()
    await layer.group_add("und.NIFTY", consumer)
    await layer.group_add(CHAIN_E1, consumer)
    publisher = Publisher(layer, bulk=bulk)
    batches = p.flush(NOW_S)
    result = await publisher.publish(batches)
    assert (result.groups, result.snapshots, result.failed) == (2, 4, [])
    got = [await receive(layer, consumer), await receive(layer, consumer)]
    assert await channel_is_empty(layer, consumer)
    by_group = {m["group"]: m for m in got}
    assert set(by_group) == {"und.NIFTY", CHAIN_E1}
    for message in got:
        assert message["type"] == schema.SNAPSHOTS_BATCH_TYPE
        assert "initial" not in message
    chain = by_group[CHAIN_E1]
    assert sorted(chain["tokens"]) == sorted([CE, PE])
    assert [orjson.loads(i)["token"] for i in chain["items"]] == chain["tokens"]
    assert chain["items"] == next(b for b in batches if b.group == CHAIN_E1).items


@pytest.mark.parametrize(("bulk", "max_concurrency"), [(True, 1), (False, 1), (False, 8)])
async def test_many_groups_each_get_exactly_one_message(layer, bulk, max_concurrency):
    consumers = [await layer.new_channel(), await layer.new_channel()]
    # A second layer instance stands for a second daphne process: its own channel key.
    other_process = RedisChannelLayer(hosts=[settings.REDIS_URL], prefix="test-pipeline")
    remote = await other_process.new_channel()
    groups = [f"chain.TEST.{i:08d}" for i in range(20)]
    empty_groups = [f"chain.EMPTY.{i:08d}" for i in range(5)]
    for i, g in enumerate(groups):
        await layer.group_add(g, consumers[i % 2])
        await layer.group_add(g, remote)
    batches = [
        GroupBatch(group=g, tokens=[i], items=[b'{"token":%d}' % i])
        for i, g in enumerate(groups + empty_groups)
    ]
    publisher = Publisher(layer, bulk=bulk, max_concurrency=max_concurrency)
    result = await publisher.publish(batches)
    assert result.groups == 25 and result.snapshots == 25
    for c, consumer in enumerate(consumers):
        got = sorted([(await receive(layer, consumer))["group"] for _ in groups[c::2]])
        assert got == groups[c::2]
    # Both local channels share one Redis key (the process's): nothing more is queued on it.
    assert await channel_is_empty(layer, consumers[0])
    got = [await receive(other_process, remote) for _ in groups]
    assert sorted(m["group"] for m in got) == groups
    assert all(m["items"] == [b'{"token":%d}' % m["tokens"][0]] for m in got)
    assert await channel_is_empty(other_process, remote)
    await other_process.close_pools()


async def test_bulk_sending_respects_channel_capacity():
    layer = RedisChannelLayer(hosts=[settings.REDIS_URL], prefix="test-pipeline", capacity=3)
    await layer.flush()
    consumer = await layer.new_channel()
    groups = [f"und.CAP{i}" for i in range(5)]
    for g in groups:
        await layer.group_add(g, consumer)
    publisher = Publisher(layer, bulk=True)
    await publisher.publish([GroupBatch(group=g, tokens=[1], items=[b"{}"]) for g in groups])
    assert publisher.dropped_full == 2
    got = [await receive(layer, consumer) for _ in range(3)]
    assert len({m["group"] for m in got}) == 3
    assert await channel_is_empty(layer, consumer)
    await layer.flush()
    await layer.close_pools()


def test_bulk_needs_channels_redis():
    with pytest.raises(ValueError, match="channels-redis"):
        Publisher(InMemoryChannelLayer(), bulk=True)


async def test_watched_groups_come_from_the_layer(layer):
    p = pipeline_with_data()
    publisher = Publisher(layer)
    assert publisher.watched is None  # unknown: a flush sends everything
    consumer = await layer.new_channel()
    await layer.group_add(CHAIN_E1, consumer)
    watched = await publisher.refresh_watched(p.universe.group_names)
    assert watched == frozenset({CHAIN_E1}) == publisher.watched
    assert [b.group for b in p.flush(NOW_S, watched=publisher.watched)] == [CHAIN_E1]
    publisher.mark_watched({"und.NIFTY"})
    assert publisher.watched == {CHAIN_E1, "und.NIFTY"}
    await layer.group_discard(CHAIN_E1, consumer)
    assert await publisher.refresh_watched(p.universe.group_names) == frozenset()


async def test_watched_groups_on_the_in_memory_layer():
    layer = InMemoryChannelLayer()
    publisher = Publisher(layer)
    consumer = await layer.new_channel()
    await layer.group_add("und.NIFTY", consumer)
    assert await publisher.refresh_watched(["und.NIFTY", CHAIN_E1]) == {"und.NIFTY"}
    batches = pipeline_with_data().flush(NOW_S, watched=publisher.watched)
    await publisher.publish(batches)
    message = await asyncio.wait_for(layer.receive(consumer), RECEIVE_TIMEOUT_S)
    assert message["group"] == "und.NIFTY"
    assert sorted(message["tokens"]) == [NIFTY_INDEX, NIFTY_FUT]


async def test_an_unknown_layer_means_every_group_is_sent():
    class OtherLayer:
        pass

    publisher = Publisher(OtherLayer())
    assert await publisher.refresh_watched(["und.NIFTY"]) is None
    assert publisher.watched is None


async def test_initial_state_requests_are_answered_and_mark_groups_watched(layer):
    p = pipeline_with_data()
    p.flush(NOW_S, watched=frozenset())  # nothing watched: nothing serialised yet
    publisher = Publisher(layer)
    await publisher.refresh_watched(p.universe.group_names)
    assert publisher.watched == frozenset()
    server = asyncio.create_task(publisher.serve_snapshot_requests(InlineReads(p)), name="snapshot-requests")
    try:
        await until(lambda: _has_members(publisher, schema.SNAPSHOT_REQUESTS_GROUP))
        consumer = await layer.new_channel()
        await layer.group_add(CHAIN_E1, consumer)
        # A malformed request is refused without stopping the loop.
        await layer.group_send(schema.SNAPSHOT_REQUESTS_GROUP, {"type": "snapshot.request", "tokens": "x"})
        await layer.group_send(
            schema.SNAPSHOT_REQUESTS_GROUP,
            schema.snapshot_request_message(reply_to=consumer, tokens=[CE, PE, 424242]),
        )
        message = await receive(layer, consumer)
        assert message["initial"] is True and message["group"] == ""
        assert message["tokens"] == [CE, PE]
        assert [orjson.loads(i)["ltp"] for i in message["items"]] == [120.0, 70.0]
        assert publisher.requests_rejected == 1 and publisher.requests_answered == 1
        assert publisher.watched == {CHAIN_E1}
        # From now on a change in that chain is published to it.
        p.ingest(tick(CE, 121.0), is_mock=False, received_epoch_s=NOW_S + 0.1)
        await publisher.publish(p.flush(NOW_S + 0.1, watched=publisher.watched))
        update = await receive(layer, consumer)
        assert update["group"] == CHAIN_E1 and CE in update["tokens"]
    finally:
        await cancel_until_done(server)
    assert not await _has_members(publisher, schema.SNAPSHOT_REQUESTS_GROUP)


async def test_a_busy_request_loop_still_renews_its_group_membership(layer):
    """channels-redis expires group members after group_expiry: the loop must re-join on a
    clock even when requests never stop arriving (a receive timeout never fires then)."""
    p = pipeline_with_data()
    publisher = Publisher(layer, request_group_renew_s=0.2)
    server = asyncio.create_task(publisher.serve_snapshot_requests(InlineReads(p)), name="snapshot-requests")
    try:
        await until(lambda: _has_members(publisher, schema.SNAPSHOT_REQUESTS_GROUP))
        connection = layer.connection(layer.consistent_hash(schema.SNAPSHOT_REQUESTS_GROUP))
        group_key = layer._group_key(schema.SNAPSHOT_REQUESTS_GROUP)
        [member] = await connection.zrange(group_key, 0, -1)
        channel = member.decode()
        # What channels-redis does to a member older than group_expiry.
        await connection.zrem(group_key, member)
        assert not await _has_members(publisher, schema.SNAPSHOT_REQUESTS_GROUP)
        consumer = await layer.new_channel()
        stop = asyncio.Event()

        async def keep_busy():
            # Stopped by an event, not cancelled: a cancel landing inside channels-redis's send
            # can leave the task stuck, and this test is about the publisher, not that.
            while not stop.is_set():
                await layer.send(channel, schema.snapshot_request_message(reply_to=consumer, tokens=[CE]))
                await asyncio.sleep(0.02)

        busy = asyncio.create_task(keep_busy(), name="keep-busy")
        try:
            await until(lambda: _has_members(publisher, schema.SNAPSHOT_REQUESTS_GROUP))
            assert publisher.requests_answered > 0
        finally:
            stop.set()
            await asyncio.wait_for(busy, RECEIVE_TIMEOUT_S)
    finally:
        server.cancel()
        # A cancel that lands as redis-py's read timeout expires comes out as a Redis
        # TimeoutError (asyncio.timeout turns the one into the other): the loop ends either way.
        await asyncio.wait_for(asyncio.gather(server, return_exceptions=True), RECEIVE_TIMEOUT_S)
        assert server.done()


async def _has_members(publisher, group):
    return bool(await publisher._groups_with_members([group]))


async def test_large_initial_answers_are_split(layer):
    consumer = await layer.new_channel()
    n = 2 * MAX_ITEMS_PER_REPLY + 5
    tokens = list(range(n))
    items = [b'{"token":%d}' % t for t in tokens]
    assert await Publisher(layer).send_initial(consumer, tokens, items) == n
    parts = [await receive(layer, consumer) for _ in range(3)]
    assert [len(m["tokens"]) for m in parts] == [MAX_ITEMS_PER_REPLY, MAX_ITEMS_PER_REPLY, 5]
    assert [t for m in parts for t in m["tokens"]] == tokens
    assert [i for m in parts for i in m["items"]] == items


async def test_closed_bars_go_to_their_bars_group(layer):
    consumer = await layer.new_channel()
    await layer.group_add(schema.bars_group("NIFTY"), consumer)
    bars = [
        Bar(NIFTY_INDEX, "NIFTY", int(NOW_S), 1.0, 2.0, 0.5, 1.5, 0, 3, False, False),
        Bar(NIFTY_INDEX, "NIFTY", int(NOW_S) + 60, None, None, None, None, 0, 0, True, False),
    ]
    assert await Publisher(layer).publish_bars(bars) == 2
    got = [await receive(layer, consumer), await receive(layer, consumer)]
    assert [m["type"] for m in got] == [schema.BAR_CLOSED_TYPE] * 2
    assert [orjson.loads(m["item"])["is_gap"] for m in got] == [False, True]


@pytest.mark.parametrize("bulk", [True, False])
async def test_a_failed_send_names_the_groups_not_sent(bulk):
    # A real layer pointed at a port where nothing listens: the connection is refused.
    dead = RedisChannelLayer(hosts=["redis://127.0.0.1:1/0"], prefix="test-pipeline")
    batches = [GroupBatch(group=g, tokens=[1], items=[b"{}"]) for g in ("und.A", "und.B")]
    with pytest.raises(PublishError) as err:
        await Publisher(dead, bulk=bulk).publish(batches)
    assert sorted(err.value.failed_groups) == ["und.A", "und.B"]
    assert "und." in str(err.value)
    await dead.close_pools()


def test_max_concurrency_is_checked():
    with pytest.raises(ValueError, match="max_concurrency"):
        Publisher(InMemoryChannelLayer(), max_concurrency=0)


def test_publish_failures_are_logged_on_state_changes_and_as_rates_not_per_flush(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    failures = PublishFailureLog(every_s=10.0, clock=lambda: now[0])
    exc = PublishError(failed_groups=["g1", "g2"], first_error=ConnectionError("redis down"))
    for i in range(101):  # ten seconds of failing flushes, ten a second
        now[0] = i * 0.1
        failures.failed(exc)
    now[0] = 12.0
    failures.succeeded()
    failures.succeeded()  # healthy again: nothing more to say

    def events(name):
        return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == name]

    assert [e["groups"] for e in events("engine.publish_failed")] == [2]
    [failing] = events("engine.publish_failing")
    assert (failing["for_s"], failing["groups_dropped"], failing["groups_per_s"]) == (10.0, 200, 20.0)
    [recovered] = events("engine.publish_recovered")
    assert (recovered["after_s"], recovered["groups_dropped"]) == (12.0, 202)


class AnalyticsReads(InlineReads):
    """The read side with the chain analytics, inline."""

    def __init__(self, pipeline, analytics) -> None:
        super().__init__(pipeline)
        self._analytics = analytics

    async def analytics_latest(self, groups):
        return self._analytics.latest(self._pipeline, list(groups), NOW_S)


@pytest.fixture
async def idle_safe_layer():
    """A layer whose read timeout exceeds receive()'s 5 s BZPOPMIN (as tickerproj/settings.py
    sets it), so that the request loop may sit idle while this test waits."""
    layer = RedisChannelLayer(hosts=[{"address": settings.REDIS_URL, "socket_timeout": 15}],
                              prefix="test-pipeline-analytics")
    await layer.flush()
    yield layer
    await layer.flush()
    await layer.close_pools()


async def test_analytics_requests_are_answered_and_mark_chains_watched(idle_safe_layer):
    layer = idle_safe_layer
    p = pipeline_with_data()
    p.flush(NOW_S, watched=frozenset())
    analytics = ChainAnalytics()
    analytics.observe(p, NOW_S)
    publisher = Publisher(layer)
    await publisher.refresh_watched(p.universe.group_names)
    server = asyncio.create_task(
        publisher.serve_snapshot_requests(AnalyticsReads(p, analytics)), name="snapshot-requests"
    )
    try:
        await until(lambda: _has_members(publisher, schema.SNAPSHOT_REQUESTS_GROUP))
        consumer = await layer.new_channel()
        await layer.group_send(schema.SNAPSHOT_REQUESTS_GROUP,
                               {"type": schema.ANALYTICS_REQUEST_TYPE, "reply_to": consumer, "groups": "x"})
        await layer.group_send(
            schema.SNAPSHOT_REQUESTS_GROUP,
            schema.analytics_request_message(reply_to=consumer, groups=[CHAIN_E1, "chain.NOPE.20261124"]),
        )
        message = await receive(layer, consumer)
        assert (message["type"], message["group"]) == (schema.CHAIN_ANALYTICS_TYPE, CHAIN_E1)
        analytics_message = AnalyticsMessage.model_validate_json(message["item"])
        assert analytics_message.summary.forward == 26050.0
        assert publisher.requests_rejected == 1 and publisher.requests_answered == 1
        assert CHAIN_E1 in publisher.watched
        assert await channel_is_empty(layer, consumer)  # nothing for a chain not streamed
    finally:
        await cancel_until_done(server)


@pytest.mark.parametrize("bulk", [True, False])
async def test_chain_analytics_go_to_their_chain_group(layer, bulk):
    consumer = await layer.new_channel()
    await layer.group_add(CHAIN_E1, consumer)
    item = b'{"type":"analytics"}'
    assert await Publisher(layer, bulk=bulk).publish_analytics([(CHAIN_E1, item)]) == 1
    assert await receive(layer, consumer) == schema.chain_analytics_message(group=CHAIN_E1, item=item)


@pytest.mark.parametrize("bulk", [True, False])
async def test_a_failed_analytics_send_names_the_chains_not_sent(bulk):
    dead = RedisChannelLayer(hosts=["redis://127.0.0.1:1/0"], prefix="test-pipeline")
    with pytest.raises(PublishError) as err:
        await Publisher(dead, bulk=bulk).publish_analytics([(CHAIN_E1, b"{}")])
    assert err.value.failed_groups == [CHAIN_E1]
    await dead.close_pools()
