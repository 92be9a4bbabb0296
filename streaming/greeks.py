"""Implied volatility and Greeks for NSE options: Black-76 on a forward, numpy + numba, no Django.

Model
    Black-76 on a forward ``F`` per (underlying, expiry): the same-expiry future where one
    trades, otherwise the forward implied by put-call parity (:func:`forward_from_parity`).
    The premium is discounted at ``r``; ``r`` only discounts the premium, the forward carries
    all drift. ``r`` is a setting read at the edge and passed in; :data:`DEFAULT_RISK_FREE_RATE`
    (6.5 %, T-bill-like, continuously compounded) is the documented default, not NSE's 10 %.
    :func:`compute_greeks_spot` is the explicit Black-Scholes-on-spot fallback
    (``F = S e^{(r - q) T}``), flagged :attr:`Flag.SPOT_FALLBACK` on every option.

Time
    Calendar time from now to 15:30 IST on the expiry date, in seconds, over 365 days
    (:func:`expiry_close_epoch_s`, :func:`years_to_expiry`).

Implied volatility
    Solved on the out-of-the-money side of each strike: an in-the-money option whose opposite
    option at the same strike (``pair_price``) has a usable price gets the IV of that OTM pair,
    so call and put at a strike show one IV (Sensibull's convention). The solver follows
    Jäckel's "Let's Be Rational" formulation (normalised price, rational-cubic initial guess,
    third-order Householder steps on transformed objectives), in numba loops over arrays.

Units of the outputs (Black-76 path; see :func:`compute_greeks_spot` for the spot path)
    iv     annualised volatility as a fraction (0.15 = 15 %).
    delta  dV/dF: the derivative of the *discounted* premium with respect to the forward,
           ``e^{-rT} N(d1)`` for a call and ``-e^{-rT} N(-d1)`` for a put.
    gamma  d2V/dF2 per rupee of forward, ``e^{-rT} n(d1) / (F sigma sqrt(T))``.
    theta  change of the premium per calendar day as time passes at a fixed forward and
           volatility, ``-dV/dT / 365``, rupees per day (negative for a long option).
    vega   change of the premium per 1 volatility point (0.01 of sigma), rupees.
    rho    change of the premium per 1 % of rate (0.01 of r) at a fixed forward,
           ``-T V / 100``, rupees.

Reason codes
    No IV is ever 0, infinite, or an exception for one bad option: where no IV exists the IV
    and every Greek are NaN and :class:`Flag` bits say why; :func:`flag_names` turns them into
    the stable snake_case names carried in snapshots.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy.special import ndtr

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_ITERATIONS",
    "DEFAULT_MIN_VEGA_PER_POINT",
    "DEFAULT_RISK_FREE_RATE",
    "FAILURE_FLAGS",
    "IST",
    "SECONDS_PER_YEAR",
    "Flag",
    "GreeksBatch",
    "black76_price",
    "compute_greeks",
    "compute_greeks_spot",
    "expiry_close_epoch_s",
    "flag_names",
    "forward_from_parity",
    "implied_volatility",
    "years_to_expiry",
]

#: A T-bill-like annual rate, continuously compounded; NSE's fixed 10 % is not a market rate.
DEFAULT_RISK_FREE_RATE = 0.065

#: Options per numba call: inputs of one block (about 0.5 MB per array) stay in cache.
DEFAULT_BLOCK_SIZE = 65_536

#: Below this vega (rupees per volatility point) half a tick (0.025 of NSE's 0.05 tick) of
#: price rounding moves the IV by more than one volatility point: the IV is unreliable.
DEFAULT_MIN_VEGA_PER_POINT = 0.025

SECONDS_PER_YEAR = 365.0 * 86_400.0

#: India has no daylight saving time: a fixed offset needs no tz database.
IST = dt.timezone(dt.timedelta(hours=5, minutes=30), name="IST")

#: NSE's equity-derivative close, when options expire.
EXPIRY_CLOSE_IST = dt.time(15, 30)


class Flag(enum.IntFlag):
    """Why an option has no IV (NaN), plus informational labels that leave the IV in place.

    The bits are stable: they travel as integers in snapshots; :func:`flag_names` gives the
    names. Failure bits: BELOW_INTRINSIC .. LOW_VEGA, NO_CONVERGENCE, BAD_INPUT. Labels:
    SPOT_FALLBACK (Black-Scholes on spot, not Black-76 on a forward) and PAIR_IV (an ITM
    option carrying the IV solved on its OTM pair).
    """

    NONE = 0
    #: The (undiscounted) premium is at or below intrinsic value: no positive volatility fits.
    BELOW_INTRINSIC = 1 << 0
    #: The premium is at or above the no-arbitrage maximum (F for a call, K for a put).
    ABOVE_MAX = 1 << 1
    #: Time to expiry is zero or negative.
    EXPIRED = 1 << 2
    #: No usable premium (NaN, zero or negative).
    NO_PRICE = 1 << 3
    #: No usable forward (NaN, zero or negative), e.g. no future and no parity pair.
    NO_FORWARD = 1 << 4
    #: The underlying/forward is stale (the caller's mask).
    STALE_UNDERLYING = 1 << 5
    #: Vega below ``min_vega_per_point``: a tick of price moves the IV too much to trust it.
    LOW_VEGA = 1 << 6
    #: The solver did not converge (never seen in tests; present so it is never silent).
    NO_CONVERGENCE = 1 << 7
    #: Strike, time or rate is not a finite number (strike must also be positive), or the
    #: inputs are so extreme that a Greek overflows double precision.
    BAD_INPUT = 1 << 8
    #: Label: Black-Scholes on spot with r and q, not Black-76 on a forward.
    SPOT_FALLBACK = 1 << 9
    #: Label: an ITM option whose IV was solved on the OTM option of the same strike.
    PAIR_IV = 1 << 10


#: Flags that mean "no IV": the IV and every Greek are NaN where any of these is set.
FAILURE_FLAGS = (
    Flag.BELOW_INTRINSIC
    | Flag.ABOVE_MAX
    | Flag.EXPIRED
    | Flag.NO_PRICE
    | Flag.NO_FORWARD
    | Flag.STALE_UNDERLYING
    | Flag.LOW_VEGA
    | Flag.NO_CONVERGENCE
    | Flag.BAD_INPUT
)

_FLAG_NAMES: tuple[tuple[int, str], ...] = tuple(
    (int(f), f.name.lower()) for f in Flag if f.value and f.name is not None
)


def flag_names(flags: int) -> list[str]:
    """Stable snake_case names of the bits set in ``flags``, lowest bit first.

    ``flag_names(Flag.NO_PRICE | Flag.STALE_UNDERLYING) == ["no_price", "stale_underlying"]``;
    ``flag_names(0) == []``. These names are the JSON vocabulary of snapshots and the browser.
    """
    value = int(flags)
    return [name for bit, name in _FLAG_NAMES if value & bit]


@dataclass(frozen=True, slots=True)
class GreeksBatch:
    """IV and Greeks of a batch of options, one array element per option (input shape).

    iv     annualised volatility as a fraction (0.15 = 15 %); NaN where ``flags`` has a
           failure bit (see :data:`FAILURE_FLAGS`).
    delta  dV/dF, discounted premium w.r.t. the forward (spot path: dV/dS).
    gamma  d2V/dF2 per rupee of forward (spot path: d2V/dS2).
    theta  rupees per calendar day, ``-dV/dT / 365`` (forward, or spot on the spot path, fixed).
    vega   rupees per 1 volatility point (0.01 of sigma).
    rho    rupees per 1 % of rate (0.01 of r), at a fixed forward (spot path: fixed spot).
    flags  uint16 :class:`Flag` bits; :func:`flag_names` gives their names.
    All Greeks are NaN wherever ``iv`` is NaN.
    """

    iv: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray
    theta: np.ndarray
    vega: np.ndarray
    rho: np.ndarray
    flags: np.ndarray

    def __len__(self) -> int:
        return int(self.iv.size)


# --------------------------------------------------------------------------------------------
# Pricing


def black76_price(*, forward, strike, t_years, sigma, r, is_call) -> np.ndarray:
    """Black-76 premium of European options on a forward, discounted at ``r``.

    All arguments broadcast against each other. At ``t_years <= 0`` or ``sigma <= 0`` the
    result is the discounted intrinsic value ``e^{-rT} max(±(F - K), 0)``.
    """
    f = np.asarray(forward, dtype=np.float64)
    k = np.asarray(strike, dtype=np.float64)
    t = np.asarray(t_years, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    rr = np.asarray(r, dtype=np.float64)
    call = np.asarray(is_call, dtype=bool)
    f, k, t, s, rr, call = np.broadcast_arrays(f, k, t, s, rr, call)
    sign = np.where(call, 1.0, -1.0)
    intrinsic = np.maximum(sign * (f - k), 0.0)
    live = (t > 0.0) & (s > 0.0)
    tt = np.where(live, t, 1.0)
    sqrt_t = np.sqrt(tt)
    sig_sqrt_t = np.where(live, s, 1.0) * sqrt_t
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = np.log(f / k) / sig_sqrt_t + 0.5 * sig_sqrt_t
    d2 = d1 - sig_sqrt_t
    undiscounted = sign * (f * ndtr(sign * d1) - k * ndtr(sign * d2))
    undiscounted = np.where(live, undiscounted, intrinsic)
    return np.exp(-rr * np.maximum(t, 0.0)) * undiscounted


# --------------------------------------------------------------------------------------------
# Time


def expiry_close_epoch_s(expiry: dt.date) -> float:
    """Unix time (seconds) of 15:30 IST on ``expiry``, when NSE options expire."""
    return dt.datetime.combine(expiry, EXPIRY_CLOSE_IST, tzinfo=IST).timestamp()


def years_to_expiry(*, now_epoch_s, expiry_epoch_s) -> np.ndarray:
    """Calendar time to expiry in years: seconds / (365 * 86400); vectorised, broadcasting.

    Zero or negative means expired (compute_greeks flags it EXPIRED); it is not clipped.
    """
    now = np.asarray(now_epoch_s, dtype=np.float64)
    exp = np.asarray(expiry_epoch_s, dtype=np.float64)
    return (exp - now) / SECONDS_PER_YEAR


# --------------------------------------------------------------------------------------------
# Forward


def forward_from_parity(*, strikes, call_prices, put_prices, t_years, r) -> float:
    """Forward implied by put-call parity, ``F = K + e^{rT} (C - P)``, or NaN.

    Uses the strike whose call and put are both priced (finite, > 0) with the smallest
    ``|C - P|``, i.e. the pair nearest the money, where parity is least sensitive to the
    wide quotes of deep ITM options. NaN when no strike has both prices, or T/r are unusable.
    Rounding each premium to a 0.05 tick moves the result by at most ``0.05 e^{rT}``.
    """
    k = np.asarray(strikes, dtype=np.float64).ravel()
    c = np.asarray(call_prices, dtype=np.float64).ravel()
    p = np.asarray(put_prices, dtype=np.float64).ravel()
    if not (k.size == c.size == p.size):
        raise ValueError(
            f"forward_from_parity: strikes, call_prices, put_prices differ in length: "
            f"{k.size}, {c.size}, {p.size}"
        )
    t = float(t_years)
    rate = float(r)
    if not (math.isfinite(t) and math.isfinite(rate)) or k.size == 0:
        return math.nan
    usable = (
        np.isfinite(k) & (k > 0.0) & np.isfinite(c) & (c > 0.0) & np.isfinite(p) & (p > 0.0)
    )
    if not usable.any():
        return math.nan
    diff = np.where(usable, c - p, np.inf)
    i = int(np.argmin(np.abs(diff)))
    forward = float(k[i] + math.exp(rate * max(t, 0.0)) * diff[i])
    return forward if forward > 0.0 else math.nan


# --------------------------------------------------------------------------------------------
# Normalised Black and the implied-volatility solver (numba).
#
# Notation (Jäckel, "Let's Be Rational", Wilmott 2015): x = ln(F/K), s = sigma sqrt(T),
# normalised price b = undiscounted premium / sqrt(F K). An OTM option is mapped to the call
# form with x <= 0 (b(x, s, put) = b(-x, s, call)), where
#     b(s)    = e^{x/2} N(x/s + s/2) - e^{-x/2} N(x/s - s/2),   0 < b < b_max = e^{x/2},
#     b'(s)   = n(x/s + s/2) e^{x/2} = exp(-(x^2/s^2 + s^2/4) / 2) / sqrt(2 pi),
#     b''/b'  = x^2/s^3 - s/4,        b'''/b' = (b''/b')^2 - 3 x^2/s^4 - 1/4.
# The absolute rounding error of b from the formula above is ~1e-16 times its larger term, so
# the error it induces in s is ~1e-16 N(z)/n(z) (z = x/s + s/2 < 0 where it matters): tiny.
# Near b_max the solver works on c = b_max - b, evaluated directly without cancellation.

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_INV_SQRT_2PI = 1.0 / _SQRT_2PI
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_SQRT_3 = math.sqrt(3.0)
_LOWER_MAP_SCALE = 2.0 * math.pi / (3.0 * _SQRT_3)

_REGION_LOWER = 0
_REGION_MIDDLE = 1
_REGION_UPPER = 2

#: A Householder step smaller than this (relative) ends the iteration. After a third-order
#: step of relative size e the error left in s is about C e^4 s, and C <= 1.2 in every region
#: (measured from starts 1e-2 and 1e-3 off the root on 900 random (x, s)), so the error left
#: is at round-off; stopping at 1e-7 instead costs a confirming step on 40 % of a chain.
_STEP_TOLERANCE = 1e-4
_EPSILON = float(np.finfo(np.float64).eps)
#: A time value within this many ulps of the premium is indistinguishable from none.
_NOISE_ULPS = 16.0
#: Safety cap on Householder steps; typical solves take 2, reaching it flags NO_CONVERGENCE.
DEFAULT_MAX_ITERATIONS = 12


@njit(cache=True, fastmath=False, error_model="numpy", inline="always")
def _norm_cdf(z):
    return 0.5 * math.erfc(-z * _INV_SQRT_2)


@njit(cache=True, fastmath=False, error_model="numpy", inline="always")
def _norm_pdf(z):
    return _INV_SQRT_2PI * math.exp(-0.5 * z * z)


@njit(cache=True, fastmath=False, error_model="numpy")
def _inverse_norm_cdf(p):
    """Acklam's rational approximation of N^{-1}(p), relative error < 1.2e-9.

    Only feeds initial guesses (the Householder steps remove its error), so scipy's exact
    ndtri, which numba could call only through an uncacheable ctypes pointer, is not needed.
    """
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    if p < 0.02425:
        q = math.sqrt(-2.0 * math.log(p))
        return (
            ((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e00)
              * q - 2.549732539343734e00) * q + 4.374664141464968e00) * q + 2.938163982698783e00
        ) / ((((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e00)
              * q + 3.754408661907416e00) * q + 1.0)
    if p > 1.0 - 0.02425:
        return -_inverse_norm_cdf(1.0 - p)
    q = p - 0.5
    rr = q * q
    return (
        (((((-3.969683028665376e01 * rr + 2.209460984245205e02) * rr - 2.759285104469687e02)
           * rr + 1.383577518672690e02) * rr - 3.066479806614716e01) * rr + 2.506628277459239e00)
        * q
    ) / (((((-5.447609879822406e01 * rr + 1.615858368580409e02) * rr - 1.556989798598866e02)
           * rr + 6.680131188771972e01) * rr - 1.328068155288572e01) * rr + 1.0)


@njit(cache=True, fastmath=False, error_model="numpy", inline="always")
def _normalised_call(x, s, ex2, emx2):
    """b(x, s) for x <= 0 (OTM call form); ex2 = e^{x/2}, emx2 = e^{-x/2}."""
    if s <= 0.0:
        return 0.0
    h = x / s
    t = 0.5 * s
    return ex2 * _norm_cdf(h + t) - emx2 * _norm_cdf(h - t)


@njit(cache=True, fastmath=False, error_model="numpy", inline="always")
def _normalised_call_complement(x, s, ex2, emx2):
    """b_max - b(x, s) = e^{x/2} N(-x/s - s/2) + e^{-x/2} N(x/s - s/2), no cancellation."""
    h = x / s
    t = 0.5 * s
    return ex2 * _norm_cdf(-h - t) + emx2 * _norm_cdf(h - t)


@njit(cache=True, fastmath=False, error_model="numpy", inline="always")
def _normalised_vega(x, s):
    """b'(s) = dB/ds."""
    if s <= 0.0:
        return 0.0
    h = x / s
    t = 0.5 * s
    return _INV_SQRT_2PI * math.exp(-0.5 * (h * h + t * t))


