"""Implied volatility and Greeks for NSE index and stock options (Black-76, no Django import).

Model
    Black-76 on a forward per (underlying, expiry). The premium is discounted at ``r``;
    ``r`` only discounts the premium, the forward carries all drift. The caller passes ``r``
    (a setting read at the edge); :data:`DEFAULT_RISK_FREE_RATE` is the documented default.

Time
    Calendar time from now to 15:30 IST on the expiry date, in seconds, over 365 days.

Units of the outputs
    iv     annualised volatility as a fraction (0.15 = 15 %).
    delta  dV/dF, the derivative of the discounted premium with respect to the forward:
           e^{-rT} N(d1) for a call, -e^{-rT} N(-d1) for a put.
    gamma  d2V/dF2 per 1 rupee of forward: e^{-rT} n(d1) / (F sigma sqrt T).
    theta  change of the premium per calendar day (-dV/dT / 365), rupees per day.
    vega   change of the premium per 1 volatility point (per 0.01 of sigma), rupees.
    rho    change of the premium per 1 % of rate (per 0.01 of r) at a fixed forward,
           i.e. -T V / 100, rupees.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

__all__ = [
    "DEFAULT_RISK_FREE_RATE",
    "black76_price",
]

#: A T-bill-like annual rate, continuously compounded; NSE's fixed 10 % is not a market rate.
DEFAULT_RISK_FREE_RATE = 0.065


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
