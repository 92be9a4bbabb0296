"""The WebSocket API over the real channels-redis layer: every message and every error.

The test plays the engine: it publishes ``snapshots.batch`` messages to the groups and answers
``snapshot.request`` like a runticker (tests/streaming/wsutil.py, FakeEngine).
"""

import asyncio
import contextlib
import time

import orjson
import pytest
from django.utils import timezone

from accounts.models import ApiToken
from accounts.services import apitoken_create, apitoken_revoke
from streaming import schema
from streaming.models import EngineHeartbeat
from streaming.protocol import SUBPROTOCOL
from tests.helpers import async_wait_until, engine_status
from tests.streaming.wsutil import (
    EXPIRY,
    EXPIRY2,
    NIFTY_FUT,
    NIFTY_INDEX,
    ORIGIN,
    STRIKES,
    FakeEngine,
    create_universe,
    expect_close,
    make_app,
    make_config,
    option_token,
    publish,
    recv,
    recv_until,
    send,
    session_cookie_for,
    snapshot_item,
    ws_connect,
)
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import core_redis_layer as core_redis_layer
from tests.streaming.wsutil import redis_layer as redis_layer
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]

CHAIN = schema.chain_group("NIFTY", EXPIRY)
CHAIN2 = schema.chain_group("NIFTY", EXPIRY2)
CE_24000 = option_token(24000, "CE")
PE_24000 = option_token(24000, "PE")
CE_24050 = option_token(24050, "CE")


@pytest.fixture
def universe():
    return create_universe()


@pytest.fixture
def cookie(user):
    return session_cookie_for(user)


@pytest.fixture
def headers(cookie):
    return [ORIGIN, cookie]


def _frame_tokens(frame: dict) -> dict[int, float]:
    assert frame["type"] == "snapshots"
    return {item["token"]: item["ltp"] for item in frame["data"]}


# --- authentication ---------------------------------------------------------------------------


async def test_session_user_is_greeted_with_limits(redis_layer, universe, headers):
    app, metrics = make_app(make_config(max_subscriptions=7, send_window=3))
    comm, hello = await ws_connect(app, headers=headers)
    assert hello == {
        "type": "hello",
        "v": 1,
        "user": "trader",
        "auth": "session",
        "limits": {
            "max_subscriptions": 7,
            "max_messages_per_s": 50,
            "send_window": 3,
            "max_items_per_frame": 1000,
        },
    }
    assert metrics.connections._value.get() == 1
    await comm.disconnect()
    assert metrics.connections._value.get() == 0


async def test_anonymous_connection_is_told_and_closed_4401(redis_layer):
    app, metrics = make_app()
    from channels.testing import WebsocketCommunicator

    comm = WebsocketCommunicator(app, "/ws/v1/", headers=[ORIGIN])
    connected, _ = await comm.connect()
    assert connected
    err = await recv(comm)
    assert err["type"] == "error" and err["code"] == "unauthorized"
    assert await expect_close(comm) == 4401
    assert metrics.connections._value.get() == 0


async def test_session_from_foreign_origin_is_rejected(redis_layer, cookie):
    app, _ = make_app()
    from channels.testing import WebsocketCommunicator

    for origin in [(b"origin", b"https://evil.example"), None]:
        hdrs = [cookie] + ([origin] if origin else [])
        comm = WebsocketCommunicator(app, "/ws/v1/", headers=hdrs)
        connected, _ = await comm.connect()
        assert not connected, origin


@pytest.fixture
def api_key(user):
    _, key = apitoken_create(user=user, name="bot")
    return key


async def test_api_token_in_header_authenticates_without_origin(redis_layer, api_key):
    app, _ = make_app()
    before = timezone.now()
    comm, hello = await ws_connect(app, headers=[(b"authorization", f"Token {api_key}".encode())])
    assert hello["auth"] == "token" and hello["user"] == "trader"
    token = await ApiToken.objects.aget(prefix=api_key[:8])
    assert token.last_used_at is not None and token.last_used_at >= before
    await comm.disconnect()


