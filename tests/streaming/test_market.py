"""SyntheticMarket: the instrument universe, the random walk, prices and candles."""

from __future__ import annotations

import csv
import io
import math
from datetime import date, datetime, timedelta

import numpy as np
import pytest
from kiteconnect import KiteConnect, KiteTicker

from streaming.greeks import black76_price
from streaming.kite.codec import decode_frame, encode_frame
from streaming.market import (
    IST,
    SyntheticMarket,
    future_tradingsymbol,
    option_tradingsymbol,
)
from streaming.nse_calendar import monthly_expiries, weekly_expiries
from tests.fixtures import KITE_MOCKS

MOCKS = KITE_MOCKS
# Wednesday 18 November 2026, 11:00 IST: mid-session, between two NIFTY weekly expiries.
WEDNESDAY_11_IST = datetime(2026, 11, 18, 11, 0, tzinfo=IST).timestamp()
SECONDS_PER_YEAR = 365.0 * 86400.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_market(seed: int = 7, now: float = WEDNESDAY_11_IST, **kwargs) -> SyntheticMarket:
    return SyntheticMarket(seed=seed, now_fn=Clock(now), **kwargs)


def rows_where(market: SyntheticMarket, **match) -> list[dict]:
    return [r for r in market.instruments if all(r[k] == v for k, v in match.items())]


def option_pairs(market: SyntheticMarket, name: str):
    """(expiry, strike, call row, put row) for every strike of an underlying."""
    calls = {(r["expiry"], r["strike"]): r for r in rows_where(market, name=name, instrument_type="CE")}
    puts = {(r["expiry"], r["strike"]): r for r in rows_where(market, name=name, instrument_type="PE")}
    assert calls.keys() == puts.keys()
    for key in sorted(calls):
        yield key[0], key[1], calls[key], puts[key]


def years_to(expiry: date, now: float) -> float:
    close = datetime(expiry.year, expiry.month, expiry.day, 15, 30, tzinfo=IST).timestamp()
    return (close - now) / SECONDS_PER_YEAR


# --- universe -------------------------------------------------------------------------------


def test_indices_carry_kite_tokens_and_columns():
    market = make_market()
    nifty, bank = rows_where(market, segment="INDICES")
    assert (nifty["instrument_token"], nifty["tradingsymbol"]) == (256265, "NIFTY 50")
    assert (bank["instrument_token"], bank["tradingsymbol"]) == (260105, "NIFTY BANK")
    for row in (nifty, bank):
        assert row["exchange"] == "NSE"
        assert row["instrument_type"] == "EQ"
        assert row["tick_size"] == 0.05
        assert row["expiry"] is None
        # KiteTicker reads the segment from the token's low byte: 9 is indices.
        assert row["instrument_token"] & 0xFF == KiteTicker.EXCHANGE_MAP["indices"]


def test_nifty_options_expire_on_tuesdays_and_banknifty_on_last_tuesdays():
    market = make_market(expiries=4)
    nifty_expiries = sorted({r["expiry"] for r in rows_where(market, name="NIFTY", segment="NFO-OPT")})
    assert nifty_expiries == [date(2026, 11, 24), date(2026, 12, 1), date(2026, 12, 8), date(2026, 12, 15)]
    bank_expiries = sorted(
        {r["expiry"] for r in rows_where(market, name="BANKNIFTY", segment="NFO-OPT")}
    )
    assert bank_expiries == [date(2026, 11, 24), date(2026, 12, 29), date(2027, 1, 26), date(2027, 2, 23)]
    for name in ("NIFTY", "BANKNIFTY"):
        futures = rows_where(market, name=name, segment="NFO-FUT")
        assert [f["expiry"] for f in futures] == [date(2026, 11, 24), date(2026, 12, 29), date(2027, 1, 26)]
        assert [f["tradingsymbol"] for f in futures] == [
            f"{name}26NOVFUT",
            f"{name}26DECFUT",
            f"{name}27JANFUT",
        ]


