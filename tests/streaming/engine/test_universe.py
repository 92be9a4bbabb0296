"""The instrument universe: slots, kinds, underlyings, chains, pairs, groups and JSON prefixes."""

from __future__ import annotations

import datetime as dt

import numpy as np
import orjson
import pytest

from streaming import schema
from streaming.engine.universe import InstrumentUniverse, UniverseError
from streaming.greeks import IST
from streaming.market import SyntheticMarket
from streaming.schema import InstrumentKind
from tests.streaming.engine.builders import (
    E1,
    E2,
    NIFTY_FUT,
    NIFTY_INDEX,
    NOW_S,
    STRIKES,
    index_row,
    market_universe,
    nifty_rows,
    option_row,
    option_token,
)


def test_slots_are_sorted_tokens_and_unknown_tokens_are_reported():
    u = InstrumentUniverse.from_rows(reversed(nifty_rows()))
    assert np.all(np.diff(u.tokens) > 0)
    wanted = [NIFTY_FUT, 12345, NIFTY_INDEX]
    slots, known = u.slots_of(wanted)
    assert known.tolist() == [True, False, True]
    assert u.tokens[slots].tolist() == [NIFTY_FUT, NIFTY_INDEX]


def test_kinds_and_the_index_takes_its_derivatives_name():
    u = InstrumentUniverse.from_rows([*nifty_rows(), {**index_row(), "instrument_token": 738561,
                                                     "tradingsymbol": "RELIANCE", "name": "RELIANCE INDUSTRIES",
                                                     "segment": "NSE"}])
    kind = dict(zip(u.tokens.tolist(), u.kind.tolist(), strict=True))
    assert kind[NIFTY_INDEX] == InstrumentKind.INDEX
    assert kind[738561] == InstrumentKind.EQ
    assert kind[NIFTY_FUT] == InstrumentKind.FUT
    assert kind[option_token(E1, 26000.0, "CE")] == InstrumentKind.CE
    assert kind[option_token(E1, 26000.0, "PE")] == InstrumentKind.PE
    assert set(u.underlyings) == {"NIFTY", "RELIANCE"}
    (index_slot,), _ = u.slots_of([NIFTY_INDEX])
    assert u.underlyings[u.und[index_slot]] == "NIFTY"
    assert u.und_spot[u.underlyings.index("NIFTY")] == index_slot
    assert u.spot_tokens() == {NIFTY_INDEX: "NIFTY", 738561: "RELIANCE"}


def test_the_nse_equity_is_the_spot_over_bse():
    bse = {**index_row(), "instrument_token": 128083204, "tradingsymbol": "RELIANCE",
           "exchange": "BSE", "segment": "BSE"}
    nse = {**bse, "instrument_token": 738561, "exchange": "NSE", "segment": "NSE"}
    # The BSE row has the higher token, so it is not just the first slot that wins.
    u = InstrumentUniverse.from_rows([bse, nse])
    (nse_slot,), _ = u.slots_of([738561])
    assert u.und_spot.tolist() == [nse_slot]
    u = InstrumentUniverse.from_rows([{**bse, "instrument_token": 100}, nse])
    (nse_slot,), _ = u.slots_of([738561])
    assert u.und_spot.tolist() == [nse_slot]


def test_chains_link_the_same_expiry_future_and_pair_calls_with_puts():
    u = InstrumentUniverse.from_rows([*nifty_rows(), option_row(E2, 26200.0, "CE")])
    assert u.chain_expiry == (E1, E2)
    (fut,), _ = u.slots_of([NIFTY_FUT])
    assert u.chain_future.tolist() == [fut, -1]
    assert u.chain[fut] == 0
    (index_slot,), _ = u.slots_of([NIFTY_INDEX])
    assert u.chain[index_slot] == -1
    for expiry, c in ((E1, 0), (E2, 1)):
        for strike in STRIKES:
            (ce, pe), _ = u.slots_of([option_token(expiry, strike, "CE"), option_token(expiry, strike, "PE")])
            assert u.pair[ce] == pe and u.pair[pe] == ce
            assert u.chain[ce] == u.chain[pe] == c
    (lonely,), _ = u.slots_of([option_token(E2, 26200.0, "CE")])
    assert u.pair[lonely] == -1
    # Parity pairs: sorted by chain, only complete strikes.
    assert u.pair_chain.tolist() == [0, 0, 0, 1, 1, 1]
    assert u.pair_strike.tolist() == [*STRIKES, *STRIKES]
    assert np.all(u.kind[u.pair_call] == InstrumentKind.CE) and np.all(u.kind[u.pair_put] == InstrumentKind.PE)