async def test_api_token_as_subprotocol_selects_v1_and_never_echoes_the_key(redis_layer, api_key):
    app, _ = make_app()
    from channels.testing import WebsocketCommunicator

    comm = WebsocketCommunicator(
        app, "/ws/v1/", subprotocols=[SUBPROTOCOL, f"tickerproj.token.{api_key}"]
    )
    connected, subprotocol = await comm.connect()
    assert connected and subprotocol == SUBPROTOCOL
    hello = await recv(comm)
    assert hello["auth"] == "token"
    await comm.disconnect()


async def test_token_subprotocol_without_v1_is_closed_4400(redis_layer, api_key):
    app, _ = make_app()
    from channels.testing import WebsocketCommunicator

    comm = WebsocketCommunicator(app, "/ws/v1/", subprotocols=[f"tickerproj.token.{api_key}"])
    connected, subprotocol = await comm.connect()
    assert connected and subprotocol is None
    err = await recv(comm)
    assert err["code"] == "subprotocol_required"
    assert await expect_close(comm) == 4400


@pytest.mark.parametrize("how", ["unknown", "revoked", "empty"])
async def test_bad_token_is_unauthorized_even_with_a_session(redis_layer, api_key, cookie, how):
    if how == "revoked":
        token = await ApiToken.objects.aget(prefix=api_key[:8])
        from channels.db import database_sync_to_async

        await database_sync_to_async(apitoken_revoke)(token=token)
        key = api_key
    else:
        key = {"unknown": "x" * 43, "empty": ""}[how]
    app, _ = make_app()
    from channels.testing import WebsocketCommunicator

    comm = WebsocketCommunicator(
        app, "/ws/v1/", headers=[ORIGIN, cookie, (b"authorization", f"Token {key}".encode())]
    )
    connected, _ = await comm.connect()
    assert connected
    err = await recv(comm)
    assert err["code"] == "unauthorized" and "token" in err["message"]
    assert await expect_close(comm) == 4401


async def test_unknown_path_is_refused(redis_layer, headers):
    app, _ = make_app()
    from channels.testing import WebsocketCommunicator

    comm = WebsocketCommunicator(app, "/ws/v2/", headers=headers)
    connected, _ = await comm.connect()
    assert not connected


# --- subscribe: acknowledgement and the full snapshot ------------------------------------------


async def test_subscribe_by_token_and_symbol_acks_and_sends_the_latest_state(
    redis_layer, universe, headers
):
    app, _ = make_app()
    latest = {CE_24000: snapshot_item(CE_24000, ltp=101.5), NIFTY_INDEX: snapshot_item(NIFTY_INDEX, ltp=24100.0)}
    async with FakeEngine(redis_layer, latest) as engine:
        comm, _ = await ws_connect(app, headers=headers)
        symbol = universe[CE_24000].tradingsymbol
        await send(comm, {"action": "subscribe", "id": 7, "instruments": [f"NFO:{symbol}", NIFTY_INDEX]})
        ack = await recv(comm)
        assert ack["type"] == "subscribed" and ack["id"] == 7
        assert ack["subscriptions"] == 2 and ack["unresolved"] == [] and ack["chain"] is None
        assert (ack["part"], ack["parts"], ack["unresolved_count"]) == (1, 1, 0)
        described = {i["token"]: i for i in ack["instruments"]}
        assert described[CE_24000] == {
            "token": CE_24000,
            "exchange": "NFO",
            "tradingsymbol": symbol,
            "name": "NIFTY",
            "kind": "CE",
            "expiry": EXPIRY.isoformat(),
            "strike": 24000.0,
            "streamed": True,
        }
        assert described[NIFTY_INDEX]["kind"] == "INDEX"
        frame = await recv(comm)
        assert frame["seq"] == 1 and frame["v"] == 1
        assert _frame_tokens(frame) == {CE_24000: 101.5, NIFTY_INDEX: 24100.0}
        assert engine.requests[0]["reply_to"]
        assert sorted(engine.requests[0]["tokens"]) == sorted([CE_24000, NIFTY_INDEX])
        # Later changes of the same instruments follow, from both of their groups.
        await send(comm, {"action": "ack", "seq": 1})
        await publish(redis_layer, CHAIN, {CE_24000: snapshot_item(CE_24000, ltp=102.0)})
        assert _frame_tokens(await recv(comm)) == {CE_24000: 102.0}
        await publish(redis_layer, schema.underlying_group("NIFTY"), {NIFTY_INDEX: snapshot_item(NIFTY_INDEX, ltp=24101.0)})
        assert _frame_tokens(await recv(comm)) == {NIFTY_INDEX: 24101.0}
        await comm.disconnect()


