"""Our ticker client against the loopback Kite simulator: 3 connections x 3000 instruments,
through dropped connections, a stall, an expired token, HTTP 429 and malformed frames."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pytest
from tenacity import wait_exponential_jitter
from websockets.asyncio.client import connect

from streaming.kite.codec import (
    PACKET_FULL,
    PACKET_INDEX_FULL,
    PACKET_INDEX_QUOTE,
    PACKET_LTP,
    PACKET_QUOTE,
    InfoMessage,
    OrderMessage,
)
from streaming.kite.limits import (
    MAX_CONNECTIONS_PER_API_KEY,
    MAX_INSTRUMENTS_PER_CONNECTION,
    MODE_FULL,
    MODE_LTP,
    MODE_QUOTE,
    MODES,
)
from streaming.kite.ticker import (
    ConnectionState,
    KiteLimitError,
    KiteTickerClient,
    SessionState,
)
from streaming.market import SyntheticMarket
from streaming.sim.simulator import KiteSimulator
from tests.helpers import async_wait_until

API_KEY, API_SECRET, ACCESS_TOKEN = "tickerkey", "tickersecret", "tickertoken-7f3a9c"
WAIT_S = 30.0
FULL_LOAD = MAX_CONNECTIONS_PER_API_KEY * MAX_INSTRUMENTS_PER_CONNECTION  # 9000
INDEX_SEGMENT = 9


def lengths_for(token: int, mode: str) -> int:
    """The packet length Kite sends for ``token`` in ``mode``."""
    index = token & 0xFF == INDEX_SEGMENT
    return {
        MODE_LTP: PACKET_LTP,
        MODE_QUOTE: PACKET_INDEX_QUOTE if index else PACKET_QUOTE,
        MODE_FULL: PACKET_INDEX_FULL if index else PACKET_FULL,
    }[mode]


# Polls: the conditions are simulator and client state with no event to wait on.
wait_until = partial(async_wait_until, timeout_s=WAIT_S, interval_s=0.01)


async def stays_false(predicate: Callable[[], bool], *, for_s: float) -> bool:
    """True if ``predicate`` never became true within ``for_s`` (a bounded negative check)."""
    try:
        await wait_until(predicate, timeout_s=for_s)
    except AssertionError:  # the deadline passed
        return True
    return False


@pytest.fixture
def market() -> SyntheticMarket:
    # 2 built-in + 7 synthetic underlyings x (5 expiries x 101 strikes x 2 + index + futures)
    market = SyntheticMarket(seed=11, extra_underlyings=7, expiries=5, strikes_each_side=50)
    assert len(market.tokens) >= FULL_LOAD
    return market


@pytest.fixture
async def sim(market):
    simulator = KiteSimulator(market=market, tick_interval_ms=200, heartbeat_interval_ms=100)
    simulator.register_account(api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    async with simulator:
        yield simulator


@dataclass
class Harness:
    """A running client and what its callbacks saw."""

    client: KiteTickerClient
    task: asyncio.Task
    last_length: dict[int, int] = field(default_factory=dict)  # token -> last packet length
    frames: int = 0
    ticks: int = 0
    expired_calls: int = 0
    expired: asyncio.Event = field(default_factory=asyncio.Event)
    texts: list = field(default_factory=list)

    def on_ticks(self, ticks: np.ndarray) -> None:
        assert len(ticks) > 0
        self.frames += 1
        self.ticks += len(ticks)
        self.last_length.update(
            zip(ticks["instrument_token"].tolist(), ticks["packet_length"].tolist(), strict=True)
        )

    def on_session_expired(self) -> None:
        self.expired_calls += 1
        self.expired.set()

    async def on_text(self, message) -> None:
        self.texts.append(message)

    def streams_in_modes(self, wanted: dict[int, str]) -> bool:
        """Every wanted token has arrived since the last reset, in its mode's packet kind."""
        seen = self.last_length
        return len(seen) >= len(wanted) and all(
            seen.get(token) == lengths_for(token, mode) for token, mode in wanted.items()
        )


