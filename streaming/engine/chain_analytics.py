"""Chain analytics in the engine: computed where the snapshots are, sent to chain subscribers.

Why here and not in the consumer: the engine holds every chain's state in arrays, computes a
chain once for all its subscribers, and already knows which chains changed; a consumer would
have to parse every snapshot of the chain (JSON) per connection to get the same numbers.

Runs on the pipeline's one thread (streaming.engine.worker), after each flush:

    analytics.observe(pipeline, now)               # OI baselines, which chains changed
                                                   # (each call follows pipeline.universe)
    messages = analytics.due(pipeline, now, watched)   # (group, bytes) for chains due
    rows = analytics.minute_rows(pipeline, now)        # once a minute: ChainMinute rows
    analytics.latest(pipeline, groups, now)            # a new chain subscriber's first message

A chain's ``analytics`` message is written at most once per ``interval_s``, only when one of
its options' snapshots changed since the last one, and only for chains somebody listens to.
The maths is :mod:`streaming.analytics`; the message shape :func:`streaming.protocol.analytics_message`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from streaming import analytics
from streaming.engine.pipeline import (
    FORWARD_FUTURE,
    FORWARD_PARITY,
    GOLDEN_FRACTION,
    SnapshotPipeline,
)
from streaming.engine.universe import InstrumentUniverse
from streaming.greeks import IST
from streaming.protocol import analytics_message

__all__ = ["ChainAnalytics", "HistoryKey"]

DEFAULT_INTERVAL_S: Final = 1.0
IST_OFFSET_S: Final = int(IST.utcoffset(None).total_seconds())
"""India Standard Time is UTC+05:30 all year: the trading day of an epoch second."""
_SOURCES: Final = {FORWARD_FUTURE: "future", FORWARD_PARITY: "parity"}

HistoryKey = tuple[str, dt.date, bool]
"""(underlying, expiry, is_mock) of a chain's daily ATM IV history."""


