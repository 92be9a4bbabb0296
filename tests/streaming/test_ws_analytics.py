"""Chain analytics and bars over the WebSocket: the real engine (with the Kite simulator) and
the project's ASGI application on channels-redis and PostgreSQL, through the channels test
communicator; the flow control and the bad input without an engine."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import orjson
import pytest

from streaming import consumers, schema
from streaming.greeks import IST
from streaming.market import SyntheticMarket
from streaming.models import ChainMinute, UnderlyingBar
from streaming.protocol import AnalyticsMessage, AnalyticsSeriesMessage
from subscriptions.models import Instrument
from tests.helpers import async_wait_until
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)
from tests.streaming.wsutil import (
    EXPIRY,
    NIFTY_INDEX,
    ORIGIN,
    create_universe,
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
from tests.streaming.wsutil import redis_layer as redis_layer
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]

ENGINE_WAIT_S = 90
"""A failure bound for the engine's first ticks on a loaded machine, not a speed claim."""


@pytest.fixture
def headers(user):
    return [ORIGIN, session_cookie_for(user)]


def quiet_minutes(day: dt.date, count: int) -> list[dt.datetime]:
    """``count`` minutes of ``day`` (IST) at least half an hour from now, so that the engine's
    own sample of the current minute never overwrites one."""
    now = dt.datetime.now(IST)
    start = dt.datetime(day.year, day.month, day.day, 0, 0, tzinfo=IST)
    if now - start < dt.timedelta(minutes=30 + count):
        start += dt.timedelta(hours=23, minutes=30)
    return [start + dt.timedelta(minutes=i) for i in range(count)]


# --- with the engine ----------------------------------------------------------------------------


