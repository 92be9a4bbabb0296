"""Option-chain analytics from the engine's state: PCR, max pain, ATM IV, straddle, build-up.

Pure and vectorised (numpy, no Django, no I/O): the engine calls it per chain at a bounded
cadence (streaming/engine/chain_analytics.py) and the tests check it against hand-computed
chains. The definitions are documented for users in docs/websocket-protocol.md ("Chain
analytics"); every value that cannot be known is None (NaN in arrays), never a guess.

A chain is described by its listed strikes (ascending) and one :class:`Leg` per side, arrays
aligned with the strikes, NaN where the option is not listed or the value is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

__all__ = [
    "BUILDUPS",
    "Leg",
    "Summary",
    "atm_index",
    "atm_iv",
    "buildup_codes",
    "days_to_expiry",
    "iv_rank_percentile",
    "max_pain",
    "oi_change",
    "ratio_of_sums",
    "straddle",
    "summarise",
]

#: Build-up tags by code (:func:`buildup_codes`); code 0 is "unknown or unchanged".
BUILDUPS: Final = (None, "long_buildup", "short_buildup", "long_unwinding", "short_covering")
SECONDS_PER_DAY: Final = 86_400.0
# Indexed by (sign of price change + 1) * 3 + (sign of OI change + 1).
_BUILDUP_BY_SIGNS: Final = np.array([3, 0, 2, 0, 0, 0, 4, 0, 1], dtype=np.int8)


@dataclass(frozen=True, slots=True)
class Leg:
    """The calls or the puts of one chain, by strike (float64, NaN where unknown)."""

    ltp: np.ndarray
    close: np.ndarray
    """Kite's previous close of the option's price (the base of the price change)."""
    iv: np.ndarray
    oi: np.ndarray
    oi_base: np.ndarray
    """The OI the day's change is measured from (the engine's first tick of the day)."""
    volume: np.ndarray


@dataclass(frozen=True, slots=True)
class Summary:
    """A chain's headline numbers; None where they cannot be known."""

    pcr_oi: float | None
    pcr_volume: float | None
    max_pain: float | None
    atm_index: int | None
    atm_strike: float | None
    atm_iv: float | None
    straddle: float | None


def ratio_of_sums(numerator: np.ndarray, denominator: np.ndarray) -> float | None:
    """sum(numerator) / sum(denominator) over the known values of each; None when either
    side has no known value or the denominator sums to zero."""
    num_known = np.isfinite(numerator)
    den_known = np.isfinite(denominator)
    if not num_known.any() or not den_known.any():
        return None
    den = float(denominator[den_known].sum())
    if den <= 0.0:
        return None
    return float(numerator[num_known].sum()) / den


def max_pain(strikes: np.ndarray, ce_oi: np.ndarray, pe_oi: np.ndarray) -> float | None:
    """The strike S minimising sum_K CE_OI(K) max(0, S-K) + PE_OI(K) max(0, K-S).

    ``strikes`` ascending. Over the options whose OI is known (others weigh nothing); the
    lowest such strike on a tie; None when no OI is known or it is all zero. O(n) with
    running sums: at S = K_j the calls' part is S C_j - KC_j over strikes up to j, the puts'
    the same over strikes above it.
    """
    ce = np.where(np.isfinite(ce_oi), ce_oi, 0.0)
    pe = np.where(np.isfinite(pe_oi), pe_oi, 0.0)
    if strikes.size == 0 or not (ce.any() or pe.any()):
        return None
    calls = strikes * np.cumsum(ce) - np.cumsum(ce * strikes)
    put_oi_above = pe.sum() - np.cumsum(pe)
    put_value_above = (pe * strikes).sum() - np.cumsum(pe * strikes)
    pain = calls + put_value_above - strikes * put_oi_above
    return float(strikes[int(np.argmin(pain))])


def atm_index(strikes: np.ndarray, forward: float) -> int | None:
    """The index of the listed strike nearest the forward (the lower one on a tie)."""
    if strikes.size == 0 or not math.isfinite(forward):
        return None
    return int(np.argmin(np.abs(strikes - forward)))


def _known(value: float) -> float | None:
    return value if math.isfinite(value) else None


def atm_iv(ce_iv: np.ndarray, pe_iv: np.ndarray, index: int | None) -> float | None:
    """IV at the ATM strike: the mean of the call's and put's where both are known, else the
    one that is (the engine's OTM convention gives both the same number anyway)."""
    if index is None:
        return None
    values = [v for v in (float(ce_iv[index]), float(pe_iv[index])) if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def straddle(ce_ltp: np.ndarray, pe_ltp: np.ndarray, index: int | None) -> float | None:
    """Call plus put premium at the ATM strike; None unless both are known."""
    if index is None:
        return None
    return _known(float(ce_ltp[index]) + float(pe_ltp[index]))


def oi_change(oi: np.ndarray, oi_base: np.ndarray) -> np.ndarray:
    """OI minus its baseline; NaN where either is unknown."""
    return oi - oi_base


def buildup_codes(ltp: np.ndarray, close: np.ndarray, oi_delta: np.ndarray) -> np.ndarray:
    """The build-up of each option as an index into :data:`BUILDUPS` (int8).

    Price up and OI up: long build-up; price down, OI up: short build-up; price down, OI
    down: long unwinding; price up, OI down: short covering; 0 when either change is zero or
    unknown.
    """
    price = np.nan_to_num(np.sign(ltp - close)).astype(np.int8)
    oi = np.nan_to_num(np.sign(oi_delta)).astype(np.int8)
    return _BUILDUP_BY_SIGNS[(price + 1) * 3 + oi + 1]


def days_to_expiry(*, now_epoch_s: float, expiry_epoch_s: float) -> float | None:
    """Calendar days to the expiry instant (15:30 IST, as the Greeks' time); may be negative
    once expired; None when the expiry is unknown."""
    if not math.isfinite(expiry_epoch_s):
        return None
    return (expiry_epoch_s - now_epoch_s) / SECONDS_PER_DAY


def summarise(strikes: np.ndarray, ce: Leg, pe: Leg, *, forward: float) -> Summary:
    """The headline numbers of one chain (see the module docstring for the layout)."""
    index = atm_index(strikes, forward)
    return Summary(
        pcr_oi=ratio_of_sums(pe.oi, ce.oi),
        pcr_volume=ratio_of_sums(pe.volume, ce.volume),
        max_pain=max_pain(strikes, ce.oi, pe.oi),
        atm_index=index,
        atm_strike=float(strikes[index]) if index is not None else None,
        atm_iv=atm_iv(ce.iv, pe.iv, index),
        straddle=straddle(ce.ltp, pe.ltp, index),
    )


def iv_rank_percentile(
    current: float | None, daily: np.ndarray
) -> tuple[float | None, float | None]:
    """(IV rank, IV percentile), both 0-100, of ``current`` against earlier days' ATM IV.

    Rank: where ``current`` lies between the lowest and highest of those days and itself;
    percentile: the share of those days below it. Both None without an earlier day (rank
    also when lowest equals highest).
    """
    if current is None or daily.size == 0:
        return None, None
    low = min(float(daily.min()), current)
    high = max(float(daily.max()), current)
    rank = 100.0 * (current - low) / (high - low) if high > low else None
    percentile = 100.0 * float(np.count_nonzero(daily < current)) / daily.size
    return rank, percentile
