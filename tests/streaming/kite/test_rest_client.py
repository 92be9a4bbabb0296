"""KiteRestClient against the loopback Kite simulator: validation, retries, errors, secrets."""

from __future__ import annotations

import datetime as dt
import itertools
import math

import numpy as np
import pytest

from streaming.kite.limits import HISTORICAL_MAX_DAYS_PER_INTERVAL, QUOTE_MAX_INSTRUMENTS_PER_CALL
from streaming.kite.rest import (
    KiteDataError,
    KiteGeneralError,
    KiteInputError,
    KiteNetworkError,
    KiteOrderError,
    KitePermissionError,
    KiteRateLimiter,
    KiteResponseError,
    KiteRestClient,
    KiteTokenError,
    KiteTransportError,
    historical_chunks,
)
from streaming.market import IST, SyntheticMarket
from streaming.sim.simulator import KiteSimulator, SimulatorThread

API_KEY = "restkey"
API_SECRET = "s" * 16 + "0123456789abcdef"
ACCESS_TOKEN = "t" * 16 + "fedcba9876543210"
THURSDAY_14_IST = dt.datetime(2026, 11, 19, 14, 0, tzinfo=IST).timestamp()
ATTEMPTS = 3


@pytest.fixture
def sim():
    market = SyntheticMarket(seed=7, now_fn=lambda: THURSDAY_14_IST)
    simulator = KiteSimulator(market=market, tick_interval_ms=1000)
    simulator.register_account(api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    with SimulatorThread(simulator) as thread:
        yield thread


def requests_to(sim, route: str) -> int:
    return sim.call(lambda: sim.sim.rest_requests.get(route, 0))


@pytest.fixture
def fast_limiter():
    """In-process pacing fast enough not to slow the tests (limits are tested elsewhere)."""
    return KiteRateLimiter(requests_per_s={"quote": 1000, "historical": 1000, "other": 1000})


def make_client(sim, limiter, **kwargs) -> KiteRestClient:
    options = {
        "api_key": API_KEY,
        "access_token": ACCESS_TOKEN,
        "api_root": sim.http_url,
        "rate_limiter": limiter,
        "retry_attempts": ATTEMPTS,
        "retry_multiplier_s": 0.01,
        "retry_max_wait_s": 0.05,
        "retry_jitter_s": 0.01,
    }
    return KiteRestClient(**{**options, **kwargs})


@pytest.fixture
def client(sim, fast_limiter):
    with make_client(sim, fast_limiter) as c:
        yield c


def first_option(client: KiteRestClient):
    return next(r for r in client.instruments("NFO") if r.instrument_type == "CE")


# --- market data ------------------------------------------------------------------------------


def test_instruments_all_and_by_exchange_match_the_dump(client, sim):
    rows = client.instruments()
    market_rows = sim.call(lambda: sim.sim.market.instruments)
    assert [r.instrument_token for r in rows] == [m["instrument_token"] for m in market_rows]
    nfo = client.instruments("NFO")
    assert nfo and {r.exchange for r in nfo} == {"NFO"}
    assert len(nfo) == sum(1 for m in market_rows if m["exchange"] == "NFO")
    option = next(r for r in nfo if r.instrument_type == "PE")
    source = next(m for m in market_rows if m["instrument_token"] == option.instrument_token)
    assert (option.tradingsymbol, option.expiry, option.strike) == (
        source["tradingsymbol"], source["expiry"], source["strike"]
    )
    assert requests_to(sim, "market.instruments.all") == 1
    assert requests_to(sim, "market.instruments") == 1


def test_quote_ltp_ohlc_are_validated_and_keyed_as_requested(client, sim):
    option = first_option(client)
    keys = [f"NFO:{option.tradingsymbol}", option.instrument_token, "NSE:NIFTY 50", "NSE:NO SUCH"]
    quotes = client.quote(keys)
    assert list(quotes) == [f"NFO:{option.tradingsymbol}", str(option.instrument_token), "NSE:NIFTY 50"]
    expected = sim.call(sim.sim.market.quote, [option.instrument_token])[option.instrument_token]
    got = quotes[str(option.instrument_token)]
    assert got.instrument_token == option.instrument_token
    assert got.last_price == expected["last_price"] and got.volume == expected["volume"]
    assert got.depth is not None and got.depth.buy[0].price == expected["depth"]["buy"][0]["price"]
    assert got.timestamp is not None and got.timestamp.utcoffset() == dt.timedelta(hours=5, minutes=30)
    ltp = client.ltp(["NSE:NIFTY 50"])["NSE:NIFTY 50"]
    ohlc = client.ohlc(["NSE:NIFTY 50"])["NSE:NIFTY 50"]
    assert ltp.last_price == ohlc.last_price == quotes["NSE:NIFTY 50"].last_price
    assert ohlc.ohlc.low <= ohlc.ohlc.high


def test_quotes_are_split_into_calls_of_kites_maximum(client, sim):
    tokens = [r.instrument_token for r in client.instruments()]
    # Unknown tokens pad the request past one call's maximum; Kite leaves them out.
    unknown = [str(9_000_000_000 + i) for i in range(QUOTE_MAX_INSTRUMENTS_PER_CALL + 10 - len(tokens))]
    result = client.ltp([*tokens, *unknown])
    assert set(result) == {str(t) for t in tokens}
    assert requests_to(sim, "market.quote.ltp") == 2


def test_historical_is_split_by_kites_span_per_interval(client, sim):
    token = client.instruments("NSE")[0].instrument_token
    start, end = dt.datetime(2026, 3, 2, 9, 15), dt.datetime(2026, 11, 18, 15, 30)
    series = client.historical(token, start, end, "minute")
    calls = math.ceil((end - start) / dt.timedelta(days=HISTORICAL_MAX_DAYS_PER_INTERVAL["minute"]))
    assert requests_to(sim, "market.historical") == calls
    assert len(series) > 60_000 and series.oi is None
    assert np.all(np.diff(series.ts.astype(np.int64)) > 0)
    assert series.ts[0] == np.datetime64("2026-03-02T03:45:00")  # 09:15 IST in UTC
    # The same candles as one direct request to the market for the last day.
    raw = sim.call(sim.sim.market.historical, token, dt.datetime(2026, 11, 18, 9, 15), end, "minute")
    assert [c[4] for c in raw] == series.close[-len(raw):].tolist()
    assert [c[5] for c in raw] == series.volume[-len(raw):].tolist()


def test_historical_with_oi_and_day_candles(client, sim):
    option = first_option(client)
    series = client.historical(option.instrument_token, dt.date(2026, 11, 16), dt.date(2026, 11, 19),
                               "minute", oi=True)
    assert series.oi is not None and len(series.oi) == len(series) > 0
    assert np.all(series.oi > 0)
    assert np.all(series.low <= series.high)
    day = client.historical(option.instrument_token, dt.date(2026, 11, 2), dt.date(2026, 11, 18), "day")
    assert len(day) == 13  # trading days from 2 to 18 November
    assert requests_to(sim, "market.historical") == 2


def test_historical_refuses_an_unknown_interval_before_calling_kite(client, sim):
    with pytest.raises(ValueError, match="invalid candle interval"):
        client.historical(256265, dt.date(2026, 11, 1), dt.date(2026, 11, 2), "2minute")
    assert requests_to(sim, "market.historical") == 0


def test_historical_chunks_cover_the_range_without_overlap():
    start = dt.datetime(2026, 1, 1, tzinfo=IST)
    end = dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=IST)
    chunks = historical_chunks(start, end, interval="minute")
    assert chunks[0][0] == start and chunks[-1][1] == end
    for (_, prev_end), (next_start, _) in itertools.pairwise(chunks):
        assert next_start - prev_end == dt.timedelta(seconds=1)
    assert all(e - s < dt.timedelta(days=60) for s, e in chunks)
    assert len(chunks) == 7
    assert historical_chunks(start, start, interval="day") == [(start, start)]


