"""Greeks engine behaviour: reason codes, pair convention, units, time, parity forward, blocks."""

import datetime as dt
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vollib.black.implied_volatility import implied_volatility as vollib_iv

from streaming.greeks import (
    DEFAULT_RISK_FREE_RATE,
    FAILURE_FLAGS,
    Flag,
    GreeksBatch,
    black76_price,
    compute_greeks,
    compute_greeks_spot,
    expiry_close_epoch_s,
    flag_names,
    forward_from_parity,
    implied_volatility,
    years_to_expiry,
)

F = 24_000.0
R = DEFAULT_RISK_FREE_RATE
T = 7 / 365
TICK = 0.05


def price(strike, sigma, is_call, *, forward=F, t=T, r=R):
    return black76_price(
        forward=forward, strike=strike, t_years=t, sigma=sigma, r=r, is_call=is_call
    )


def one(**kwargs) -> tuple[float, int]:
    """IV and flags of a single option (defaults: NIFTY-like weekly, no vega floor)."""
    args = {"forward": F, "strike": 24_500.0, "t_years": T, "is_call": True, "r": R}
    args.setdefault("min_vega_per_point", 0.0)
    args.update(kwargs)
    g = compute_greeks(**args)
    return float(g.iv), int(g.flags)


def assert_no_iv(g: GreeksBatch, i=()) -> None:
    for name in ("iv", "delta", "gamma", "theta", "vega", "rho"):
        assert math.isnan(getattr(g, name)[i]), name


# ------------------------------------------------------------------------------ black76_price


def test_black76_price_matches_vollib_black():
    from vollib.black import black

    for k in (20_000.0, 23_950.0, 24_000.0, 28_000.0):
        for c in (True, False):
            got = float(price(k, 0.17, c))
            assert got == pytest.approx(black("c" if c else "p", F, k, T, R, 0.17), rel=1e-12)


def test_black76_price_broadcasts_and_has_intrinsic_at_expiry():
    strikes = np.array([[23_000.0], [25_000.0]])
    got = black76_price(
        forward=F, strike=strikes, t_years=np.array([0.0, T, -1.0]), sigma=0.2, r=R, is_call=True
    )
    assert got.shape == (2, 3)
    assert got[0, 0] == 1000.0 and got[1, 0] == 0.0
    assert got[0, 2] == 1000.0  # past expiry: undiscounted intrinsic
    parity = price(23_000.0, 0.2, True) - price(23_000.0, 0.2, False)
    assert float(parity) == pytest.approx(math.exp(-R * T) * 1000.0, rel=1e-12)


# ------------------------------------------------------------------------------ reason codes


def test_flag_names_are_stable_snake_case():
    assert flag_names(0) == []
    assert [flag_names(f) for f in Flag if f.value] == [
        ["below_intrinsic"],
        ["above_max"],
        ["expired"],
        ["no_price"],
        ["no_forward"],
        ["stale_underlying"],
        ["low_vega"],
        ["no_convergence"],
        ["bad_input"],
        ["spot_fallback"],
        ["pair_iv"],
    ]
    assert flag_names(Flag.NO_PRICE | Flag.STALE_UNDERLYING) == ["no_price", "stale_underlying"]
    assert [int(f) for f in Flag if f.value] == [1 << i for i in range(11)]


def test_below_intrinsic():
    # An ITM call quoted under its discounted intrinsic value, with no pair to fall back on.
    iv, flags = one(strike=23_000.0, price=998.7)  # e^{-rT} * 1000 = 998.75
    assert math.isnan(iv) and flags == Flag.BELOW_INTRINSIC
    # Exactly the undiscounted intrinsic: a volatility of 0 is not an answer either.
    iv, flags = one(strike=23_000.0, price=1000.0 * math.exp(-R * T))
    assert math.isnan(iv) and flags == Flag.BELOW_INTRINSIC


def test_above_max():
    iv, flags = one(strike=24_500.0, price=F)  # a call worth more than the forward
    assert math.isnan(iv) and flags == Flag.ABOVE_MAX
    iv, flags = one(strike=24_500.0, is_call=False, price=24_600.0)  # a put worth more than K
    assert math.isnan(iv) and flags == Flag.ABOVE_MAX


@pytest.mark.parametrize("t", [0.0, -1e-6, -1.0])
def test_expired(t):
    iv, flags = one(t_years=t, price=10.0)
    assert math.isnan(iv) and flags == Flag.EXPIRED