def test_contract_specs_lot_sizes_strike_steps_and_tokens():
    market = make_market(strikes_each_side=10)
    for name, lot, step in (("NIFTY", 75, 50.0), ("BANKNIFTY", 35, 100.0)):
        options = rows_where(market, name=name, segment="NFO-OPT")
        assert {r["lot_size"] for r in options} == {lot}
        strikes = sorted({r["strike"] for r in options})
        assert len(strikes) == 21
        assert set(np.diff(strikes)) == {step}
    tokens = [r["instrument_token"] for r in market.instruments]
    assert len(set(tokens)) == len(tokens)
    for row in rows_where(market, exchange="NFO"):
        assert row["instrument_token"] == int(row["exchange_token"]) * 256 + 2  # NFO segment


def test_tradingsymbols_use_kite_monthly_and_weekly_forms():
    market = make_market(strikes_each_side=0)
    symbols = {r["tradingsymbol"] for r in market.instruments}
    # 24 Nov 2026 is November's last Tuesday (monthly form); 1 Dec is a weekly (month code D).
    assert "NIFTY26NOV26000CE" in symbols
    assert "NIFTY26D0126000PE" in symbols
    assert "BANKNIFTY26DEC58000CE" in symbols
    assert option_tradingsymbol(
        name="NIFTY", expiry=date(2025, 10, 7), strike=24500, option_type="CE", monthly=False
    ) == "NIFTY25O0724500CE"
    assert future_tradingsymbol(name="NIFTY", expiry=date(2025, 11, 25)) == "NIFTY25NOVFUT"


def test_expiry_calendar_includes_today_until_the_close_and_moves_before_holidays():
    tuesday_10 = datetime(2026, 11, 24, 10, 0, tzinfo=IST).timestamp()
    tuesday_16 = datetime(2026, 11, 24, 16, 0, tzinfo=IST).timestamp()
    assert weekly_expiries(now_epoch_s=tuesday_10, count=1) == [date(2026, 11, 24)]
    assert weekly_expiries(now_epoch_s=tuesday_16, count=1) == [date(2026, 12, 1)]
    assert monthly_expiries(now_epoch_s=tuesday_16, count=1) == [date(2026, 12, 29)]
    holiday = frozenset({date(2026, 12, 29)})
    assert monthly_expiries(now_epoch_s=tuesday_16, count=1, holidays=holiday) == [date(2026, 12, 28)]
    market = make_market(holidays=holiday, strikes_each_side=0)
    moved = rows_where(market, name="BANKNIFTY", expiry=date(2026, 12, 28), instrument_type="CE")
    assert moved[0]["tradingsymbol"] == "BANKNIFTY26DEC58000CE"  # still the monthly contract


def test_extra_underlyings_scale_the_universe_past_100k_instruments():
    market = make_market(extra_underlyings=48, expiries=4, strikes_each_side=125)
    assert len(market.instruments) >= 95_000
    assert len({r["instrument_token"] for r in market.instruments}) == len(market.instruments)


def test_instruments_csv_is_kites_format_and_parses_with_kiteconnect():
    market = make_market()
    text = market.instruments_csv()
    mock_header = (MOCKS / "instruments_all.csv").read_text().splitlines()[0]
    assert text.splitlines()[0] == mock_header
    parsed = KiteConnect("key")._parse_instruments(text.encode())
    assert len(parsed) == len(market.instruments)
    for got, want in zip(parsed, market.instruments, strict=True):
        assert got["instrument_token"] == want["instrument_token"]
        assert got["tradingsymbol"] == want["tradingsymbol"]
        assert got["expiry"] == (want["expiry"] or "")
        assert got["strike"] == want["strike"]
        assert got["lot_size"] == want["lot_size"]
        assert got["last_price"] == want["last_price"]
    nfo_only = list(csv.DictReader(io.StringIO(market.instruments_csv("NFO"))))
    assert {r["exchange"] for r in nfo_only} == {"NFO"}
    assert len(nfo_only) == len(rows_where(market, exchange="NFO"))


# --- the walk -------------------------------------------------------------------------------


def walk(market: SyntheticMarket, steps: int, dt_s: float = 0.5) -> np.ndarray:
    for i in range(1, steps + 1):
        market.step(WEDNESDAY_11_IST + i * dt_s)
    return market.ticks(market.tokens, mode="full")