# --- user, session, orders --------------------------------------------------------------------


def test_profile(client, sim):
    profile = client.profile()
    assert profile.user_id == sim.call(lambda: sim.sim._account(API_KEY).user_id)
    assert "NFO" in profile.exchanges


def test_order_round_trip(client, sim):
    option = first_option(client)
    order_id = client.place_order(
        variety="regular", exchange="NFO", tradingsymbol=option.tradingsymbol,
        transaction_type="BUY", quantity=option.lot_size, product="NRML", order_type="MARKET",
        tag="resttest",
    )
    orders = {o.order_id: o for o in client.orders()}
    assert orders[order_id].status == "COMPLETE" and orders[order_id].tag == "resttest"
    assert orders[order_id].filled_quantity == option.lot_size
    trades = client.order_trades(order_id)
    assert [t.order_id for t in trades] == [order_id]
    assert sum(t.quantity for t in trades) == option.lot_size
    assert [t.trade_id for t in client.trades()] == [t.trade_id for t in trades]


def test_invalid_order_is_an_input_error_and_not_retried(client, sim):
    option = first_option(client)
    with pytest.raises(KiteInputError, match="multiple of lot size") as info:
        client.place_order(
            variety="regular", exchange="NFO", tradingsymbol=option.tradingsymbol,
            transaction_type="BUY", quantity=option.lot_size + 1, product="NRML", order_type="MARKET",
        )
    assert (info.value.status, info.value.error_type) == (400, "InputException")
    assert info.value.instrument == f"NFO:{option.tradingsymbol}"
    assert requests_to(sim, "order.place") == 1