@pytest.mark.parametrize("p", [math.nan, 0.0, -0.05, math.inf])
def test_no_price(p):
    iv, flags = one(price=p)
    assert math.isnan(iv) and flags == Flag.NO_PRICE


@pytest.mark.parametrize("forward", [math.nan, 0.0, -5.0, math.inf])
def test_no_forward(forward):
    iv, flags = one(forward=forward, price=50.0)
    assert math.isnan(iv) and flags == Flag.NO_FORWARD


def test_stale_underlying_masks_only_the_stale_options():
    g = compute_greeks(
        price=np.array([50.0, 50.0]), forward=F, strike=24_500.0, t_years=T, is_call=True, r=R,
        stale=np.array([True, False]),
    )  # fmt: skip
    assert g.flags.tolist() == [Flag.STALE_UNDERLYING, 0]
    assert_no_iv(g, 0)
    assert math.isfinite(g.iv[1])


def test_low_vega():
    # A one-tick call 2000 points out of the money a day before expiry: a half-tick error
    # moves its IV by many points.
    g = compute_greeks(
        price=TICK, forward=F, strike=26_000.0, t_years=1 / 365, is_call=True, r=R
    )
    assert int(g.flags) == Flag.LOW_VEGA
    assert_no_iv(g)
    # The same option with the floor disabled has an IV, and its vega is below the default.
    g = compute_greeks(
        price=TICK, forward=F, strike=26_000.0, t_years=1 / 365, is_call=True, r=R,
        min_vega_per_point=0.0,
    )  # fmt: skip
    assert int(g.flags) == 0 and float(g.vega) < 0.025
    # A liquid near-the-money option passes the default floor.
    g = compute_greeks(
        price=price(24_100.0, 0.12, True), forward=F, strike=24_100.0, t_years=T, is_call=True,
        r=R,
    )  # fmt: skip
    assert int(g.flags) == 0 and float(g.vega) > 1.0


@pytest.mark.parametrize(
    ("strike", "t", "r"),
    [(math.nan, T, R), (0.0, T, R), (-100.0, T, R), (24_500.0, math.nan, R), (24_500.0, T, math.nan)],
)
def test_bad_input(strike, t, r):
    iv, flags = one(strike=strike, t_years=t, r=r, price=50.0)
    assert math.isnan(iv) and flags & Flag.BAD_INPUT


def test_no_convergence_when_the_iteration_cap_is_hit():
    # Solves take 1-3 Householder steps; a cap of one step leaves most of them unfinished.
    g = compute_greeks(
        price=price(np.arange(22_000.0, 26_001.0, 500.0), 0.15, True), forward=F,
        strike=np.arange(22_000.0, 26_001.0, 500.0), t_years=T, is_call=True, r=R,
        min_vega_per_point=0.0, max_iterations=1,
    )  # fmt: skip
    capped = g.flags == Flag.NO_CONVERGENCE
    assert capped.any()
    assert np.isnan(g.iv[capped]).all() and np.isnan(g.delta[capped]).all()
    assert (g.flags[~capped] == 0).all()


def test_one_bad_option_does_not_spoil_the_batch():
    """Every failure in one batch: NaN where no IV, never 0 or ±inf, and the good ones exact."""
    good = float(price(24_500.0, 0.14, True))
    prices = np.array([good, math.nan, good, good, F, 0.01, good, good, good])
    forwards = np.array([F, F, math.nan, F, F, F, F, F, F])
    strikes = np.array([24_500.0, 24_500.0, 24_500.0, 24_500.0, 24_500.0, 23_000.0, 0.0,
                        24_500.0, 24_500.0])  # fmt: skip
    times = np.array([T, T, T, 0.0, T, T, T, T, T])
    stale = np.array([False, False, False, False, False, False, False, True, False])
    g = compute_greeks(
        price=prices, forward=forwards, strike=strikes, t_years=times, is_call=True, r=R,
        stale=stale,
    )  # fmt: skip
    assert g.flags.tolist() == [
        0, Flag.NO_PRICE, Flag.NO_FORWARD, Flag.EXPIRED, Flag.ABOVE_MAX, Flag.BELOW_INTRINSIC,
        Flag.BAD_INPUT, Flag.STALE_UNDERLYING, 0,
    ]  # fmt: skip
    for out in (g.iv, g.delta, g.gamma, g.theta, g.vega, g.rho):
        assert not np.isinf(out).any()
        assert (out[np.isfinite(out)] != 0.0).all()
    failed = (g.flags & FAILURE_FLAGS) != 0
    assert np.isnan(g.iv[failed]).all() and np.isfinite(g.iv[~failed]).all()
    assert g.iv[0] == pytest.approx(0.14, abs=1e-12) and g.iv[8] == g.iv[0]