def test_same_seed_same_clock_gives_the_same_market():
    a, b = walk(make_market(seed=11), 40), walk(make_market(seed=11), 40)
    assert a.tobytes() == b.tobytes()
    c = walk(make_market(seed=12), 40)
    assert not np.array_equal(a["last_price"], c["last_price"])


def test_the_walk_moves_the_indices_and_keeps_day_statistics_consistent():
    market = make_market()
    start = market.spot("NIFTY")
    ticks = walk(market, 200, dt_s=30.0)
    assert market.spot("NIFTY") != start
    assert np.all(ticks["high"] >= ticks["last_price"])
    assert np.all(ticks["low"] <= ticks["last_price"])
    tradable = ticks[ticks["tradable"]]
    assert tradable["volume_traded"].sum() > 0
    assert np.all(tradable["oi"] >= 0)
    assert np.all(tradable["oi_day_low"] <= tradable["oi"])
    assert np.all(tradable["oi"] <= tradable["oi_day_high"])
    prices = np.concatenate([ticks["last_price"], ticks["depth_buy_price"].ravel()])
    live_prices = prices[prices > 0]
    assert np.allclose(np.round(live_prices * 20), live_prices * 20)  # all on the 0.05 tick


def test_depth_sits_around_the_price():
    market = make_market()
    ticks = market.ticks(market.tokens, mode="full")
    options = ticks[ticks["tradable"] & (ticks["last_price"] > 1)]
    assert np.all(options["depth_buy_price"][:, 0] < options["last_price"])
    assert np.all(options["depth_sell_price"][:, 0] > options["last_price"])
    assert np.all(np.diff(options["depth_buy_price"], axis=1) < 0)
    assert np.all(np.diff(options["depth_sell_price"], axis=1) > 0)
    assert np.all(options["depth_buy_quantity"] > 0)


def test_a_new_ist_day_rolls_close_and_resets_volume():
    market = make_market()
    walk(market, 20, dt_s=60.0)
    before = market.ticks(market.tokens, mode="full")
    assert before["volume_traded"].sum() > 0
    next_morning = datetime(2026, 11, 19, 9, 15, tzinfo=IST).timestamp()
    market.step(next_morning)
    after = market.ticks(market.tokens, mode="full")
    assert np.array_equal(after["close"], before["last_price"])
    assert after["exchange_timestamp"][0] == int(next_morning)


# --- prices ---------------------------------------------------------------------------------


def test_put_call_parity_holds_within_rounding():
    market = make_market(strikes_each_side=20)
    walk(market, 10)
    now = market.now_epoch_s
    r = 0.065
    checked = 0
    for name in ("NIFTY", "BANKNIFTY"):
        spec = market.spec(name)
        quotes = market.quote([t for _, _, c, p in option_pairs(market, name) for t in (c["instrument_token"], p["instrument_token"])])
        for expiry, strike, call, put in option_pairs(market, name):
            c = quotes[call["instrument_token"]]["last_price"]
            p = quotes[put["instrument_token"]]["last_price"]
            if min(c, p) <= 0.05:  # one tick is a floor, not a price: parity cannot hold there
                continue
            t = years_to(expiry, now)
            forward = market.spot(name) * math.exp((r - spec.dividend_yield) * t)
            parity = math.exp(-r * t) * (forward - strike)
            assert abs((c - p) - parity) <= 0.05 + 1e-9, (call["tradingsymbol"], c, p, parity)
            checked += 1
    assert checked > 100


def test_futures_carry_spot_at_r_minus_q():
    market = make_market()
    walk(market, 5)
    for name in ("NIFTY", "BANKNIFTY"):
        spec = market.spec(name)
        futures = rows_where(market, name=name, segment="NFO-FUT")
        prices = market.ticks([f["instrument_token"] for f in futures], mode="ltp")["last_price"]
        for future, price in zip(futures, prices, strict=True):
            t = years_to(future["expiry"], market.now_epoch_s)
            fair = market.spot(name) * math.exp((0.065 - spec.dividend_yield) * t)
            assert abs(price - fair) <= 0.025 + 1e-9
        assert np.all(np.diff(prices) > 0)  # r > q: later futures trade higher


