"""Bounds on what one WebSocket client can make the web process do (docs/security.md: H1, M4,
L3), over the real channels-redis layer and the real database."""

import asyncio
import itertools

import orjson
import pytest
import redis as redis_lib
from channels.testing import WebsocketCommunicator
from django.conf import settings

from streaming import schema
from streaming.protocol import MAX_TEXT_FRAME_BYTES
from tests.streaming.wsutil import (
    EXPIRY,
    EXPIRY2,
    ORIGIN,
    create_universe,
    expect_close,
    make_app,
    make_config,
    option_token,
    recv,
    send,
    session_cookie_for,
    ws_connect,
)
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import core_redis_layer as core_redis_layer
from tests.streaming.wsutil import redis_layer as redis_layer
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]

CE_24000 = option_token(24000, "CE")
CE_24000_FEB = option_token(24000, "CE", EXPIRY2)


@pytest.fixture
def headers(user):
    return [ORIGIN, session_cookie_for(user)]


@pytest.fixture
def universe():
    return create_universe()


@pytest.fixture
def two_cookies(django_user_model):
    users = [django_user_model.objects.create_user(username=f"u{i}", password="pw-123456")
             for i in range(2)]
    return [session_cookie_for(u) for u in users]


@pytest.fixture
def redis_client():
    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


def ticking_clock():
    """A rate-limit clock one second further on at every reading: no message is ever limited."""
    counter = itertools.count(1000)
    return lambda: float(next(counter))


def from_address(app, host: str):
    """The application as seen by clients connecting from ``host``."""

    async def seen_from(scope, receive, send_):
        await app({**scope, "client": (host, 40000)}, receive, send_)

    return seen_from


# --- H1: frames, rate, room, connections -------------------------------------------------------


async def test_a_frame_over_the_limit_in_utf8_bytes_is_not_read(redis_layer, headers):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    # Fewer characters than the limit, more bytes: the limit is on bytes.
    pad = "€" * (MAX_TEXT_FRAME_BYTES // 3 + 10)
    assert len(pad) < MAX_TEXT_FRAME_BYTES < len(pad.encode())
    await comm.send_to(text_data=orjson.dumps({"action": "ping", "pad": pad}).decode())
    err = await recv(comm)
    assert err["code"] == "message_too_large" and err["limit"] == MAX_TEXT_FRAME_BYTES
    await send(comm, {"action": "ping", "id": 1})
    assert (await recv(comm))["type"] == "pong"
    await comm.disconnect()


async def test_large_frames_count_against_the_rate_before_they_are_parsed(redis_layer, headers):
    app, metrics = make_app(make_config(max_messages_per_s=2), clock=lambda: 1000.0)
    comm, _ = await ws_connect(app, headers=headers)
    big = orjson.dumps({"action": "subscribe", "instruments": list(range(1, 20_000))}).decode()
    assert len(big) < MAX_TEXT_FRAME_BYTES
    for _ in range(2):
        await send(comm, {"action": "ping"})
        assert (await recv(comm))["type"] == "pong"
    await comm.send_to(text_data=big)
    assert (await recv(comm))["code"] == "rate_limited"
    # Refused unread: never counted as a subscribe, which only parsing could have told.
    assert metrics.client_messages.labels("unread")._value.get() == 1
    assert metrics.client_messages.labels("subscribe")._value.get() == 0
    await comm.disconnect()


async def test_a_subscribe_beyond_the_connections_room_is_refused_before_the_lookup(
    redis_layer, universe, headers
):
    app, _ = make_app(make_config(max_subscriptions=5))
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "id": 1, "instruments": [CE_24000]})
    assert (await recv(comm))["subscriptions"] == 1
    # 10 000 tokens that exist nowhere: a lookup would answer unknown_instrument.
    await send(comm, {"action": "subscribe", "id": 2, "instruments": list(range(1, 10_001))})
    err = await recv(comm)
    assert err["code"] == "too_many_subscriptions" and err["id"] == 2
    assert err["requested"] == 10_000 and err["room"] == 4
    assert err["limit"] == 5 and err["subscriptions"] == 1
    # What the connection already holds does not use up room.
    await send(comm, {"action": "subscribe", "id": 3,
                      "instruments": [str(CE_24000), 1, 2, 3, 4]})
    reply = await recv(comm)
    assert reply["type"] == "subscribed" and reply["id"] == 3
    assert reply["subscriptions"] == 1 and reply["unresolved_count"] == 4
    await comm.disconnect()