# ------------------------------------------------------------------------------ OTM convention


def test_itm_option_takes_the_iv_of_its_otm_pair():
    strike = 23_500.0  # call ITM, put OTM
    call = float(np.round(price(strike, 0.16, True) / TICK) * TICK)
    put = float(np.round(price(strike, 0.15, False) / TICK) * TICK)
    g = compute_greeks(
        price=np.array([call, put]), pair_price=np.array([put, call]), forward=F, strike=strike,
        t_years=T, is_call=np.array([True, False]), r=R,
    )  # fmt: skip
    assert g.flags.tolist() == [Flag.PAIR_IV, 0]
    assert g.iv[0] == g.iv[1]
    assert g.iv[1] == pytest.approx(vollib_iv(put, F, strike, R, T, "p"), abs=1e-9)
    # The ITM call's Greeks are those of a call at the put's IV, priced by parity.
    assert g.vega[0] == g.vega[1] and g.gamma[0] == g.gamma[1]
    assert g.delta[0] - g.delta[1] == pytest.approx(math.exp(-R * T), rel=1e-12)
    parity_call = put + math.exp(-R * T) * (F - strike)
    assert g.rho[0] == pytest.approx(-T * parity_call / 100, rel=1e-12)


def test_reused_solve_of_a_neighbour_keeps_each_options_own_time():
    """Neighbours with the same normalised problem but different expiries get their own IV."""
    times = np.array([3 / 365, 10 / 365])
    undiscounted = 80.0
    prices = undiscounted * np.exp(-R * times)  # same undiscounted premium, same F and K
    iv, flags = implied_volatility(price=prices, forward=F, strike=24_500.0, t_years=times,
                                   is_call=True, r=R)  # fmt: skip
    assert (flags == 0).all()
    assert iv[0] * math.sqrt(times[0]) == pytest.approx(iv[1] * math.sqrt(times[1]), rel=1e-15)
    for i in range(2):
        assert abs(iv[i] - vollib_iv(prices[i], F, 24_500.0, R, times[i], "c")) <= 1e-9


def test_itm_option_without_a_usable_pair_uses_its_own_time_value():
    strike = 23_500.0
    call = float(price(strike, 0.16, True))
    for pair in (None, math.nan, 0.0):
        g = compute_greeks(
            price=call, pair_price=pair, forward=F, strike=strike, t_years=T, is_call=True, r=R
        )
        assert int(g.flags) == 0
        assert float(g.iv) == pytest.approx(0.16, abs=1e-9)


def test_itm_option_needs_no_own_price_when_its_pair_is_priced():
    put = float(price(23_500.0, 0.15, False))
    g = compute_greeks(
        price=math.nan, pair_price=put, forward=F, strike=23_500.0, t_years=T, is_call=True, r=R
    )
    assert int(g.flags) == Flag.PAIR_IV
    assert float(g.iv) == pytest.approx(0.15, abs=1e-9)


def test_otm_option_ignores_its_pair_and_pair_failures_travel_to_the_itm_side():
    # The OTM put is solved on its own price even when the ITM call's price is given.
    g = compute_greeks(
        price=float(price(23_500.0, 0.15, False)), pair_price=12_345.0, forward=F,
        strike=23_500.0, t_years=T, is_call=False, r=R,
    )  # fmt: skip
    assert int(g.flags) == 0 and float(g.iv) == pytest.approx(0.15, abs=1e-9)
    # An ITM call whose OTM put is quoted above K gets the put's ABOVE_MAX.
    g = compute_greeks(
        price=600.0, pair_price=30_000.0, forward=F, strike=23_500.0, t_years=T, is_call=True,
        r=R,
    )  # fmt: skip
    assert int(g.flags) == Flag.PAIR_IV | Flag.ABOVE_MAX
    assert_no_iv(g)