@pytest.fixture
async def harness(sim):
    """Start clients on the simulator; every one is closed and its run() awaited afterwards."""
    started: list[Harness] = []

    def start(**overrides) -> Harness:
        options = dict(
            api_key=API_KEY,
            access_token=ACCESS_TOKEN,
            ws_url=sim.ws_url,
            account="acct-1",
            watchdog_s=1.5,
            connect_timeout_s=5.0,
            close_timeout_s=1.0,
            backoff_reset_after_s=60.0,
            wait=wait_exponential_jitter(multiplier=0.05, max=0.4, jitter=0.05),
            wait_rate_limited=wait_exponential_jitter(multiplier=0.1, max=0.5, jitter=0.05),
        )
        options.update(overrides)
        h = Harness(client=None, task=None)  # type: ignore[arg-type]
        client = KiteTickerClient(
            on_ticks=h.on_ticks,
            on_session_expired=h.on_session_expired,
            on_text=h.on_text,
            **options,
        )
        h.client = client
        h.task = asyncio.create_task(client.run(), name="test.ticker.run")
        started.append(h)
        return h

    yield start
    for h in started:
        await h.client.aclose()
        async with asyncio.timeout(WAIT_S):
            await h.task


def full_load(market: SyntheticMarket) -> dict[int, str]:
    """9000 instruments, the modes cycling ltp / quote / full."""
    tokens = market.tokens[:FULL_LOAD].tolist()
    return {token: MODES[i % 3] for i, token in enumerate(tokens)}


def per_connection_counts(sim: KiteSimulator) -> list[int]:
    return sorted(len(c.subscriptions) for c in sim.connections(API_KEY))


def fully_subscribed(sim: KiteSimulator, wanted: dict[int, str]) -> bool:
    return (
        sim.connection_count(API_KEY) == MAX_CONNECTIONS_PER_API_KEY
        and sim.subscriptions(API_KEY) == wanted
        and per_connection_counts(sim) == [MAX_INSTRUMENTS_PER_CONNECTION] * 3
    )


async def streaming_everything(sim: KiteSimulator, h: Harness, wanted: dict[int, str]) -> None:
    """Kite holds every instrument in its mode, and ticks for all of them arrive in that mode."""
    await wait_until(lambda: fully_subscribed(sim, wanted))
    h.last_length.clear()
    await wait_until(lambda: h.streams_in_modes(wanted))
    health = h.client.health()
    assert health.session is SessionState.ACTIVE
    assert [c.state for c in health.connections] == [ConnectionState.CONNECTED] * 3
    assert [c.instruments for c in health.connections] == [MAX_INSTRUMENTS_PER_CONNECTION] * 3


async def test_9000_instruments_on_3_connections_in_their_modes(sim, market, harness):
    h = harness()
    wanted = full_load(market)
    await h.client.set_subscriptions(wanted)
    await streaming_everything(sim, h, wanted)
    health = h.client.health()
    assert [c.reconnects for c in health.connections] == [0, 0, 0]
    assert all(c.subscribed == MAX_INSTRUMENTS_PER_CONNECTION for c in health.connections)
    assert sim.connection_attempts(API_KEY) == 3
    assert h.client.subscriptions() == wanted


async def test_resubscribes_every_instrument_after_dropped_connections(sim, market, harness):
    h = harness()
    wanted = full_load(market)
    await h.client.set_subscriptions(wanted)
    await streaming_everything(sim, h, wanted)
    before = {c.id: c.subscriptions for c in sim.connections(API_KEY)}

    assert await sim.drop_connections(API_KEY) == 3
    await wait_until(lambda: all(c.reconnects == 1 for c in h.client.health().connections))
    await streaming_everything(sim, h, wanted)
    after = {c.id: c.subscriptions for c in sim.connections(API_KEY)}
    assert set(after).isdisjoint(before)  # new sockets, not the old ones
    # Each connection carries the same instruments as before the drop (allocation is sticky).
    assert sorted(map(sorted, after.values())) == sorted(map(sorted, before.values()))

    # A second drop, of the same sockets' replacements, recovers the same way.
    assert await sim.drop_connections(API_KEY) == 3
    await wait_until(lambda: all(c.reconnects == 2 for c in h.client.health().connections))
    await streaming_everything(sim, h, wanted)


def structured_events(caplog) -> list[dict]:
    """The structlog events of the captured records. Read through the standard library, not
    structlog.testing.capture_logs, which misses loggers cached on first use by an earlier
    test after logging was configured again."""
    return [record.msg for record in caplog.records if isinstance(record.msg, dict)]