async def test_only_subscribed_instruments_of_a_group_are_forwarded(redis_layer, universe, headers):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000]})
    await recv_until(comm, lambda m: m["type"] == "subscribed")
    await publish(
        redis_layer,
        CHAIN,
        {CE_24050: snapshot_item(CE_24050, ltp=1.0), CE_24000: snapshot_item(CE_24000, ltp=2.0)},
    )
    assert _frame_tokens(await recv(comm)) == {CE_24000: 2.0}
    await publish(redis_layer, CHAIN, {CE_24050: snapshot_item(CE_24050, ltp=3.0)})
    assert await comm.receive_nothing(0.3)
    await comm.disconnect()


async def test_subscribe_a_chain_around_the_money_from_the_engines_forward(
    redis_layer, universe, headers
):
    now = timezone.now()
    await EngineHeartbeat.objects.acreate(
        engine_id="e1",
        hostname="h",
        pid=1,
        started_at=now,
        updated_at=now,
        state=engine_status(
            underlyings={"NIFTY": {"price": 24000.0, "forwards": {EXPIRY.isoformat(): 24262.0}}}
        ),
    )
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(
        comm,
        {
            "action": "subscribe",
            "id": "c",
            "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat(), "strikes_around_atm": 2},
        },
    )
    ack = await recv(comm)
    assert ack["chain"] == {
        "underlying": "NIFTY",
        "expiry": EXPIRY.isoformat(),
        "strikes_around_atm": 2,
        "atm_strike": 24250.0,
        "reference_price": 24262.0,
        "reference": "forward",
        "strikes": [24150.0, 24200.0, 24250.0, 24300.0, 24350.0],
    }
    assert len(ack["instruments"]) == 10 and ack["subscriptions"] == 10
    assert {i["kind"] for i in ack["instruments"]} == {"CE", "PE"}
    assert (await recv(comm))["type"] == "analytics_series"
    # The other expiry's forward is absent: the underlying price decides, then the future.
    await send(comm, {"action": "subscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY2.isoformat(), "strikes_around_atm": 0}})
    ack = await recv(comm)
    assert ack["chain"]["reference"] == "underlying" and ack["chain"]["atm_strike"] == 24000.0
    assert len(ack["instruments"]) == 2
    await comm.disconnect()


@pytest.mark.parametrize(
    ("future_price", "reference", "atm"), [(24105.0, "future", 24100.0), (0.0, "strikes", 24250.0)]
)
async def test_chain_atm_without_engines_uses_the_future_then_the_strikes(
    redis_layer, universe, headers, future_price, reference, atm
):
    from subscriptions.models import Instrument

    await Instrument.objects.filter(pk=NIFTY_FUT).aupdate(last_price=future_price)
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat(), "strikes_around_atm": 1}})
    ack = await recv(comm)
    assert ack["chain"]["reference"] == reference
    assert ack["chain"]["atm_strike"] == atm
    assert ack["chain"]["strikes"] == [atm - 50, atm, atm + 50]
    await comm.disconnect()


async def test_whole_chain_marks_instruments_that_are_not_streamed(redis_layer, universe, headers):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat()}})
    ack = await recv(comm)
    assert len(ack["instruments"]) == 2 * len(STRIKES)
    not_streamed = [i["token"] for i in ack["instruments"] if not i["streamed"]]
    assert not_streamed == [option_token(24500, "PE")]
    await comm.disconnect()


# --- errors -----------------------------------------------------------------------------------


async def test_unknown_instruments_are_reported_and_known_ones_subscribed(redis_layer, universe, headers):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "id": "x", "instruments": [CE_24000, 42, "NFO:NOPE", "nfo:NOPE2"]})
    ack = await recv(comm)
    assert ack["type"] == "subscribed" and [i["token"] for i in ack["instruments"]] == [CE_24000]
    assert ack["unresolved"] == [42, "NFO:NOPE", "NFO:NOPE2"]
    err = await recv(comm)
    assert err["type"] == "error" and err["code"] == "unknown_instrument" and err["id"] == "x"
    assert err["instruments"] == [42, "NFO:NOPE", "NFO:NOPE2"]
    # Nothing known: only the error.
    await send(comm, {"action": "subscribe", "chain": {"underlying": "NOPE", "expiry": "2030-01-29"}})
    err = await recv(comm)
    assert err["code"] == "unknown_instrument"
    assert err["instruments"] == [{"underlying": "NOPE", "expiry": "2030-01-29"}]
    await comm.disconnect()


