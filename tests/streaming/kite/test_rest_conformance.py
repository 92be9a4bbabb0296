"""Every response model accepts Kite's official mocks and rejects broken variants by name."""

from __future__ import annotations

import copy
import datetime as dt
import inspect
import json

import pytest
from kiteconnect import KiteConnect

from streaming.kite import rest, schemas
from streaming.kite.rest import KiteResponseError, parse_candles, parse_instruments_csv
from tests.fixtures import KITE_MOCKS

MOCKS = KITE_MOCKS


def mock(name: str):
    return json.loads((MOCKS / name).read_text())["data"]


def csv_bytes(name: str) -> bytes:
    return (MOCKS / name).read_bytes()


# --- the mocks are accepted ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["instruments_all.csv", "instruments_nse.csv"])
def test_instrument_dumps_are_accepted(name):
    text = csv_bytes(name).decode()
    rows = parse_instruments_csv(csv_bytes(name))
    assert len(rows) == text.strip().count("\n")
    by_symbol = {(r.exchange, r.tradingsymbol): r for r in rows}
    # A row of each kind, checked field by field against the CSV text.
    eq = by_symbol[("NSE", "CENTRALBK-BE")]
    assert (eq.instrument_token, eq.exchange_token, eq.expiry, eq.strike) == (3813889, 14898, None, 0.0)
    assert (eq.tick_size, eq.lot_size, eq.instrument_type, eq.segment) == (0.05, 1, "EQ", "NSE")
    if name == "instruments_all.csv":
        options = [r for r in rows if r.instrument_type in ("CE", "PE")]
        assert options and all(r.expiry is not None and r.strike > 0 for r in options)
        assert all(isinstance(r.expiry, dt.date) for r in options)


@pytest.mark.parametrize(
    ("file", "model"),
    [("quote.json", schemas.Quote), ("ltp.json", schemas.LtpQuote), ("ohlc.json", schemas.OhlcQuote)],
)
def test_quote_mocks_are_accepted(file, model):
    data = mock(file)
    for key, item in data.items():
        parsed = rest.validate_item(model, item, endpoint=file, instrument=key)
        assert parsed.instrument_token == item["instrument_token"]
        assert parsed.last_price == item["last_price"]


def test_full_quote_keeps_every_field_and_makes_times_ist():
    item = mock("quote.json")["NSE:INFY"]
    quote = schemas.Quote.model_validate(item)
    assert quote.timestamp == dt.datetime(2021, 6, 8, 15, 45, 56, tzinfo=schemas.IST)
    assert quote.last_trade_time == dt.datetime(2021, 6, 8, 15, 45, 52, tzinfo=schemas.IST)
    assert (quote.volume, quote.oi, quote.sell_quantity) == (7360198, 0, 5191)
    assert quote.ohlc.close == 1389.65
    assert quote.depth is not None and quote.depth.sell[0].price == 1412.95
    assert len(quote.depth.buy) == len(quote.depth.sell) == 5


@pytest.mark.parametrize(("file", "oi"), [("historical_minute.json", False), ("historical_oi.json", True)])
def test_historical_mocks_are_accepted(file, oi):
    data = mock(file)
    candles = parse_candles(data, instrument_token=408065, interval="minute", oi=oi)
    assert len(candles) == len(data["candles"])
    first = data["candles"][0]
    assert candles[0].date == dt.datetime.fromisoformat(first[0])
    assert candles[0].date.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert (candles[0].open, candles[0].close, candles[0].volume) == (first[1], first[4], first[5])
    assert candles[0].oi == (first[6] if oi else None)
    series = rest.CandleSeries.from_candles(candles, instrument_token=408065, interval="minute", oi=oi)
    assert len(series) == len(candles)
    assert str(series.ts[0]) == candles[0].date.astimezone(dt.UTC).replace(tzinfo=None).isoformat()
    assert (series.oi is not None) == oi


def test_profile_session_orders_trades_mocks_are_accepted():
    profile = schemas.Profile.model_validate(mock("profile.json"))
    assert profile.user_id == "AB1234" and "NFO" in profile.exchanges
    session = schemas.Session.model_validate(mock("generate_session.json"))
    assert session.access_token == "XXXXXX" and session.user_id == "XX0000"
    assert session.login_time == dt.datetime(2021, 1, 1, 16, 15, 14, tzinfo=schemas.IST)
    orders = rest.validate_list(schemas.Order, mock("orders.json"), endpoint="orders",
                                describe=rest._describe_order)
    assert len(orders) == len(mock("orders.json"))
    assert {o.status for o in orders} >= {"COMPLETE", "CANCELLED", "REJECTED"}
    for file in ("trades.json", "order_trades.json"):
        trades = rest.validate_list(schemas.Trade, mock(file), endpoint=file,
                                    describe=rest._describe_trade)
        assert len(trades) == len(mock(file))
        assert trades[0].order_timestamp is not None
    assert schemas.OrderPlaced.model_validate(mock("order_response.json")).order_id == "151220000000000"