def implied_vol(price, *, forward, strike, t, is_call, r=0.065):
    """Bisection on black76_price: slow and sure, fine for a test."""
    lo, hi = 1e-4, 3.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        value = float(black76_price(forward=forward, strike=strike, t_years=t, sigma=mid, r=r, is_call=is_call))
        lo, hi = (mid, hi) if value < price else (lo, mid)
    return 0.5 * (lo + hi)


def test_volatility_smile_has_a_put_skew_and_prices_carry_it():
    market = make_market(strikes_each_side=40)
    name = "NIFTY"
    expiry = min(r["expiry"] for r in rows_where(market, name=name, segment="NFO-OPT"))
    calls = sorted(rows_where(market, name=name, expiry=expiry, instrument_type="CE"), key=lambda r: r["strike"])
    strikes = np.array([r["strike"] for r in calls])
    sigma = market.sigma([r["instrument_token"] for r in calls])
    atm = int(np.argmin(np.abs(strikes - market.spot(name))))
    low_wing, high_wing = sigma[0], sigma[-1]
    assert sigma.min() < sigma[atm] * 1.001
    assert low_wing > sigma[atm] and high_wing > sigma.min()  # a smile
    assert low_wing > high_wing  # a put skew: downside strikes are dearer
    # The prices carry that smile: implied back, near-the-money vols match the model.
    t = years_to(expiry, market.now_epoch_s)
    forward = market.spot(name) * math.exp((0.065 - market.spec(name).dividend_yield) * t)
    prices = market.ticks([r["instrument_token"] for r in calls], mode="ltp")["last_price"]
    for i in range(atm - 5, atm + 6):
        iv = implied_vol(prices[i], forward=forward, strike=strikes[i], t=t, is_call=True)
        assert abs(iv - sigma[i]) < 0.002, (strikes[i], iv, sigma[i])


def test_term_structure_rises_with_expiry():
    market = make_market(expiries=4, strikes_each_side=0)
    atm_calls = sorted(rows_where(market, name="NIFTY", instrument_type="CE"), key=lambda r: r["expiry"])
    sigma = market.sigma([r["instrument_token"] for r in atm_calls])
    assert np.all(np.diff(sigma) > 0)


def test_set_spot_moves_an_underlying_across_strikes():
    market = make_market(strikes_each_side=10)
    strike = 26300.0
    call = next(r for r in rows_where(market, name="NIFTY", instrument_type="CE", strike=strike))
    put = next(r for r in rows_where(market, name="NIFTY", instrument_type="PE", strike=strike, expiry=call["expiry"]))
    tokens = [256265, call["instrument_token"], put["instrument_token"], 260105]
    before = market.ticks(tokens, mode="quote")["last_price"]
    assert before[1] < before[2]  # 26300 is out of the money for the call at 26000
    market.set_spot("NIFTY", 26800.0)
    after = market.ticks(tokens, mode="quote")["last_price"]
    assert after[0] == 26800.0
    assert after[1] >= 500.0 > after[2]  # now deep in the money, at least intrinsic
    assert after[3] == before[3]  # BANKNIFTY did not move with NIFTY
    with pytest.raises(ValueError, match="spot must be positive"):
        market.set_spot("NIFTY", 0.0)


# --- ticks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "index_length", "tradable_length"),
    [("ltp", 8, 8), ("quote", 28, 44), ("full", 32, 184)],
)
def test_ticks_use_kites_packet_kinds_and_round_trip_through_kiteconnect(
    mode, index_length, tradable_length
):
    market = make_market()
    walk(market, 3)
    tokens = [256265, int(market.tokens[5])]
    ticks = market.ticks(tokens, mode=mode)
    assert ticks["packet_length"].tolist() == [index_length, tradable_length]
    frame = encode_frame(ticks)
    parsed = KiteTicker("key", "token")._parse_binary(frame)
    assert [p["mode"] for p in parsed] == [mode, mode]
    assert [p["instrument_token"] for p in parsed] == tokens
    assert [p["last_price"] for p in parsed] == pytest.approx(ticks["last_price"].tolist())
    if mode == "full":
        assert parsed[0]["exchange_timestamp"] == datetime.fromtimestamp(int(market.now_epoch_s))
        assert parsed[1]["depth"]["buy"][0]["price"] == pytest.approx(ticks["depth_buy_price"][1, 0])
    decoded = decode_frame(frame)
    assert decoded.malformed == 0
    assert decoded.ticks["last_price"].tolist() == pytest.approx(ticks["last_price"].tolist())


