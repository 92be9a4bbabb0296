"""A synthetic NSE index-options market: the mock market shared by the Kite simulator and runticker.

``SyntheticMarket`` owns, in plain numpy arrays, a Kite-like instrument universe (NIFTY 50 and
NIFTY BANK indices, their NFO futures and CE/PE option chains on the next expiries) and the
state of every instrument. It is a single-owner object: no locks, no threads, no I/O. The one
task that owns it calls :meth:`SyntheticMarket.step` to move the market and reads ticks,
quotes and candles from it. Given the same seed, clock and sequence of calls it produces the
same numbers.

Model
    Each underlying index follows a driftless geometric random walk at its annual volatility.
    A future is ``S e^{(r-q)T}``. An option is priced with Black-76 on that forward with a
    volatility that depends on the expiry (term structure) and on standardised log-moneyness
    (a smile with a put skew). Prices are rounded to the 0.05 tick; an option never trades
    below one tick. Volume, open interest and the five-level depth evolve around the price.

Expiries (the calendar of ``streaming.nse_calendar``)
    NIFTY options expire every Tuesday and always list the current monthly expiry (the last
    Tuesday of the month, the one with a future) among them; BANKNIFTY has monthly expiries
    only; futures are the next three monthly expiries. An expiry that falls on a holiday moves
    to the previous trading day: pass the exchange's holidays as ``holidays``. Expiries are
    computed once, relative to the clock at construction; a contract whose expiry passes stays
    listed and is priced at intrinsic value.

Historical candles
    Each underlying has one seeded intraday path per trading day (09:15-15:30 IST). The path
    of the construction day passes through the live starting spot at the construction time,
    so history and the live market meet. Futures and options candles are priced from the
    same path with the same model, so Greeks computed from historical candles are consistent.
    Candles are never produced for the future (after the clock) or for weekends and holidays.
"""

from __future__ import annotations

import csv
import io
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final

import numpy as np

from streaming.greeks import (
    DEFAULT_RISK_FREE_RATE,
    IST,
    SECONDS_PER_YEAR,
    black76_price,
    years_to_expiry,
)
from streaming.kite.codec import (
    PACKET_FULL,
    PACKET_INDEX_FULL,
    PACKET_INDEX_QUOTE,
    PACKET_LTP,
    PACKET_QUOTE,
    TICK_DTYPE,
)
from streaming.kite.limits import MODES
from streaming.kite.schemas import INSTRUMENT_CSV_COLUMNS
from streaming.nse_calendar import (
    MINUTES_PER_SESSION,
    is_trading_day,
    ist_date,
    monthly_expiries,
    monthly_expiry_of,
    previous_trading_day_on_or_before,
    session_close_epoch_s,
    session_open_epoch_s,
    weekly_option_expiries,
)

__all__ = [
    "BANKNIFTY",
    "IST",
    "NIFTY",
    "SyntheticMarket",
    "UnderlyingSpec",
    "future_tradingsymbol",
    "option_tradingsymbol",
]

#: The low byte of a Kite instrument_token names its segment (as KiteTicker reads it).
NSE_SEGMENT_ID: Final = 1
NFO_SEGMENT_ID: Final = 2
INDICES_SEGMENT_ID: Final = 9

TICK_SIZE: Final = 0.05


_MONTH_ABBR: Final = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
# Kite's weekly-option symbols carry the month as one character: 1-9, then O, N, D.
_WEEKLY_MONTH_CODE: Final = "123456789OND"

# Instrument kinds in the state arrays.
KIND_INDEX: Final = 0
KIND_FUTURE: Final = 1
KIND_CALL: Final = 2
KIND_PUT: Final = 3

# First exchange_token handed to generated NFO contracts (real NFO tokens are of this size).
_FIRST_NFO_EXCHANGE_TOKEN: Final = 35001
# Extra synthetic indices get exchange tokens from here (clear of NIFTY 1001, BANKNIFTY 1016).
_FIRST_EXTRA_INDEX_EXCHANGE_TOKEN: Final = 5001

# Volatility surface: ATM vol rises from 90 % of the base vol at the shortest expiry towards
# 110 % with this time constant; the smile is quadratic in standardised moneyness with a put
# skew, clipped at +-4 standard deviations so far wings stay finite.
_TERM_SHORT_RATIO: Final = 0.9
_TERM_LONG_RATIO: Final = 1.1
_TERM_TIME_CONSTANT_YEARS: Final = 0.25
_SMILE_SKEW: Final = -0.06
_SMILE_CURVATURE: Final = 0.02
_SMILE_CLIP_STD: Final = 4.0
# Below an hour to expiry the standardised moneyness would explode; the smile freezes there.
_MIN_SMILE_T_YEARS: Final = 3600.0 / SECONDS_PER_YEAR

# Activity: mean trades per second per contract, lots per trade, and how many contracts the
# book holds beyond the five visible levels (total buy/sell quantity = visible * this).
_TRADES_PER_S: Final = 0.5
_BOOK_DEPTH_MULTIPLIER: Final = 4
_DEPTH_LEVELS: Final = 5
_LISTING_DAYS: Final = 120
_SUBSTEPS_PER_MINUTE: Final = 4
_TRADING_DAYS_PER_YEAR: Final = 252.0
_OVERNIGHT_GAP_VOL_RATIO: Final = 0.25
_PATH_CACHE_DAYS: Final = 64


@dataclass(frozen=True, slots=True)
class UnderlyingSpec:
    """One index underlying: its Kite identifiers, contract rules and the market's parameters."""

    name: str  # derivative tradingsymbol prefix and `name` column, e.g. "NIFTY"
    index_symbol: str  # the index's tradingsymbol on NSE, e.g. "NIFTY 50"
    index_exchange_token: int  # instrument_token = exchange_token * 256 + 9
    spot: float  # starting level
    strike_step: float
    lot_size: int
    weekly: bool  # weekly option expiries (else monthly only)
    vol: float  # annual volatility of the walk and base of the surface
    dividend_yield: float

    @property
    def index_token(self) -> int:
        return self.index_exchange_token * 256 + INDICES_SEGMENT_ID