def test_generate_session_exchanges_the_request_token(sim, fast_limiter):
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    with make_client(sim, fast_limiter, access_token="") as c:
        session = c.generate_session(request_token=request_token, api_secret=API_SECRET)
    assert session.access_token == sim.call(sim.sim.access_token, API_KEY)
    assert session.user_id and session.api_key == API_KEY
    assert session.login_time is not None and session.login_time.tzinfo is not None


def test_wrong_secret_is_a_token_error_without_the_secret(sim, fast_limiter):
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    wrong_secret = "w" * 32
    with make_client(sim, fast_limiter, access_token="") as c, pytest.raises(KiteTokenError) as info:
        c.generate_session(request_token=request_token, api_secret=wrong_secret)
    assert info.value.status == 403 and not info.value.retryable
    assert wrong_secret not in str(info.value) and request_token not in str(info.value)
    assert requests_to(sim, "api.token") == 1


# --- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(429, "NetworkException"), (503, "NetworkException"), (500, "GeneralException"),
     (502, "DataException"), (504, "GeneralException")],
)
def test_transient_errors_are_retried(client, sim, status, error_type):
    sim.call(sim.sim.fail_next, "market.quote.ltp", status, error_type, times=ATTEMPTS - 1)
    assert client.ltp(["NSE:NIFTY 50"])["NSE:NIFTY 50"].last_price > 0
    assert requests_to(sim, "market.quote.ltp") == ATTEMPTS


def test_retries_stop_after_the_last_attempt_with_the_last_error(client, sim):
    sim.call(sim.sim.fail_next, "user.profile", 503, "NetworkException", times=ATTEMPTS + 5)
    with pytest.raises(KiteNetworkError) as info:
        client.profile()
    assert info.value.status == 503 and info.value.retryable
    assert "profile" in str(info.value) and "NetworkException" in str(info.value)
    assert requests_to(sim, "user.profile") == ATTEMPTS


@pytest.mark.parametrize("kind", ["html", "truncated"])
def test_proxy_pages_and_cut_bodies_are_retried(client, sim, kind):
    sim.call(sim.sim.corrupt_next, "market.quote", kind=kind)
    assert client.quote(["NSE:NIFTY 50"])["NSE:NIFTY 50"].last_price > 0
    assert requests_to(sim, "market.quote") == 2


def test_dropped_connections_and_timeouts_are_retried(sim, fast_limiter):
    with make_client(sim, fast_limiter, timeout_s=0.3) as c:
        sim.call(sim.sim.drop_next, "orders")
        assert c.orders() == []
        assert requests_to(sim, "orders") == 2
        sim.call(sim.sim.delay_next, "trades", 1.0)
        assert c.trades() == []
        assert requests_to(sim, "trades") == 2
        sim.call(sim.sim.delay_next, "user.profile", 1.0, times=ATTEMPTS)
        with pytest.raises(KiteTransportError, match="Timeout") as info:
            c.profile()
        assert info.value.retryable


@pytest.mark.parametrize(
    ("status", "error_type", "error_class"),
    [
        (403, "TokenException", KiteTokenError),
        (400, "InputException", KiteInputError),
        (403, "PermissionException", KitePermissionError),
        (500, "OrderException", KiteOrderError),
    ],
)
def test_token_input_permission_and_order_errors_are_never_retried(client, sim, status, error_type,
                                                                     error_class):
    sim.call(sim.sim.fail_next, "orders", status, error_type, times=ATTEMPTS)
    with pytest.raises(error_class) as info:
        client.orders()
    assert (info.value.status, info.value.error_type) == (status, error_type)
    assert not info.value.retryable
    assert requests_to(sim, "orders") == 1


