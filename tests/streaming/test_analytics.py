"""streaming/analytics.py against a small chain computed by hand."""

import math

import numpy as np
import pytest

from streaming import analytics

NAN = math.nan
STRIKES = np.array([100.0, 110.0, 120.0])


def leg(**columns):
    values = {name: np.full(3, NAN) for name in ("ltp", "close", "iv", "oi", "oi_base", "volume")}
    values.update({k: np.asarray(v, dtype=np.float64) for k, v in columns.items()})
    return analytics.Leg(**values)


def test_max_pain_is_the_strike_where_holders_get_least():
    # S=100: puts 20*10 + 5*20 = 300; S=110: calls 10*10 + puts 5*10 = 150;
    # S=120: calls 10*20 + 20*10 = 400. Least at 110.
    ce_oi = np.array([10.0, 20.0, 30.0])
    pe_oi = np.array([40.0, 20.0, 5.0])
    assert analytics.max_pain(STRIKES, ce_oi, pe_oi) == 110.0


def test_max_pain_ignores_unknown_oi_and_is_null_without_any():
    # Only the 120 call is known: every expiry at or below 120 pays nothing at S=100.
    assert analytics.max_pain(STRIKES, np.array([NAN, NAN, 30.0]), np.full(3, NAN)) == 100.0
    assert analytics.max_pain(STRIKES, np.full(3, NAN), np.full(3, NAN)) is None
    assert analytics.max_pain(STRIKES, np.zeros(3), np.zeros(3)) is None
    assert analytics.max_pain(np.zeros(0), np.zeros(0), np.zeros(0)) is None


def test_pcr_of_oi_and_volume_over_known_values():
    assert analytics.ratio_of_sums(np.array([40.0, 20.0, 5.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(65 / 60)
    # An unknown call volume is left out, not taken as zero.
    assert analytics.ratio_of_sums(np.array([30.0, 60.0, 10.0]), np.array([100.0, NAN, 50.0])) == pytest.approx(100 / 150)
    assert analytics.ratio_of_sums(np.array([1.0, 2.0, 3.0]), np.full(3, NAN)) is None
    assert analytics.ratio_of_sums(np.full(3, NAN), np.array([1.0, 2.0, 3.0])) is None
    assert analytics.ratio_of_sums(np.array([1.0, 2.0, 3.0]), np.zeros(3)) is None


def test_atm_strike_is_the_nearest_to_the_forward_lower_on_a_tie():
    assert analytics.atm_index(STRIKES, 113.0) == 1
    assert analytics.atm_index(STRIKES, 115.0) == 1
    assert analytics.atm_index(STRIKES, 116.0) == 2
    assert analytics.atm_index(STRIKES, 10.0) == 0
    assert analytics.atm_index(STRIKES, NAN) is None


def test_summary_of_a_hand_made_chain():
    ce = leg(ltp=[14.0, 5.0, 1.0], iv=[0.25, 0.20, 0.18], oi=[10, 20, 30], volume=[100, NAN, 50])
    pe = leg(ltp=[1.0, 4.0, 11.0], iv=[0.27, 0.22, 0.19], oi=[40, 20, 5], volume=[30, 60, 10])
    summary = analytics.summarise(STRIKES, ce, pe, forward=111.0)
    assert summary == analytics.Summary(
        pcr_oi=pytest.approx(65 / 60),
        pcr_volume=pytest.approx(100 / 150),
        max_pain=110.0,
        atm_index=1,
        atm_strike=110.0,
        atm_iv=pytest.approx(0.21),
        straddle=9.0,
    )


def test_summary_unknowns_are_null_never_zero():
    ce = leg(ltp=[NAN, 5.0, NAN])
    pe = leg()
    summary = analytics.summarise(STRIKES, ce, pe, forward=NAN)
    assert summary == analytics.Summary(None, None, None, None, None, None, None)
    # A forward but only a call premium at the ATM strike: no straddle, IV from what is known.
    ce = leg(ltp=[NAN, 5.0, NAN], iv=[NAN, 0.2, NAN])
    summary = analytics.summarise(STRIKES, ce, pe, forward=110.0)
    assert (summary.atm_strike, summary.atm_iv, summary.straddle) == (110.0, 0.2, None)


def test_buildup_from_the_signs_of_price_and_oi_change():
    ltp = np.array([12.0, 8.0, 8.0, 12.0, 10.0, 12.0, NAN, 12.0])
    close = np.array([10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, NAN])
    delta = analytics.oi_change(
        np.array([150.0, 150.0, 50.0, 50.0, 150.0, 100.0, 150.0, 150.0]), np.full(8, 100.0)
    )
    names = [analytics.BUILDUPS[c] for c in analytics.buildup_codes(ltp, close, delta)]
    assert names == [
        "long_buildup",  # price up, OI up
        "short_buildup",  # price down, OI up
        "long_unwinding",  # price down, OI down
        "short_covering",  # price up, OI down
        None,  # price unchanged
        None,  # OI unchanged
        None,  # price unknown
        None,  # previous close unknown
    ]


def test_oi_change_is_unknown_without_a_baseline():
    delta = analytics.oi_change(np.array([150.0, 150.0, NAN]), np.array([100.0, NAN, 100.0]))
    assert delta[0] == 50.0 and np.isnan(delta[1]) and np.isnan(delta[2])


def test_days_to_expiry():
    assert analytics.days_to_expiry(now_epoch_s=0.0, expiry_epoch_s=1.5 * 86_400) == 1.5
    assert analytics.days_to_expiry(now_epoch_s=0.0, expiry_epoch_s=NAN) is None


def test_iv_rank_and_percentile():
    history = np.array([0.10, 0.20, 0.30])
    rank, percentile = analytics.iv_rank_percentile(0.25, history)
    assert rank == pytest.approx(75.0) and percentile == pytest.approx(200 / 3)
    # Above every earlier day: the top of the range, and of the distribution.
    assert analytics.iv_rank_percentile(0.35, history) == (100.0, 100.0)
    assert analytics.iv_rank_percentile(0.05, history) == (0.0, 0.0)
    # Without history, or without a current value: unknown.
    assert analytics.iv_rank_percentile(0.25, np.zeros(0)) == (None, None)
    assert analytics.iv_rank_percentile(None, history) == (None, None)
    # A flat history equal to today: no range to rank in.
    assert analytics.iv_rank_percentile(0.2, np.array([0.2, 0.2])) == (None, 0.0)
