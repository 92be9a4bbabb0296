"""The rebalancer's band maths and heartbeat parsing: pure functions, no database."""

import datetime as dt

import numpy as np
import pytest
from django.utils import timezone

from streaming.models import EngineHeartbeat
from subscriptions.rebalancer import (
    TargetInstrument,
    band_strikes,
    choose_centre,
    heartbeat_prices,
    nearest_strike,
    order_by_moneyness,
    strike_step,
)
from tests.helpers import engine_status

STRIKES = np.arange(25_000.0, 27_001.0, 50.0)


def test_strike_step_is_the_smallest_listed_gap():
    assert strike_step([100.0, 200.0, 150.0, 400.0]) == 50.0
    assert strike_step([26_000.0, 26_000.0, 26_100.0]) == 100.0  # CE and PE share a strike
    assert strike_step([26_000.0]) is None
    assert strike_step([]) is None


def test_nearest_strike_rounds_to_listed_strikes_and_clamps():
    assert nearest_strike(STRIKES, 26_024.0) == 26_000.0
    assert nearest_strike(STRIKES, 26_026.0) == 26_050.0
    assert nearest_strike(STRIKES, 26_025.0) == 26_000.0  # a tie goes to the lower strike
    assert nearest_strike(STRIKES, 10.0) == 25_000.0
    assert nearest_strike(STRIKES, 99_999.0) == 27_000.0


def decide(price, current, *, hysteresis=0.6, cooldown=False):
    return choose_centre(
        strikes=STRIKES, price=price, current=current, step=50.0,
        hysteresis_steps=hysteresis, in_cooldown=cooldown,
    )


def test_first_run_centres_on_the_nearest_strike():
    d = decide(26_012.0, None)
    assert (d.centre, d.moved, d.reason) == (26_000.0, True, "first centre")


@pytest.mark.parametrize(
    ("price", "centre", "moved"),
    [
        (26_029.0, 26_000.0, False),  # 0.58 steps: inside the 0.6 hysteresis
        (26_030.0, 26_000.0, False),  # exactly 0.6 steps: still inside
        (26_031.0, 26_050.0, True),  # 0.62 steps: re-centre on the nearest strike
        (25_969.0, 25_950.0, True),
        (26_140.0, 26_150.0, True),  # 2.8 steps in one go
    ],
)
def test_hysteresis_keeps_the_centre_until_the_price_is_far_enough(price, centre, moved):
    d = decide(price, 26_000.0)
    assert (d.centre, d.moved) == (centre, moved)


def test_zero_hysteresis_follows_the_nearest_strike():
    assert decide(26_026.0, 26_000.0, hysteresis=0.0).centre == 26_050.0
    d = decide(26_020.0, 26_000.0, hysteresis=0.0)
    assert (d.centre, d.moved, d.reason) == (26_000.0, False, "nearest strike unchanged")


def test_cooldown_blocks_a_re_centre_but_not_a_first_centre():
    d = decide(26_200.0, 26_000.0, cooldown=True)
    assert (d.centre, d.moved, d.reason) == (26_000.0, False, "cooldown")
    assert decide(26_200.0, None, cooldown=True).centre == 26_200.0


def test_no_price_keeps_a_centre_and_gives_none_without_one():
    assert decide(None, 26_000.0).centre == 26_000.0
    assert decide(float("nan"), 26_000.0).centre == 26_000.0
    assert decide(None, None).centre is None


def test_a_centre_no_longer_listed_is_replaced():
    d = decide(26_010.0, 26_013.0)
    assert (d.centre, d.moved) == (26_000.0, True)


def test_band_takes_positions_either_side_and_stops_at_the_edges():
    assert band_strikes(STRIKES, 26_000.0, 2).tolist() == [25_900.0, 25_950.0, 26_000.0, 26_050.0, 26_100.0]
    assert band_strikes(STRIKES, 25_000.0, 2).tolist() == [25_000.0, 25_050.0, 25_100.0]
    uneven = np.array([100.0, 200.0, 250.0, 300.0, 400.0])
    assert band_strikes(uneven, 250.0, 1).tolist() == [200.0, 250.0, 300.0]


def test_fill_order_is_nearest_the_money_then_nearest_expiry():
    e1, e2 = dt.date(2026, 11, 24), dt.date(2026, 12, 1)
    targets = [
        TargetInstrument(4, e2, 26_000.0, 0.0),
        TargetInstrument(3, e1, 26_050.0, 1.0),
        TargetInstrument(2, e1, 26_000.0, 0.0),
        TargetInstrument(1, e1, 25_950.0, 1.0),
    ]
    assert [t.token for t in order_by_moneyness(targets)] == [2, 4, 1, 3]


def heartbeat(state, *, age_s=0.0) -> EngineHeartbeat:
    now = timezone.now()
    return EngineHeartbeat(
        engine_id=f"e{age_s}", hostname="h", pid=1, started_at=now,
        updated_at=now - dt.timedelta(seconds=age_s), state=state,
    )


def test_heartbeat_prices_reads_live_fresh_entries_only():
    now = timezone.now()
    ts = int(now.timestamp())
    hb = heartbeat(
        engine_status(
            underlyings={
                "NIFTY": {"price": 26_010.5, "ts": ts - 2, "forwards": {"2026-11-24": 26_030.0}},
                "BANKNIFTY": {"price": 58_000.0, "ts": ts - 120, "forwards": {}},  # stale
                "MIDCPNIFTY": {"price": None, "ts": None, "forwards": {}},  # nothing usable
            },
        )
    )
    prices = heartbeat_prices([hb], now=now, max_age_s=30)
    assert set(prices) == {"NIFTY"}
    assert prices["NIFTY"].price == 26_010.5
    assert prices["NIFTY"].forwards == {dt.date(2026, 11, 24): 26_030.0}


def test_heartbeat_prices_read_nothing_from_an_invalid_document(caplog):
    now = timezone.now()
    state = engine_status(underlyings={"NIFTY": {"price": 26_000.0, "ts": now.timestamp()}})
    state["underlyings"]["NIFTY"]["price"] = "not a number"
    assert heartbeat_prices([heartbeat(state)], now=now, max_age_s=30) == {}
    assert "rebalancer.engine_status_invalid" in caplog.text


def test_heartbeat_prices_skip_mock_engines_unless_asked():
    now = timezone.now()
    state = engine_status(mode="mock",
                          underlyings={"NIFTY": {"price": 26_000.0, "ts": now.timestamp()}})
    assert heartbeat_prices([heartbeat(state)], now=now, max_age_s=30) == {}
    assert heartbeat_prices([heartbeat(state)], now=now, max_age_s=30, include_mock=True)["NIFTY"].price == 26_000.0


def test_heartbeat_prices_prefer_the_freshest_engine():
    now = timezone.now()
    ts = now.timestamp()
    older = heartbeat(engine_status(underlyings={"NIFTY": {"price": 1.0, "ts": ts - 10}}), age_s=1)
    newer = heartbeat(engine_status(underlyings={"NIFTY": {"price": 2.0, "ts": ts - 1}}), age_s=2)
    assert heartbeat_prices([older, newer], now=now, max_age_s=30)["NIFTY"].price == 2.0
