"""The publisher on channels-redis's RedisPubSubChannelLayer (CHANNEL_LAYER_BACKEND=pubsub):
a flush's batches pipelined as the layer's own PUBLISHes, watched groups from PUBSUB NUMSUB,
initial-state requests answered through the layer, failures naming what was not sent."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings

from streaming import schema
from streaming.engine.pipeline import GroupBatch
from streaming.engine.publisher import Publisher, PublishError
from tests.helpers import cancel_until_done
from tests.streaming.engine.builders import NOW_S, InlineReads, tick
from tests.streaming.engine.test_publisher import (
    CE,
    CHAIN_E1,
    PE,
    RECEIVE_TIMEOUT_S,
    pipeline_with_data,
    until,
)


def pubsub_layer(prefix: str, url: str | None = None, **host: object) -> RedisPubSubChannelLayer:
    return RedisPubSubChannelLayer(
        hosts=[{"address": url or settings.REDIS_URL, "socket_timeout": 15, **host}], prefix=prefix
    )


@pytest.fixture
async def prefix():
    return f"test-pubsub-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def engine_layer(prefix):
    layer = pubsub_layer(prefix)
    yield layer
    await layer.flush()


@pytest.fixture
async def web_layer(prefix):
    """A second layer instance on the same prefix: a web process of its own."""
    layer = pubsub_layer(prefix)
    yield layer
    await layer.flush()


async def receive(layer, channel):
    return await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT_S)


async def nothing_more(layer, channel) -> bool:
    """No further message for ``channel`` within a short wait (pub/sub delivers in order, so a
    marker sent after everything else arrives next when nothing else is due)."""
    marker = {"type": "test.marker"}
    await layer.send(channel, marker)
    return await receive(layer, channel) == marker


async def test_each_group_gets_its_message_once_per_member_across_processes(engine_layer, web_layer):
    members = [await web_layer.new_channel() for _ in range(3)]
    groups = [f"chain.TEST.{i:08d}" for i in range(20)]
    for i, group in enumerate(groups):
        await web_layer.group_add(group, members[i % 3])
        await web_layer.group_add(group, members[(i + 1) % 3])
    batches = [
        GroupBatch(group=g, tokens=[i], items=[b'{"token":%d}' % i])
        for i, g in enumerate([*groups, "chain.EMPTY.00000000"])
    ]
    result = await Publisher(engine_layer).publish(batches)
    assert (result.groups, result.snapshots, result.failed) == (21, 21, [])
    for m, member in enumerate(members):
        wanted = sorted(g for i, g in enumerate(groups) if m in (i % 3, (i + 1) % 3))
        got = [await receive(web_layer, member) for _ in wanted]
        assert sorted(x["group"] for x in got) == wanted
        assert all(x["type"] == schema.SNAPSHOTS_BATCH_TYPE for x in got)
        assert all(x["items"] == [b'{"token":%d}' % x["tokens"][0]] for x in got)
        assert await nothing_more(web_layer, member)


async def test_a_group_named_twice_in_one_send_gets_both_messages_in_order(engine_layer, web_layer):
    member = await web_layer.new_channel()
    await web_layer.group_add("und.NIFTY", member)
    first = GroupBatch(group="und.NIFTY", tokens=[1], items=[b'{"token":1,"v":1}'])
    second = GroupBatch(group="und.NIFTY", tokens=[1], items=[b'{"token":1,"v":2}'])
    await Publisher(engine_layer).publish([first, second])
    assert [(await receive(web_layer, member))["items"] for _ in range(2)] == [first.items, second.items]


async def test_watched_groups_are_those_a_web_process_subscribes_to(engine_layer, web_layer):
    publisher = Publisher(engine_layer)
    member = await web_layer.new_channel()
    await web_layer.group_add("und.NIFTY", member)
    await web_layer.group_add(CHAIN_E1, member)
    names = ["und.NIFTY", CHAIN_E1, "und.BANKNIFTY"]
    assert await publisher.refresh_watched(names) == {"und.NIFTY", CHAIN_E1}
    await web_layer.group_discard(CHAIN_E1, member)
    # The unsubscribe is a command on the web process's connection: poll until Redis has it.
    await until(lambda: _watched_is(publisher, names, {"und.NIFTY"}))


async def _watched_is(publisher, names, expected) -> bool:
    return await publisher.refresh_watched(names) == expected


async def test_initial_state_requests_are_answered_over_the_pubsub_layer(engine_layer, web_layer):
    p = pipeline_with_data()
    p.flush(NOW_S, watched=frozenset())
    publisher = Publisher(engine_layer)
    server = asyncio.create_task(publisher.serve_snapshot_requests(InlineReads(p)), name="requests")
    try:
        await until(lambda: _watched_is(publisher, [schema.SNAPSHOT_REQUESTS_GROUP],
                                        {schema.SNAPSHOT_REQUESTS_GROUP}))
        consumer = await web_layer.new_channel()
        await web_layer.group_add(CHAIN_E1, consumer)
        await web_layer.group_send(
            schema.SNAPSHOT_REQUESTS_GROUP,
            schema.snapshot_request_message(reply_to=consumer, tokens=[CE, PE]),
        )
        message = await receive(web_layer, consumer)
        assert message["initial"] is True and message["tokens"] == [CE, PE]
        assert [orjson.loads(i)["ltp"] for i in message["items"]] == [120.0, 70.0]
        assert CHAIN_E1 in publisher.watched
        p.ingest(tick(CE, 121.0), is_mock=False, received_epoch_s=NOW_S + 0.1)
        await publisher.publish(p.flush(NOW_S + 0.1, watched=publisher.watched))
        update = await receive(web_layer, consumer)
        assert update["group"] == CHAIN_E1 and CE in update["tokens"]
    finally:
        await cancel_until_done(server)


async def test_a_failed_pubsub_send_names_the_groups_not_sent():
    # A real layer pointed at a port where nothing listens: the connection is refused.
    dead = pubsub_layer("test-pubsub-dead", url="redis://127.0.0.1:1/0")
    batches = [GroupBatch(group=g, tokens=[1], items=[b"{}"]) for g in ("und.A", "und.B")]
    with pytest.raises(PublishError) as err:
        await Publisher(dead).publish(batches)
    assert sorted(err.value.failed_groups) == ["und.A", "und.B"]
    await dead.flush()


async def test_a_web_process_whose_connection_redis_drops_subscribes_again(prefix, engine_layer):
    """Group membership lives in the web process (nothing to expire in Redis): when Redis
    drops its pub/sub connection (a restart, a failover, a kill), redis-py reconnects and
    subscribes again, and the next change is delivered."""
    import redis

    name = f"{prefix}-web"
    web = pubsub_layer(prefix, client_name=name)
    admin = redis.Redis.from_url(settings.REDIS_URL)
    try:
        member = await web.new_channel()
        await web.group_add("und.NIFTY", member)
        publisher = Publisher(engine_layer)
        await until(lambda: _watched_is(publisher, ["und.NIFTY"], {"und.NIFTY"}))
        # Only this test's own connections, by the name they set.
        ids = [c["id"] for c in admin.client_list() if c.get("name") == name and int(c.get("sub", 0))]
        assert ids
        for client_id in ids:
            admin.execute_command("CLIENT", "KILL", "ID", client_id)
        await until(lambda: _watched_is(publisher, ["und.NIFTY"], {"und.NIFTY"}))
        batch = GroupBatch(group="und.NIFTY", tokens=[1], items=[b'{"token":1}'])
        await publisher.publish([batch])
        assert (await receive(web, member))["items"] == batch.items
    finally:
        admin.close()
        await web.flush()


async def test_snapshot_reads_leave_no_subscription_behind(prefix, engine_layer, web_layer):
    """A read answered before its deadline, and one that times out, both let their reply
    channel go: the pub/sub layer would otherwise keep one subscription per read forever."""
    import redis

    from streaming.snapshots import SnapshotReader

    p = pipeline_with_data()
    p.flush(NOW_S, watched=frozenset())
    publisher = Publisher(engine_layer)
    server = asyncio.create_task(publisher.serve_snapshot_requests(InlineReads(p)), name="requests")
    admin = redis.Redis.from_url(settings.REDIS_URL)
    try:
        await until(lambda: _watched_is(publisher, [schema.SNAPSHOT_REQUESTS_GROUP],
                                        {schema.SNAPSHOT_REQUESTS_GROUP}))
        serving = admin.pubsub_channels(f"{prefix}specific.*")  # the engine's own channel
        reader = SnapshotReader(web_layer, timeout_s=RECEIVE_TIMEOUT_S)
        for _ in range(3):
            assert set(await reader.latest([CE, PE])) == {CE, PE}
        assert set(await SnapshotReader(web_layer, timeout_s=0.2).latest([424242])) == set()
        assert len(serving) == 1
        assert admin.pubsub_channels(f"{prefix}specific.*") == serving
    finally:
        admin.close()
        await cancel_until_done(server)