def test_expiry_is_the_1530_ist_close():
    u = InstrumentUniverse.from_rows(nifty_rows())
    close = dt.datetime(2026, 11, 24, 15, 30, tzinfo=IST).timestamp()
    (ce,), _ = u.slots_of([option_token(E1, 26000.0, "CE")])
    assert u.expiry_epoch_s[ce] == close
    assert u.chain_expiry_epoch_s[0] == close
    (index_slot,), _ = u.slots_of([NIFTY_INDEX])
    assert np.isnan(u.expiry_epoch_s[index_slot])


def test_groups_options_by_chain_and_the_rest_by_underlying():
    u = InstrumentUniverse.from_rows(nifty_rows())
    assert u.group_of(NIFTY_INDEX) == "und.NIFTY"
    assert u.group_of(NIFTY_FUT) == "und.NIFTY"
    assert u.group_of(option_token(E1, 25900.0, "PE")) == "chain.NIFTY.20261124"
    assert u.group_of(option_token(E2, 26100.0, "CE")) == "chain.NIFTY.20261201"
    assert set(u.group_names) == {"und.NIFTY", "chain.NIFTY.20261124", "chain.NIFTY.20261201"}
    assert u.groups_of([NIFTY_FUT, option_token(E2, 26100.0, "CE"), 1]) == {
        "und.NIFTY",
        "chain.NIFTY.20261201",
    }
    with pytest.raises(KeyError):
        u.group_of(1)


def test_prefixes_are_the_static_start_of_the_snapshot_json():
    u = InstrumentUniverse.from_rows(nifty_rows())
    (ce, index_slot), _ = u.slots_of([option_token(E1, 26000.0, "CE"), NIFTY_INDEX])
    assert orjson.loads(u.prefixes[ce] + b"}") == {
        "v": schema.SCHEMA_VERSION,
        "token": option_token(E1, 26000.0, "CE"),
        "symbol": "NIFTY26NOV2426000CE",
        "exchange": "NFO",
        "name": "NIFTY",
        "kind": "CE",
        "expiry": "2026-11-24",
        "strike": 26000.0,
    }
    static = orjson.loads(u.prefixes[index_slot] + b"}")
    assert (static["kind"], static["name"], static["expiry"], static["strike"]) == (
        "INDEX",
        "NIFTY",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({**option_row(E1, 26000.0, "CE"), "expiry": None}, "expiry"),
        ({**option_row(E1, 26000.0, "CE"), "instrument_type": "XX"}, "instrument_type"),
        ({**option_row(E1, 26000.0, "CE"), "expiry": "24-11-2026"}, "expiry"),
    ],
)
def test_rows_the_universe_cannot_place_are_refused_with_context(row, field):
    with pytest.raises(UniverseError) as err:
        InstrumentUniverse.from_rows([row])
    assert err.value.field == field
    assert str(row["instrument_token"]) in str(err.value)


def test_duplicate_tokens_are_refused():
    with pytest.raises(UniverseError, match="instrument_token"):
        InstrumentUniverse.from_rows([index_row(), index_row()])


def test_iso_string_expiries_and_extra_keys_are_accepted():
    row = {**option_row(E1, 26000.0, "CE"), "expiry": "2026-11-24", "lot_size": 75}
    u = InstrumentUniverse.from_rows([row])
    assert u.chain_expiry == (E1,)


def test_empty_universe():
    u = InstrumentUniverse.empty()
    assert len(u) == 0
    slots, known = u.slots_of([1, 2])
    assert slots.size == 0 and known.tolist() == [False, False]


def test_synthetic_market_universe_has_a_spot_per_underlying_and_every_option_paired():
    market = SyntheticMarket(seed=3, now_fn=lambda: NOW_S, extra_underlyings=2)
    u = market_universe(market)
    assert len(u) == len(market.instruments)
    assert set(u.underlyings) == set(market.underlyings)
    assert np.all(u.und_spot >= 0)
    assert np.all(u.kind[u.und_spot] == InstrumentKind.INDEX)
    options = u.is_option
    assert np.all(u.pair[options] >= 0)
    assert np.all(u.chain[options] >= 0)
    # Each chain group is named after its underlying and expiry.
    for c, (und, expiry) in enumerate(zip(u.chain_und.tolist(), u.chain_expiry, strict=True)):
        members = np.flatnonzero(options & (u.chain == c))
        assert {u.group_names[g] for g in u.group[members].tolist()} == {
            schema.chain_group(u.underlyings[und], expiry)
        }