async def test_too_many_subscriptions_subscribes_nothing(redis_layer, universe, headers):
    app, _ = make_app(make_config(max_subscriptions=5))
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000, PE_24000, CE_24050]})
    assert (await recv(comm))["subscriptions"] == 3
    await send(comm, {"action": "subscribe", "id": 2, "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat(), "strikes_around_atm": 1}})
    err = await recv(comm)
    assert err["code"] == "too_many_subscriptions" and err["id"] == 2
    # ATM 24100 (from the future): 24050..24150, CE and PE; CE 24050 is already there.
    assert err["limit"] == 5 and err["subscriptions"] == 3 and err["requested"] == 5
    # Re-subscribing what is already there costs nothing.
    await send(comm, {"action": "subscribe", "instruments": [CE_24000, NIFTY_INDEX, NIFTY_FUT]})
    assert (await recv(comm))["subscriptions"] == 5
    await comm.disconnect()


@pytest.mark.parametrize(
    ("frame", "code", "needle"),
    [
        ("{not json", "invalid_json", "not valid JSON"),
        ("[1, 2]", "invalid_message", "JSON object"),
        ('{"id": 3}', "invalid_message", "action"),
        ('{"action": "fly", "id": 9}', "unknown_action", "fly"),
        ('{"action": "subscribe"}', "invalid_message", "instruments"),
        ('{"action": "subscribe", "instruments": [true]}', "invalid_message", "instruments.0"),
        ('{"action": "subscribe", "instruments": ["NIFTY"]}', "invalid_message", "EXCHANGE:TRADINGSYMBOL"),
        ('{"action": "subscribe", "chain": {"underlying": "NIFTY", "expiry": "soon"}}', "invalid_message", "chain.expiry"),
        ('{"action": "subscribe", "instruments": [1], "extra": 1}', "invalid_message", "extra"),
        ('{"action": "unsubscribe"}', "invalid_message", "all"),
        ('{"action": "ack"}', "invalid_message", "seq"),
        ('{"action": "ack", "seq": -1}', "invalid_message", "seq"),
        ('{"action": "ack", "seq": 5}', "invalid_message", "last frame sent is 0"),
        ('{"action": "ping", "id": {"a": 1}}', "invalid_message", "id"),
    ],
)
async def test_invalid_messages_get_an_error_and_the_connection_stays(
    redis_layer, headers, frame, code, needle
):
    app, metrics = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await comm.send_to(text_data=frame)
    err = await recv(comm)
    assert err["type"] == "error" and err["code"] == code, err
    assert needle in err["message"]
    assert "Traceback" not in err["message"]
    if code == "unknown_action":
        assert err["id"] == 9
    await send(comm, {"action": "ping", "id": "still-there"})
    pong = await recv(comm)
    assert pong["type"] == "pong" and pong["id"] == "still-there"
    assert abs(pong["ts"] - time.time() * 1000) < 60_000
    assert metrics.errors.labels(code)._value.get() == 1
    await comm.disconnect()


async def test_binary_frames_are_an_error_not_a_crash(redis_layer, headers):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await comm.send_to(bytes_data=b'{"action":"ping"}')
    err = await recv(comm)
    assert err["code"] == "invalid_message" and "binary" in err["message"]
    await send(comm, {"action": "ping"})
    assert (await recv(comm))["type"] == "pong"
    await comm.disconnect()


async def test_oversized_frame_is_refused_before_parsing(redis_layer, headers):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await comm.send_to(text_data='{"action":"ping","pad":"' + "x" * 600_000 + '"}')
    err = await recv(comm)
    assert err["code"] == "message_too_large" and "exceeds" in err["message"]
    await comm.disconnect()


async def test_rate_limit_then_flood_close(redis_layer, headers):
    # A clock that never moves: every message falls into the same one-second window.
    app, metrics = make_app(make_config(max_messages_per_s=3), clock=lambda: 1000.0)
    comm, _ = await ws_connect(app, headers=headers)
    for i in range(3):
        await send(comm, {"action": "ping", "id": i})
        assert (await recv(comm))["type"] == "pong"
    await send(comm, {"action": "ping", "id": 3})
    err = await recv(comm)
    assert err["code"] == "rate_limited" and "3 messages per second" in err["message"]
    # Up to 5x the limit each excess message is answered with rate_limited, then it is a flood.
    for _ in range(11):
        await comm.send_to(text_data="garbage")
        assert (await recv(comm))["code"] == "rate_limited"
    await send(comm, {"action": "ping"})
    assert (await recv(comm))["code"] == "flood"
    assert await expect_close(comm) == 4008
    assert metrics.errors.labels("rate_limited")._value.get() == 12


async def test_rate_limit_window_moves_on(redis_layer, headers):
    now = [1000.0]
    app, _ = make_app(make_config(max_messages_per_s=2), clock=lambda: now[0])
    comm, _ = await ws_connect(app, headers=headers)
    for second in range(3):
        now[0] = 1000.0 + second * 1.01
        for _ in range(2):
            await send(comm, {"action": "ping"})
            assert (await recv(comm))["type"] == "pong"
    await comm.disconnect()


# --- unsubscribe --------------------------------------------------------------------------------


async def test_unsubscribe_by_token_symbol_chain_and_all(redis_layer, universe, headers):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat()}})
    await send(comm, {"action": "subscribe", "instruments": [NIFTY_INDEX, option_token(24000, "CE", EXPIRY2)]})
    assert (await recv(comm))["subscriptions"] == 22
    assert (await recv(comm))["type"] == "analytics_series"
    assert (await recv(comm))["subscriptions"] == 24

    symbol = universe[PE_24000].tradingsymbol
    await send(comm, {"action": "unsubscribe", "id": "u", "instruments": [CE_24000, f"NFO:{symbol}", 42]})
    msg = await recv(comm)
    assert msg == {"type": "unsubscribed", "id": "u", "tokens": sorted([CE_24000, PE_24000]), "bars": [], "subscriptions": 22}
    await publish(redis_layer, CHAIN, {CE_24000: snapshot_item(CE_24000, ltp=1.0), CE_24050: snapshot_item(CE_24050, ltp=2.0)})
    assert _frame_tokens(await recv(comm)) == {CE_24050: 2.0}

    await send(comm, {"action": "unsubscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat()}})
    msg = await recv(comm)
    assert len(msg["tokens"]) == 20 and msg["subscriptions"] == 2
    await publish(redis_layer, CHAIN, {CE_24050: snapshot_item(CE_24050, ltp=3.0)})
    assert await comm.receive_nothing(0.3)

    await send(comm, {"action": "unsubscribe", "all": True})
    msg = await recv(comm)
    assert msg["tokens"] == sorted([NIFTY_INDEX, option_token(24000, "CE", EXPIRY2)])
    assert msg["subscriptions"] == 0
    await publish(redis_layer, CHAIN2, {option_token(24000, "CE", EXPIRY2): snapshot_item(1, ltp=1.0)})
    assert await comm.receive_nothing(0.3)
    await comm.disconnect()


# --- flow control -------------------------------------------------------------------------------


async def test_window_full_keeps_only_the_latest_and_counts_drops(redis_layer, universe, headers):
    app, metrics = make_app(make_config(send_window=2))
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000, CE_24050]})
    await recv(comm)
    for i in range(6):
        await publish(redis_layer, CHAIN, {CE_24000: snapshot_item(CE_24000, ltp=float(i))})
    await publish(redis_layer, CHAIN, {CE_24050: snapshot_item(CE_24050, ltp=50.0)})
    first, second = await recv(comm), await recv(comm)
    assert (first["seq"], second["seq"]) == (1, 2)
    assert _frame_tokens(first) == {CE_24000: 0.0} and _frame_tokens(second) == {CE_24000: 1.0}
    # The window is full: nothing more until an ack, however much is published.
    assert await comm.receive_nothing(0.3)
    assert metrics.items_dropped._value.get() == 3  # ltp 2, 3, 4 overwritten by 5
    # A stale or duplicate ack opens nothing; acking seq 1 opens one frame: the latest of each.
    await send(comm, {"action": "ack", "seq": 1})
    third = await recv(comm)
    assert third["seq"] == 3 and _frame_tokens(third) == {CE_24000: 5.0, CE_24050: 50.0}
    await send(comm, {"action": "ack", "seq": 1})
    assert await comm.receive_nothing(0.2)
    await send(comm, {"action": "ack", "seq": 3})
    await publish(redis_layer, CHAIN, {CE_24000: snapshot_item(CE_24000, ltp=6.0)})
    assert _frame_tokens(await recv(comm)) == {CE_24000: 6.0}
    assert metrics.frames_sent._value.get() == 4
    await comm.disconnect()


