"""The simulator's ticker WebSocket: auth, limits, subscriptions, ticks, heartbeats, faults."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from functools import partial

import aiohttp
import orjson
import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming.kite.codec import (
    PACKET_FULL,
    PACKET_INDEX_FULL,
    PACKET_INDEX_QUOTE,
    PACKET_LTP,
    PACKET_QUOTE,
    decode_frame,
    mode_message,
    subscribe_message,
    unsubscribe_message,
)
from streaming.kite.limits import MAX_INSTRUMENTS_PER_CONNECTION
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator
from tests.helpers import async_wait_until

API_KEY, API_SECRET, ACCESS_TOKEN = "wskey", "wssecret", "wstoken"
WAIT_S = 10.0


@pytest.fixture
async def sim():
    market = SyntheticMarket(seed=5, strikes_each_side=5)
    simulator = KiteSimulator(market=market, tick_interval_ms=20, heartbeat_interval_ms=100)
    simulator.register_account(api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    async with simulator:
        yield simulator


def url(sim: KiteSimulator, *, api_key: str = API_KEY, token: str = ACCESS_TOKEN) -> str:
    return f"{sim.ws_url}?api_key={api_key}&access_token={token}"


# Polls: the conditions are simulator state with no event to wait on.
wait_until = partial(async_wait_until, timeout_s=WAIT_S, interval_s=0.005)


async def next_ticks(ws: ClientConnection, *, where: Callable = lambda ticks: len(ticks) > 0):
    """The next binary frame's ticks that satisfy ``where`` (heartbeats and others skipped)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes) and len(message) > 1:
                decoded = decode_frame(message)
                assert decoded.malformed == 0
                if where(decoded.ticks):
                    return decoded.ticks


async def next_text(ws: ClientConnection) -> dict:
    async with asyncio.timeout(WAIT_S):
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                return orjson.loads(message)


def option_tokens(sim: KiteSimulator, n: int) -> list[int]:
    return [r["instrument_token"] for r in sim.market.instruments if r["segment"] == "NFO-OPT"][:n]


# --- auth and limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "token"), [(API_KEY, "wrong"), ("nokey", ACCESS_TOKEN), (API_KEY, "")]
)
async def test_bad_credentials_get_403(sim, api_key, token):
    with pytest.raises(InvalidStatus) as error:
        await connect(url(sim, api_key=api_key, token=token))
    assert error.value.response.status_code == 403
    assert sim.connection_attempts(api_key) == 1
    assert sim.connection_count(api_key) == 0


async def test_fourth_connection_gets_429_and_a_freed_slot_is_reusable(sim):
    sockets = [await connect(url(sim)) for _ in range(3)]
    try:
        assert sim.connection_count(API_KEY) == 3
        with pytest.raises(InvalidStatus) as error:
            await connect(url(sim))
        assert error.value.response.status_code == 429
        assert sim.connection_attempts(API_KEY) == 4
        await sockets.pop().close()
        await wait_until(lambda: sim.connection_count(API_KEY) == 2)
        sockets.append(await connect(url(sim)))
        assert sim.connection_count(API_KEY) == 3
    finally:
        for ws in sockets:
            await ws.close()


async def test_limit_is_per_api_key(sim):
    sim.register_account(api_key="other", api_secret="s", access_token="t")
    sockets = [await connect(url(sim)) for _ in range(3)]
    try:
        async with connect(url(sim, api_key="other", token="t")):
            assert sim.connection_count("other") == 1
    finally:
        for ws in sockets:
            await ws.close()


# --- subscriptions and ticks ----------------------------------------------------------------