def test_chain_grid_itm_side_matches_lets_be_rational_on_the_otm_price():
    """Deep ITM to deep OTM, 1 minute to 1 year: both sides of a strike carry vollib's OTM IV."""
    minute = 60 / (365 * 86_400)
    strikes = np.arange(20_000.0, 28_001.0, 500.0)
    for t in (minute, 1 / 365, 30 / 365, 1.0):
        for sigma in (0.1, 0.3, 1.0):
            calls = np.round(price(strikes, sigma, True, t=t) / TICK) * TICK
            puts = np.round(price(strikes, sigma, False, t=t) / TICK) * TICK
            g = compute_greeks(
                price=np.concatenate([calls, puts]), pair_price=np.concatenate([puts, calls]),
                forward=F, strike=np.concatenate([strikes, strikes]), t_years=t,
                is_call=np.repeat([True, False], strikes.size), r=R, min_vega_per_point=0.0,
            )  # fmt: skip
            for i, k in enumerate(strikes):
                otm_is_call = k >= F
                otm_price = calls[i] if otm_is_call else puts[i]
                call_iv, put_iv = g.iv[i], g.iv[i + strikes.size]
                if otm_price <= 0:
                    # No OTM quote: the OTM side has no price and the ITM side falls back to
                    # its own time value (or, rounded to a tick, none).
                    itm = i + strikes.size if otm_is_call else i
                    otm = i if otm_is_call else i + strikes.size
                    assert g.flags[otm] == Flag.NO_PRICE
                    assert g.flags[itm] in (0, Flag.BELOW_INTRINSIC)
                    own = calls[i] if not otm_is_call else puts[i]
                    if g.flags[itm] == 0:
                        ref = vollib_iv(own, F, k, R, t, "p" if otm_is_call else "c")
                        assert abs(g.iv[itm] - ref) <= 1e-9
                    continue
                ref = vollib_iv(otm_price, F, k, R, t, "c" if otm_is_call else "p")
                assert call_iv == put_iv
                assert abs(call_iv - ref) <= 1e-9, (t, sigma, k, call_iv, ref)


# ------------------------------------------------------------------------------ units


def test_greek_units_by_finite_differences():
    """theta per calendar day, vega per vol point, rho per 1 % at fixed F, delta/gamma dV/dF."""
    k, sigma, t = 24_300.0, 0.18, 20 / 365
    for is_call in (True, False):
        p = float(price(k, sigma, is_call, t=t))
        g = compute_greeks(price=p, forward=F, strike=k, t_years=t, is_call=is_call, r=R)

        def v(forward=F, t_=t, sigma_=sigma, r_=R, c=is_call):
            return float(black76_price(
                forward=forward, strike=k, t_years=t_, sigma=sigma_, r=r_, is_call=c))  # fmt: skip

        hf, ht, hs, hr = 0.5, 1e-5, 1e-5, 1e-5
        assert float(g.iv) == pytest.approx(sigma, abs=1e-12)
        assert float(g.delta) == pytest.approx((v(F + hf) - v(F - hf)) / (2 * hf), rel=1e-7)
        gamma_fd = (v(F + hf) - 2 * v() + v(F - hf)) / hf**2
        assert float(g.gamma) == pytest.approx(gamma_fd, rel=1e-4)
        theta_fd = -(v(t_=t + ht) - v(t_=t - ht)) / (2 * ht) / 365
        assert float(g.theta) == pytest.approx(theta_fd, rel=1e-6)
        vega_fd = (v(sigma_=sigma + hs) - v(sigma_=sigma - hs)) / (2 * hs) * 0.01
        assert float(g.vega) == pytest.approx(vega_fd, rel=1e-7)
        rho_fd = (v(r_=R + hr) - v(r_=R - hr)) / (2 * hr) * 0.01
        assert float(g.rho) == pytest.approx(rho_fd, rel=1e-6)
    # Orders of magnitude a trader checks against Kite/Sensibull for an ATM weekly.
    g = compute_greeks(price=float(price(F, 0.12, True)), forward=F, strike=F, t_years=T,
                       is_call=True, r=R)  # fmt: skip
    assert -40 < float(g.theta) < -10 and 10 < float(g.vega) < 15