@njit(cache=True, fastmath=False, error_model="numpy", inline="always")
def _rational_cubic(x, x_l, x_r, y_l, y_r, d_l, d_r, r):
    """Delbourgo-Gregory rational cubic through (x_l, y_l), (x_r, y_r) with slopes d_l, d_r.

    r = 3 is the cubic Hermite; larger r bends it towards the chord (r -> inf: linear).
    """
    h = x_r - x_l
    if h <= 0.0:
        return 0.5 * (y_l + y_r)
    t = (x - x_l) / h
    if not (r < 1e15):
        return y_r * t + y_l * (1.0 - t)
    omt = 1.0 - t
    t2 = t * t
    omt2 = omt * omt
    numerator = (
        y_r * t2 * t
        + (r * y_r - h * d_r) * t2 * omt
        + (r * y_l + h * d_l) * t * omt2
        + y_l * omt2 * omt
    )
    return numerator / (1.0 + (r - 3.0) * t * omt)


@njit(cache=True, fastmath=False, error_model="numpy")
def _rational_cubic_control(x_l, x_r, y_l, y_r, d_l, d_r, second_derivative, at_right):
    """Control parameter r that gives ``second_derivative`` at one end, kept shape-preserving.

    From d2y/dx2 at the left end = -2 (r (d_l - D) + d_r - d_l) / h and at the right end
    = 2 (r (d_r - D) - (d_r - d_l)) / h (D the chord slope). Where the data are convex or
    concave (D strictly between d_l and d_r) r is raised to the least value that keeps that
    shape at both ends; r stays above -1 so the denominator never vanishes.
    """
    h = x_r - x_l
    if h <= 0.0:
        return 3.0
    chord = (y_r - y_l) / h
    if at_right:
        denominator = d_r - chord
        numerator = (d_r - d_l) + 0.5 * h * second_derivative
    else:
        denominator = chord - d_l
        numerator = (d_r - d_l) + 0.5 * h * second_derivative
    r = numerator / denominator if denominator != 0.0 else math.inf
    if r != r:
        r = 3.0
    spread = d_r - d_l
    if (d_l < chord < d_r) or (d_r < chord < d_l):
        r_min = max(spread / (chord - d_l), spread / (d_r - chord))
        r = max(r, r_min)
    return min(max(r, -1.0 + 1e-12), 1e16)