async def test_watchdog_reconnects_a_stalled_connection(sim, market, harness, caplog):
    h = harness(watchdog_s=1.0)
    wanted = full_load(market)
    await h.client.set_subscriptions(wanted)
    await streaming_everything(sim, h, wanted)
    attempts = sim.connection_attempts(API_KEY)

    with caplog.at_level(logging.DEBUG, logger="streaming.kite"):
        sim.stall(API_KEY)  # sockets stay open, nothing (not even a heartbeat) is sent
        await wait_until(lambda: all(c.reconnects >= 1 for c in h.client.health().connections))
        assert sim.connection_attempts(API_KEY) >= attempts + 3
        ticks_during_stall = h.ticks
        sim.resume()
        await streaming_everything(sim, h, wanted)
    events = structured_events(caplog)
    watchdog = [e for e in events if e["event"] == "kite.ws.watchdog"]
    assert {e["connection"] for e in watchdog} == {0, 1, 2}
    assert all(e["silent_s"] == 1.0 for e in watchdog)
    assert h.ticks > ticks_during_stall


async def test_expired_token_stops_retrying_until_the_token_changes(sim, market, harness):
    h = harness()
    wanted = full_load(market)
    await h.client.set_subscriptions(wanted)
    await streaming_everything(sim, h, wanted)

    sim.expire_token(API_KEY)  # closes the sockets; upgrades now get HTTP 403
    async with asyncio.timeout(WAIT_S):
        await h.expired.wait()
    await wait_until(
        lambda: all(
            c.state is ConnectionState.SESSION_EXPIRED for c in h.client.health().connections
        )
    )
    assert h.client.session is SessionState.EXPIRED
    attempts = sim.connection_attempts(API_KEY)
    # Backoff here is 50-400 ms, so a client that kept retrying would try many times in 3 s.
    assert await stays_false(lambda: sim.connection_attempts(API_KEY) > attempts, for_s=3.0)
    assert sim.connection_count(API_KEY) == 0

    # The same (refused) token again changes nothing.
    await h.client.update_token(ACCESS_TOKEN)
    assert await stays_false(lambda: sim.connection_attempts(API_KEY) > attempts, for_s=1.0)
    assert h.client.session is SessionState.EXPIRED

    # Subscriptions changed while expired are kept and applied on reconnect.
    wanted = {token: MODE_FULL for token in list(wanted)[:4500]} | {
        token: MODE_LTP for token in list(wanted)[4500:]
    }
    await h.client.set_subscriptions(wanted)
    assert await stays_false(lambda: sim.connection_attempts(API_KEY) > attempts, for_s=0.5)

    sim.set_access_token(API_KEY, "tickertoken-new")
    await h.client.update_token("tickertoken-new")
    await streaming_everything(sim, h, wanted)
    assert h.client.session is SessionState.ACTIVE
    assert h.expired_calls == 1


async def test_http_429_backs_off_then_connects(sim, market, harness):
    # Someone else holds one of the key's three sockets: one of our three gets HTTP 429.
    def refused() -> list[int]:
        return [
            c.index
            for c in h.client.health().connections
            if c.last_error == "HTTP 429 on upgrade" and c.state is not ConnectionState.CONNECTED
        ]

    async with connect(f"{sim.ws_url}?api_key={API_KEY}&access_token={ACCESS_TOKEN}") as other:
        h = harness()
        wanted = full_load(market)
        await h.client.set_subscriptions(wanted)
        await wait_until(lambda: len(refused()) == 1 and sim.connection_count(API_KEY) == 3)
        attempts = sim.connection_attempts(API_KEY)
        await wait_until(lambda: sim.connection_attempts(API_KEY) >= attempts + 2)  # retries
        assert len(refused()) == 1
        assert h.client.session is SessionState.ACTIVE
        assert h.expired_calls == 0
        await other.close()
    await streaming_everything(sim, h, wanted)