def test_spot_fallback_is_black_scholes_with_spot_greeks():
    spot, q, k, sigma, t = 24_000.0, 0.012, 24_200.0, 0.2, 45 / 365
    for is_call in (True, False):

        def v(s=spot, t_=t, r_=R, c=is_call):
            fwd = s * math.exp((r_ - q) * t_)
            return float(black76_price(
                forward=fwd, strike=k, t_years=t_, sigma=sigma, r=r_, is_call=c))  # fmt: skip

        g = compute_greeks_spot(price=v(), spot=spot, strike=k, t_years=t, is_call=is_call, r=R, q=q)
        assert int(g.flags) == Flag.SPOT_FALLBACK
        assert float(g.iv) == pytest.approx(sigma, abs=1e-12)
        d1 = (math.log(spot / k) + (R - q + sigma**2 / 2) * t) / (sigma * math.sqrt(t))
        n_d1 = 0.5 * math.erfc(-d1 / math.sqrt(2)) if is_call else -0.5 * math.erfc(d1 / math.sqrt(2))
        assert float(g.delta) == pytest.approx(math.exp(-q * t) * n_d1, rel=1e-12)
        h = 0.5
        assert float(g.gamma) == pytest.approx((v(spot + h) - 2 * v() + v(spot - h)) / h**2, rel=1e-4)
        theta_fd = -(v(t_=t + 1e-5) - v(t_=t - 1e-5)) / 2e-5 / 365
        assert float(g.theta) == pytest.approx(theta_fd, rel=1e-6)
        rho_fd = (v(r_=R + 1e-5) - v(r_=R - 1e-5)) / 2e-5 * 0.01
        assert float(g.rho) == pytest.approx(rho_fd, rel=1e-6)
        fwd = spot * math.exp((R - q) * t)
        b76 = compute_greeks(price=v(), forward=fwd, strike=k, t_years=t, is_call=is_call, r=R)
        assert float(g.vega) == pytest.approx(float(b76.vega), rel=1e-12)
    assert int(compute_greeks_spot(price=1.0, spot=math.nan, strike=k, t_years=t, is_call=True,
                                   r=R).flags) == Flag.SPOT_FALLBACK | Flag.NO_FORWARD  # fmt: skip


# ------------------------------------------------------------------------------ time


def test_expiry_is_1530_ist():
    close = expiry_close_epoch_s(dt.date(2025, 11, 25))
    assert close == dt.datetime(2025, 11, 25, 10, 0, tzinfo=dt.UTC).timestamp()


def test_years_to_expiry_is_calendar_seconds_over_365_days():
    close = expiry_close_epoch_s(dt.date(2025, 11, 27))
    now = np.array([close - 86_400.0, close - 60.0, close, close + 1.0])
    t = years_to_expiry(now_epoch_s=now, expiry_epoch_s=close)
    assert t.tolist() == [1 / 365, 60 / (365 * 86_400), 0.0, -1 / (365 * 86_400)]
    # A weekend counts: Friday 15:30 IST to the next Thursday's close is six calendar days.
    friday = dt.datetime(2025, 11, 21, 15, 30, tzinfo=dt.timezone(dt.timedelta(hours=5.5)))
    t = years_to_expiry(now_epoch_s=friday.timestamp(), expiry_epoch_s=close)
    assert float(t) == pytest.approx(6 / 365, rel=1e-15)


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("t", [1 / 365, 7 / 365, 30 / 365, 60 / 365])
@pytest.mark.parametrize("forward", [24_123.45, 51_987.6, 24_000.0])
def test_forward_from_parity_recovers_a_known_forward_within_a_tick(forward, t):
    strikes = np.arange(round(forward * 0.9, -2), forward * 1.1, 50.0)
    m = np.log(strikes / forward)
    smile = 0.13 - 0.2 * m + 1.5 * m * m
    calls = np.round(black76_price(forward=forward, strike=strikes, t_years=t, sigma=smile, r=R,
                                   is_call=True) / TICK) * TICK  # fmt: skip
    puts = np.round(black76_price(forward=forward, strike=strikes, t_years=t, sigma=smile, r=R,
                                  is_call=False) / TICK) * TICK  # fmt: skip
    got = forward_from_parity(strikes=strikes, call_prices=calls, put_prices=puts, t_years=t, r=R)
    assert abs(got - forward) <= TICK, (got, forward)


def test_forward_from_parity_uses_the_pair_nearest_the_money_and_skips_unpriced():
    strikes = np.array([23_900.0, 24_000.0, 24_100.0, 24_200.0])
    calls = np.array([160.0, 95.0, 40.0, math.nan])
    puts = np.array([50.0, math.nan, 130.0, 0.0])
    got = forward_from_parity(strikes=strikes, call_prices=calls, put_prices=puts, t_years=T, r=R)
    assert got == pytest.approx(24_100.0 + math.exp(R * T) * (40.0 - 130.0), rel=1e-15)