@pytest.fixture
def market_world(transactional_db):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    expiry = min(r["expiry"] for r in market.instruments
                 if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    tokens = {r["instrument_token"] for r in market.instruments
              if r["name"] == "NIFTY" and (r["expiry"] == expiry or r["instrument_type"] == "FUT")}
    tokens.add(market.index_token("NIFTY"))
    subscribe(sorted(tokens))
    make_account("acc1", api_key="k1", access_token="tok-acc1")
    future = any(r["instrument_type"] == "FUT" and r["expiry"] == expiry and r["name"] == "NIFTY"
                 for r in market.instruments)
    return {"market": market, "expiry": expiry, "future": future}


async def test_a_chain_subscriber_gets_the_series_then_the_engines_analytics(
    redis_layer, market_world, headers
):
    expiry = market_world["expiry"]
    today = dt.datetime.now(IST).date()
    minutes = quiet_minutes(today, 3)
    await ChainMinute.objects.abulk_create([
        ChainMinute(underlying="NIFTY", expiry=expiry, minute=m, atm_iv=0.12 + i / 100,
                    straddle=300.0 + i, pcr_oi=None if i == 1 else 0.9)
        for i, m in enumerate(minutes)
    ])  # fmt: skip
    lot_size = await Instrument.objects.filter(name="NIFTY", expiry=expiry).values_list(
        "lot_size", flat=True
    ).afirst()
    app, _ = make_app(make_config(max_subscriptions=200))
    async with InProcessEngine(accounts={"acc1": "k1"}):
        comm, _ = await ws_connect(app, headers=headers)
        await send(comm, {"action": "subscribe", "id": "c",
                          "chain": {"underlying": "NIFTY", "expiry": expiry.isoformat()}})
        ack = await recv(comm)
        assert ack["type"] == "subscribed" and ack["bars"] == []
        strikes = ack["chain"]["strikes"]
        series = AnalyticsSeriesMessage.model_validate_json(await comm.receive_from(5))
        assert (series.underlying, series.expiry) == ("NIFTY", expiry)
        assert [(p.ts, p.atm_iv, p.straddle, p.pcr_oi) for p in series.points] == [
            (int(m.timestamp()) * 1000, 0.12 + i / 100, 300.0 + i, None if i == 1 else 0.9)
            for i, m in enumerate(minutes)
        ]

        def is_analytics(msg):
            if msg["type"] == "snapshots":
                # Acknowledged, as every client must, so that the analytics are not held back.
                sends.append(msg["seq"])
            return msg["type"] == "analytics" and msg["summary"]["forward"] is not None

        sends: list[int] = []
        first = await _recv_acking(comm, is_analytics, sends)
        message = AnalyticsMessage.model_validate(first)
        s = message.summary
        assert (message.underlying, message.expiry) == ("NIFTY", expiry)
        assert [row.strike for row in message.rows] == strikes
        # A weekly expiry has no same-expiry future: its forward is from parity.
        assert s.forward_source in (["future", "parity"] if market_world["future"] else ["parity"])
        assert s.lot_size == lot_size and s.is_mock is False
        assert s.atm_strike == min(strikes, key=lambda k: (abs(k - s.forward), k))
        assert s.days_to_expiry > 0
        assert (s.iv_rank, s.iv_percentile) == (None, None)  # no earlier day stored
        assert expiry in [p.expiry for p in message.term_structure]
        tokens = {i["token"] for i in ack["instruments"]}
        assert {leg.token for row in message.rows for leg in (row.ce, row.pe) if leg} <= tokens
        # And again later, at most once a second, as the chain moves.
        second = await _recv_acking(comm, lambda m: is_analytics(m) and m["ts"] > first["ts"], sends)
        assert second["ts"] - first["ts"] >= 1000
        await comm.disconnect()


async def _recv_acking(comm, predicate, sends, wait_s=ENGINE_WAIT_S):
    deadline = time.monotonic() + wait_s
    while True:
        assert time.monotonic() < deadline, "no matching message before the deadline"
        msg = await recv(comm, wait_s=deadline - time.monotonic())
        matched = predicate(msg)
        if sends:
            await send(comm, {"action": "ack", "seq": max(sends)})
            sends.clear()
        if matched:
            return msg


async def test_bars_the_recent_stored_then_each_closed_bar(redis_layer, market_world, headers):
    market: SyntheticMarket = market_world["market"]
    index = market.index_token("NIFTY")
    first = (int(time.time()) // 60 - 500) * 60
    await UnderlyingBar.objects.abulk_create([
        UnderlyingBar(instrument_id=index, start=dt.datetime.fromtimestamp(first + 60 * i, dt.UTC),
                      open=100.0 + i, high=101.0 + i, low=99.0 + i, close=100.5 + i,
                      tick_count=3, is_mock=True)
        for i in range(400)
    ])  # fmt: skip
    app, _ = make_app()
    async with InProcessEngine(accounts={}, force_mode="mock", mock_interval_ms=60_000) as h:
        comm, _ = await ws_connect(app, headers=headers)
        await send(comm, {"action": "subscribe", "id": 7, "bars": ["nifty"]})
        ack = await recv(comm)
        assert (ack["type"], ack["id"], ack["bars"], ack["instruments"]) == ("subscribed", 7, ["NIFTY"], [])
        recent = await recv(comm)
        assert (recent["type"], recent["underlying"]) == ("bars", "NIFTY")
        # The latest 375 of the 400 stored, oldest first, as the bar schema writes them.
        assert len(recent["bars"]) == 375
        assert [b["start_ts"] for b in recent["bars"]] == [
            (first + 60 * i) * 1000 for i in range(25, 400)
        ]
        assert recent["bars"][0] == orjson.loads(schema.encode_bar(
            token=index, name="NIFTY", start_epoch_s=first + 60 * 25, open=125.0, high=126.0,
            low=124.0, close=125.5, volume=0, ticks=3, is_gap=False, is_mock=True,
        ))  # fmt: skip

        await _wait_for_index(h, index)
        minute = (int(time.time()) // 60 + 2) * 60
        ticks = market.ticks([index, index, index], mode="full")
        ticks["exchange_timestamp"] = [minute + 5, minute + 30, minute + 65]
        ticks["last_price"] = [26000.0, 26010.0, 26020.0]
        h.engine.intake.mock_ticks(ticks)
        live = await recv_until(
            comm, lambda m: m["type"] == "bar" and m["bar"]["start_ts"] == minute * 1000,
            wait_s=ENGINE_WAIT_S,
        )
        assert live["underlying"] == "NIFTY"
        bar = live["bar"]
        assert (bar["open"], bar["high"], bar["low"], bar["close"], bar["ticks"]) == (
            26000.0, 26010.0, 26000.0, 26010.0, 2
        )
        await comm.disconnect()


async def _wait_for_index(h, index):
    deadline = time.monotonic() + ENGINE_WAIT_S
    while index not in set(h.engine.worker.universe.tokens.tolist()):
        assert time.monotonic() < deadline, "the index never reached the engine's universe"
        await h.engine.reloaded.wait()
        h.engine.reloaded.clear()


# --- without an engine: delivery rules and bad input ----------------------------------------


@pytest.fixture
def universe():
    return create_universe()


CHAIN = schema.chain_group("NIFTY", EXPIRY)


def analytics_item(ts: int) -> bytes:
    return orjson.dumps({"type": "analytics", "v": 1, "underlying": "NIFTY", "ts": ts})


async def test_analytics_go_to_chain_subscribers_only_and_wait_for_the_window(
    redis_layer, universe, headers
):
    app, metrics = make_app(make_config(send_window=1))
    # Plays the engines' request group (read at once, never left waiting idle).
    engines = await redis_layer.new_channel()
    await redis_layer.group_add(schema.SNAPSHOT_REQUESTS_GROUP, engines)
    chain, _ = await ws_connect(app, headers=headers)
    await send(chain, {"action": "subscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat()}})
    assert (await recv(chain))["type"] == "subscribed"
    assert (await recv(chain)) == {"type": "analytics_series", "underlying": "NIFTY",
                                   "expiry": EXPIRY.isoformat(), "points": []}
    options, _ = await ws_connect(app, headers=headers)
    await send(options, {"action": "subscribe", "instruments": [option_token(24000, "CE")]})
    assert (await recv(options))["type"] == "subscribed"
    # The chain subscriber asked the engines for its state and the chain's latest analytics.
    requests = [await asyncio.wait_for(redis_layer.receive(engines), 10) for _ in range(3)]
    await redis_layer.group_discard(schema.SNAPSHOT_REQUESTS_GROUP, engines)
    assert sorted(r["type"] for r in requests) == sorted(
        [schema.SNAPSHOT_REQUEST_TYPE, schema.ANALYTICS_REQUEST_TYPE, schema.SNAPSHOT_REQUEST_TYPE]
    )
    assert [r["groups"] for r in requests if r["type"] == schema.ANALYTICS_REQUEST_TYPE] == [[CHAIN]]

    await publish(redis_layer, CHAIN, {option_token(24000, "CE"): snapshot_item(option_token(24000, "CE"), ltp=1.0)})
    frame = await recv(chain)
    assert (frame["type"], frame["seq"]) == ("snapshots", 1)
    assert (await recv(options))["type"] == "snapshots"
    # Window full (one unacknowledged frame): analytics wait, the newest replacing older.
    for ts in (1, 2):
        await redis_layer.group_send(CHAIN, schema.chain_analytics_message(group=CHAIN, item=analytics_item(ts)))
    await async_wait_until(
        lambda: metrics.registry.get_sample_value("tickerproj_ws_items_dropped_total") == 1,
        timeout_s=10, what="the second analytics replacing the first",
    )
    for comm in (chain, options):
        await send(comm, {"action": "ping", "id": "p"})
        assert (await recv(comm))["type"] == "pong"
    await send(chain, {"action": "ack", "seq": 1})
    assert await recv(chain) == orjson.loads(analytics_item(2))
    await send(chain, {"action": "ping"})
    assert (await recv(chain))["type"] == "pong"
    # The options-only subscriber never gets a chain's analytics.
    await send(options, {"action": "ping"})
    assert (await recv(options))["type"] == "pong"
    # After unsubscribing the chain, its analytics stop.
    await send(chain, {"action": "unsubscribe", "chain": {"underlying": "NIFTY", "expiry": EXPIRY.isoformat()}})
    assert (await recv(chain))["type"] == "unsubscribed"
    await redis_layer.group_send(CHAIN, schema.chain_analytics_message(group=CHAIN, item=analytics_item(3)))
    await send(chain, {"action": "ping"})
    assert (await recv(chain))["type"] == "pong"
    for comm in (chain, options):
        await comm.disconnect()


@pytest.mark.parametrize(
    ("bars", "detail"),
    [
        (["NIFTY 50!"], "bars.0: expected an underlying name such as 'NIFTY'"),
        ([""], "bars.0: expected an underlying name such as 'NIFTY'"),
        ([42], "bars.0: expected an underlying name such as 'NIFTY' (1-32 letters, digits, '&', '_', '-', '.', spaces), got int"),
        ("NIFTY", "bars: Input should be a valid list"),
        (["X"] * 21, "bars: List should have at most 20 items"),
        (["A" * 33], "bars.0: expected an underlying name"),
    ],
)
async def test_a_bad_bars_subscribe_gets_a_precise_error(redis_layer, universe, headers, bars, detail):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "id": 3, "bars": bars})
    error = await recv(comm)
    assert (error["type"], error["code"], error["id"]) == ("error", "invalid_message", 3)
    assert error["message"].startswith("invalid subscribe: ") and detail in error["message"], error
    await send(comm, {"action": "ping"})
    assert (await recv(comm))["type"] == "pong"  # nothing else was sent: nothing subscribed
    await comm.disconnect()


async def test_bars_of_unknown_underlyings_the_limit_and_unsubscribe(
    redis_layer, universe, headers, monkeypatch
):
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=headers)
    await send(comm, {"action": "subscribe", "id": 1, "bars": ["NOPE"]})
    assert await recv(comm) == {
        "type": "error", "code": "unknown_underlying", "id": 1, "bars": ["NOPE"],
        "message": "1 underlying(s) have no index or equity to take bars from; they are not followed",
    }  # fmt: skip
    await send(comm, {"action": "subscribe", "id": 2, "bars": ["NIFTY", "NOPE", "nifty"]})
    ack = await recv(comm)
    assert (ack["type"], ack["bars"], ack["unresolved"]) == ("subscribed", ["NIFTY"], [])
    assert (await recv(comm))["code"] == "unknown_underlying"
    assert await recv(comm) == {"type": "bars", "underlying": "NIFTY", "bars": []}

    monkeypatch.setattr(consumers, "MAX_BARS_SUBSCRIPTIONS", 1)
    await send(comm, {"action": "subscribe", "id": 3, "bars": ["BANKNIFTY"]})
    error = await recv(comm)
    assert (error["code"], error["limit"], error["bars"], error["requested"]) == (
        "too_many_subscriptions", 1, 1, 1
    )
    # Already followed: free, and its recent bars are sent again.
    await send(comm, {"action": "subscribe", "id": 4, "bars": ["NIFTY"]})
    assert (await recv(comm))["bars"] == ["NIFTY"]
    assert (await recv(comm))["type"] == "bars"

    bar = schema.encode_bar(token=NIFTY_INDEX, name="NIFTY", start_epoch_s=60, open=1.0, high=1.0,
                            low=1.0, close=1.0, volume=0, ticks=1, is_gap=False, is_mock=True)
    await redis_layer.group_send(schema.bars_group("NIFTY"), schema.bar_closed_message(bar))
    assert await recv(comm) == {"type": "bar", "underlying": "NIFTY", "bar": orjson.loads(bar)}

    await send(comm, {"action": "unsubscribe", "id": 5, "bars": ["NIFTY", "NOPE"]})
    assert await recv(comm) == {"type": "unsubscribed", "id": 5, "tokens": [], "bars": ["NIFTY"],
                                "subscriptions": 0}
    await redis_layer.group_send(schema.bars_group("NIFTY"), schema.bar_closed_message(bar))
    await send(comm, {"action": "ping"})
    assert (await recv(comm))["type"] == "pong"
    await comm.disconnect()