async def test_subscribe_defaults_to_quote_mode_then_mode_and_unsubscribe(sim):
    index, option = 256265, option_tokens(sim, 1)[0]
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([index, option]))
        ticks = await next_ticks(ws)
        assert sorted(ticks["instrument_token"].tolist()) == [index, option]
        lengths = dict(zip(ticks["instrument_token"].tolist(), ticks["packet_length"].tolist(), strict=True))
        assert lengths == {index: PACKET_INDEX_QUOTE, option: PACKET_QUOTE}
        assert sim.subscriptions(API_KEY) == {index: "quote", option: "quote"}

        await ws.send(mode_message("full", [index, option]))
        ticks = await next_ticks(ws, where=lambda t: set(t["packet_length"].tolist()) == {PACKET_INDEX_FULL, PACKET_FULL})
        full = ticks[ticks["instrument_token"] == option][0]
        assert full["depth_buy_price"][0] < full["last_price"] < full["depth_sell_price"][0]
        assert full["exchange_timestamp"] > 0

        await ws.send(mode_message("ltp", [option]))
        await next_ticks(ws, where=lambda t: PACKET_LTP in t["packet_length"].tolist())
        assert sim.subscriptions(API_KEY) == {index: "full", option: "ltp"}

        await ws.send(unsubscribe_message([index]))
        ticks = await next_ticks(ws, where=lambda t: index not in t["instrument_token"].tolist())
        assert ticks["instrument_token"].tolist() == [option]
        assert sim.subscriptions(API_KEY) == {option: "ltp"}


async def test_ticks_follow_the_market(sim):
    option = option_tokens(sim, 1)[0]
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([256265, option]))
        await next_ticks(ws)
        sim.market.set_spot("NIFTY", 27123.45)
        ticks = await next_ticks(ws, where=lambda t: 27000.0 < t["last_price"][t["instrument_token"] == 256265][0] < 27300.0)
        assert ticks["instrument_token"].tolist().count(256265) == 1


async def test_unknown_tokens_are_held_but_get_no_ticks(sim):
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([256265, 7]))
        ticks = await next_ticks(ws)
        assert ticks["instrument_token"].tolist() == [256265]
        assert sim.subscriptions(API_KEY) == {256265: "quote", 7: "quote"}


async def test_more_than_3000_instruments_on_a_connection_get_kites_error_text(sim):
    tokens = list(range(1_000_000, 1_000_000 + MAX_INSTRUMENTS_PER_CONNECTION + 5))
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message(tokens))
        message = await next_text(ws)
        assert message["type"] == "error"
        assert "3000" in message["data"]
        await wait_until(lambda: len(sim.subscriptions(API_KEY)) == MAX_INSTRUMENTS_PER_CONNECTION)


async def test_invalid_control_messages_get_an_error_text(sim):
    async with connect(url(sim)) as ws:
        await ws.send('{"a": "subscribe", "v": "everything"}')
        assert (await next_text(ws))["type"] == "error"
        await ws.send("not json")
        assert (await next_text(ws))["type"] == "error"
        assert sim.subscriptions(API_KEY) == {}


async def test_subscriptions_are_per_connection_and_unioned_per_key(sim):
    a_tokens, b_tokens = option_tokens(sim, 4)[:2], option_tokens(sim, 4)[2:]
    async with connect(url(sim)) as a, connect(url(sim)) as b:
        await a.send(subscribe_message(a_tokens))
        await b.send(subscribe_message(b_tokens))
        await b.send(mode_message("full", b_tokens))
        await wait_until(lambda: len(sim.subscriptions(API_KEY)) == 4)
        await wait_until(lambda: set(sim.subscriptions(API_KEY).values()) == {"quote", "full"})
        per_connection = {frozenset(c.subscriptions) for c in sim.connections(API_KEY)}
        assert per_connection == {frozenset(a_tokens), frozenset(b_tokens)}
        a_ticks = await next_ticks(a)
        assert set(a_ticks["instrument_token"].tolist()) == set(a_tokens)


async def test_frames_split_at_max_packets_per_frame(sim):
    sim.max_packets_per_frame = 3
    tokens = option_tokens(sim, 10)
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message(tokens))
        sizes = []
        seen: set[int] = set()
        while len(sizes) < 12:
            ticks = await next_ticks(ws)
            sizes.append(len(ticks))
            seen.update(ticks["instrument_token"].tolist())
        assert max(sizes) == 3
        assert 1 in sizes
        assert seen == set(tokens)


async def test_heartbeats_when_idle(sim):
    async with connect(url(sim)) as ws:
        async with asyncio.timeout(WAIT_S):
            message = await ws.recv()
        assert message == b"\x00"
        assert decode_frame(message).heartbeat