NIFTY: Final = UnderlyingSpec(
    name="NIFTY",
    index_symbol="NIFTY 50",
    index_exchange_token=1001,
    spot=26000.0,
    strike_step=50.0,
    lot_size=75,
    weekly=True,
    vol=0.12,
    dividend_yield=0.012,
)
BANKNIFTY: Final = UnderlyingSpec(
    name="BANKNIFTY",
    index_symbol="NIFTY BANK",
    index_exchange_token=1016,
    spot=58000.0,
    strike_step=100.0,
    lot_size=35,
    weekly=False,
    vol=0.14,
    dividend_yield=0.008,
)
_BUILTIN_SPECS: Final = {NIFTY.name: NIFTY, BANKNIFTY.name: BANKNIFTY}


def _extra_spec(i: int) -> UnderlyingSpec:
    """A synthetic weekly-expiry index used only to scale the universe for benchmarks."""
    return UnderlyingSpec(
        name=f"SYNIDX{i:03d}",
        index_symbol=f"SYNTH INDEX {i:03d}",
        index_exchange_token=_FIRST_EXTRA_INDEX_EXCHANGE_TOKEN + i,
        spot=5000.0 * (1 + i % 8),
        strike_step=50.0,
        lot_size=50,
        weekly=True,
        vol=0.10 + 0.01 * (i % 10),
        dividend_yield=0.01,
    )


# --- symbols --------------------------------------------------------------------------------


def _strike_text(strike: float) -> str:
    return str(int(strike)) if float(strike).is_integer() else f"{strike:g}"


def option_tradingsymbol(
    *, name: str, expiry: date, strike: float, option_type: str, monthly: bool
) -> str:
    """Kite's option symbol: NIFTY25NOV24000CE (monthly) or NIFTY25N1824000CE (weekly)."""
    yy = f"{expiry.year % 100:02d}"
    if monthly:
        when = f"{yy}{_MONTH_ABBR[expiry.month - 1]}"
    else:
        when = f"{yy}{_WEEKLY_MONTH_CODE[expiry.month - 1]}{expiry.day:02d}"
    return f"{name}{when}{_strike_text(strike)}{option_type}"


def future_tradingsymbol(*, name: str, expiry: date) -> str:
    """Kite's futures symbol: NIFTY25NOVFUT."""
    return f"{name}{expiry.year % 100:02d}{_MONTH_ABBR[expiry.month - 1]}FUT"


# --- helpers --------------------------------------------------------------------------------