@njit(cache=True, fastmath=False, error_model="numpy")
def _lower_map(x, s):
    """f(s) = (2 pi |x| / (3 sqrt 3)) N(x / (sqrt 3 s))^3 and df/ds, d2f/ds2 (x < 0).

    f matches b(s) to leading order as s -> 0 and inverts in closed form.
    """
    z = x / (_SQRT_3 * s)
    u = -z / s  # dz/ds > 0
    big_n = _norm_cdf(z)
    small_n = _norm_pdf(z)
    scale = _LOWER_MAP_SCALE * -x
    f = scale * big_n * big_n * big_n
    df = 3.0 * scale * big_n * big_n * small_n * u
    d2f = 3.0 * scale * big_n * small_n * (
        2.0 * small_n * u * u - z * big_n * u * u - 2.0 * big_n * u / s
    )
    return f, df, d2f


@njit(cache=True, fastmath=False, error_model="numpy")
def _inverse_lower_map(x, f):
    y = (f / (_LOWER_MAP_SCALE * -x)) ** (1.0 / 3.0)
    z = _inverse_norm_cdf(y)
    if not (z < 0.0):
        return math.nan
    return x / (_SQRT_3 * z)


@njit(cache=True, fastmath=False, error_model="numpy")
def _normalised_iv(beta, x, ex2, max_iterations):
    """s = sigma sqrt(T) such that b(x, s) = beta, for x <= 0 and 0 < beta < ex2 = e^{x/2}.

    Returns (s, iterations); s is NaN if beta is out of range or the iteration fails.
    """
    emx2 = 1.0 / ex2
    b_max = ex2
    if not (beta > 0.0) or not (beta < b_max):
        return math.nan, 0

    # Initial guess: four branches around the inflection point s_c = sqrt(2|x|).
    # At s_c, x/s + s/2 = 0, so b_c = e^{x/2}/2 - e^{-x/2} N(-s_c) and b'(s_c) = e^{x/2} n(0).
    s_c = math.sqrt(-2.0 * x)
    b_c = 0.5 * ex2 - emx2 * _norm_cdf(-s_c) if s_c > 0.0 else 0.0
    v_c = ex2 * _INV_SQRT_2PI
    if beta <= b_c:
        s_l = s_c - b_c / v_c
        if s_l > 0.0:
            b_l = _normalised_call(x, s_l, ex2, emx2)
        else:
            s_l = 0.0
            b_l = 0.0
        if beta < b_l:
            region = _REGION_LOWER
            v_l = _normalised_vega(x, s_l)
            b2_l = v_l * (x * x / (s_l * s_l * s_l) - 0.25 * s_l)
            f_l, df_ds, d2f_ds2 = _lower_map(x, s_l)
            df_db = df_ds / v_l
            d2f_db2 = d2f_ds2 / (v_l * v_l) - df_ds * b2_l / (v_l * v_l * v_l)
            r = _rational_cubic_control(0.0, b_l, 0.0, f_l, 1.0, df_db, d2f_db2, True)
            f = _rational_cubic(beta, 0.0, b_l, 0.0, f_l, 1.0, df_db, r)
            if not (f > 0.0):
                w = beta / b_l
                f = (f_l * w + b_l * (1.0 - w)) * w
            s = _inverse_lower_map(x, f)
        else:
            region = _REGION_MIDDLE
            v_l = _normalised_vega(x, s_l) if s_l > 0.0 else 0.0
            d_l = 1.0 / v_l if v_l > 0.0 else 1e300
            r = _rational_cubic_control(b_l, b_c, s_l, s_c, d_l, 1.0 / v_c, 0.0, True)
            s = _rational_cubic(beta, b_l, b_c, s_l, s_c, d_l, 1.0 / v_c, r)
    else:
        s_u = s_c + (b_max - b_c) / v_c
        b_u = _normalised_call(x, s_u, ex2, emx2)
        v_u = _normalised_vega(x, s_u)
        if beta <= b_u:
            region = _REGION_MIDDLE
            r = _rational_cubic_control(b_c, b_u, s_c, s_u, 1.0 / v_c, 1.0 / v_u, 0.0, False)
            s = _rational_cubic(beta, b_c, b_u, s_c, s_u, 1.0 / v_c, 1.0 / v_u, r)
        else:
            region = _REGION_UPPER
            b2_u = v_u * (x * x / (s_u * s_u * s_u) - 0.25 * s_u)
            f_u = _norm_cdf(-0.5 * s_u)
            df_ds = -0.5 * _norm_pdf(0.5 * s_u)
            d2f_ds2 = 0.125 * s_u * _norm_pdf(0.5 * s_u)
            df_db = df_ds / v_u
            d2f_db2 = d2f_ds2 / (v_u * v_u) - df_ds * b2_u / (v_u * v_u * v_u)
            # As beta -> b_max, c -> (e^{x/2} + e^{-x/2}) N(-s/2): the slope of N(-s/2) there.
            d_r = -1.0 / (ex2 + emx2)
            r = _rational_cubic_control(b_u, b_max, f_u, 0.0, df_db, d_r, d2f_db2, False)
            f = _rational_cubic(beta, b_u, b_max, f_u, 0.0, df_db, d_r, r)
            if not (0.0 < f < 0.5):
                f = f_u * (b_max - beta) / (b_max - b_u)
            s = -2.0 * _inverse_norm_cdf(f)

    # Safeguarded third-order Householder iteration on the region's objective:
    #   lower  g = 1/ln(b(s)) - 1/ln(beta)   (nearly linear in s where b is tiny)
    #   middle g = b(s) - beta
    #   upper  g = ln(b_max - beta) - ln(b_max - b(s))   (nearly linear near b_max)
    # A bracket [lo, hi] of s with b(lo) < beta < b(hi) catches any step that leaves it.
    lo = 0.0
    hi = math.inf
    ln_beta = math.log(beta)
    c_beta = b_max - beta
    ln_c_beta = math.log(c_beta)
    if not (s > 0.0 and s < math.inf):
        s = s_c if s_c > 0.0 else 1.0
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        vega = _normalised_vega(x, s)
        inv_s = 1.0 / s
        x2_s3 = x * x * inv_s * inv_s * inv_s
        q = x2_s3 - 0.25 * s  # b''/b'
        w = q * q - 3.0 * x2_s3 * inv_s - 0.25  # b'''/b'
        step = math.nan
        if region == _REGION_UPPER:
            c = _normalised_call_complement(x, s, ex2, emx2)
            if c < c_beta:
                hi = s
            elif c > c_beta:
                lo = s
            else:
                return s, iterations
            if c > 0.0 and vega > 0.0:
                pc = vega / c
                newton = (math.log(c) - ln_c_beta) / pc
                halley = q + pc
                hh3 = w + 3.0 * q * pc + 2.0 * pc * pc
                step = newton * (1.0 + 0.5 * halley * newton) / (
                    1.0 + newton * (halley + hh3 * newton / 6.0)
                )
        else:
            b = _normalised_call(x, s, ex2, emx2)
            if b > beta:
                hi = s
            elif b < beta:
                lo = s
            else:
                return s, iterations
            if region == _REGION_LOWER:
                if b > 0.0 and vega > 0.0:
                    ln_b = math.log(b)
                    p = vega / b
                    newton = (ln_beta - ln_b) * (ln_b / ln_beta) / p
                    halley = q - p * (1.0 + 2.0 / ln_b)
                    lpp_lp = q - p  # L''/L'
                    lppp_lp = w - 3.0 * q * p + 2.0 * p * p  # L'''/L'
                    hh3 = lppp_lp - 6.0 * p * lpp_lp / ln_b + 6.0 * p * p / (ln_b * ln_b)
                    step = newton * (1.0 + 0.5 * halley * newton) / (
                        1.0 + newton * (halley + hh3 * newton / 6.0)
                    )
            elif vega > 0.0:
                newton = (beta - b) / vega
                step = newton * (1.0 + 0.5 * q * newton) / (
                    1.0 + newton * (q + w * newton / 6.0)
                )
        if abs(step) <= _STEP_TOLERANCE * s:
            # Converged; a step this small may legitimately land on the bracket's edge.
            return s + step, iterations
        s_new = s + step
        if not (lo < s_new < hi):
            # The step left the bracket (or was not finite): bisect, or grow without a ceiling.
            s_new = 0.5 * (lo + hi) if hi < math.inf else 2.0 * max(s, lo)
            step = s_new - s
        s = s_new
    return math.nan, iterations