async def test_acks_of_new_frames_do_not_count_against_the_rate_limit(
    redis_layer, universe, headers
):
    app, _ = make_app(make_config(max_messages_per_s=2, send_window=1), clock=lambda: 5.0)
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000]})
    await recv(comm)
    for i in range(10):
        await publish(redis_layer, CHAIN, {CE_24000: snapshot_item(CE_24000, ltp=float(i))})
        frame = await recv(comm)
        assert frame["seq"] == i + 1
        await send(comm, {"action": "ack", "seq": frame["seq"]})
    await send(comm, {"action": "ping"})
    assert (await recv(comm))["type"] == "pong"
    await comm.disconnect()


async def test_large_subscriptions_are_split_into_frames_of_at_most_1000_items(redis_layer, headers):
    from subscriptions.models import Instrument

    await Instrument.objects.abulk_create(
        Instrument(
            instrument_token=50_000_000 + i,
            exchange_token=i + 1,
            tradingsymbol=f"EQ{i}",
            name=f"EQ{i}",
            instrument_type="EQ",
            segment="NSE",
            exchange="NSE",
        )
        for i in range(2500)
    )
    tokens = [50_000_000 + i for i in range(2500)]
    latest = {t: snapshot_item(t, ltp=float(t % 97)) for t in tokens}
    app, _ = make_app(make_config(max_subscriptions=3000, send_window=2))
    async with FakeEngine(redis_layer, latest):
        comm, _ = await ws_connect(app, headers=headers)
        await send(comm, {"action": "subscribe", "id": "big", "instruments": [*tokens, 1, 2]})
        # Replies stay far below daphne's 1 MiB message limit: 2000 instruments a part.
        parts = [await recv(comm), await recv(comm)]
        assert [(p["type"], p["id"], p["part"], p["parts"]) for p in parts] == [
            ("subscribed", "big", 1, 2), ("subscribed", "big", 2, 2)
        ]
        assert [len(p["instruments"]) for p in parts] == [2000, 500]
        assert {i["token"] for p in parts for i in p["instruments"]} == set(tokens)
        assert all(p["subscriptions"] == 2500 and p["unresolved"] == [1, 2] for p in parts)
        assert all(p["unresolved_count"] == 2 for p in parts)
        assert (await recv(comm))["code"] == "unknown_instrument"
        first, second = await recv(comm), await recv(comm)
        assert len(first["data"]) == 1000 and len(second["data"]) == 1000
        assert await comm.receive_nothing(0.3)
        await send(comm, {"action": "ack", "seq": 2})
        third = await recv(comm)
        assert len(third["data"]) == 500
        got = {**_frame_tokens(first), **_frame_tokens(second), **_frame_tokens(third)}
        assert got == {t: float(t % 97) for t in tokens}
        await comm.disconnect()


