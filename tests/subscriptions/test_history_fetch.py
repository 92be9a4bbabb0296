"""The REST client's vectorised candle path gives exactly what the per-candle models give.

The history service fetches a month of minutes per request; streaming/kite/rest.py validates
Kite's usual array candles column-wise and falls back to ``parse_candles`` (one ``Candle``
model per candle) for anything else, which also names the problem.
"""

from __future__ import annotations

import copy
import datetime as dt
import json

import numpy as np
import pytest

from streaming.kite import rest
from streaming.kite.rest import KiteResponseError, parse_candles
from streaming.market import IST, SyntheticMarket
from tests.fixtures import KITE_MOCKS

MOCKS = KITE_MOCKS


def mock(name: str):
    return json.loads((MOCKS / name).read_text())["data"]


def both(raw, **kw):
    fast = rest._candle_columns(raw, **kw)
    slow = rest._columns_of(parse_candles(raw, instrument_token=1, **kw), oi=kw["oi"])
    return fast, slow


def assert_same(fast, slow):
    assert fast is not None
    assert fast.keys() == slow.keys()
    for name in slow:
        assert fast[name].dtype == slow[name].dtype, name
        np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)


@pytest.mark.parametrize(("name", "oi"), [("historical_minute.json", False), ("historical_oi.json", True)])
def test_kites_own_examples(name, oi):
    assert_same(*both(mock(name), interval="minute" if not oi else "day", oi=oi, start=None, end=None))


@pytest.mark.parametrize("interval", ["minute", "5minute", "60minute", "day"])
def test_a_month_of_simulated_candles(interval):
    clock = dt.datetime(2026, 11, 20, 13, 7, tzinfo=IST)
    market = SyntheticMarket(seed=5, now_fn=clock.timestamp, expiries=2, strikes_each_side=2)
    token = market.token_of("NFO:" + next(r["tradingsymbol"] for r in market.instruments if r["instrument_type"] == "PE"))
    start, end = clock - dt.timedelta(days=30), clock
    raw = {"candles": market.historical(token, start, end, interval, oi=True)}
    assert len(raw["candles"]) > 10
    assert_same(*both(raw, interval=interval, oi=True, start=start, end=end))


def broken(mutate):
    raw = copy.deepcopy(mock("historical_minute.json"))
    mutate(raw["candles"])
    return raw


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c[3].__setitem__(3, 99999.0),  # low above high
        lambda c: c[3].__setitem__(4, -1.0),  # negative price
        lambda c: c[3].__setitem__(5, "many"),  # volume not a number
        lambda c: c.__setitem__(4, c[3]),  # not ascending
        lambda c: c[3].pop(),  # five values
        lambda c: c[3].__setitem__(0, "yesterday"),
    ],
)
def test_anything_off_goes_to_the_models_which_name_it(mutate):
    raw = broken(mutate)
    assert rest._candle_columns(raw, interval="minute", oi=False, start=None, end=None) is None
    with pytest.raises(KiteResponseError, match="historical response for 1 candle"):
        parse_candles(raw, instrument_token=1, interval="minute", oi=False)


def test_forms_only_the_models_accept_still_work():
    raw = mock("historical_minute.json")
    as_objects = {"candles": [dict(zip(("date", "open", "high", "low", "close", "volume"), c, strict=True))
                              for c in raw["candles"]]}
    assert rest._candle_columns(as_objects, interval="minute", oi=False, start=None, end=None) is None
    assert len(parse_candles(as_objects, instrument_token=1, interval="minute", oi=False)) == len(raw["candles"])
    with_oi_asked = rest._candle_columns(raw, interval="minute", oi=True, start=None, end=None)
    assert with_oi_asked is None  # no oi column: parse_candles reports it