def test_ticks_refuse_unknown_tokens_and_modes():
    market = make_market()
    with pytest.raises(KeyError, match="unknown instrument_token"):
        market.ticks([123], mode="full")
    with pytest.raises(ValueError, match="unknown mode"):
        market.ticks([256265], mode="fast")
    rows, found = market.locate([256265, 123])
    assert found.tolist() == [True, False]
    assert market.tokens[rows].tolist() == [256265]


def test_quote_has_the_shape_of_kites_quote_response():
    import json

    mock = json.loads((MOCKS / "quote.json").read_text())["data"]["NSE:INFY"]
    market = make_market()
    token = int(market.tokens[10])
    quote = market.quote([token])[token]
    assert set(quote) == set(mock)
    assert set(quote["ohlc"]) == set(mock["ohlc"])
    assert len(quote["depth"]["buy"]) == len(quote["depth"]["sell"]) == 5
    assert quote["lower_circuit_limit"] < quote["last_price"] < quote["upper_circuit_limit"]


# --- historical candles ---------------------------------------------------------------------


def ist(*args) -> datetime:
    return datetime(*args)  # naive: Kite reads historical bounds as IST


def stamp_of(candle) -> datetime:
    return datetime.strptime(candle[0], "%Y-%m-%dT%H:%M:%S%z")


def test_minute_candles_cover_market_hours_only_and_never_the_future():
    market = make_market()
    token = market.token_of("NSE:NIFTY 50")
    candles = market.historical(token, ist(2026, 11, 13, 0, 0), ist(2026, 11, 18, 23, 59), "minute")
    days = sorted({stamp_of(c).date() for c in candles})
    # Saturday 14 and Sunday 15 have no session; Wednesday 18 stops at the clock (11:00).
    assert days == [date(2026, 11, 13), date(2026, 11, 16), date(2026, 11, 17), date(2026, 11, 18)]
    assert len(candles) == 3 * 375 + 106
    for candle in candles:
        when = stamp_of(candle)
        assert when.utcoffset() == timedelta(hours=5, minutes=30)
        assert (9, 15) <= (when.hour, when.minute) <= (15, 29)
        _, o, h, low, c, volume = candle
        assert low <= min(o, c) <= max(o, c) <= h
        assert volume == 0  # indices have no volume
    assert stamp_of(candles[-1]) == datetime(2026, 11, 18, 11, 0, tzinfo=IST)


def test_history_meets_the_live_spot_at_the_start():
    market = make_market()
    token = market.token_of("NSE:NIFTY 50")
    last = market.historical(token, ist(2026, 11, 18, 11, 0), ist(2026, 11, 18, 11, 0), "minute")
    assert last[0][1] == pytest.approx(26000.0)  # the 11:00 candle opens at the live start


def test_candles_are_deterministic_and_consistent_across_ranges():
    a, b = make_market(seed=5), make_market(seed=5)
    token = a.token_of("NFO:NIFTY26NOV26000CE")
    wide = a.historical(token, ist(2026, 11, 10, 9, 15), ist(2026, 11, 18, 15, 30), "minute", oi=True)
    again = a.historical(token, ist(2026, 11, 10, 9, 15), ist(2026, 11, 18, 15, 30), "minute", oi=True)
    fresh = b.historical(token, ist(2026, 11, 10, 9, 15), ist(2026, 11, 18, 15, 30), "minute", oi=True)
    assert wide == again == fresh
    narrow = b.historical(token, ist(2026, 11, 12, 10, 0), ist(2026, 11, 12, 10, 29), "minute", oi=True)
    assert len(narrow) == 30
    assert narrow == [c for c in wide if c[0].startswith("2026-11-12T10:")][:30]
    assert all(len(c) == 7 for c in wide)
    assert all(len(c) == 6 for c in a.historical(token, ist(2026, 11, 12), ist(2026, 11, 12, 15, 30), "minute"))
    other_seed = make_market(seed=6).historical(token, ist(2026, 11, 12, 10, 0), ist(2026, 11, 12, 10, 29), "minute")
    assert [c[4] for c in other_seed] != [c[4] for c in narrow]


