"""Arbitrary client frames never crash the consumer: every answer is a well-formed server
message, and the connection still answers a ping afterwards. Over the real channels-redis
layer and database, like the rest of the WebSocket tests."""

import asyncio
import json

import orjson
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.services import apitoken_create
from streaming.protocol import ErrorCode
from tests.streaming.wsutil import (
    EXPIRY,
    NIFTY_INDEX,
    STRIKES,
    create_universe,
    make_app,
    make_config,
    option_token,
    recv,
)
from tests.streaming.wsutil import redis_layer as redis_layer
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True)]

SERVER_TYPES = {
    "hello", "subscribed", "unsubscribed", "snapshots", "pong", "error",
    "analytics", "analytics_series", "bars", "bar",
}
ERROR_CODES = {str(c) for c in ErrorCode}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
instrument_refs = st.one_of(
    st.sampled_from([NIFTY_INDEX, option_token(STRIKES[3], "CE"), 1, 0, -5, 2**63]),
    st.sampled_from(["NSE:NIFTY 50", "NFO:X", ":", "NFO:", "256265", "nfo:nifty"]),
    json_values,
)
chains = st.fixed_dictionaries(
    {"underlying": st.sampled_from(["NIFTY", "", "NOPE"]) | st.text(max_size=70)},
    optional={
        "expiry": st.sampled_from([EXPIRY.isoformat(), "2030-13-01", "x"]) | json_values,
        "strikes_around_atm": st.integers(min_value=-3, max_value=2000) | json_values,
        "extra": json_values,
    },
)
underlying_names = st.lists(
    st.sampled_from(["NIFTY", "nifty", "NOPE", "M&M", "", "NIFTY 50", "A" * 33]) | json_values,
    max_size=25,
)
messages = st.fixed_dictionaries(
    {"action": st.sampled_from(["subscribe", "unsubscribe", "ping", "ack", "fly", ""]) | json_values},
    optional={
        "id": json_values,
        "instruments": st.lists(instrument_refs, max_size=8) | json_values,
        "chain": chains | json_values,
        "bars": underlying_names | json_values,
        "seq": st.integers(min_value=-2, max_value=2**60) | json_values,
        "all": json_values,
    },
)
frames = st.one_of(
    st.text(max_size=200).map(lambda t: ("text", t)),
    st.binary(max_size=200).map(lambda b: ("bytes", b)),
    json_values.map(lambda v: ("text", json.dumps(v))),
    messages.map(lambda m: ("text", json.dumps(m))),
)


@pytest.fixture
def scenario(redis_layer, user, settings):
    """An event loop, the app and an API key shared by every hypothesis example."""
    # Every example connects afresh: the per-address connect rate is not what is fuzzed here.
    settings.WS_MAX_CONNECTS_PER_IP_PER_MINUTE = 1_000_000
    create_universe()
    _, key = apitoken_create(user=user, name="fuzz")
    app, _ = make_app(make_config(max_messages_per_s=10_000, max_subscriptions=50))
    loop = asyncio.new_event_loop()
    yield loop, app, key
    # The async ORM's worker thread keeps a connection open; close it (see close_db_threads).
    loop.run_until_complete(sync_to_async(connections.close_all)())
    loop.close()


async def exchange(app, key: str, sent: list[tuple[str, object]]) -> None:
    comm = WebsocketCommunicator(app, "/ws/v1/", headers=[(b"authorization", f"Token {key}".encode())])
    connected, _ = await comm.connect(timeout=5)
    assert connected
    assert (await recv(comm))["type"] == "hello"
    for kind, payload in sent:
        await comm.send_input({"type": "websocket.receive", kind: payload})
    await comm.send_to(text_data='{"action": "ping", "id": "last"}')
    async with asyncio.timeout(10):
        while True:
            raw = await comm.receive_from(10)  # raises the consumer's exception if it crashed
            assert isinstance(raw, str)
            msg = orjson.loads(raw)
            assert msg["type"] in SERVER_TYPES, msg
            if msg["type"] == "error":
                assert msg["code"] in ERROR_CODES, msg
                assert isinstance(msg["message"], str) and "Traceback" not in msg["message"]
            if msg["type"] == "pong" and msg["id"] == "last":
                break
    await comm.disconnect()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=st.lists(frames, max_size=12))
def test_arbitrary_frames_never_crash_the_consumer(scenario, sent):
    loop, app, key = scenario
    loop.run_until_complete(exchange(app, key, sent))