def _round_to_tick(price: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(price, dtype=np.float64) / TICK_SIZE) * TICK_SIZE


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, pure hash so depth does not consume the walk's RNG."""
    z = np.asarray(x, dtype=np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _stamp(epoch_s: float) -> str:
    """Kite's REST timestamp format, IST wall clock."""
    return datetime.fromtimestamp(epoch_s, IST).strftime("%Y-%m-%d %H:%M:%S")


def _candle_stamps(epoch_s: np.ndarray) -> list[str]:
    """Kite's candle timestamps (IST with offset) of whole-second epoch times, vectorised."""
    offset_s = int(IST.utcoffset(None).total_seconds())
    local = (np.asarray(epoch_s, dtype=np.float64).astype(np.int64) + offset_s).astype("datetime64[s]")
    return [f"{text}+0530" for text in np.datetime_as_string(local, unit="s").tolist()]


def _as_ist(value: datetime) -> datetime:
    """Kite reads naive historical-data bounds as IST."""
    return value.replace(tzinfo=IST) if value.tzinfo is None else value.astimezone(IST)


_INTERVAL_MINUTES: Final[dict[str, int]] = {
    "minute": 1,
    "3minute": 3,
    "5minute": 5,
    "10minute": 10,
    "15minute": 15,
    "30minute": 30,
    "60minute": 60,
    "day": MINUTES_PER_SESSION,
}


class SyntheticMarket:
    """A seeded random-walk NSE index-options market, owned by exactly one task.

    ``underlyings`` names built-in specs ("NIFTY", "BANKNIFTY") or passes ``UnderlyingSpec``
    values. ``expiries`` option expiries per underlying (weekly for NIFTY, monthly for
    BANKNIFTY), ``strikes_each_side`` strikes either side of the at-the-money strike,
    ``future_months`` monthly futures each. ``extra_underlyings`` adds synthetic weekly
    indices so that benchmarks can reach 100k instruments.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        now_fn: Callable[[], float] = time.time,
        underlyings: Sequence[str | UnderlyingSpec] = ("NIFTY", "BANKNIFTY"),
        expiries: int = 3,
        strikes_each_side: int = 15,
        future_months: int = 3,
        extra_underlyings: int = 0,
        r: float = DEFAULT_RISK_FREE_RATE,
        holidays: Iterable[date] = (),
    ) -> None:
        if expiries < 1 or strikes_each_side < 0 or future_months < 0 or extra_underlyings < 0:
            raise ValueError(
                f"SyntheticMarket sizes must be positive: expiries={expiries} "
                f"strikes_each_side={strikes_each_side} future_months={future_months} "
                f"extra_underlyings={extra_underlyings}"
            )
        self._seed = int(seed)
        self._now_fn = now_fn
        self._r = float(r)
        self._holidays = frozenset(holidays)
        self._rng = np.random.default_rng([self._seed, 0x5EED])
        specs = [_BUILTIN_SPECS[u] if isinstance(u, str) else u for u in underlyings]
        specs += [_extra_spec(i) for i in range(extra_underlyings)]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate underlyings: {names}")
        self._specs: tuple[UnderlyingSpec, ...] = tuple(specs)
        self._und_index = {s.name: i for i, s in enumerate(specs)}
        self._now = float(now_fn())
        self._created_epoch_s = self._now
        self._day = ist_date(self._now)
        self._step_count = 0

        self._und_vol = np.array([s.vol for s in specs])
        self._und_q = np.array([s.dividend_yield for s in specs])
        self._spot = np.array([s.spot for s in specs], dtype=np.float64)
        self._build_universe(expiries, strikes_each_side, future_months)
        self._init_state()
        # Historical paths: per (underlying, day) caches; the market is single-owner.
        self._open_log: list[dict[date, float]] = [{} for _ in specs]
        self._paths: OrderedDict[tuple[int, date], tuple[float, np.ndarray]] = OrderedDict()

    # --- universe -------------------------------------------------------------------------

    def _build_universe(self, n_expiries: int, strikes_each_side: int, future_months: int) -> None:
        rows: list[dict[str, Any]] = []
        kind: list[int] = []
        und: list[int] = []
        strike: list[float] = []
        expiry_s: list[float] = []
        lot: list[int] = []
        exchange_token = _FIRST_NFO_EXCHANGE_TOKEN
        for u, spec in enumerate(self._specs):
            rows.append(
                {
                    "instrument_token": spec.index_token,
                    "exchange_token": str(spec.index_exchange_token),
                    "tradingsymbol": spec.index_symbol,
                    "name": spec.index_symbol,
                    "last_price": 0.0,
                    "expiry": None,
                    "strike": 0.0,
                    "tick_size": TICK_SIZE,
                    "lot_size": 0,
                    "instrument_type": "EQ",
                    "segment": "INDICES",
                    "exchange": "NSE",
                }
            )
            kind.append(KIND_INDEX)
            und.append(u)
            strike.append(0.0)
            expiry_s.append(math.inf)
            lot.append(0)
        for u, spec in enumerate(self._specs):
            months = monthly_expiries(
                now_epoch_s=self._now,
                count=max(future_months, n_expiries),
                holidays=self._holidays,
            )
            monthly_set = set(months)
            for expiry in months[:future_months]:
                rows.append(
                    self._nfo_row(
                        exchange_token,
                        future_tradingsymbol(name=spec.name, expiry=expiry),
                        spec,
                        expiry,
                        0.0,
                        "FUT",
                        "NFO-FUT",
                    )
                )
                exchange_token += 1
                kind.append(KIND_FUTURE)
                und.append(u)
                strike.append(0.0)
                expiry_s.append(session_close_epoch_s(expiry))
                lot.append(spec.lot_size)
            option_expiries = (
                weekly_option_expiries(
                    now_epoch_s=self._now, count=n_expiries, holidays=self._holidays
                )
                if spec.weekly
                else months[:n_expiries]
            )
            atm = round(spec.spot / spec.strike_step) * spec.strike_step
            strikes = [
                atm + spec.strike_step * k
                for k in range(-strikes_each_side, strikes_each_side + 1)
                if atm + spec.strike_step * k > 0
            ]
            for expiry in option_expiries:
                is_monthly = expiry in monthly_set or expiry == monthly_expiry_of(
                    expiry.year, expiry.month, self._holidays
                )
                for k in strikes:
                    for option_type, option_kind in (("CE", KIND_CALL), ("PE", KIND_PUT)):
                        symbol = option_tradingsymbol(
                            name=spec.name,
                            expiry=expiry,
                            strike=k,
                            option_type=option_type,
                            monthly=is_monthly,
                        )
                        rows.append(
                            self._nfo_row(
                                exchange_token, symbol, spec, expiry, k, option_type, "NFO-OPT"
                            )
                        )
                        exchange_token += 1
                        kind.append(option_kind)
                        und.append(u)
                        strike.append(k)
                        expiry_s.append(session_close_epoch_s(expiry))
                        lot.append(spec.lot_size)
        self.instruments: list[dict[str, Any]] = rows
        self._token = np.array([r["instrument_token"] for r in rows], dtype=np.int64)
        self._kind = np.array(kind, dtype=np.int8)
        self._und = np.array(und, dtype=np.int64)
        self._strike = np.array(strike, dtype=np.float64)
        self._expiry_s = np.array(expiry_s, dtype=np.float64)
        self._lot = np.array(lot, dtype=np.int64)
        self._tradable = self._kind != KIND_INDEX
        self._is_option = (self._kind == KIND_CALL) | (self._kind == KIND_PUT)
        self._is_call = self._kind == KIND_CALL
        self._order = np.argsort(self._token, kind="stable")
        self._sorted_token = self._token[self._order]
        if np.any(np.diff(self._sorted_token) == 0):
            raise ValueError("instrument tokens collide; check extra_underlyings tokens")
        self._row_by_key = {f"{r['exchange']}:{r['tradingsymbol']}": i for i, r in enumerate(rows)}
        self._listed_s = np.where(
            self._tradable, self._expiry_s - _LISTING_DAYS * 86400.0, -math.inf
        )

    @staticmethod
    def _nfo_row(
        exchange_token: int,
        symbol: str,
        spec: UnderlyingSpec,
        expiry: date,
        strike: float,
        instrument_type: str,
        segment: str,
    ) -> dict[str, Any]:
        return {
            "instrument_token": exchange_token * 256 + NFO_SEGMENT_ID,
            "exchange_token": str(exchange_token),
            "tradingsymbol": symbol,
            "name": spec.name,
            "last_price": 0.0,
            "expiry": expiry,
            "strike": float(strike),
            "tick_size": TICK_SIZE,
            "lot_size": spec.lot_size,
            "instrument_type": instrument_type,
            "segment": segment,
            "exchange": "NFO",
        }

    def _init_state(self) -> None:
        n = len(self._token)
        price = self._fair(np.arange(n), self._now)
        self._price = price
        # The previous session's close sits a little away from today's start.
        close_jitter = self._rng.normal(0.0, 0.004, size=len(self._specs))
        prev_spot = self._spot * np.exp(close_jitter)
        saved_spot = self._spot
        self._spot = prev_spot
        self._close = self._fair(np.arange(n), self._now - 86400.0)
        self._spot = saved_spot
        self._open = price.copy()
        self._high = price.copy()
        self._low = price.copy()
        self._volume = np.zeros(n, dtype=np.int64)
        self._avg_price = price.copy()
        self._ltq = np.where(self._tradable, self._lot, 0)
        base_oi_lots = 100 + (_mix64(self._token) % np.uint64(20000)).astype(np.int64)
        self._oi = np.where(self._tradable, base_oi_lots * self._lot, 0)
        self._oi_high = self._oi.copy()
        self._oi_low = self._oi.copy()
        self._last_trade_s = np.full(n, int(self._now), dtype=np.int64)
        for i, row in enumerate(self.instruments):
            row["last_price"] = round(float(self._close[i]), 2)

    # --- model ----------------------------------------------------------------------------

    def _sigma(self, und: np.ndarray, log_moneyness: np.ndarray, t_years: np.ndarray):
        """Volatility surface: term structure times a skewed quadratic smile."""
        base = self._und_vol[und]
        growth = 1.0 - np.exp(-np.maximum(t_years, 0.0) / _TERM_TIME_CONSTANT_YEARS)
        atm = base * (_TERM_SHORT_RATIO + (_TERM_LONG_RATIO - _TERM_SHORT_RATIO) * growth)
        std = atm * np.sqrt(np.maximum(t_years, _MIN_SMILE_T_YEARS))
        x = np.clip(log_moneyness / std, -_SMILE_CLIP_STD, _SMILE_CLIP_STD)
        return atm * (1.0 + _SMILE_SKEW * x + _SMILE_CURVATURE * x * x)

    def _fair_from_spot(
        self, rows: np.ndarray, spot: np.ndarray, now_epoch_s: float | np.ndarray
    ) -> np.ndarray:
        """Tick-rounded prices of ``rows`` given each row's underlying spot."""
        kind = self._kind[rows]
        und = self._und[rows]
        t = np.maximum(
            years_to_expiry(now_epoch_s=now_epoch_s, expiry_epoch_s=self._expiry_s[rows]), 0.0
        )
        t = np.where(np.isfinite(t), t, 0.0)  # indices: no expiry
        forward = spot * np.exp((self._r - self._und_q[und]) * t)
        strike = self._strike[rows]
        is_option = (kind == KIND_CALL) | (kind == KIND_PUT)
        safe_strike = np.where(is_option, strike, 1.0)
        sigma = self._sigma(und, np.log(safe_strike / forward), t)
        premium = black76_price(
            forward=forward,
            strike=safe_strike,
            t_years=t,
            sigma=sigma,
            r=self._r,
            is_call=kind == KIND_CALL,
        )
        raw = np.where(kind == KIND_INDEX, spot, np.where(kind == KIND_FUTURE, forward, premium))
        price = _round_to_tick(raw)
        return np.where(is_option, np.maximum(price, TICK_SIZE), price)

    def _fair(self, rows: np.ndarray, now_epoch_s: float) -> np.ndarray:
        return self._fair_from_spot(rows, self._spot[self._und[rows]], now_epoch_s)

    # --- public: universe -----------------------------------------------------------------

    @property
    def now_epoch_s(self) -> float:
        """The market's clock: the time of the last step (or construction)."""
        return self._now

    @property
    def tokens(self) -> np.ndarray:
        """Every instrument_token, in ``instruments`` order."""
        return self._token.copy()

    @property
    def underlyings(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._specs)

    def spec(self, name: str) -> UnderlyingSpec:
        return self._specs[self._und_index[name]]

    def index_token(self, name: str) -> int:
        return self.spec(name).index_token

    def spot(self, name: str) -> float:
        """The unrounded level of an underlying index."""
        return float(self._spot[self._und_index[name]])

    def token_of(self, key: str) -> int:
        """instrument_token of ``EXCHANGE:TRADINGSYMBOL``; KeyError if unknown."""
        return int(self._token[self._row_by_key[key]])

    def instrument(self, token: int) -> dict[str, Any]:
        return self.instruments[int(self.rows_of([token])[0])]

    def rows_of(self, tokens: Iterable[int] | np.ndarray, *, strict: bool = True) -> np.ndarray:
        """Row indices of ``tokens``; unknown tokens raise KeyError (or are dropped if not strict)."""
        t = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64)
        pos = np.searchsorted(self._sorted_token, t)
        pos_clipped = np.minimum(pos, len(self._sorted_token) - 1)
        found = self._sorted_token[pos_clipped] == t
        if strict and not np.all(found):
            raise KeyError(f"unknown instrument_token(s): {t[~found][:10].tolist()}")
        return self._order[pos_clipped[found]]

    def locate(self, tokens: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the known tokens, mask of which tokens are known), without raising."""
        t = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_token, t), len(self._sorted_token) - 1)
        found = self._sorted_token[pos] == t
        return self._order[pos[found]], found

    def has_token(self, token: int) -> bool:
        return len(self.rows_of([token], strict=False)) == 1

    def instruments_csv(self, exchange: str | None = None) -> str:
        """The instrument dump in Kite's CSV format (all exchanges, or one)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(INSTRUMENT_CSV_COLUMNS)
        for row in self.instruments:
            if exchange is not None and row["exchange"] != exchange:
                continue
            writer.writerow(
                [
                    row["instrument_token"],
                    row["exchange_token"],
                    row["tradingsymbol"],
                    row["name"],
                    repr(row["last_price"]),
                    row["expiry"].isoformat() if row["expiry"] else "",
                    repr(row["strike"]),
                    repr(row["tick_size"]),
                    row["lot_size"],
                    row["instrument_type"],
                    row["segment"],
                    row["exchange"],
                ]
            )
        return buf.getvalue()

    def sigma(self, tokens: Iterable[int]) -> np.ndarray:
        """The model volatility the market prices each option with at its current state."""
        rows = self.rows_of(tokens)
        t = np.maximum(
            years_to_expiry(now_epoch_s=self._now, expiry_epoch_s=self._expiry_s[rows]), 0.0
        )
        t = np.where(np.isfinite(t), t, 0.0)
        und = self._und[rows]
        forward = self._spot[und] * np.exp((self._r - self._und_q[und]) * t)
        strike = np.where(self._is_option[rows], self._strike[rows], forward)
        return self._sigma(und, np.log(strike / forward), t)

    # --- public: live state ---------------------------------------------------------------

    def step(self, now_epoch_s: float | None = None) -> None:
        """Advance the market to ``now_epoch_s`` (default: the clock): walk, reprice, trade."""
        now = float(self._now_fn() if now_epoch_s is None else now_epoch_s)
        dt_s = max(now - self._now, 0.0)
        today = ist_date(now)
        if today != self._day:
            self._roll_day(today)
        dt_years = dt_s / SECONDS_PER_YEAR
        if dt_years > 0.0:
            z = self._rng.standard_normal(len(self._specs))
            vol = self._und_vol
            self._spot *= np.exp(-0.5 * vol * vol * dt_years + vol * math.sqrt(dt_years) * z)
        self._now = max(now, self._now)
        self._step_count += 1
        self._reprice(np.arange(len(self._token)))
        self._trade(dt_s)

    def set_spot(self, name: str, price: float) -> None:
        """Move an underlying to ``price`` now and reprice its futures and options."""
        if not price > 0:
            raise ValueError(f"spot must be positive: underlying={name} got={price}")
        u = self._und_index[name]
        self._spot[u] = float(price)
        self._step_count += 1
        self._reprice(np.flatnonzero(self._und == u))

    def _reprice(self, rows: np.ndarray) -> None:
        price = self._fair(rows, self._now)
        self._price[rows] = price
        self._high[rows] = np.maximum(self._high[rows], price)
        self._low[rows] = np.minimum(self._low[rows], price)

    def _trade(self, dt_s: float) -> None:
        if dt_s <= 0.0:
            return
        n = len(self._token)
        lots = self._rng.poisson(_TRADES_PER_S * dt_s, size=n) * self._tradable
        traded = lots > 0
        if not np.any(traded):
            return
        qty = lots * self._lot
        new_volume = self._volume + qty
        with np.errstate(invalid="ignore", divide="ignore"):
            avg = (self._avg_price * self._volume + self._price * qty) / new_volume
        self._avg_price = np.where(traded, avg, self._avg_price)
        self._volume = new_volume
        self._ltq = np.where(traded, qty, self._ltq)
        self._last_trade_s = np.where(traded, int(self._now), self._last_trade_s)
        oi_move = self._rng.integers(-1, 2, size=n) * qty
        self._oi = np.maximum(self._oi + np.where(traded, oi_move, 0), 0)
        self._oi_high = np.maximum(self._oi_high, self._oi)
        self._oi_low = np.minimum(self._oi_low, self._oi)

    def _roll_day(self, today: date) -> None:
        """A new session: yesterday's last price becomes the close, the day's counters reset."""
        self._day = today
        self._close = self._price.copy()
        self._open = self._price.copy()
        self._high = self._price.copy()
        self._low = self._price.copy()
        self._volume = np.zeros_like(self._volume)
        self._avg_price = self._price.copy()
        self._oi_high = self._oi.copy()
        self._oi_low = self._oi.copy()

    def _depth(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Five bid and five ask levels around the price (shape (n, 5)); none for indices."""
        price = self._price[rows]
        lot = self._lot[rows]
        tradable = self._tradable[rows]
        # Wider books for pricier contracts; a pure hash keeps depth off the walk's RNG.
        spread_ticks = np.where(price >= 200.0, 2.0, 1.0)
        level = np.arange(1, _DEPTH_LEVELS + 1, dtype=np.float64)
        offsets = spread_ticks[:, None] * level[None, :] * TICK_SIZE
        bid_price = _round_to_tick(price[:, None] - offsets)
        ask_price = _round_to_tick(price[:, None] + offsets)
        seed = (
            self._token[rows].astype(np.uint64) << np.uint64(20)
        ) ^ np.uint64(self._step_count & 0xFFFFF)
        h = _mix64(seed[:, None] * np.uint64(16) + np.arange(2 * _DEPTH_LEVELS, dtype=np.uint64))
        # Bit masks, not modulo: uint64 division is the slowest step of the tick hot path.
        qty = (1 + (h & np.uint64(31)).astype(np.int64)) * lot[:, None]  # 1-32 lots
        orders = 1 + ((h >> np.uint64(16)) & np.uint64(15)).astype(np.int64)  # 1-16 orders
        live = tradable[:, None] & (bid_price > 0)
        bid_qty = np.where(live, qty[:, :_DEPTH_LEVELS], 0)
        bid_orders = np.where(live, orders[:, :_DEPTH_LEVELS], 0)
        bid_price = np.where(live, bid_price, 0.0)
        ask_live = np.broadcast_to(tradable[:, None], ask_price.shape)
        ask_qty = np.where(ask_live, qty[:, _DEPTH_LEVELS:], 0)
        ask_orders = np.where(ask_live, orders[:, _DEPTH_LEVELS:], 0)
        ask_price = np.where(ask_live, ask_price, 0.0)
        return {
            "bid_price": bid_price,
            "bid_qty": bid_qty,
            "bid_orders": bid_orders,
            "ask_price": ask_price,
            "ask_qty": ask_qty,
            "ask_orders": ask_orders,
        }

    def _circuit_limits(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """NSE-like price bands: 10 % for futures, wide for options, none for indices."""
        kind = self._kind[rows]
        ref = np.maximum(self._close[rows], self._price[rows])
        lower = np.where(kind == KIND_FUTURE, self._close[rows] * 0.9, TICK_SIZE)
        upper = np.where(kind == KIND_FUTURE, self._close[rows] * 1.1, ref * 3.0 + 20.0)
        tradable = self._tradable[rows]
        return {
            "lower_circuit_limit": np.where(tradable, _round_to_tick(lower), 0.0),
            "upper_circuit_limit": np.where(tradable, _round_to_tick(upper), 0.0),
        }

    def state(self, tokens: Iterable[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The current numbers of ``tokens`` as arrays (prices in rupees), one entry per token."""
        return self.state_at(self.rows_of(tokens))

    def state_at(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Like :meth:`state` for row indices (see :meth:`rows_of`); the simulator's hot path."""
        depth = self._depth(rows)
        return {
            "instrument_token": self._token[rows],
            "tradable": self._tradable[rows],
            "last_price": self._price[rows],
            "last_traded_quantity": np.where(self._tradable[rows], self._ltq[rows], 0),
            "average_traded_price": np.where(self._tradable[rows], self._avg_price[rows], 0.0),
            "volume_traded": self._volume[rows],
            "total_buy_quantity": depth["bid_qty"].sum(axis=1) * _BOOK_DEPTH_MULTIPLIER,
            "total_sell_quantity": depth["ask_qty"].sum(axis=1) * _BOOK_DEPTH_MULTIPLIER,
            "open": self._open[rows],
            "high": self._high[rows],
            "low": self._low[rows],
            "close": self._close[rows],
            "last_trade_time": np.where(self._tradable[rows], self._last_trade_s[rows], 0),
            "oi": self._oi[rows],
            "oi_day_high": self._oi_high[rows],
            "oi_day_low": self._oi_low[rows],
            "exchange_timestamp": np.full(len(rows), int(self._now), dtype=np.int64),
            **self._circuit_limits(rows),
            **depth,
        }

    def ticks(
        self, tokens: Iterable[int] | np.ndarray, *, mode: str | Sequence[str] = "full"
    ) -> np.ndarray:
        """Ticks (``TICK_DTYPE``) of ``tokens`` at the current state, in ``mode`` (one or per token).

        Each row's ``packet_length`` is the packet Kite would send for that instrument in that
        mode: 8/44/184 for tradable contracts, 8/28/32 for indices.
        """
        rows = self.rows_of(tokens)
        return self.ticks_at(rows, self.packet_lengths(rows, mode))

    def packet_lengths(self, rows: np.ndarray, mode: str | Sequence[str]) -> np.ndarray:
        """The packet length Kite uses for each row in ``mode`` (one mode or one per row)."""
        modes = np.asarray(mode)
        unknown = ~np.isin(modes, MODES)
        if np.any(unknown):
            raise ValueError(f"unknown mode: got={np.atleast_1d(modes)[np.atleast_1d(unknown)][0]!r} expected={MODES}")
        index = ~self._tradable[rows]
        return np.where(
            modes == "ltp",
            PACKET_LTP,
            np.where(
                modes == "quote",
                np.where(index, PACKET_INDEX_QUOTE, PACKET_QUOTE),
                np.where(index, PACKET_INDEX_FULL, PACKET_FULL),
            ),
        ).astype(np.uint16)

    def ticks_at(self, rows: np.ndarray, packet_lengths: np.ndarray | int) -> np.ndarray:
        """Ticks of row indices with given packet lengths: the simulator's hot path.

        Fields a packet length does not carry are left zero, as the decoder leaves them.
        """
        out = np.zeros(len(rows), dtype=TICK_DTYPE)
        if len(rows) == 0:
            return out
        lengths = np.broadcast_to(np.asarray(packet_lengths, dtype=np.uint16), (len(rows),))
        s = self.state_at(rows)
        uniform = bool(lengths.min() == lengths.max())

        def kinds(*wanted: int) -> np.ndarray | bool:
            # One packet kind for all rows (the simulator's case) needs no per-row masks.
            if uniform:
                return int(lengths[0]) in wanted
            return np.isin(lengths, wanted)

        def put(name: str, values: np.ndarray, where: np.ndarray | bool) -> None:
            if where is True:
                out[name] = values
            elif where is not False:
                mask = where if values.ndim == 1 else where[:, None]
                out[name] = np.where(mask, values, 0)

        out["instrument_token"] = s["instrument_token"]
        out["packet_length"] = lengths
        out["tradable"] = s["tradable"]
        out["is_index"] = ~s["tradable"]
        out["last_price"] = s["last_price"]
        has_ohlc = kinds(PACKET_INDEX_QUOTE, PACKET_INDEX_FULL, PACKET_QUOTE, PACKET_FULL)
        for name in ("open", "high", "low", "close"):
            put(name, s[name], has_ohlc)
        with np.errstate(divide="ignore", invalid="ignore"):
            change = (s["last_price"] - s["close"]) * 100.0 / s["close"]
        put("change", np.where(s["close"] != 0, change, 0.0), has_ohlc)
        quote = kinds(PACKET_QUOTE, PACKET_FULL)
        for name in (
            "last_traded_quantity",
            "average_traded_price",
            "volume_traded",
            "total_buy_quantity",
            "total_sell_quantity",
        ):
            put(name, s[name], quote)
        full = kinds(PACKET_FULL)
        for name in ("last_trade_time", "oi", "oi_day_high", "oi_day_low"):
            put(name, s[name], full)
        put("exchange_timestamp", s["exchange_timestamp"], kinds(PACKET_INDEX_FULL, PACKET_FULL))
        for side, prefix in (("buy", "bid"), ("sell", "ask")):
            put(f"depth_{side}_quantity", s[f"{prefix}_qty"], full)
            put(f"depth_{side}_price", s[f"{prefix}_price"], full)
            put(f"depth_{side}_orders", s[f"{prefix}_orders"], full)
        return out

    def quote(self, tokens: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Kite's /quote entry for each token (the envelope's values, keyed by token)."""
        tokens = list(tokens)
        rows = self.rows_of(tokens)
        s = self.state_at(rows)
        now_text = _stamp(self._now)
        out: dict[int, dict[str, Any]] = {}
        for i in range(len(rows)):
            close = float(s["close"][i])
            last = float(s["last_price"][i])
            tradable = bool(s["tradable"][i])
            out[int(s["instrument_token"][i])] = {
                "instrument_token": int(s["instrument_token"][i]),
                "timestamp": now_text,
                "last_trade_time": _stamp(float(s["last_trade_time"][i])) if tradable else None,
                "last_price": round(last, 2),
                "last_quantity": int(s["last_traded_quantity"][i]),
                "buy_quantity": int(s["total_buy_quantity"][i]),
                "sell_quantity": int(s["total_sell_quantity"][i]),
                "volume": int(s["volume_traded"][i]),
                "average_price": round(float(s["average_traded_price"][i]), 2),
                "oi": int(s["oi"][i]),
                "oi_day_high": int(s["oi_day_high"][i]),
                "oi_day_low": int(s["oi_day_low"][i]),
                "net_change": round(last - close, 2),
                "lower_circuit_limit": round(float(s["lower_circuit_limit"][i]), 2),
                "upper_circuit_limit": round(float(s["upper_circuit_limit"][i]), 2),
                "ohlc": {
                    "open": round(float(s["open"][i]), 2),
                    "high": round(float(s["high"][i]), 2),
                    "low": round(float(s["low"][i]), 2),
                    "close": round(close, 2),
                },
                "depth": {
                    side: [
                        {
                            "price": round(float(s[f"{prefix}_price"][i, k]), 2),
                            "quantity": int(s[f"{prefix}_qty"][i, k]),
                            "orders": int(s[f"{prefix}_orders"][i, k]),
                        }
                        for k in range(_DEPTH_LEVELS)
                    ]
                    for side, prefix in (("buy", "bid"), ("sell", "ask"))
                },
            }
        return out

    # --- public: historical candles -------------------------------------------------------

    def historical(
        self,
        token: int,
        from_dt: datetime,
        to_dt: datetime,
        interval: str,
        *,
        oi: bool = False,
    ) -> list[list[Any]]:
        """Kite's historical candles ``[stamp, open, high, low, close, volume(, oi)]``.

        Naive datetimes are IST, as Kite reads them. The same request always returns the
        same candles. Raises ValueError for an unknown interval or an inverted range and
        KeyError for an unknown token.
        """
        if interval not in _INTERVAL_MINUTES:
            raise ValueError(f"invalid interval: got={interval!r} expected={list(_INTERVAL_MINUTES)}")
        start = _as_ist(from_dt)
        end = _as_ist(to_dt)
        if end < start:
            raise ValueError(f"from after to: from={start.isoformat()} to={end.isoformat()}")
        row = int(self.rows_of([token])[0])
        now = self._now
        minutes_per_candle = _INTERVAL_MINUTES[interval]
        day = start.date()
        candles: list[list[Any]] = []
        while day <= end.date():
            if is_trading_day(day, self._holidays) and session_open_epoch_s(day) <= now:
                candles.extend(
                    self._day_candles(row, day, minutes_per_candle, start, end, now, oi=oi)
                )
            day += timedelta(days=1)
        return candles

    def _day_candles(
        self,
        row: int,
        day: date,
        minutes_per_candle: int,
        start: datetime,
        end: datetime,
        now: float,
        *,
        oi: bool,
    ) -> list[list[Any]]:
        u = int(self._und[row])
        open_s = session_open_epoch_s(day)
        listed_s = float(self._listed_s[row])
        expiry_s = float(self._expiry_s[row])
        if session_close_epoch_s(day) <= listed_s or open_s >= expiry_s:
            return []
        minute_start_s = open_s + 60.0 * np.arange(MINUTES_PER_SESSION)
        # Only minutes that have begun and that the contract traded in.
        live = (minute_start_s <= now) & (minute_start_s < expiry_s)
        if not np.any(live):
            return []
        level = np.exp(self._open_log_of(u, day) + self._day_path(u, day)[1])
        pts = level[: MINUTES_PER_SESSION * _SUBSTEPS_PER_MINUTE + 1]
        windows = np.lib.stride_tricks.sliding_window_view(pts, _SUBSTEPS_PER_MINUTE + 1)[
            :: _SUBSTEPS_PER_MINUTE
        ]
        spot = np.stack(
            [windows[:, 0], windows.max(axis=1), windows.min(axis=1), windows[:, -1]], axis=1
        )  # (375, 4): open, high, low, close of the underlying
        rows = np.full(MINUTES_PER_SESSION, row)
        prices = np.stack(
            [self._fair_from_spot(rows, spot[:, j], minute_start_s) for j in range(4)], axis=1
        )
        if self._kind[row] == KIND_PUT:
            prices = prices[:, [0, 2, 1, 3]]  # a put is highest when the underlying is lowest
        prices[:, 1] = np.maximum(prices[:, 1], prices.max(axis=1))
        prices[:, 2] = np.minimum(prices[:, 2], prices.min(axis=1))
        volume, open_interest = self._day_activity(row, day)
        if minutes_per_candle == MINUTES_PER_SESSION:
            stamp_s = np.array([datetime(day.year, day.month, day.day, tzinfo=IST).timestamp()])
            group = np.zeros(MINUTES_PER_SESSION, dtype=np.int64)
        else:
            group = np.arange(MINUTES_PER_SESSION) // minutes_per_candle
            stamp_s = open_s + 60.0 * minutes_per_candle * np.arange(group[-1] + 1)
        # Which minutes make up each candle: live ones, in candles that start within the
        # requested range (a day candle is in range whenever its day is). Vectorised over the
        # day; each value is still rounded by Python's round() as Kite's JSON would carry it.
        member = live.copy()
        if minutes_per_candle != MINUTES_PER_SESSION:
            member &= ((stamp_s >= start.timestamp()) & (stamp_s <= end.timestamp()))[group]
        idx = np.flatnonzero(member)
        if idx.size == 0:
            return []
        g = group[idx]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        first = idx[starts]
        last = idx[np.r_[starts[1:], idx.size] - 1]
        columns = [
            _candle_stamps(stamp_s[g[starts]]),
            [round(v, 2) for v in prices[first, 0].tolist()],
            [round(v, 2) for v in np.maximum.reduceat(prices[idx, 1], starts).tolist()],
            [round(v, 2) for v in np.minimum.reduceat(prices[idx, 2], starts).tolist()],
            [round(v, 2) for v in prices[last, 3].tolist()],
            np.add.reduceat(volume[idx], starts).tolist(),
        ]
        if oi:
            columns.append(open_interest[last].tolist())
        return [list(candle) for candle in zip(*columns, strict=True)]

    def _day_activity(self, row: int, day: date) -> tuple[np.ndarray, np.ndarray]:
        """Seeded per-minute volume and open interest of a contract on a day (zeros for indices)."""
        if not self._tradable[row]:
            zeros = np.zeros(MINUTES_PER_SESSION, dtype=np.int64)
            return zeros, zeros
        rng = np.random.default_rng([self._seed, int(self._token[row]), day.toordinal(), 1])
        lot = int(self._lot[row])
        volume = rng.poisson(8.0, size=MINUTES_PER_SESSION) * lot
        base_lots = 100 + int(_mix64(np.array([self._token[row]]))[0] % np.uint64(20000))
        drift = np.cumsum(rng.integers(-3, 4, size=MINUTES_PER_SESSION))
        open_interest = np.maximum(base_lots + drift, 0) * lot
        return volume, open_interest

    def _day_path(self, u: int, day: date) -> tuple[float, np.ndarray]:
        """(overnight log gap, intraday log path relative to the open) of an underlying's day."""
        key = (u, day)
        cached = self._paths.get(key)
        if cached is not None:
            self._paths.move_to_end(key)
            return cached
        spec = self._specs[u]
        rng = np.random.default_rng([self._seed, zlib.crc32(spec.name.encode()), day.toordinal()])
        n_steps = MINUTES_PER_SESSION * _SUBSTEPS_PER_MINUTE
        step_vol = spec.vol / math.sqrt(_TRADING_DAYS_PER_YEAR * n_steps)
        z = rng.standard_normal(n_steps)
        path = np.concatenate([[0.0], np.cumsum(step_vol * z - 0.5 * step_vol * step_vol)])
        gap = spec.vol / math.sqrt(_TRADING_DAYS_PER_YEAR) * _OVERNIGHT_GAP_VOL_RATIO
        result = (gap * float(rng.standard_normal()), path)
        self._paths[key] = result
        if len(self._paths) > _PATH_CACHE_DAYS:
            self._paths.popitem(last=False)
        return result

    def _anchor(self) -> tuple[date, int]:
        """The trading day and path point where history meets the starting spot."""
        created = self._created_epoch_s
        day = ist_date(created)
        n_points = MINUTES_PER_SESSION * _SUBSTEPS_PER_MINUTE
        if not is_trading_day(day, self._holidays):
            return previous_trading_day_on_or_before(day, self._holidays), n_points
        elapsed_s = created - session_open_epoch_s(day)
        point = int(elapsed_s / 60.0 * _SUBSTEPS_PER_MINUTE)
        if point < 0:
            previous = previous_trading_day_on_or_before(day - timedelta(days=1), self._holidays)
            return previous, n_points
        return day, min(point, n_points)

    def _open_log_of(self, u: int, day: date) -> float:
        """Log level of underlying ``u`` at ``day``'s open, walking from the anchor day."""
        memo = self._open_log[u]
        if day in memo:
            return memo[day]
        anchor_day, anchor_point = self._anchor()
        if not memo:
            memo[anchor_day] = math.log(self._specs[u].spot) - self._day_path(u, anchor_day)[1][
                anchor_point
            ]
        # Walk from the nearest known day towards ``day`` one trading day at a time.
        known = min(memo, key=lambda d: abs((d - day).days))
        level = memo[known]
        cursor = known
        while cursor != day:
            if cursor < day:
                nxt = cursor + timedelta(days=1)
                while not is_trading_day(nxt, self._holidays):
                    nxt += timedelta(days=1)
                level = level + self._day_path(u, cursor)[1][-1] + self._day_path(u, nxt)[0]
                cursor = nxt
            else:
                prev = previous_trading_day_on_or_before(cursor - timedelta(days=1), self._holidays)
                level = level - self._day_path(u, cursor)[0] - self._day_path(u, prev)[1][-1]
                cursor = prev
            memo[cursor] = level
        return level