def test_an_expired_token_is_a_token_error(client, sim):
    sim.call(sim.sim.expire_token, API_KEY)
    with pytest.raises(KiteTokenError):
        client.ltp(["NSE:NIFTY 50"])
    assert requests_to(sim, "market.quote.ltp") == 1


def test_orders_are_not_resent_when_kite_may_have_received_them(client, sim):
    option = first_option(client)
    order = {
        "variety": "regular", "exchange": "NFO", "tradingsymbol": option.tradingsymbol,
        "transaction_type": "BUY", "quantity": option.lot_size, "product": "NRML",
        "order_type": "MARKET",
    }
    sim.call(sim.sim.drop_next, "order.place")
    with pytest.raises(KiteTransportError) as info:
        client.place_order(**order)
    assert info.value.request_sent
    sim.call(sim.sim.fail_next, "order.place", 503, "NetworkException")
    with pytest.raises(KiteNetworkError):
        client.place_order(**order)
    assert requests_to(sim, "order.place") == 2
    # A 429 was refused before processing: that one is retried, and the order placed once.
    sim.call(sim.sim.fail_next, "order.place", 429, "NetworkException")
    order_id = client.place_order(**order)
    assert requests_to(sim, "order.place") == 4
    assert [o["order_id"] for o in sim.call(sim.sim.orders, API_KEY)] == [order_id]


# --- bad responses ----------------------------------------------------------------------------


def test_a_response_of_the_wrong_shape_is_one_clear_error(client, sim):
    sim.call(sim.sim.corrupt_next, "market.quote.ohlc", kind="wrong_shape")
    with pytest.raises(KiteResponseError) as info:
        client.ohlc(["NSE:NIFTY 50"])
    assert (info.value.endpoint, info.value.field, info.value.got) == ("ohlc", "data", "unexpected")
    sim.call(sim.sim.corrupt_next, "market.historical", kind="wrong_shape")
    with pytest.raises(KiteResponseError) as info:
        client.historical(256265, dt.date(2026, 11, 18), dt.date(2026, 11, 18), "minute")
    assert (info.value.endpoint, info.value.instrument, info.value.field) == ("historical", "256265", "candles")
    sim.call(sim.sim.corrupt_next, "user.profile", kind="wrong_shape")
    with pytest.raises(KiteResponseError) as info:
        client.profile()
    assert info.value.field == "user_id" and "field required" in str(info.value)
    # Not transient: one request each.
    assert requests_to(sim, "market.quote.ohlc") == 1
    assert requests_to(sim, "user.profile") == 1


def test_errors_never_carry_the_access_token(client, sim):
    sim.call(sim.sim.fail_next, "user.profile", 403, "TokenException",
             message=f"token {ACCESS_TOKEN} is not valid for {API_KEY}")
    with pytest.raises(KiteTokenError) as info:
        client.profile()
    assert ACCESS_TOKEN not in str(info.value)
    assert "***" in str(info.value) and API_KEY in str(info.value)
    assert ACCESS_TOKEN not in repr(client)


def test_error_classes_keep_kites_error_type():
    assert issubclass(KiteDataError, Exception) and issubclass(KiteGeneralError, Exception)
    error = KiteGeneralError("boom", endpoint="quote", error_type="GeneralException", status=502)
    assert error.retryable and "HTTP 502" in str(error)
    error = KiteGeneralError("bad", endpoint="quote", error_type="GeneralException", status=400)
    assert not error.retryable


def test_day_candles_of_a_range_starting_mid_day_are_kept_once(client, sim):
    token = client.instruments("NSE")[0].instrument_token
    start, end = dt.datetime(2025, 3, 3, 11, 0), dt.datetime(2026, 11, 18, 15, 30)
    series = client.historical(token, start, end, "day")
    assert requests_to(sim, "market.historical") == 1
    assert series.ts[0] == np.datetime64("2025-03-02T18:30:00")  # 3 March 00:00 IST
    # 2000 days on, the second call starts at 11:00 on a Tuesday whose candle both calls return.
    long = client.historical(token, dt.datetime(2020, 3, 5, 11, 0), end, "day")
    assert requests_to(sim, "market.historical") == 1 + 2  # more than 2000 days: two calls
    assert np.all(np.diff(long.ts.astype(np.int64)) > 0)
    assert long.ts[-len(series):].tolist() == series.ts.tolist()