# --------------------------------------------------------------------------------------------
# The batch kernel.

_F_BELOW_INTRINSIC = int(Flag.BELOW_INTRINSIC)
_F_ABOVE_MAX = int(Flag.ABOVE_MAX)
_F_EXPIRED = int(Flag.EXPIRED)
_F_NO_PRICE = int(Flag.NO_PRICE)
_F_NO_FORWARD = int(Flag.NO_FORWARD)
_F_STALE = int(Flag.STALE_UNDERLYING)
_F_LOW_VEGA = int(Flag.LOW_VEGA)
_F_NO_CONVERGENCE = int(Flag.NO_CONVERGENCE)
_F_BAD_INPUT = int(Flag.BAD_INPUT)
_F_SPOT = int(Flag.SPOT_FALLBACK)
_F_PAIR = int(Flag.PAIR_IV)


@njit(cache=True, fastmath=False, error_model="numpy", nogil=True)
def _greeks_kernel(
    price,
    pair_price,
    underlying,
    strike,
    t_years,
    is_call,
    rate,
    stale,
    dividend_yield,
    spot_mode,
    min_vega_per_point,
    max_iterations,
    out_iv,
    out_delta,
    out_gamma,
    out_theta,
    out_vega,
    out_rho,
    out_flags,
):
    """One pass over a block. Inputs have the block's length or length 1 (broadcast).

    The outputs arrive filled with NaN: an option without an IV only gets its flags written.
    """
    n = out_iv.shape[0]
    sp = 1 if price.shape[0] > 1 else 0
    spp = 1 if pair_price.shape[0] > 1 else 0
    su = 1 if underlying.shape[0] > 1 else 0
    sk = 1 if strike.shape[0] > 1 else 0
    st = 1 if t_years.shape[0] > 1 else 0
    sc = 1 if is_call.shape[0] > 1 else 0
    sr = 1 if rate.shape[0] > 1 else 0
    ss = 1 if stale.shape[0] > 1 else 0
    sq = 1 if dividend_yield.shape[0] > 1 else 0
    nan = math.nan
    # The last normalised solve: a call and its put at one strike, side by side with their
    # pair prices, solve the same OTM problem (Sensibull's convention); the second reuses it.
    last_beta = nan
    last_x = nan
    last_s = nan
    for i in range(n):
        flags = _F_SPOT if spot_mode else 0
        k = strike[i * sk]
        t = t_years[i * st]
        r = rate[i * sr]
        u = underlying[i * su]
        theta_sign = 1.0 if is_call[i * sc] else -1.0
        carry = 0.0
        if not (k > 0.0 and k < math.inf) or t != t or not (abs(r) < math.inf):
            flags |= _F_BAD_INPUT
        elif not (t > 0.0):
            flags |= _F_EXPIRED
        if not (u > 0.0 and u < math.inf):
            flags |= _F_NO_FORWARD
        if stale[i * ss]:
            flags |= _F_STALE
        f = u
        if spot_mode and flags & (_F_BAD_INPUT | _F_NO_FORWARD) == 0:
            carry = r - dividend_yield[i * sq]
            f = u * math.exp(carry * max(t, 0.0))
            if not (f > 0.0 and f < math.inf):
                flags |= _F_BAD_INPUT
        # Which premium to solve: an ITM option with a usable OTM pair takes the pair's IV.
        own = price[i * sp]
        pair = pair_price[i * spp]
        solve_price = own
        solve_sign = theta_sign
        usable_pair = pair > 0.0 and pair < math.inf
        in_the_money = flags & (_F_BAD_INPUT | _F_NO_FORWARD) == 0 and theta_sign * (f - k) > 0.0
        if in_the_money and usable_pair:
            solve_price = pair
            solve_sign = -theta_sign
            flags |= _F_PAIR
        if not (solve_price > 0.0 and solve_price < math.inf):
            flags |= _F_NO_PRICE
        if flags & ~(_F_SPOT | _F_PAIR) != 0:
            out_flags[i] = flags
            continue

        discount = math.exp(-r * t)
        # Undiscount by division, as vollib does, so both see bit-identical premia.
        undiscounted = solve_price / discount
        max_price = f if solve_sign > 0.0 else k
        intrinsic = max(solve_sign * (f - k), 0.0)
        x = math.log(f / k)
        s = nan
        otm_undiscounted = undiscounted
        if undiscounted >= max_price:
            flags |= _F_ABOVE_MAX
        elif undiscounted - intrinsic <= _NOISE_ULPS * _EPSILON * undiscounted:
            # At or below intrinsic, or a time value within rounding noise of the premium,
            # which would pin the IV on the last bits of the inputs.
            flags |= _F_BELOW_INTRINSIC
        else:
            if solve_sign * x > 0.0:
                otm_undiscounted = undiscounted - intrinsic
            beta = otm_undiscounted / (math.sqrt(f) * math.sqrt(k))
            x_otm = -abs(x)
            b_max = math.exp(0.5 * x_otm)
            if not (beta > 0.0):
                flags |= _F_BELOW_INTRINSIC
            elif not (beta < b_max):
                flags |= _F_ABOVE_MAX
            elif beta == last_beta and x_otm == last_x:
                s = last_s
            else:
                s, _ = _normalised_iv(beta, x_otm, b_max, max_iterations)
                if s != s:
                    flags |= _F_NO_CONVERGENCE
                else:
                    last_beta = beta
                    last_x = x_otm
                    last_s = s
        if s != s:
            out_flags[i] = flags
            continue

        sqrt_t = math.sqrt(t)
        sigma = s / sqrt_t
        d1 = x / s + 0.5 * s
        density = _norm_pdf(d1)
        vega_unit = discount * f * density * sqrt_t
        if vega_unit * 0.01 < min_vega_per_point:
            out_flags[i] = flags | _F_LOW_VEGA
            continue
        # Model premium of this option: the solved OTM premium plus this option's intrinsic
        # value (put-call parity), so an ITM option priced from its pair is parity-consistent.
        value = discount * (otm_undiscounted + max(theta_sign * (f - k), 0.0))
        delta = theta_sign * discount * _norm_cdf(theta_sign * d1)
        gamma = discount * density / (f * s)
        theta = (r * value - discount * f * density * s / (2.0 * t)) / 365.0
        rho = -t * value * 0.01
        if spot_mode:
            # Spot held fixed: F = S e^{(r-q)T} moves with T and r.
            growth = f / u
            theta -= delta * carry * f / 365.0
            rho += delta * t * f * 0.01
            gamma *= growth * growth
            delta *= growth
        vega = vega_unit * 0.01
        # Inputs near the ends of double's range (a strike of 1e307) can overflow a Greek.
        if not (
            abs(sigma) < math.inf
            and abs(delta) < math.inf
            and abs(gamma) < math.inf
            and abs(theta) < math.inf
            and abs(vega) < math.inf
            and abs(rho) < math.inf
        ):
            out_flags[i] = flags | _F_BAD_INPUT
            continue
        out_iv[i] = sigma
        out_delta[i] = delta
        out_gamma[i] = gamma
        out_theta[i] = theta
        out_vega[i] = vega
        out_rho[i] = rho
        out_flags[i] = flags