def test_forward_from_parity_is_nan_without_a_usable_pair():
    nan = math.nan
    assert math.isnan(forward_from_parity(strikes=[24_000.0], call_prices=[nan], put_prices=[10.0],
                                          t_years=T, r=R))  # fmt: skip
    assert math.isnan(forward_from_parity(strikes=[], call_prices=[], put_prices=[], t_years=T,
                                          r=R))  # fmt: skip
    assert math.isnan(forward_from_parity(strikes=[24_000.0], call_prices=[10.0],
                                          put_prices=[10.0], t_years=nan, r=R))  # fmt: skip
    with pytest.raises(ValueError, match="differ in length"):
        forward_from_parity(strikes=[1.0, 2.0], call_prices=[1.0], put_prices=[1.0], t_years=T, r=R)


# ------------------------------------------------------------------------------ batch shape


def test_blocks_give_identical_results_and_shapes_broadcast():
    rng = np.random.default_rng(7)
    strikes = rng.uniform(20_000, 28_000, 1000).round(-1)
    calls = rng.random(1000) < 0.5
    prices = np.round(price(strikes, rng.uniform(0.08, 0.6, 1000), calls) / TICK) * TICK
    whole = compute_greeks(price=prices, forward=F, strike=strikes, t_years=T, is_call=calls, r=R)
    blocked = compute_greeks(price=prices, forward=F, strike=strikes, t_years=T, is_call=calls,
                             r=R, block_size=7)  # fmt: skip
    for name in ("iv", "delta", "gamma", "theta", "vega", "rho", "flags"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(blocked, name))
    assert whole.flags.dtype == np.uint16 and whole.iv.dtype == np.float64
    assert len(whole) == 1000
    grid = compute_greeks(price=prices.reshape(20, 50), forward=F, strike=strikes.reshape(20, 50),
                          t_years=T, is_call=calls.reshape(20, 50), r=R)  # fmt: skip
    assert grid.iv.shape == (20, 50)
    np.testing.assert_array_equal(grid.iv.ravel(), whole.iv)
    with pytest.raises(ValueError, match="broadcast"):
        compute_greeks(price=prices, forward=F, strike=strikes[:3], t_years=T, is_call=True, r=R)


def test_historical_candles_use_the_same_function():
    """A column of candle closes and timestamps goes through the batch API unchanged."""
    close = expiry_close_epoch_s(dt.date(2025, 11, 27))
    stamps = close - np.arange(1, 6) * 86_400.0
    t = years_to_expiry(now_epoch_s=stamps, expiry_epoch_s=close)
    closes = price(24_200.0, 0.13, True, t=t)
    iv, flags = implied_volatility(price=closes, forward=F, strike=24_200.0, t_years=t,
                                   is_call=True, r=R)  # fmt: skip
    assert (flags == 0).all()
    np.testing.assert_allclose(iv, 0.13, atol=1e-12)


# ------------------------------------------------------------------------------ fuzz

# Mostly plausible market numbers, with any float at all (NaN, ±inf, ±1e308, -0.0) mixed in.
_any_float = st.one_of(
    st.floats(1e-4, 1e5), st.floats(allow_nan=True, allow_infinity=True, width=64)
)


def _columns(n: int):
    floats = [st.lists(_any_float, min_size=n, max_size=n) for _ in range(5)]
    flags = [st.lists(st.booleans(), min_size=n, max_size=n) for _ in range(2)]
    return st.tuples(*floats, *flags)


_arrays = st.integers(1, 12).flatmap(_columns)


@settings(max_examples=300, deadline=None)
@given(columns=_arrays, r=_any_float)
def test_garbage_in_gives_flags_not_exceptions(columns, r):
    """Any floats at all: no exception, no IV of 0 or ±inf, NaN exactly where a failure flag is."""
    prices, pairs, forwards, strikes, times, calls, stale = (np.array(c) for c in columns)
    for fn, underlying in ((compute_greeks, "forward"), (compute_greeks_spot, "spot")):
        g = fn(price=prices, pair_price=pairs, strike=strikes, t_years=times, is_call=calls,
               r=r, stale=stale, **{underlying: forwards})  # fmt: skip
        failed = (g.flags & FAILURE_FLAGS) != 0
        assert np.isnan(g.iv[failed]).all()
        assert (np.isfinite(g.iv[~failed]) & (g.iv[~failed] > 0)).all()
        for out in (g.delta, g.gamma, g.theta, g.vega, g.rho):
            assert np.isnan(out[failed]).all()
            assert np.isfinite(out[~failed]).all()