async def test_frames_are_engine_bytes_verbatim(redis_layer, universe, headers):
    """The consumer concatenates the engine's bytes; it never re-serialises them."""
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000]})
    await recv(comm)
    odd = b'{"token":%d, "ltp" : 1.50,"iv":null,"z":"\\u00e9"}' % CE_24000
    await publish(redis_layer, CHAIN, {CE_24000: odd})
    raw = await comm.receive_from(5)
    assert raw == '{"type":"snapshots","v":1,"seq":1,"data":[' + odd.decode() + "]}"
    assert orjson.loads(raw)["data"][0]["z"] == "é"
    await comm.disconnect()


# --- metrics endpoint ---------------------------------------------------------------------------


async def test_metrics_endpoint_for_explicit_ops_access_only(redis_layer, universe, headers):
    """M1: staff, the OPS_TOKEN bearer or an allow-listed peer; loopback alone is nobody."""
    from asgiref.testing import ApplicationCommunicator
    from channels.db import database_sync_to_async

    from tests.streaming.wsutil import session_cookie_for, staff_user
    from tickerproj.access import OpsAccess, parse_networks

    token = "metrics-token-0123456789abcdefghij"
    access = OpsAccess(token=token, allowed_networks=parse_networks(["192.0.2.0/24"]))
    app, _ = make_app(ops_access=access)

    async def get(client, hdrs=()):
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "path": "/metrics",
            "raw_path": b"/metrics",
            "query_string": b"",
            "headers": list(hdrs),
            "client": client,
            "server": ("127.0.0.1", 8000),
        }
        comm = ApplicationCommunicator(app, scope)
        await comm.send_input({"type": "http.request", "body": b""})
        start = await comm.receive_output(5)
        body = await comm.receive_output(5)
        return start["status"], body["body"]

    assert (await get(("127.0.0.1", 5555)))[0] == 403
    status, body = await get(("10.0.0.9", 5555), [(b"authorization", f"Bearer {token}".encode())])
    assert status == 200 and b"tickerproj_ws_connections" in body and b"process_" in body
    assert (await get(("10.0.0.9", 5555), [(b"authorization", b"Bearer wrong")]))[0] == 403
    assert (await get(("192.0.2.44", 5555)))[0] == 200
    assert (await get(("10.0.0.9", 5555), [(b"x-forwarded-for", b"192.0.2.44")]))[0] == 403
    # daphne --proxy-headers makes the forged address the peer: a forwarded request is never
    # let in by its address (found by the fault suite, security.ops_exposure).
    assert (await get(("192.0.2.44", 5555), [(b"x-forwarded-for", b"192.0.2.44")]))[0] == 403
    _, trader_cookie = headers
    assert (await get(("10.0.0.9", 5555), [trader_cookie]))[0] == 403
    staff = await database_sync_to_async(staff_user)()
    staff_cookie = await database_sync_to_async(session_cookie_for)(staff)
    assert (await get(("10.0.0.9", 5555), [staff_cookie]))[0] == 200