def test_session_repr_hides_the_access_token():
    session = schemas.Session.model_validate({**mock("generate_session.json"), "access_token": "s3cr3t-token-value"})
    assert "s3cr3t-token-value" not in repr(session)


# --- broken variants are rejected by endpoint, instrument and field --------------------------


def broken(data, path, value):
    data = copy.deepcopy(data)
    target = data
    for part in path[:-1]:
        target = target[part]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("file", "model", "path", "value", "field"),
    [
        ("quote.json", schemas.Quote, ["last_price"], "abc", "last_price"),
        ("quote.json", schemas.Quote, ["ohlc", "close"], None, "ohlc.close"),
        ("quote.json", schemas.Quote, ["ohlc"], DELETE, "ohlc"),
        ("quote.json", schemas.Quote, ["depth", "buy", 0, "quantity"], -5, "depth.buy.0.quantity"),
        ("quote.json", schemas.Quote, ["volume"], 1.5, "volume"),
        ("quote.json", schemas.Quote, ["timestamp"], "yesterday", "timestamp"),
        ("ltp.json", schemas.LtpQuote, ["last_price"], float("nan"), "last_price"),
        ("ltp.json", schemas.LtpQuote, ["instrument_token"], DELETE, "instrument_token"),
        ("ohlc.json", schemas.OhlcQuote, ["ohlc", "high"], float("inf"), "ohlc.high"),
    ],
)
def test_broken_quotes_name_endpoint_instrument_and_field(file, model, path, value, field):
    item = broken(mock(file)["NSE:INFY"], path, value)
    with pytest.raises(KiteResponseError) as info:
        rest.validate_item(model, item, endpoint=file.removesuffix(".json"), instrument="NSE:INFY")
    err = info.value
    assert (err.endpoint, err.instrument, err.field) == (file.removesuffix(".json"), "NSE:INFY", field)
    assert f"field {field!r}" in str(err) and "NSE:INFY" in str(err) and file.removesuffix(".json") in str(err)


@pytest.mark.parametrize(
    ("index", "position", "value", "field"),
    [
        (2, 4, "x", "close"),
        (3, 5, -1, "volume"),
        (1, 0, "not a date", "date"),
        (4, 3, 99999.0, "low"),  # low above high
    ],
)
def test_broken_candles_name_the_candle_and_field(index, position, value, field):
    data = copy.deepcopy(mock("historical_minute.json"))
    data["candles"][index][position] = value
    with pytest.raises(KiteResponseError) as info:
        parse_candles(data, instrument_token=408065, interval="minute", oi=False)
    err = info.value
    assert err.endpoint == "historical" and err.field == field
    assert err.instrument.startswith(f"408065 candle {index} ")


def test_candles_must_ascend_carry_oi_when_asked_and_have_six_or_seven_values():
    data = copy.deepcopy(mock("historical_minute.json"))
    data["candles"][3][0] = data["candles"][2][0]
    with pytest.raises(KiteResponseError, match="not after the previous candle") as info:
        parse_candles(data, instrument_token=1, interval="minute", oi=False)
    assert info.value.field == "date"
    with pytest.raises(KiteResponseError, match="missing though oi was requested") as info:
        parse_candles(mock("historical_minute.json"), instrument_token=1, interval="minute", oi=True)
    assert info.value.field == "oi"
    data = copy.deepcopy(mock("historical_minute.json"))
    data["candles"][0] = data["candles"][0][:5]
    with pytest.raises(KiteResponseError, match="5 values") as info:
        parse_candles(data, instrument_token=1, interval="minute", oi=False)
    assert info.value.instrument.startswith("1 candle 0 ")
    with pytest.raises(KiteResponseError) as info:
        parse_candles({"unexpected": True}, instrument_token=1, interval="minute", oi=False)
    assert info.value.field == "candles"


def test_candles_outside_the_requested_range_are_rejected():
    data = mock("historical_minute.json")
    start = dt.datetime(2017, 12, 15, 9, 16, tzinfo=schemas.IST)
    with pytest.raises(KiteResponseError, match="outside the requested range"):
        parse_candles(data, instrument_token=1, interval="minute", oi=False, start=start)


def replace_line(text: str, line_no: int, column: str, value: str) -> bytes:
    lines = text.splitlines()
    header = lines[0].split(",")
    cells = lines[line_no - 1].split(",")
    cells[header.index(column)] = value
    lines[line_no - 1] = ",".join(cells)
    return ("\n".join(lines) + "\n").encode()


def option_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if ",CE," in line or ",PE," in line)


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("instrument_token", "12ab", "valid integer"),
        ("strike", "nan", "finite number"),
        ("expiry", "2017-13-40", "date"),
        ("expiry", "", "empty for a"),
        ("strike", "0", "not positive"),
        ("instrument_type", "XX", "'EQ', 'FUT', 'CE' or 'PE'"),
        ("lot_size", "-75", "greater than or equal to 0"),
        ("tradingsymbol", "", "at least 1 character"),
        ("tradingsymbol", "X" * 65, "at most 64"),
    ],
)
def test_broken_instrument_rows_name_the_row_and_field(column, value, reason):
    text = csv_bytes("instruments_all.csv").decode()
    line = option_line(text)
    symbol = text.splitlines()[line - 1].split(",")[2]
    with pytest.raises(KiteResponseError) as info:
        parse_instruments_csv(replace_line(text, line, column, value))
    err = info.value
    assert err.endpoint == "instruments" and err.field == column
    assert f"(CSV line {line})" in err.instrument
    if column != "tradingsymbol":
        assert err.instrument.startswith(f"NFO:{symbol} ")
    assert reason in str(err)


