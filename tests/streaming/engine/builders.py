"""Builders of instrument rows, universes and ticks by hand, shared by the engine's unit tests."""

from __future__ import annotations

import datetime as dt

import numpy as np

from streaming.engine.universe import InstrumentUniverse
from streaming.greeks import IST
from streaming.kite.codec import TICK_DTYPE
from streaming.market import SyntheticMarket

E1 = dt.date(2026, 11, 24)  # has a same-expiry future
E2 = dt.date(2026, 12, 1)  # options only: forward from parity
NOW_S = dt.datetime(2026, 11, 20, 10, 0, tzinfo=IST).timestamp()
STRIKES = (25900.0, 26000.0, 26100.0)

NIFTY_INDEX = 256265
NIFTY_FUT = 9000 * 256 + 2


def option_token(expiry: dt.date, strike: float, kind: str) -> int:
    """A deterministic NFO token per contract (segment 2)."""
    e = 0 if expiry == E1 else 1
    return (10_000 + e * 1000 + int(strike) // 100 * 2 + (kind == "PE")) * 256 + 2


def index_row(token=NIFTY_INDEX, symbol="NIFTY 50"):
    return {
        "instrument_token": token,
        "tradingsymbol": symbol,
        "name": symbol,
        "exchange": "NSE",
        "segment": "INDICES",
        "instrument_type": "EQ",
        "expiry": None,
        "strike": 0.0,
    }


def future_row(token=NIFTY_FUT, name="NIFTY", expiry=E1):
    return {
        "instrument_token": token,
        "tradingsymbol": f"{name}{expiry:%y%b}FUT".upper(),
        "name": name,
        "exchange": "NFO",
        "segment": "NFO-FUT",
        "instrument_type": "FUT",
        "expiry": expiry,
        "strike": 0.0,
    }


def option_row(expiry, strike, kind, *, name="NIFTY", token=None):
    return {
        "instrument_token": token or option_token(expiry, strike, kind),
        "tradingsymbol": f"{name}{expiry:%y%b%d}{int(strike)}{kind}".upper(),
        "name": name,
        "exchange": "NFO",
        "segment": "NFO-OPT",
        "instrument_type": kind,
        "expiry": expiry,
        "strike": strike,
    }


def nifty_rows():
    """NIFTY index, the E1 future, and CE/PE at three strikes for E1 and E2."""
    rows = [index_row(), future_row()]
    for expiry in (E1, E2):
        for strike in STRIKES:
            rows += [option_row(expiry, strike, "CE"), option_row(expiry, strike, "PE")]
    return rows


def tick(
    token,
    price,
    *,
    length=184,
    ts=int(NOW_S),
    bid=None,
    ask=None,
    bid_qty=10,
    ask_qty=20,
    volume=1000,
    oi=5000,
    close=None,
):
    """One TICK_DTYPE row as the decoder would produce it for ``length``."""
    t = np.zeros(1, dtype=TICK_DTYPE)
    t["instrument_token"] = token
    t["packet_length"] = length
    t["is_index"] = (token & 0xFF) == 9
    t["tradable"] = not t["is_index"][0]
    t["last_price"] = price
    if length != 8:
        t["close"] = price if close is None else close
    if length in (44, 184):
        t["volume_traded"] = volume
    if length == 184:
        t["oi"] = oi
        t["depth_buy_price"][0, 0] = price - 0.05 if bid is None else bid
        t["depth_sell_price"][0, 0] = price + 0.05 if ask is None else ask
        t["depth_buy_quantity"][0, 0] = bid_qty
        t["depth_sell_quantity"][0, 0] = ask_qty
    if length in (32, 184):
        t["exchange_timestamp"] = ts
    return t


def ticks(*rows):
    return np.concatenate(rows) if rows else np.zeros(0, dtype=TICK_DTYPE)


def market_universe(market: SyntheticMarket) -> InstrumentUniverse:
    """The universe of a synthetic market, with its index names mapped to its underlyings."""
    return InstrumentUniverse.from_rows(
        market.instruments,
        index_underlyings={market.spec(n).index_symbol: n for n in market.underlyings},
    )


# --- tests ----------------------------------------------------------------------------------


class InlineReads:
    """A pipeline's read side as the publisher awaits it, run inline (the engine runs it on
    the pipeline thread)."""

    def __init__(self, pipeline) -> None:
        self._pipeline = pipeline

    async def latest(self, tokens):
        return self._pipeline.latest(tokens)

    async def groups_of(self, tokens):
        return self._pipeline.groups_of(tokens)