async def test_frames_stay_under_daphnes_message_limit_by_bytes(redis_layer, universe, headers):
    app, _ = make_app(make_config(send_window=10))
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat()}})
    tokens = [i["token"] for i in (await recv(comm))["instruments"]]
    assert (await recv(comm))["type"] == "analytics_series"
    pad = "x" * 100_000
    big = {t: b'{"token":%d,"ltp":1.0,"pad":"%s"}' % (t, pad.encode()) for t in tokens}
    huge = tokens[0]
    big[huge] = b'{"token":%d,"ltp":1.0,"pad":"%s"}' % (huge, b"y" * 600_000)
    await publish(redis_layer, CHAIN, big)
    got = []
    while len(got) < len(tokens) - 1:
        raw = await comm.receive_from(5)
        assert len(raw.encode()) <= 512 * 1024 + 100
        got.extend(item["token"] for item in orjson.loads(raw)["data"])
    # Five 100 kB items to a frame; the one item too large to send at all is left out.
    assert sorted(got) == sorted(tokens[1:])
    await send(comm, {"action": "ping"})
    assert (await recv(comm))["type"] == "pong"
    await comm.disconnect()


async def test_token_with_a_foreign_origin_is_rejected(redis_layer, api_key):
    app, _ = make_app()
    from channels.testing import WebsocketCommunicator

    comm = WebsocketCommunicator(
        app,
        "/ws/v1/",
        headers=[(b"authorization", f"Token {api_key}".encode()), (b"origin", b"https://evil.example")],
    )
    connected, _ = await comm.connect()
    assert not connected


async def test_api_keys_never_reach_the_logs(redis_layer, api_key, caplog, capfd):
    app, _ = make_app()
    from channels.testing import WebsocketCommunicator

    caplog.set_level("DEBUG")
    comm, _ = await ws_connect(app, headers=[(b"authorization", f"Token {api_key}".encode())])
    await comm.disconnect()
    wrong = "w" * 43
    comm = WebsocketCommunicator(app, "/ws/v1/", subprotocols=[SUBPROTOCOL, f"tickerproj.token.{wrong}"])
    assert (await comm.connect())[0]
    assert (await recv(comm))["code"] == "unauthorized"
    await expect_close(comm)
    logged = caplog.text + "".join(str(r.msg) for r in caplog.records) + "".join(capfd.readouterr())
    assert "ws.connected" in logged and "ws.token_rejected" in logged
    assert api_key not in logged and wrong not in logged