def test_instrument_dump_structure_is_checked():
    text = csv_bytes("instruments_nse.csv").decode()
    lines = text.splitlines()
    with pytest.raises(KiteResponseError, match="missing from the CSV header") as info:
        parse_instruments_csv(text.replace("lot_size", "lots", 1).encode())
    assert info.value.field == "lot_size"
    with pytest.raises(KiteResponseError, match="more values than the header"):
        parse_instruments_csv(("\n".join([*lines[:3], lines[3] + ",extra", *lines[4:]]) + "\n").encode())
    with pytest.raises(KiteResponseError, match="no instrument rows"):
        parse_instruments_csv((lines[0] + "\n").encode())
    with pytest.raises(KiteResponseError, match="not UTF-8"):
        parse_instruments_csv(text.encode() + b"\xff\xfe")
    with pytest.raises(KiteResponseError, match="not CSV"):
        parse_instruments_csv({"status": "success"})
    # A truncated download cuts a row short: its missing cells fail validation.
    with pytest.raises(KiteResponseError) as info:
        parse_instruments_csv(text[: len(text) - 20].encode())
    assert info.value.instrument.endswith(f"(CSV line {len(lines)})")


def test_instrument_dump_must_not_repeat_a_token_or_a_symbol():
    text = csv_bytes("instruments_nse.csv").decode()
    lines = text.splitlines()
    token = lines[1].split(",")[0]
    with pytest.raises(KiteResponseError, match="repeats CSV line 2") as info:
        parse_instruments_csv(replace_line(text, 5, "instrument_token", token))
    assert info.value.field == "instrument_token"
    symbol = lines[1].split(",")[2]
    with pytest.raises(KiteResponseError, match="repeats CSV line 2 on NSE") as info:
        parse_instruments_csv(replace_line(text, 5, "tradingsymbol", symbol))
    assert info.value.field == "tradingsymbol"


def test_broken_orders_and_trades_name_the_order():
    orders = broken(mock("orders.json"), [1, "transaction_type"], "HOLD")
    with pytest.raises(KiteResponseError) as info:
        rest.validate_list(schemas.Order, orders, endpoint="orders", describe=rest._describe_order)
    assert info.value.field == "transaction_type"
    assert info.value.instrument == "order 300000000000000 (NSE:IOC)"
    trades = broken(mock("trades.json"), [0, "quantity"], 0)
    with pytest.raises(KiteResponseError) as info:
        rest.validate_list(schemas.Trade, trades, endpoint="trades", describe=rest._describe_trade)
    assert (info.value.field, info.value.instrument) == ("quantity", "trade 10000000 (NSE:SBIN)")
    with pytest.raises(KiteResponseError, match="not a list"):
        rest.validate_list(schemas.Trade, {"x": 1}, endpoint="trades", describe=rest._describe_trade)


def test_broken_session_never_shows_the_token():
    secret = "0123456789abcdef0123456789abcdef"
    data = {**mock("generate_session.json"), "access_token": ["not", "a", "string", secret]}
    with pytest.raises(KiteResponseError) as info:
        rest.validate_item(schemas.Session, data, endpoint="session")
    assert info.value.field == "access_token"
    assert secret not in str(info.value) and "<redacted>" in str(info.value)
    with pytest.raises(KiteResponseError) as info:
        rest.validate_item(schemas.Session, broken(mock("generate_session.json"), ["user_id"], DELETE),
                           endpoint="session")
    assert info.value.field == "user_id"


# --- the kiteconnect surface the client relies on -------------------------------------------

ROUTES_USED = {
    "market.instruments.all": "/instruments",
    "market.instruments": "/instruments/{exchange}",
    "market.quote": "/quote",
    "market.quote.ltp": "/quote/ltp",
    "market.quote.ohlc": "/quote/ohlc",
    "market.historical": "/instruments/historical/{instrument_token}/{interval}",
    "user.profile": "/user/profile",
    "api.token": "/session/token",
    "orders": "/orders",
    "trades": "/trades",
    "order.trades": "/orders/{order_id}/trades",
    "order.place": "/orders/{variety}",
}


def test_kiteconnect_private_surface_is_what_the_client_calls():
    for route, path in ROUTES_USED.items():
        assert KiteConnect._routes[route] == path
    params = list(inspect.signature(KiteConnect._request).parameters)
    assert params[:6] == ["self", "route", "method", "url_args", "params", "is_json"]
    kite = KiteConnect("key", access_token="token", root="http://127.0.0.1:9", timeout=3)
    assert (kite.root, kite.timeout) == ("http://127.0.0.1:9", 3)