def trading_day(epoch_s: float) -> int:
    """The IST date of an instant, as days since the epoch."""
    return int((epoch_s + IST_OFFSET_S) // 86_400)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _ints(values: np.ndarray) -> list[int | None]:
    """An int64 column with -1 for unknown as JSON-ready values."""
    return np.where(values >= 0, values, None).tolist()


@dataclass(frozen=True, slots=True)
class _Chain:
    """One chain's layout: its strikes and, per strike, the call's and put's slot (or -1)."""

    name: str
    expiry: dt.date
    group: str
    strikes: np.ndarray
    ce: np.ndarray
    pe: np.ndarray
    lot_size: int | None


class ChainAnalytics:
    """Per-chain analytics state of one engine: OI baselines, cadence, history, last messages."""

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S, iv_window_days: int = 365) -> None:
        if not (interval_s > 0 and iv_window_days > 0):
            raise ValueError(f"bad analytics settings: interval_s={interval_s} iv_window_days={iv_window_days}")
        self._interval_s = float(interval_s)
        self.iv_window_days = int(iv_window_days)
        self._history: dict[HistoryKey, np.ndarray] = {}
        self._sampled_minute = -1
        self._install(InstrumentUniverse.empty())

    # --- universe ---------------------------------------------------------------------------

    def _install(self, u: InstrumentUniverse) -> None:
        self._u = u
        n = len(u)
        self._oi_base = np.full(n, -1, dtype=np.int64)
        self._oi_base_s = np.full(n, np.nan)
        self._oi_base_day = np.full(n, -1, dtype=np.int64)
        self._oi_base_mock = np.zeros(n, dtype=bool)
        options = np.flatnonzero(u.is_option)
        order = options[np.lexsort((u.strike[options], u.chain[options]))]
        chains: list[_Chain] = []
        bounds = np.searchsorted(u.chain[order], np.arange(len(u.chain_und) + 1))
        for c in range(len(u.chain_und)):
            slots = order[bounds[c] : bounds[c + 1]]
            strikes, at = np.unique(u.strike[slots], return_inverse=True)
            ce = np.full(strikes.size, -1, dtype=np.int64)
            pe = np.full(strikes.size, -1, dtype=np.int64)
            calls = u.is_call[slots]
            ce[at[calls]] = slots[calls]
            pe[at[~calls]] = slots[~calls]
            lots = u.lot_size[slots]
            lots = lots[lots > 0]
            name = u.underlyings[int(u.chain_und[c])]
            chains.append(
                _Chain(
                    name=name,
                    expiry=u.chain_expiry[c],
                    group=u.group_names[int(u.group[slots[0]])] if slots.size else "",
                    strikes=strikes,
                    ce=ce,
                    pe=pe,
                    lot_size=int(lots[0]) if lots.size else None,
                )
            )
        self._chains = chains
        self._by_group = {ch.group: c for c, ch in enumerate(chains)}
        siblings: dict[int, list[int]] = {}
        for c in range(len(chains)):
            siblings.setdefault(int(u.chain_und[c]), []).append(c)
        # Each underlying's chains, nearest expiry first (chain ids sort by expiry within one).
        self._siblings = [
            sorted(siblings[int(u.chain_und[c])], key=lambda i: chains[i].expiry)
            for c in range(len(chains))
        ]
        self._watched_source: object = None
        self._watched = np.zeros(len(chains), dtype=bool)
        self._dirty = np.ones(len(chains), dtype=bool)
        # Golden-ratio phases spread the chains over the interval: without them every chain
        # of the universe would be due in the same flush, once a second (a spike of Python).
        self._phase_s = np.arange(len(chains)) * GOLDEN_FRACTION % 1.0 * self._interval_s
        #: When each chain was last sent; None until the first ``due`` after an install.
        self._sent_s: np.ndarray | None = None
        self._latest: dict[int, bytes] = {}

    def _follow(self, pipeline: SnapshotPipeline) -> None:
        """Take the pipeline's universe when it changed (reloads install it there)."""
        if pipeline.universe is not self._u:
            self.set_universe(pipeline.universe)

    def set_universe(self, universe: InstrumentUniverse) -> None:
        """Switch universes; tokens in both keep their OI baseline."""
        old = self._u
        base = (self._oi_base, self._oi_base_s, self._oi_base_day, self._oi_base_mock)
        _, old_slots, new_slots = np.intersect1d(
            old.tokens, universe.tokens, assume_unique=True, return_indices=True
        )
        self._install(universe)
        for new, kept in zip(
            (self._oi_base, self._oi_base_s, self._oi_base_day, self._oi_base_mock), base, strict=True
        ):
            new[new_slots] = kept[old_slots]

    def set_history(self, history: Mapping[HistoryKey, np.ndarray]) -> None:
        """Earlier days' ATM IV per chain (one value a day) for IV rank and percentile."""
        self._history = dict(history)

    # --- per flush --------------------------------------------------------------------------

    def observe(self, pipeline: SnapshotPipeline, now: float) -> None:
        """Take OI baselines of options seen for the first time today; mark changed chains."""
        self._follow(pipeline)
        u, st = self._u, pipeline.state
        slots = pipeline.changed_slots
        slots = slots[u.is_option[slots]]
        if slots.size == 0:
            return
        today = trading_day(now)
        oi = st.oi[slots]
        mock = st.is_mock[slots]
        fresh = (oi >= 0) & (
            (self._oi_base_day[slots] != today) | (self._oi_base_mock[slots] != mock)
        )
        if fresh.any():
            taken = slots[fresh]
            self._oi_base[taken] = oi[fresh]
            self._oi_base_s[taken] = st.received_s[taken]
            self._oi_base_day[taken] = today
            self._oi_base_mock[taken] = mock[fresh]
        self._dirty[u.chain[slots]] = True

    def due(
        self, pipeline: SnapshotPipeline, now: float, watched: Collection[str] | None
    ) -> list[tuple[str, bytes]]:
        """The ``analytics`` messages of watched chains that changed and whose interval passed."""
        self._follow(pipeline)
        if self._sent_s is None:
            # As if chain c had been sent its phase before an interval ago: the first
            # messages after an install come at their phases, then one interval apart.
            self._sent_s = now - self._interval_s + self._phase_s
        due = self._dirty & (now - self._sent_s >= self._interval_s)
        if watched is not None:
            due &= self._watched_mask(watched)
        out = []
        for c in np.flatnonzero(due).tolist():
            chain = self._chains[c]
            message = self._message(pipeline, c, now)
            self._dirty[c] = False
            self._sent_s[c] = now
            if message is not None:
                out.append((chain.group, message))
        return out

    def next_due_in(self, now: float, watched: Collection[str] | None) -> float | None:
        """Seconds until a changed, watched chain's message is due; None when none waits."""
        pending = self._dirty if watched is None else self._dirty & self._watched_mask(watched)
        if self._sent_s is None or not pending.any():
            return None
        return max(float(self._sent_s[pending].min()) + self._interval_s - now, 0.0)

    def _watched_mask(self, watched: Collection[str]) -> np.ndarray:
        """Which chains are watched; rebuilt only when the publisher's set is a new object."""
        if watched is not self._watched_source:
            self._watched = np.fromiter(
                (ch.group in watched for ch in self._chains), dtype=bool, count=len(self._chains)
            )
            self._watched_source = watched
        return self._watched

    def latest(
        self, pipeline: SnapshotPipeline, groups: Iterable[str], now: float
    ) -> list[tuple[str, bytes]]:
        """(group, last ``analytics`` message) of each named chain group this engine streams
        (computed now if none is current)."""
        self._follow(pipeline)
        out = []
        for group in groups:
            c = self._by_group.get(group)
            if c is None:
                continue
            message = None if self._dirty[c] else self._latest.get(c)
            if message is None:
                message = self._message(pipeline, c, now)
            if message is not None:
                out.append((group, message))
        return out

    def minute_rows(self, pipeline: SnapshotPipeline, now: float) -> list[dict[str, Any]]:
        """Once per minute (else []): every chain's ATM IV, straddle and PCR, to be stored."""
        self._follow(pipeline)
        minute = int(now // 60)
        if minute == self._sampled_minute:
            return []
        self._sampled_minute = minute
        start = dt.datetime.fromtimestamp(minute * 60, tz=dt.UTC)
        rows = []
        for c, chain in enumerate(self._chains):
            summary, present, _ = self._summary(pipeline, c)
            if not present.any():
                continue
            if summary.atm_iv is None and summary.straddle is None and summary.pcr_oi is None:
                continue
            rows.append(
                {
                    "underlying": chain.name,
                    "expiry": chain.expiry,
                    "minute": start,
                    "atm_iv": summary.atm_iv,
                    "straddle": summary.straddle,
                    "pcr_oi": summary.pcr_oi,
                    "is_mock": self._is_mock(pipeline, c),
                }
            )
        return rows

    # --- computing one chain ----------------------------------------------------------------

    def _legs(self, pipeline: SnapshotPipeline, slots: np.ndarray) -> tuple[analytics.Leg, np.ndarray]:
        st = pipeline.state
        s = np.maximum(slots, 0)
        present = (slots >= 0) & st.has_data[s]

        def column(values: np.ndarray) -> np.ndarray:
            out = values[s].astype(np.float64)
            out[~present] = np.nan
            return out

        def counts(values: np.ndarray) -> np.ndarray:
            out = values[s].astype(np.float64)
            out[~present | (values[s] < 0)] = np.nan
            return out

        leg = analytics.Leg(
            ltp=column(st.ltp),
            close=column(st.close),
            iv=column(pipeline.iv),
            oi=counts(st.oi),
            oi_base=counts(self._oi_base),
            volume=counts(st.volume),
        )
        return leg, present

    def _summary(
        self, pipeline: SnapshotPipeline, c: int
    ) -> tuple[analytics.Summary, np.ndarray, tuple[analytics.Leg, analytics.Leg, np.ndarray, np.ndarray]]:
        chain = self._chains[c]
        ce, ce_present = self._legs(pipeline, chain.ce)
        pe, pe_present = self._legs(pipeline, chain.pe)
        forward = float(pipeline.chain_forwards()[0][c])
        summary = analytics.summarise(chain.strikes, ce, pe, forward=forward)
        return summary, ce_present | pe_present, (ce, pe, ce_present, pe_present)

    def _is_mock(self, pipeline: SnapshotPipeline, c: int) -> bool:
        chain = self._chains[c]
        slots = np.concatenate((chain.ce, chain.pe))
        slots = slots[slots >= 0]
        st = pipeline.state
        return bool((st.is_mock[slots] & st.has_data[slots]).any())

    def _atm_iv(self, pipeline: SnapshotPipeline, c: int) -> float | None:
        chain = self._chains[c]
        index = analytics.atm_index(chain.strikes, float(pipeline.chain_forwards()[0][c]))
        if index is None:
            return None
        iv = pipeline.iv
        values = [
            float(iv[s]) if s >= 0 and pipeline.state.has_data[s] else math.nan
            for s in (int(chain.ce[index]), int(chain.pe[index]))
        ]
        return analytics.atm_iv(np.array(values[:1]), np.array(values[1:]), 0)

    def _message(self, pipeline: SnapshotPipeline, c: int, now: float) -> bytes | None:
        summary, present, (ce, pe, ce_present, pe_present) = self._summary(pipeline, c)
        if not present.any():
            return None
        chain = self._chains[c]
        u, st = self._u, pipeline.state
        forward, source, stale, _ = pipeline.chain_forwards()
        is_mock = self._is_mock(pipeline, c)
        rank, percentile = analytics.iv_rank_percentile(
            summary.atm_iv, self._history.get((chain.name, chain.expiry, is_mock), np.zeros(0))
        )
        slots = np.concatenate((chain.ce, chain.pe))
        taken = slots[slots >= 0]
        base_s = self._oi_base_s[taken][st.has_data[taken]]
        base_s = base_s[np.isfinite(base_s)]
        summary_json = {
            "pcr_oi": _round(summary.pcr_oi, 4),
            "pcr_volume": _round(summary.pcr_volume, 4),
            "max_pain": summary.max_pain,
            "atm_strike": summary.atm_strike,
            "atm_iv": _round(summary.atm_iv, 6),
            "straddle": _round(summary.straddle, 2),
            "forward": _round(float(forward[c]), 4),
            "forward_source": _SOURCES.get(int(source[c])),
            "forward_stale": bool(stale[c]),
            "days_to_expiry": _round(
                analytics.days_to_expiry(
                    now_epoch_s=now, expiry_epoch_s=float(u.chain_expiry_epoch_s[c])
                ),
                2,
            ),
            "lot_size": chain.lot_size,
            "oi_change_since": int(base_s.max() * 1000) if base_s.size else None,
            "iv_rank": _round(rank, 1),
            "iv_percentile": _round(percentile, 1),
            "iv_window_days": self.iv_window_days,
            "is_mock": is_mock,
        }
        legs = [
            self._leg_json(pipeline, chain.ce, ce, ce_present),
            self._leg_json(pipeline, chain.pe, pe, pe_present),
        ]
        rows = [
            {"strike": k, "ce": a, "pe": b}
            for k, a, b in zip(chain.strikes.tolist(), *legs, strict=True)
        ]
        term = []
        for s in self._siblings[c]:
            sibling = self._chains[s]
            term.append(
                {
                    "expiry": sibling.expiry.isoformat(),
                    "atm_iv": _round(summary.atm_iv if s == c else self._atm_iv(pipeline, s), 6),
                    "days_to_expiry": _round(
                        analytics.days_to_expiry(
                            now_epoch_s=now, expiry_epoch_s=float(u.chain_expiry_epoch_s[s])
                        ),
                        2,
                    ),
                    "forward": _round(float(forward[s]), 4),
                }
            )
        message = analytics_message(
            underlying=chain.name,
            expiry=chain.expiry,
            ts_ms=int(now * 1000),
            summary=summary_json,
            rows=rows,
            term_structure=term,
        )
        self._latest[c] = message
        return message

    def _leg_json(
        self, pipeline: SnapshotPipeline, slots: np.ndarray, leg: analytics.Leg, present: np.ndarray
    ) -> list[dict[str, Any] | None]:
        st = pipeline.state
        s = np.maximum(slots, 0)
        delta = analytics.oi_change(leg.oi, leg.oi_base)
        codes = analytics.buildup_codes(leg.ltp, leg.close, delta).tolist()
        names = analytics.BUILDUPS
        # NaN is written as null by orjson; integer columns use -1 for unknown.
        columns = zip(
            present.tolist(),
            self._u.tokens[s].tolist(),
            leg.ltp.tolist(),
            st.bid[s].tolist(),
            _ints(st.bid_qty[s]),
            st.ask[s].tolist(),
            _ints(st.ask_qty[s]),
            _ints(st.volume[s]),
            _ints(st.oi[s]),
            np.where(np.isnan(delta), None, np.nan_to_num(delta).astype(np.int64)).tolist(),
            codes,
            strict=True,
        )
        return [
            {
                "token": token,
                "ltp": ltp,
                "bid": bid,
                "bid_qty": bid_qty,
                "ask": ask,
                "ask_qty": ask_qty,
                "volume": volume,
                "oi": oi,
                "oi_change": change,
                "buildup": names[code],
            }
            if here
            else None
            for here, token, ltp, bid, bid_qty, ask, ask_qty, volume, oi, change, code in columns
        ]