# --------------------------------------------------------------------------------------------
# Public batch API


def _as_flat(value, dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A 1-D contiguous array of ``shape``'s size, or of length 1 when ``value`` is scalar."""
    arr = np.asarray(value, dtype=dtype)
    if arr.size == 1:
        return arr.reshape(1)
    if arr.shape == shape:
        return np.ascontiguousarray(arr.reshape(-1))
    try:
        return np.ascontiguousarray(np.broadcast_to(arr, shape).reshape(-1))
    except ValueError as exc:
        raise ValueError(f"{name}: shape {arr.shape} does not broadcast to {shape}") from exc


def _run(
    *,
    price,
    underlying,
    strike,
    t_years,
    is_call,
    r,
    pair_price,
    stale,
    dividend_yield,
    spot_mode: bool,
    min_vega_per_point: float,
    max_iterations: int,
    block_size: int,
) -> GreeksBatch:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    inputs = {
        "price": price,
        "underlying": underlying,
        "strike": strike,
        "t_years": t_years,
        "is_call": is_call,
        "r": r,
        "pair_price": math.nan if pair_price is None else pair_price,
        "stale": False if stale is None else stale,
        "dividend_yield": dividend_yield,
    }
    try:
        shape = np.broadcast_shapes(*(np.shape(v) for v in inputs.values()))
    except ValueError as exc:
        shapes = {k: np.shape(v) for k, v in inputs.items()}
        raise ValueError(f"inputs do not broadcast together: {shapes}") from exc
    flat = {
        name: _as_flat(
            value, np.bool_ if name in ("is_call", "stale") else np.float64, shape, name
        )
        for name, value in inputs.items()
    }
    n = math.prod(shape)
    out = [np.full(n, np.nan) for _ in range(6)]
    out_flags = np.empty(n, dtype=np.uint16)
    for lo in range(0, n, block_size):
        hi = min(lo + block_size, n)
        block = [a if a.shape[0] == 1 else a[lo:hi] for a in flat.values()]
        p, u, k, t, c, rr, pp, st, q = block
        _greeks_kernel(
            p, pp, u, k, t, c, rr, st, q, spot_mode, float(min_vega_per_point), int(max_iterations),
            *(o[lo:hi] for o in out), out_flags[lo:hi],
        )  # fmt: skip
    iv, delta, gamma, theta, vega, rho = (o.reshape(shape) for o in out)
    return GreeksBatch(iv, delta, gamma, theta, vega, rho, out_flags.reshape(shape))


def compute_greeks(
    *,
    price,
    forward,
    strike,
    t_years,
    is_call,
    r,
    pair_price=None,
    stale=None,
    min_vega_per_point: float = DEFAULT_MIN_VEGA_PER_POINT,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> GreeksBatch:
    """IV and Black-76 Greeks of a batch of options (live ticks and historical candles alike).

    Arguments are arrays (or scalars) that broadcast together; outputs have their shape.
    ``price`` is the discounted premium paid today, ``forward`` the forward of the option's
    underlying and expiry, ``t_years`` from :func:`years_to_expiry`, ``r`` the continuously
    compounded rate that discounts the premium, ``is_call`` a boolean mask.

    Which premium is solved (Sensibull's convention, OTM IV on both sides of a strike):
      * an in-the-money option (call with F > K, put with F < K) whose ``pair_price`` (the
        opposite option at the same strike and expiry) is finite and > 0 takes the IV solved
        on that pair, flagged PAIR_IV; its own price is then not needed, and failures of the
        pair's solve (e.g. ABOVE_MAX) are reported on it too;
      * every other option (OTM, at the money, or ITM without a usable pair) is solved on its
        own price; for ITM that is its time value over intrinsic (BELOW_INTRINSIC if none).

    Reason codes (see :class:`Flag`): NaN forward -> NO_FORWARD; NaN/<=0 price to solve ->
    NO_PRICE; ``t_years <= 0`` -> EXPIRED; ``stale`` mask -> STALE_UNDERLYING; premium at or
    below intrinsic -> BELOW_INTRINSIC; at or above F (call) / K (put) undiscounted ->
    ABOVE_MAX; vega below ``min_vega_per_point`` (rupees per vol point; 0 disables) -> LOW_VEGA;
    strike <= 0 or NaN, NaN time or rate -> BAD_INPUT; the solver still moving after
    ``max_iterations`` steps (a safety cap; solves take 1-3) -> NO_CONVERGENCE.
    Where any failure flag is set, IV and Greeks are NaN. Nothing raises for one bad option.

    Units: iv a fraction; delta dV/dF and gamma d2V/dF2 of the discounted premium w.r.t. the
    forward; theta rupees per calendar day; vega rupees per volatility point; rho rupees per
    1 % of rate at a fixed forward. Work proceeds in blocks of ``block_size`` options.
    """
    return _run(
        price=price,
        underlying=forward,
        strike=strike,
        t_years=t_years,
        is_call=is_call,
        r=r,
        pair_price=pair_price,
        stale=stale,
        dividend_yield=0.0,
        spot_mode=False,
        min_vega_per_point=min_vega_per_point,
        max_iterations=max_iterations,
        block_size=block_size,
    )


def compute_greeks_spot(
    *,
    price,
    spot,
    strike,
    t_years,
    is_call,
    r,
    q=0.0,
    pair_price=None,
    stale=None,
    min_vega_per_point: float = DEFAULT_MIN_VEGA_PER_POINT,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> GreeksBatch:
    """Black-Scholes on spot with rate ``r`` and dividend yield ``q``: the explicit fallback.

    For when neither a future nor a parity forward is available. Every option is flagged
    SPOT_FALLBACK. It is Black-76 on ``F = S e^{(r - q) T}``, so the IV is the same as
    :func:`compute_greeks` on that forward; the Greeks are taken at a fixed *spot*:
    delta dV/dS = e^{-qT} N(d1) (call), gamma d2V/dS2, theta -dV/dT / 365 at fixed S, vega per
    volatility point, rho per 1 % of r at fixed S and q. Other rules as :func:`compute_greeks`.
    """
    return _run(
        price=price,
        underlying=spot,
        strike=strike,
        t_years=t_years,
        is_call=is_call,
        r=r,
        pair_price=pair_price,
        stale=stale,
        dividend_yield=q,
        spot_mode=True,
        min_vega_per_point=min_vega_per_point,
        max_iterations=max_iterations,
        block_size=block_size,
    )


def implied_volatility(
    *, price, forward, strike, t_years, is_call, r, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Black-76 IV of each option from its own price, as (iv, flags); no pair, no vega floor.

    The plain inversion (what Let's Be Rational computes): ITM options are solved on their
    own time value. NaN IV with failure flags where none exists.
    """
    batch = compute_greeks(
        price=price,
        forward=forward,
        strike=strike,
        t_years=t_years,
        is_call=is_call,
        r=r,
        min_vega_per_point=0.0,
        max_iterations=DEFAULT_MAX_ITERATIONS,
        block_size=block_size,
    )
    return batch.iv, batch.flags