async def test_counters_of_ticks_sent(sim):
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([256265, 260105]))
        for _ in range(3):
            await next_ticks(ws)
        assert sim.ticks_sent >= 6
        assert sim.ticks_sent_to(API_KEY) == sim.ticks_sent
        assert sim.connections(API_KEY)[0].ticks_sent == sim.ticks_sent
        assert sim.frames_sent >= 3 and sim.bytes_sent > 0


async def test_latency_probe_stamps_send_time_in_milliseconds(sim):
    sim.latency_probe = True
    option = option_tokens(sim, 1)[0]
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([option]))
        await ws.send(mode_message("full", [option]))
        ticks = await next_ticks(ws, where=lambda t: t["packet_length"][0] == PACKET_FULL)
        now_ms = (time.time_ns() // 1_000_000) & 0xFFFFFFFF
        latency_ms = (now_ms - int(ticks["last_trade_time"][0])) % (1 << 32)
        assert 0 <= latency_ms < 5_000


async def test_order_updates_are_pushed_as_text(sim):
    symbol = next(r["tradingsymbol"] for r in sim.market.instruments if r["segment"] == "NFO-OPT")
    async with connect(url(sim)) as ws, aiohttp.ClientSession() as http:
        response = await http.post(
            f"{sim.http_url}/orders/regular",
            data={
                "exchange": "NFO",
                "tradingsymbol": symbol,
                "transaction_type": "SELL",
                "quantity": "75",
                "product": "MIS",
                "order_type": "MARKET",
            },
            headers={"X-Kite-Version": "3", "Authorization": f"token {API_KEY}:{ACCESS_TOKEN}"},
        )
        order_id = (await response.json())["data"]["order_id"]
        statuses = []
        while "COMPLETE" not in statuses:
            message = await next_text(ws)
            assert message["type"] == "order"
            assert message["data"]["order_id"] == order_id
            statuses.append(message["data"]["status"])
        assert statuses == ["OPEN", "COMPLETE"]
    await wait_until(lambda: sim.connection_count(API_KEY) == 0)
    assert sim.push_text(API_KEY, {"type": "message", "data": "hello"}) == 0  # nobody connected


# --- fault injection ------------------------------------------------------------------------


async def test_drop_connections_aborts_without_a_close_frame(sim):
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([256265]))
        await next_ticks(ws)
        assert await sim.drop_connections(API_KEY) == 1
        with pytest.raises(ConnectionClosed) as error:
            async with asyncio.timeout(WAIT_S):
                while True:
                    await ws.recv()
        assert error.value.rcvd is None  # no close frame: the network "failed"
    assert sim.connection_count(API_KEY) == 0


async def test_stall_sends_nothing_until_resume(sim):
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([256265]))
        await next_ticks(ws)
        sim.stall(API_KEY)
        # Drain what was in flight, then nothing at all: no ticks, no heartbeats, no pongs.
        while True:
            try:
                async with asyncio.timeout(0.5):
                    await ws.recv()
            except TimeoutError:
                break
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await asyncio.shield(pong)
        assert sim.connection_count(API_KEY) == 1  # the socket is still open
        sim.resume()
        await next_ticks(ws)
        async with asyncio.timeout(WAIT_S):
            await (await ws.ping())  # pongs are back too


async def test_send_malformed_frames(sim):
    async with connect(url(sim)) as ws:
        for kind, reason in (
            ("truncated", "truncated_packet"),
            ("unknown_length", "unknown_packet_length"),
            ("count_exceeds", "count_exceeds_frame"),
        ):
            assert sim.send_malformed(API_KEY, kind=kind) == 1
            async with asyncio.timeout(WAIT_S):
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes) and len(message) > 1:
                        break
            decoded = decode_frame(message)
            assert reason in decoded.malformed_reasons
        sim.send_malformed(API_KEY, kind="text")
        async with asyncio.timeout(WAIT_S):
            while not isinstance(message := await ws.recv(), str):
                pass
        assert message == "{not json"