async def test_subscription_changes_are_sent_as_diffs_and_allocation_is_sticky(
    sim, market, harness
):
    h = harness()
    tokens = market.tokens[:FULL_LOAD].tolist()
    wanted = dict.fromkeys(tokens[:5000], MODE_QUOTE)
    await h.client.set_subscriptions(wanted)
    await wait_until(lambda: sim.subscriptions(API_KEY) == wanted)
    # First fit: 3000 + 2000, and no third socket.
    assert per_connection_counts(sim) == [2000, 3000]
    assert sim.connection_count(API_KEY) == 2
    first = {c.id: set(c.subscriptions) for c in sim.connections(API_KEY)}

    await h.client.unsubscribe(tokens[:1000])  # frees room on the first connection
    await h.client.set_mode(tokens[1000:1500], MODE_FULL)
    await h.client.subscribe(tokens[5000:8000], MODE_LTP)
    expected = (
        dict.fromkeys(tokens[1000:1500], MODE_FULL)
        | dict.fromkeys(tokens[1500:5000], MODE_QUOTE)
        | dict.fromkeys(tokens[5000:8000], MODE_LTP)
    )
    assert h.client.subscriptions() == expected
    await wait_until(lambda: sim.subscriptions(API_KEY) == expected)
    await wait_until(lambda: sim.connection_count(API_KEY) == 3)
    now = {c.id: set(c.subscriptions) for c in sim.connections(API_KEY)}
    for conn_id, old in first.items():
        # Instruments never move between connections: each old socket kept what it still has.
        assert old - set(tokens[:1000]) <= now[conn_id]
    # First fit again: the 3000 new ones top up connection 0 and 1, the rest open a third.
    assert sorted(len(s) for s in now.values()) == [1000, 3000, 3000]
    assert [c.reconnects for c in h.client.health().connections] == [0, 0, 0]

    h.last_length.clear()
    await wait_until(lambda: h.streams_in_modes(expected))

    # Dropping every instrument of a connection closes its socket.
    await h.client.set_subscriptions(dict.fromkeys(tokens[1000:3000], MODE_LTP))
    await wait_until(lambda: sim.connection_count(API_KEY) == 1)
    assert [c.state for c in h.client.health().connections] == [
        ConnectionState.CONNECTED,
        ConnectionState.IDLE,
        ConnectionState.IDLE,
    ]


async def test_requests_beyond_kites_limits_are_refused(sim, market, harness):
    h = harness()
    tokens = market.tokens.tolist()
    wanted = dict.fromkeys(tokens[:FULL_LOAD], MODE_LTP)
    await h.client.set_subscriptions(wanted)
    with pytest.raises(KiteLimitError) as caught:
        await h.client.set_subscriptions(dict.fromkeys(tokens[: FULL_LOAD + 1], MODE_LTP))
    assert caught.value.account == "acct-1"
    assert (caught.value.requested, caught.value.limit) == (FULL_LOAD + 1, FULL_LOAD)
    assert "3 connections x 3000 instruments" in str(caught.value)
    with pytest.raises(KiteLimitError):
        await h.client.subscribe([tokens[FULL_LOAD]], MODE_FULL)
    assert h.client.subscriptions() == wanted  # nothing of the refused requests applied

    with pytest.raises(ValueError, match="mode 'fast'"):
        await h.client.set_subscriptions({tokens[0]: "fast"})
    with pytest.raises(ValueError, match="not in uint32"):
        await h.client.set_subscriptions({-5: MODE_LTP})
    with pytest.raises(ValueError, match="unsubscribed tokens"):
        await h.client.set_mode([tokens[FULL_LOAD + 5]], MODE_FULL)
    with pytest.raises(ValueError, match="max_connections"):
        KiteTickerClient(
            api_key=API_KEY,
            access_token=ACCESS_TOKEN,
            ws_url=sim.ws_url,
            on_ticks=print,
            on_session_expired=print,
            max_connections=4,
        )
    with pytest.raises(ValueError, match="max_instruments_per_connection"):
        KiteTickerClient(
            api_key=API_KEY,
            access_token=ACCESS_TOKEN,
            ws_url=sim.ws_url,
            on_ticks=print,
            on_session_expired=print,
            max_instruments_per_connection=3001,
        )
    await wait_until(lambda: sim.subscriptions(API_KEY) == wanted)


async def test_malformed_frames_are_counted_without_reconnecting(sim, market, harness):
    h = harness()
    wanted = dict.fromkeys(market.tokens[:100].tolist(), MODE_FULL)
    await h.client.set_subscriptions(wanted)
    await wait_until(lambda: h.streams_in_modes(wanted))
    for kind in ("truncated", "unknown_length", "count_exceeds", "text"):
        assert sim.send_malformed(API_KEY, kind=kind) == 1
    await wait_until(lambda: h.client.health().connections[0].malformed_parts == 4)
    ticks = h.ticks
    await wait_until(lambda: h.ticks > ticks)
    conn = h.client.health().connections[0]
    assert (conn.state, conn.reconnects) == (ConnectionState.CONNECTED, 0)


async def test_text_messages_reach_on_text(sim, market, harness):
    h = harness()
    await h.client.set_subscriptions({int(market.tokens[0]): MODE_LTP})
    await wait_until(lambda: sim.connection_count(API_KEY) == 1)
    sim.push_text(API_KEY, {"type": "message", "data": "exchange notice"})
    sim.push_text(
        API_KEY, {"type": "order", "data": {"order_id": "2501", "status": "COMPLETE"}}
    )
    await wait_until(lambda: len(h.texts) == 2)
    info, order = h.texts
    assert isinstance(info, InfoMessage) and info.data == "exchange notice"
    assert isinstance(order, OrderMessage) and order.data.order_id == "2501"