def test_coarser_intervals_aggregate_the_minutes():
    market = make_market()
    token = market.token_of("NSE:NIFTY BANK")
    minutes = market.historical(token, ist(2026, 11, 17), ist(2026, 11, 17, 23, 59), "minute")
    five = market.historical(token, ist(2026, 11, 17), ist(2026, 11, 17, 23, 59), "5minute")
    day = market.historical(token, ist(2026, 11, 17), ist(2026, 11, 17, 23, 59), "day")
    assert len(five) == 75
    first = minutes[:5]
    assert five[0] == [first[0][0], first[0][1], max(c[2] for c in first), min(c[3] for c in first), first[-1][4], 0]
    assert day == [["2026-11-17T00:00:00+0530", minutes[0][1], max(c[2] for c in minutes), min(c[3] for c in minutes), minutes[-1][4], 0]]
    hourly = market.historical(token, ist(2026, 11, 17), ist(2026, 11, 17, 23, 59), "60minute")
    assert [stamp_of(c).strftime("%H:%M") for c in hourly] == [
        "09:15", "10:15", "11:15", "12:15", "13:15", "14:15", "15:15"
    ]


def test_option_candles_are_consistent_with_the_underlying_candles():
    """Historical put-call parity against the index candles: Greeks from history make sense."""
    market = make_market(strikes_each_side=5)
    spec = market.spec("NIFTY")
    expiry = date(2026, 11, 24)
    strike = 26000.0
    call = market.token_of("NFO:NIFTY26NOV26000CE")
    put = market.token_of("NFO:NIFTY26NOV26000PE")
    span = (ist(2026, 11, 16, 9, 15), ist(2026, 11, 17, 15, 30))
    index = market.historical(256265, *span, "minute")
    calls = market.historical(call, *span, "minute", oi=True)
    puts = market.historical(put, *span, "minute", oi=True)
    assert len(index) == len(calls) == len(puts) == 750
    for i, c, p in zip(index, calls, puts, strict=True):
        assert i[0] == c[0] == p[0]
        t = years_to(expiry, stamp_of(c).timestamp())
        forward = i[1] * math.exp((0.065 - spec.dividend_yield) * t)
        # Candle opens are priced on the index open; rounding of three prices adds up.
        assert abs((c[1] - p[1]) - math.exp(-0.065 * t) * (forward - strike)) <= 0.1 + 1e-9
        assert c[5] >= 0 and c[6] > 0
    assert sum(c[5] for c in calls) > 0  # options trade and carry open interest
    # A call rises with the index within a candle, a put falls.
    index_up = [k for k, i in enumerate(index) if i[4] > i[1] + 5]
    assert index_up
    for k in index_up:
        assert calls[k][4] >= calls[k][1]
        assert puts[k][4] <= puts[k][1]


def test_no_candles_before_listing_or_after_expiry():
    market = make_market(now=datetime(2026, 11, 26, 12, 0, tzinfo=IST).timestamp(), expiries=2)
    # 24 Nov expired before this clock, so the first NIFTY weekly is 1 Dec.
    token = market.token_of("NFO:NIFTY26D0126000CE")
    assert market.historical(token, ist(2026, 6, 1), ist(2026, 6, 30, 15, 30), "day") == []
    assert len(market.historical(token, ist(2026, 11, 20), ist(2026, 11, 25, 15, 30), "day")) == 4


def test_historical_rejects_bad_requests():
    market = make_market()
    with pytest.raises(ValueError, match="invalid interval"):
        market.historical(256265, ist(2026, 11, 17), ist(2026, 11, 18), "2minute")
    with pytest.raises(ValueError, match="from after to"):
        market.historical(256265, ist(2026, 11, 18), ist(2026, 11, 17), "minute")
    with pytest.raises(KeyError):
        market.historical(42, ist(2026, 11, 17), ist(2026, 11, 18), "minute")