async def test_connections_are_capped_per_user(redis_layer, headers):
    app, metrics = make_app(make_config(max_connections_per_user=2))
    first, _ = await ws_connect(app, headers=headers)
    second, _ = await ws_connect(app, headers=headers)
    third = WebsocketCommunicator(app, "/ws/v1/", headers=headers)
    connected, _ = await third.connect(timeout=5)
    assert connected
    err = await recv(third)
    assert err["code"] == "too_many_connections" and "limit 2" in err["message"]
    assert await expect_close(third) == 4429
    assert metrics.connections._value.get() == 2
    await first.disconnect()
    again, hello = await ws_connect(app, headers=headers)
    assert hello["type"] == "hello"
    await second.disconnect()
    await again.disconnect()


async def test_connections_are_capped_per_client_address(redis_layer, two_cookies):
    app, _ = make_app(make_config(max_connections_per_ip=1))
    cookies = two_cookies
    first, _ = await ws_connect(from_address(app, "10.0.0.7"), headers=[ORIGIN, cookies[0]])
    refused = WebsocketCommunicator(from_address(app, "10.0.0.7"), "/ws/v1/",
                                    headers=[ORIGIN, cookies[1]])
    assert (await refused.connect(timeout=5))[0]
    err = await recv(refused)
    assert err["code"] == "too_many_connections" and "address" in err["message"]
    assert await expect_close(refused) == 4429
    other, _ = await ws_connect(from_address(app, "10.0.0.8"), headers=[ORIGIN, cookies[1]])
    await first.disconnect()
    await other.disconnect()


async def test_frames_piling_up_unread_close_the_connection(redis_layer, headers):
    # The rate limiter never trips: only the inbox bound can stop this client.
    config = make_config(max_messages_per_s=2)
    app, _ = make_app(config, clock=ticking_clock())
    comm, _ = await ws_connect(app, headers=headers)
    for i in range(config.inbox_max_messages * 5):
        await comm.send_to(text_data=orjson.dumps({"action": "ping", "id": i}).decode())
    async with asyncio.timeout(10):
        while (msg := await recv(comm))["type"] == "pong":
            pass
    assert msg["code"] == "flood" and "faster than they could be handled" in msg["message"]
    assert await expect_close(comm) == 4008


async def test_bytes_piling_up_unread_close_the_connection(redis_layer, headers):
    app, _ = make_app(make_config(max_messages_per_s=1000), clock=ticking_clock())
    comm, _ = await ws_connect(app, headers=headers)
    frame = orjson.dumps({"action": "ping", "pad": "x" * (MAX_TEXT_FRAME_BYTES - 100)}).decode()
    for _ in range(6):
        await comm.send_to(text_data=frame)
    async with asyncio.timeout(10):
        while (msg := await recv(comm))["type"] != "error" or msg["code"] != "flood":
            pass
    assert await expect_close(comm) == 4008


# --- M4: group expiry, disconnect despite Redis errors -----------------------------------------


async def test_disconnect_leaves_every_group_and_uncounts_despite_a_redis_error(
    core_redis_layer, universe, headers, redis_client
):
    app, metrics = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000, CE_24000_FEB]})
    assert (await recv(comm))["subscriptions"] == 2
    groups = sorted([schema.chain_group("NIFTY", EXPIRY), schema.chain_group("NIFTY", EXPIRY2)])
    broken, intact = (core_redis_layer._group_key(g) for g in groups)
    assert redis_client.zcard(intact) == 1
    # A real Redis error on the first discard: the key now holds a string (WRONGTYPE).
    redis_client.delete(broken)
    redis_client.set(broken, "not a group")
    await comm.disconnect()
    assert redis_client.zcard(intact) == 0, "left joined after the first group's error"
    assert metrics.connections._value.get() == 0


# --- L3: a Redis error in subscribe is an error message, not a 1011 close ----------------------


async def test_a_redis_error_in_subscribe_answers_unavailable_and_keeps_the_connection(
    core_redis_layer, universe, headers, redis_client
):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    key = core_redis_layer._group_key(schema.chain_group("NIFTY", EXPIRY))
    redis_client.set(key, "not a group")
    await send(comm, {"action": "subscribe", "id": 7, "instruments": [CE_24000]})
    err = await recv(comm)
    assert err["code"] == "unavailable" and err["id"] == 7
    redis_client.delete(key)
    await send(comm, {"action": "subscribe", "id": 8, "instruments": [CE_24000]})
    assert (await recv(comm))["subscriptions"] == 1
    await comm.disconnect()