async def test_aclose_closes_every_socket_and_ends_run(sim, market, harness):
    h = harness()
    await h.client.set_subscriptions(full_load(market))
    await wait_until(lambda: sim.connection_count(API_KEY) == 3)
    await h.client.aclose()
    assert h.task.done() and h.task.exception() is None
    await wait_until(lambda: sim.connection_count(API_KEY) == 0)
    assert [c.state for c in h.client.health().connections] == [ConnectionState.CLOSED] * 3
    with pytest.raises(RuntimeError, match="closed"):
        await h.client.run()


async def test_a_failing_callback_ends_run_with_its_exception_and_run_can_restart(sim, market):
    class Boom(Exception):
        pass

    seen: list[int] = []

    def on_ticks(ticks):
        if not seen:
            seen.append(0)
            raise Boom(f"consumer bug on {len(ticks)} ticks")
        seen.append(len(ticks))

    client = KiteTickerClient(
        api_key=API_KEY,
        access_token=ACCESS_TOKEN,
        ws_url=sim.ws_url,
        on_ticks=on_ticks,
        on_session_expired=lambda: None,
    )
    await client.set_subscriptions({int(market.tokens[0]): MODE_LTP})
    with pytest.raises(Boom, match="consumer bug"):
        async with asyncio.timeout(WAIT_S):
            await client.run()
    await wait_until(lambda: sim.connection_count(API_KEY) == 0)
    assert [c.state for c in client.health().connections] == [ConnectionState.CLOSED] * 3

    # A supervisor restarting run() gets the same subscriptions streaming again.
    task = asyncio.create_task(client.run())
    await wait_until(lambda: len(seen) > 1)
    assert sim.subscriptions(API_KEY) == {int(market.tokens[0]): MODE_LTP}
    await client.aclose()
    async with asyncio.timeout(WAIT_S):
        await task


async def test_the_access_token_never_reaches_logs(sim, market, harness, caplog):
    caplog.set_level(logging.DEBUG, logger="streaming.kite.ticker.wire")
    with caplog.at_level(logging.DEBUG, logger="streaming.kite"):
        # A refused token, a port with nothing listening, and a normal session.
        sim.expire_token(API_KEY)
        h = harness()
        await h.client.set_subscriptions({int(market.tokens[0]): MODE_FULL})
        async with asyncio.timeout(WAIT_S):
            await h.expired.wait()
        dead = harness(ws_url="ws://127.0.0.1:9/ws", account="acct-dead")
        await dead.client.set_subscriptions({int(market.tokens[0]): MODE_FULL})
        await wait_until(lambda: dead.client.health().connections[0].connect_attempts >= 2)
        sim.set_access_token(API_KEY, "tickertoken-second")
        await h.client.update_token("tickertoken-second")
        await wait_until(lambda: sim.connection_count(API_KEY) == 1)
    events = structured_events(caplog)
    wire = [record.getMessage() for record in caplog.records]
    assert any("access_token=***" in message for message in wire)  # websockets logged the URL
    texts = [*wire, *(repr(event) for event in events)]
    texts += [repr(h.client), repr(h.client.health()), repr(dead.client.health())]
    for secret in (ACCESS_TOKEN, "tickertoken-second"):
        assert not [text for text in texts if secret in text]
    assert any(event["event"] == "kite.ws.session_expired" for event in events)
    assert any(event["event"] == "kite.ws.retry" for event in events)


@pytest.mark.parametrize("url", ["https://ws.kite.trade", "ws.kite.trade", "wss://ws.kite.trade/?x=1"])
def test_a_url_websockets_would_refuse_is_refused_before_the_token_joins_it(url):
    """H2 (docs/security.md): websockets' InvalidURI quotes the whole URL, token included."""
    token = "tokInUrlCheck0123456789"
    with pytest.raises(ValueError, match="KITE_WS_URL") as raised:
        KiteTickerClient(api_key="k1", access_token=token, ws_url=url,
                         on_ticks=lambda ticks: None, on_session_expired=lambda: None)
    assert token not in str(raised.value)


def test_the_query_is_encoded_so_a_token_cannot_break_the_url():
    client = KiteTickerClient(api_key="k1", access_token="x", ws_url="wss://ws.kite.trade",
                              on_ticks=lambda ticks: None, on_session_expired=lambda: None)
    assert client._url("a&b c") == "wss://ws.kite.trade?api_key=k1&access_token=a%26b+c"