async def test_an_instrument_the_engine_cannot_place_is_reported_not_fatal(redis_layer, universe, headers):
    from subscriptions.models import Instrument

    # An option row without an expiry: no engine publishes it, so no group to join.
    await Instrument.objects.acreate(
        instrument_token=777, exchange_token=3, tradingsymbol="BROKEN", name="NIFTY",
        instrument_type="CE", segment="NFO-OPT", exchange="NFO", strike=1.0,
    )  # fmt: skip
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [777, CE_24000]})
    ack = await recv(comm)
    assert [i["token"] for i in ack["instruments"]] == [CE_24000]
    assert ack["unresolved"] == [777]
    assert (await recv(comm))["code"] == "unknown_instrument"
    await comm.disconnect()


async def test_groups_are_rejoined_after_redis_forgets_them(core_redis_layer, universe, headers):
    """channels-redis drops members after group_expiry, and all groups when Redis restarts."""
    import redis as redis_lib
    from django.conf import settings

    app, _ = make_app(make_config(group_refresh_s=0.2))
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000]})
    await recv(comm)
    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    key = core_redis_layer._group_key(CHAIN)
    assert client.delete(key) == 1  # what an expiry or a restart leaves behind
    async with asyncio.timeout(10):
        # Publish until the refresher has re-joined: receive_nothing waits without consuming.
        while await comm.receive_nothing(0.1):
            await publish(core_redis_layer, CHAIN, {CE_24000: snapshot_item(CE_24000, ltp=9.0)})
    assert _frame_tokens(await recv(comm)) == {CE_24000: 9.0}
    assert client.exists(key)
    await comm.disconnect()
    client.close()


async def test_a_redis_restart_that_forgets_every_group_is_rejoined_within_seconds(
    core_redis_layer, universe, headers
):
    """A Redis restart without persistence forgets every group while the connection lives
    on: the layer watch sees its marker gone, and the connection re-joins long before its
    periodic refresh (minutes)."""
    import uuid

    import redis as redis_lib
    from django.conf import settings

    from streaming.layer_watch import layer_marker_key

    prefix = f"{settings.CHANNEL_LAYER_PREFIX}-{uuid.uuid4().hex[:8]}"
    app, _ = make_app(make_config(layer_redis_url=settings.REDIS_URL, layer_prefix=prefix,
                                  layer_check_s=0.2))
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000]})
    await recv(comm)
    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    marker = layer_marker_key(prefix)
    await async_wait_until(lambda: client.exists(marker), timeout_s=10, what="the layer marker set")
    # What a restart without persistence leaves: no group, no marker.
    assert client.delete(core_redis_layer._group_key(CHAIN), marker) == 2
    async with asyncio.timeout(10):
        while await comm.receive_nothing(0.1):
            await publish(core_redis_layer, CHAIN, {CE_24000: snapshot_item(CE_24000, ltp=9.5)})
    assert _frame_tokens(await recv(comm)) == {CE_24000: 9.5}
    await comm.disconnect()
    client.delete(marker)
    client.close()


async def test_a_cancelled_consumer_leaves_no_task_behind(core_redis_layer, universe, headers):
    import redis as redis_lib
    from django.conf import settings

    app, metrics = make_app(make_config(group_refresh_s=0.05))
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "instruments": [CE_24000]})
    await recv(comm)
    assert metrics.connections._value.get() == 1
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert any(n.startswith("ws-group-refresh:") for n in names)
    # What daphne does when a client vanishes without a close and the app does not exit.
    comm.future.cancel()
    # channels-redis may surface the cancelled BZPOPMIN as redis' TimeoutError: not ours.
    with contextlib.suppress(asyncio.CancelledError, redis_lib.exceptions.TimeoutError):
        await comm.future
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("ws-group-refresh:")]
    assert metrics.connections._value.get() == 0

    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    assert not client.exists(core_redis_layer._group_key(CHAIN)), "left its group"
    client.close()
