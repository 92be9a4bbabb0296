"""The simulator's REST side, driven by the official kiteconnect.KiteConnect client."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from kiteconnect import KiteConnect
from kiteconnect import exceptions as kex

from streaming.kite.simulator import KiteSimulator, SimulatorThread
from streaming.market import IST, SyntheticMarket
from tests.fixtures import KITE_MOCKS

MOCKS = KITE_MOCKS
API_KEY, API_SECRET, ACCESS_TOKEN = "simkey", "simsecret", "simtoken"
# Thursday 19 November 2026, 14:00 IST.
THURSDAY_14_IST = datetime(2026, 11, 19, 14, 0, tzinfo=IST).timestamp()


def mock_data(name: str):
    return json.loads((MOCKS / name).read_text())["data"]


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def monotonic():
    return FakeMonotonic()


@pytest.fixture
def sim(monotonic):
    market = SyntheticMarket(seed=21, now_fn=lambda: THURSDAY_14_IST)
    simulator = KiteSimulator(market=market, tick_interval_ms=50, monotonic_fn=monotonic)
    simulator.register_account(api_key=API_KEY, api_secret=API_SECRET, access_token=ACCESS_TOKEN)
    with SimulatorThread(simulator) as thread:
        yield thread


@pytest.fixture
def kite(sim):
    return KiteConnect(API_KEY, access_token=ACCESS_TOKEN, root=sim.http_url)


def option_symbol(kite: KiteConnect) -> str:
    return next(i["tradingsymbol"] for i in kite.instruments("NFO") if i["instrument_type"] == "CE")


# --- market data ----------------------------------------------------------------------------


def test_instruments_all_and_by_exchange(kite, sim):
    everything = kite.instruments()
    assert len(everything) == len(sim.sim.market.instruments)
    nse = kite.instruments("NSE")
    assert [i["tradingsymbol"] for i in nse] == ["NIFTY 50", "NIFTY BANK"]
    nfo = kite.instruments("NFO")
    assert {i["segment"] for i in nfo} == {"NFO-FUT", "NFO-OPT"}
    assert len(nse) + len(nfo) == len(everything)


def test_quote_ltp_ohlc_have_kites_shapes(kite):
    symbol = option_symbol(kite)
    keys = ("NSE:NIFTY 50", f"NFO:{symbol}")
    quotes = kite.quote(*keys)
    assert set(quotes) == set(keys)
    mock = mock_data("quote.json")["NSE:INFY"]
    for quote in quotes.values():
        assert set(quote) == set(mock)
        assert set(quote["depth"]) == {"buy", "sell"}
        assert isinstance(quote["timestamp"], datetime)  # kiteconnect parsed Kite's format
    ltp = kite.ltp(*keys)
    assert set(ltp[keys[0]]) == set(mock_data("ltp.json")["NSE:INFY"])
    ohlc = kite.ohlc(*keys)
    assert set(ohlc[keys[1]]) == set(mock_data("ohlc.json")["NSE:INFY"])
    assert ohlc[keys[0]]["instrument_token"] == 256265


def test_quote_leaves_unknown_instruments_out_and_accepts_tokens(kite):
    got = kite.ltp("NSE:NIFTY 50", "NFO:NOSUCH26NOV1CE", "260105")
    assert set(got) == {"NSE:NIFTY 50", "260105"}
    with pytest.raises(kex.InputException, match="Too many instruments"):
        kite.ltp(*[f"NSE:X{i}" for i in range(501)])


def test_historical_data_with_and_without_oi(kite):
    token = next(i["instrument_token"] for i in kite.instruments("NFO") if i["instrument_type"] == "PE")
    start, end = datetime(2026, 11, 18, 9, 15), datetime(2026, 11, 18, 15, 29)
    plain = kite.historical_data(token, start, end, "minute")
    with_oi = kite.historical_data(token, start, end, "minute", oi=True)
    assert len(plain) == len(with_oi) == 375
    assert "oi" not in plain[0] and with_oi[0]["oi"] > 0
    assert plain[0]["date"] == datetime(2026, 11, 18, 9, 15, tzinfo=IST)
    assert [c["close"] for c in plain] == [c["close"] for c in with_oi]
    day = kite.historical_data(256265, "2026-11-02", "2026-11-19", "day")
    assert len(day) == 14  # weekdays from 2 to 19 November


def test_historical_rejects_what_kite_rejects(kite):
    with pytest.raises(kex.InputException, match="interval"):
        kite.historical_data(256265, "2026-11-18", "2026-11-19", "2minute")
    with pytest.raises(kex.InputException, match="60 days"):
        kite.historical_data(256265, datetime(2026, 8, 1), datetime(2026, 11, 18), "minute")
    with pytest.raises(kex.InputException, match="invalid token"):
        kite.historical_data(1, "2026-11-18", "2026-11-19", "minute")
    with pytest.raises(kex.InputException, match="from"):
        kite.historical_data(256265, "yesterday", "2026-11-19", "minute")


# --- session and user -----------------------------------------------------------------------


def test_generate_session_with_the_real_checksum(sim):
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    kite = KiteConnect(API_KEY, root=sim.http_url)
    session = kite.generate_session(request_token, API_SECRET)
    assert set(mock_data("generate_session.json")) <= set(session)
    assert kite.access_token == session["access_token"] != ACCESS_TOKEN
    assert isinstance(session["login_time"], datetime)
    assert kite.profile()["user_id"] == session["user_id"]
    # The old token stopped working, and the request token was single use.
    with pytest.raises(kex.TokenException):
        KiteConnect(API_KEY, access_token=ACCESS_TOKEN, root=sim.http_url).profile()
    with pytest.raises(kex.TokenException, match="invalid or has expired"):
        KiteConnect(API_KEY, root=sim.http_url).generate_session(request_token, API_SECRET)


def test_generate_session_with_a_wrong_checksum_is_a_token_error(sim):
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    with pytest.raises(kex.TokenException, match="checksum") as error:
        KiteConnect(API_KEY, root=sim.http_url).generate_session(request_token, "not-the-secret")
    assert error.value.code == 403
    # The same token still works with the right secret: a bad checksum does not burn it.
    checksum = hashlib.sha256((API_KEY + request_token + API_SECRET).encode()).hexdigest()
    response = requests.post(
        f"{sim.http_url}/session/token",
        data={"api_key": API_KEY, "request_token": request_token, "checksum": checksum},
        headers={"X-Kite-Version": "3"},
        timeout=5,
    )
    assert response.status_code == 200
    assert response.json()["data"]["access_token"] == sim.call(sim.sim.access_token, API_KEY)


def test_invalidate_access_token_logs_out(sim, kite):
    assert kite.invalidate_access_token() is True
    with pytest.raises(kex.TokenException):
        kite.profile()


def test_profile_and_margins_have_kites_shapes(kite):
    assert set(kite.profile()) == set(mock_data("profile.json"))
    margins = kite.margins()
    mock = mock_data("margins.json")
    assert set(margins) == set(mock)
    assert set(margins["equity"]["available"]) == set(mock["equity"]["available"])
    assert set(margins["equity"]["utilised"]) == set(mock["equity"]["utilised"])
    assert set(kite.margins("commodity")) == set(mock["commodity"])


def test_bad_token_is_a_403_token_exception_and_calls_the_expiry_hook(sim):
    expired = []
    kite = KiteConnect(API_KEY, access_token="wrong", root=sim.http_url)
    kite.set_session_expiry_hook(lambda: expired.append(True))
    with pytest.raises(kex.TokenException) as error:
        kite.quote("NSE:NIFTY 50")
    assert error.value.code == 403
    assert expired == [True]


def test_expire_token_turns_rest_calls_into_token_errors(sim, kite):
    assert kite.profile()
    sim.call(sim.sim.expire_token, API_KEY)
    with pytest.raises(kex.TokenException):
        kite.profile()
    sim.call(sim.sim.set_access_token, API_KEY, "fresh")
    kite.set_access_token("fresh")
    assert kite.profile()["user_id"]


def test_requests_without_the_kite_version_header_are_refused(sim):
    response = requests.get(
        f"{sim.http_url}/user/profile",
        headers={"Authorization": f"token {API_KEY}:{ACCESS_TOKEN}"},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["error_type"] == "InputException"


def test_unknown_routes_answer_with_kites_error_envelope(sim):
    response = requests.get(f"{sim.http_url}/nope", headers={"X-Kite-Version": "3"}, timeout=5)
    assert response.status_code == 404
    assert response.json()["status"] == "error"


# --- orders ---------------------------------------------------------------------------------


def test_market_order_fills_and_shows_in_orders_trades_and_positions(kite):
    symbol = option_symbol(kite)
    order_id = kite.place_order(
        variety="regular",
        exchange="NFO",
        tradingsymbol=symbol,
        transaction_type="BUY",
        quantity=150,
        product="NRML",
        order_type="MARKET",
    )
    orders = kite.orders()
    assert [o["order_id"] for o in orders] == [order_id]
    assert orders[0]["status"] == "COMPLETE"
    assert set(mock_data("orders.json")[0]) <= set(orders[0])
    history = kite.order_history(order_id)
    assert [h["status"] for h in history] == ["PUT ORDER REQ RECEIVED", "OPEN", "COMPLETE"]
    trades = kite.order_trades(order_id)
    assert len(trades) == 1 and trades[0]["quantity"] == 150
    assert set(mock_data("trades.json")[0]) == set(trades[0])
    assert kite.trades() == trades
    positions = kite.positions()
    assert set(positions) == {"net", "day"}
    assert set(mock_data("positions.json")["net"][0]) == set(positions["net"][0])
    assert positions["net"][0]["quantity"] == 150


def test_limit_order_rests_then_is_modified_and_cancelled(kite):
    symbol = option_symbol(kite)
    order_id = kite.place_order(
        variety="regular",
        exchange="NFO",
        tradingsymbol=symbol,
        transaction_type="BUY",
        quantity=75,
        product="NRML",
        order_type="LIMIT",
        price=0.05,
    )
    assert kite.order_history(order_id)[-1]["status"] == "OPEN"
    assert kite.modify_order(variety="regular", order_id=order_id, quantity=150, price=0.1) == order_id
    modified = kite.order_history(order_id)[-1]
    assert (modified["quantity"], modified["price"], modified["modified"]) == (150, 0.1, True)
    assert kite.cancel_order(variety="regular", order_id=order_id) == order_id
    cancelled = kite.order_history(order_id)[-1]
    assert (cancelled["status"], cancelled["cancelled_quantity"]) == ("CANCELLED", 150)
    assert kite.order_trades(order_id) == []
    with pytest.raises(kex.InputException, match="CANCELLED"):
        kite.cancel_order(variety="regular", order_id=order_id)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantity": 10}, "multiple of lot size"),
        ({"tradingsymbol": "NOSUCH"}, "tradingsymbol"),
        ({"transaction_type": "HOLD"}, "transaction_type"),
        ({"order_type": "LIMIT"}, "price"),
    ],
)
def test_invalid_orders_are_input_exceptions(kite, change, message):
    order = {
        "variety": "regular",
        "exchange": "NFO",
        "tradingsymbol": option_symbol(kite),
        "transaction_type": "BUY",
        "quantity": 75,
        "product": "NRML",
        "order_type": "MARKET",
        **change,
    }
    with pytest.raises(kex.InputException, match=message) as error:
        kite.place_order(**order)
    assert error.value.code == 400
    assert kite.orders() == []


# --- REST fault injection -------------------------------------------------------------------


def test_fail_next_answers_with_kites_error_body_the_given_number_of_times(sim, kite):
    sim.call(sim.sim.fail_next, "market.quote.ltp", 503, "NetworkException", times=2)
    for _ in range(2):
        with pytest.raises(kex.NetworkException) as error:
            kite.ltp("NSE:NIFTY 50")
        assert error.value.code == 503
    assert kite.ltp("NSE:NIFTY 50")["NSE:NIFTY 50"]["last_price"] > 0
    # Faults are per route: other endpoints were never affected.
    sim.call(sim.sim.fail_next, "market.historical", 500, "GeneralException")
    assert kite.ltp("NSE:NIFTY 50")
    with pytest.raises(kex.GeneralException):
        kite.historical_data(256265, "2026-11-18", "2026-11-19", "minute")


def test_corrupt_next_returns_malformed_bodies(sim, kite):
    sim.call(sim.sim.corrupt_next, "market.quote")
    with pytest.raises(kex.DataException, match="parse the JSON"):
        kite.quote("NSE:NIFTY 50")
    sim.call(sim.sim.corrupt_next, "market.quote", kind="html")
    with pytest.raises(kex.DataException, match="Unknown Content-Type"):
        kite.quote("NSE:NIFTY 50")
    sim.call(sim.sim.corrupt_next, "market.quote.ltp", kind="wrong_shape")
    assert kite.ltp("NSE:NIFTY 50") == {"unexpected": True}  # kiteconnect does not validate
    assert "NSE:NIFTY 50" in kite.ltp("NSE:NIFTY 50")


def test_drop_next_closes_the_connection_without_an_answer(sim, kite):
    sim.call(sim.sim.drop_next, "user.profile")
    with pytest.raises(requests.ConnectionError):
        kite.profile()
    assert kite.profile()


def test_delay_next_lets_a_client_time_out(sim):
    sim.call(sim.sim.delay_next, "user.profile", 2.0)
    slow = KiteConnect(API_KEY, access_token=ACCESS_TOKEN, root=sim.http_url, timeout=0.3)
    with pytest.raises(requests.Timeout):
        slow.profile()


def test_rate_limits_when_enforced(sim, kite, monotonic):
    sim.call(setattr, sim.sim, "enforce_rate_limits", True)
    assert kite.quote("NSE:NIFTY 50")
    with pytest.raises(kex.NetworkException, match="Too many requests") as error:
        kite.quote("NSE:NIFTY 50")
    assert error.value.code == 429
    # Other buckets have their own budget: 10 per second for everything else.
    for _ in range(10):
        kite.profile()
    with pytest.raises(kex.NetworkException):
        kite.profile()
    monotonic.now += 1.0
    assert kite.quote("NSE:NIFTY 50")
    assert kite.profile()


def test_simulator_thread_counts_requests_per_route(sim, kite):
    kite.profile()
    kite.profile()
    counts = sim.call(lambda: dict(sim.sim.rest_requests))
    assert counts["user.profile"] == 2
    assert sim.call(sim.sim.market.spot, "NIFTY") > 0
    now = sim.call(lambda: sim.sim.market.now_epoch_s)
    assert now == THURSDAY_14_IST


def test_simulator_thread_reports_a_port_in_use():
    market = SyntheticMarket(seed=1)
    with SimulatorThread(KiteSimulator(market=market)) as first:
        taken = KiteSimulator(market=market, port=first.sim.port)
        with pytest.raises(RuntimeError, match="failed to start"):
            SimulatorThread(taken).start()


def test_login_time_is_ist_wall_clock(sim):
    request_token = sim.call(sim.sim.issue_request_token, API_KEY)
    session = KiteConnect(API_KEY, root=sim.http_url).generate_session(request_token, API_SECRET)
    now_ist = datetime.now(IST).replace(tzinfo=None)
    assert abs(session["login_time"] - now_ist) < timedelta(minutes=1)


def test_login_page_redirects_with_a_request_token_that_buys_a_session():
    market = SyntheticMarket(seed=2, strikes_each_side=1)
    simulator = KiteSimulator(market=market)
    simulator.register_account(
        api_key="loginkey", api_secret="loginsecret", redirect_url="http://app.invalid/kite/callback?next=x"
    )
    with SimulatorThread(simulator) as sim:
        response = requests.get(
            sim.login_url, params={"api_key": "loginkey", "v": "3"}, allow_redirects=False, timeout=5
        )
        assert response.status_code == 302
        target = urlsplit(response.headers["Location"])
        assert (target.netloc, target.path) == ("app.invalid", "/kite/callback")
        query = parse_qs(target.query)
        assert query["status"] == ["success"] and query["next"] == ["x"]
        kite = KiteConnect("loginkey", root=sim.http_url)
        session = kite.generate_session(query["request_token"][0], "loginsecret")
        assert kite.profile()["user_id"] == session["user_id"]
        unknown = requests.get(sim.login_url, params={"api_key": "nope"}, allow_redirects=False, timeout=5)
        assert unknown.status_code == 400
        assert unknown.json()["error_type"] == "InputException"