async def test_expire_token_closes_sockets_and_refuses_upgrades_until_a_new_token(sim):
    async with connect(url(sim)) as ws:
        await ws.send(subscribe_message([256265]))
        await next_ticks(ws)
        assert sim.expire_token(API_KEY) == 1
        with pytest.raises(ConnectionClosed) as error:
            async with asyncio.timeout(WAIT_S):
                while True:
                    await ws.recv()
        assert error.value.rcvd is not None and error.value.rcvd.code == 1008
    with pytest.raises(InvalidStatus) as refused:
        await connect(url(sim))
    assert refused.value.response.status_code == 403
    sim.set_access_token(API_KEY, "renewed")
    async with connect(url(sim, token="renewed")) as ws:
        await ws.send(subscribe_message([256265]))
        await next_ticks(ws)


async def test_stop_closes_live_connections(sim):
    ws = await connect(url(sim))
    await sim.stop()
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(WAIT_S):
            while True:
                await ws.recv()
    await sim.start()  # the fixture's exit stops it again


async def test_expire_token_closes_even_a_stalled_connection(sim):
    async with connect(url(sim)) as ws:
        sim.stall()
        sim.expire_token(API_KEY)
        with pytest.raises(ConnectionClosed) as error:
            async with asyncio.timeout(WAIT_S):
                while True:
                    await ws.recv()
        assert error.value.rcvd is not None and error.value.rcvd.code == 1008
    await wait_until(lambda: sim.connection_count(API_KEY) == 0)


async def test_stall_current_silences_only_the_sockets_open_now(sim):
    async with connect(url(sim)) as stalled:
        await stalled.send(subscribe_message([256265]))
        await next_ticks(stalled)
        assert sim.stall_current(API_KEY) == 1
        while True:  # drain what was in flight, then silence
            try:
                async with asyncio.timeout(0.5):
                    await stalled.recv()
            except TimeoutError:
                break
        async with connect(url(sim)) as fresh:
            await fresh.send(subscribe_message([256265]))
            await next_ticks(fresh)  # a new connection of the same key streams
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await stalled.recv()
        sim.resume()
        await next_ticks(stalled)


async def place_market_order(sim: KiteSimulator, http: aiohttp.ClientSession, symbol: str) -> str:
    response = await http.post(
        f"{sim.http_url}/orders/regular",
        data={"exchange": "NFO", "tradingsymbol": symbol, "transaction_type": "BUY",
              "quantity": "75", "product": "MIS", "order_type": "MARKET"},
        headers={"X-Kite-Version": "3", "Authorization": f"token {API_KEY}:{ACCESS_TOKEN}"},
    )  # fmt: skip
    return (await response.json())["data"]["order_id"]


async def test_disorder_postbacks_sends_each_twice_and_each_pair_swapped(sim):
    received: list[tuple[str, str]] = []

    async def postback(request: web.Request) -> web.Response:
        body = await request.json()
        received.append((body["order_id"], body["status"]))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/postback", postback)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        sim.set_postback_url(API_KEY, f"http://127.0.0.1:{port}/postback")
        sim.disorder_postbacks(API_KEY)
        symbol = next(r["tradingsymbol"] for r in sim.market.instruments if r["segment"] == "NFO-OPT")
        async with aiohttp.ClientSession() as http:
            first = await place_market_order(sim, http, symbol)
            second = await place_market_order(sim, http, symbol)
            await wait_until(lambda: len(received) == 4)
            # The later COMPLETE first, twice, then the earlier one, twice.
            assert received == [(second, "COMPLETE")] * 2 + [(first, "COMPLETE")] * 2
            third = await place_market_order(sim, http, symbol)
            # Nothing follows it: it goes out alone (twice) after the hold.
            await wait_until(lambda: len(received) == 6)
            assert received[4:] == [(third, "COMPLETE")] * 2
            sim.disorder_postbacks(API_KEY, enabled=False)
            fourth = await place_market_order(sim, http, symbol)
            await wait_until(lambda: len(received) == 7)
            assert received[6] == (fourth, "COMPLETE")
    finally:
        await runner.cleanup()
