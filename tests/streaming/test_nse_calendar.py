"""The NSE calendar and the synthetic universe hold their invariants on every day of a year.

The tests elsewhere rely on these facts of the synthetic market whatever today's date is: a
near NIFTY expiry with a future of its own, strikes around the money on every expiry, no
expiry already closed. Each is checked here for every day of a full year, before and after
the close, with and without holidays (a monthly expiry on a holiday, a weekly one, and the
trading day before one of them).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest

from streaming.greeks import IST
from streaming.market import SyntheticMarket
from streaming.nse_calendar import (
    is_trading_day,
    monthly_expiries,
    session_close_epoch_s,
    weekly_expiries,
    weekly_option_expiries,
)

FIRST_DAY = date(2026, 1, 1)
DAYS = 366
HOLIDAY_LISTS = {
    "none": frozenset(),
    # 2026-12-29 and 2027-03-30 are monthly expiries, 2026-12-08 a weekly one, 2027-03-29 the
    # Monday a moved 30 March expiry would fall back to; 2026-11-24 a monthly, 2026-03-03 a
    # Tuesday in the first week of a month.
    "holidays": frozenset(
        {
            date(2026, 3, 3),
            date(2026, 11, 24),
            date(2026, 12, 8),
            date(2026, 12, 29),
            date(2027, 3, 29),
            date(2027, 3, 30),
        }
    ),
}


def moments():
    for offset in range(DAYS):
        day = FIRST_DAY + timedelta(days=offset)
        for hour, minute in ((10, 0), (16, 0)):
            yield datetime(day.year, day.month, day.day, hour, minute, tzinfo=IST).timestamp()


@pytest.mark.parametrize("holidays", HOLIDAY_LISTS.values(), ids=HOLIDAY_LISTS.keys())
def test_every_day_of_a_year_lists_a_near_nifty_expiry_that_has_a_future(holidays):
    for now in moments():
        weeklies = weekly_expiries(now_epoch_s=now, count=3, holidays=holidays)
        listed = weekly_option_expiries(now_epoch_s=now, count=3, holidays=holidays)
        (monthly,) = monthly_expiries(now_epoch_s=now, count=1, holidays=holidays)
        context = f"at {datetime.fromtimestamp(now, IST):%Y-%m-%d %H:%M} IST, listed {listed}"
        assert len(listed) == 3 and listed == sorted(set(listed)), context
        assert listed[0] == weeklies[0], context  # the nearest expiry is always listed
        assert monthly in listed, context
        assert all(session_close_epoch_s(e) > now for e in listed), context
        assert all(is_trading_day(e, holidays) for e in listed), context
        # A week at most, eight days after a weekly expiry moved back onto a Monday.
        assert (listed[0] - datetime.fromtimestamp(now, IST).date()).days <= 8, context


@pytest.mark.parametrize("holidays", HOLIDAY_LISTS.values(), ids=HOLIDAY_LISTS.keys())
def test_the_synthetic_universe_of_every_day_has_what_the_tests_rely_on(holidays):
    for now in moments():
        market = SyntheticMarket(seed=7, now_fn=lambda now=now: now, holidays=holidays)
        context = f"at {datetime.fromtimestamp(now, IST):%Y-%m-%d %H:%M} IST"
        for name in ("NIFTY", "BANKNIFTY"):
            rows = [r for r in market.instruments if r["name"] == name]
            futures = sorted(r["expiry"] for r in rows if r["instrument_type"] == "FUT")
            options = [r for r in rows if r["instrument_type"] in ("CE", "PE")]
            expiries = sorted({r["expiry"] for r in options})
            assert len(futures) == 3 and len(expiries) == 3, context
            assert expiries[0] in futures or name == "NIFTY", context
            assert set(expiries) & set(futures), f"{name} has no option expiry with a future {context}"
            assert all(session_close_epoch_s(e) > now for e in expiries + futures), context
            spot = market.spec(name).spot
            step = market.spec(name).strike_step
            atm = round(spot / step) * step
            for expiry in expiries:
                strikes = sorted({r["strike"] for r in options if r["expiry"] == expiry})
                assert len(strikes) == 31 and atm in strikes, f"{name} {expiry} {context}"
                assert strikes[0] == atm - 15 * step and strikes[-1] == atm + 15 * step, context
                calls = {r["strike"] for r in options if r["expiry"] == expiry and r["instrument_type"] == "CE"}
                puts = {r["strike"] for r in options if r["expiry"] == expiry and r["instrument_type"] == "PE"}
                assert calls == puts == set(strikes), context
        tokens = [r["instrument_token"] for r in market.instruments]
        assert len(set(tokens)) == len(tokens), context
        symbols = [r["tradingsymbol"] for r in market.instruments]
        assert len(set(symbols)) == len(symbols), context
