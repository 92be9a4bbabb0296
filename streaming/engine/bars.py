"""Real 1-minute OHLCV bars of underlyings, built from ticks, with gaps marked, not invented.

A :class:`BarAggregator` watches a few tokens (each underlying's index or equity, see
``InstrumentUniverse.spot_tokens``). Ticks are bucketed by minute of exchange time (receipt
time for packets without a timestamp: LTP and index-quote modes). A bar closes when a tick of
a later minute arrives, or when the clock passes the end of its minute plus ``grace_s``.

* OHLC come from the LTP of the ticks in the minute; ``ticks`` counts them.
* Volume is the change in the cumulative ``volume_traded`` over the bar (from the last
  cumulative value before the bar; for the first bar after start, from its first tick, so the
  first tick's own trades are not counted). Indices carry no volume: 0.
* A minute with no tick between two bars of the same IST day is a gap bar: null prices,
  ``is_gap=True``, emitted when the next bar starts. Minutes before the first bar, across
  days, or across a live/mock switch are not gaps: nothing is known about them.
* A tick for a minute already closed is late and dropped (counted in ``late_ticks``).
* Live and mock never share a bar: a tick from the other source closes the open bar.

The aggregator is vectorised up to one segment per (token, minute) in a batch; the short loop
over segments merges them into the open bars, so its cost grows with underlyings, not ticks.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from streaming import schema
from streaming.kite.codec import PACKET_FULL, PACKET_INDEX_FULL, PACKET_QUOTE

__all__ = ["Bar", "BarAggregator"]

SECONDS_PER_MINUTE: Final = 60
_IST_OFFSET_S: Final = 5 * 3600 + 30 * 60
_SECONDS_PER_DAY: Final = 86_400
#: How long after a minute ends its bar waits for late ticks before the clock closes it.
DEFAULT_GRACE_S: Final = 3.0


def _ist_day(minute: int) -> int:
    return (minute * SECONDS_PER_MINUTE + _IST_OFFSET_S) // _SECONDS_PER_DAY


@dataclass(frozen=True, slots=True)
class Bar:
    """One closed 1-minute bar of an underlying; a gap bar has no prices."""

    token: int
    name: str
    start_epoch_s: int
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    volume: int
    ticks: int
    is_gap: bool
    is_mock: bool
    #: Filled from Kite's historical candles (streaming.services.bars_backfill), not ticks.
    backfilled: bool = False

    def item(self) -> bytes:
        """The bar's JSON for ``bar.closed`` messages (:func:`streaming.schema.encode_bar`)."""
        return schema.encode_bar(
            token=self.token,
            name=self.name,
            start_epoch_s=self.start_epoch_s,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
            ticks=self.ticks,
            is_gap=self.is_gap,
            is_mock=self.is_mock,
            backfilled=self.backfilled,
        )

    def row(self) -> dict[str, Any]:
        """The bar as ``UnderlyingBar`` field values (for ``streaming.engine.store.bars_save``)."""
        return {
            "instrument_id": self.token,
            "start": dt.datetime.fromtimestamp(self.start_epoch_s, tz=dt.UTC),
            "open": self.open,
            "high": self.high,
            "low": self.low,
            "close": self.close,
            "volume": self.volume,
            "tick_count": self.ticks,
            "is_gap": self.is_gap,
            "is_mock": self.is_mock,
            "backfilled": self.backfilled,
        }


class _Open:
    """The open bar of one token (mutable; a handful of these exist)."""

    __slots__ = ("close", "high", "is_mock", "low", "minute", "open", "ticks", "volume_base", "volume_last")

    def __init__(
        self, minute: int, o: float, h: float, lo: float, c: float, n: int, base: int, last: int, mock: bool
    ) -> None:
        self.minute = minute
        self.open = o
        self.high = h
        self.low = lo
        self.close = c
        self.ticks = n
        self.volume_base = base  # cumulative volume before the bar, -1 unknown
        self.volume_last = last  # last cumulative volume seen in the bar, -1 unknown
        self.is_mock = mock


class BarAggregator:
    """1-minute bars of the tokens in ``sources`` (token -> underlying name).

    ``ingest`` and ``close_due`` return the bars they closed, oldest first, gap bars included.
    ``clock`` stamps packets that carry no exchange timestamp (injectable for tests).
    """

    def __init__(
        self,
        sources: Mapping[int, str],
        *,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._grace_s = float(grace_s)
        self._clock = clock
        self._open: dict[int, _Open] = {}
        # Last closed minute, its source and its closing cumulative volume, per token.
        self._closed: dict[int, tuple[int, bool, int]] = {}
        self.late_ticks = 0
        self.set_sources(sources)

    def set_sources(self, sources: Mapping[int, str]) -> None:
        """Watch these tokens from now on; open bars of tokens kept stay open, others go."""
        self._names = {int(t): str(n) for t, n in sources.items()}
        self._tokens = np.array(sorted(self._names), dtype=np.int64)
        self._open = {t: b for t, b in self._open.items() if t in self._names}
        self._closed = {t: c for t, c in self._closed.items() if t in self._names}

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens

    def ingest(
        self, ticks: np.ndarray, *, is_mock: bool, received_epoch_s: float | None = None
    ) -> list[Bar]:
        """Add a batch of ticks (TICK_DTYPE); return the bars a later-minute tick closed."""
        if len(ticks) == 0 or self._tokens.size == 0:
            return []
        tokens = ticks["instrument_token"].astype(np.int64)
        pos = np.minimum(np.searchsorted(self._tokens, tokens), self._tokens.size - 1)
        mine = (self._tokens[pos] == tokens) & (ticks["last_price"] > 0)
        if not mine.any():
            return []
        t = ticks[mine]
        tokens = tokens[mine]
        received = self._clock() if received_epoch_s is None else received_epoch_s
        length = t["packet_length"]
        stamped = ((length == PACKET_FULL) | (length == PACKET_INDEX_FULL)) & (
            t["exchange_timestamp"] > 0
        )
        ts = np.where(stamped, t["exchange_timestamp"], int(received))
        minute = ts // SECONDS_PER_MINUTE
        price = t["last_price"]
        has_volume = (length == PACKET_QUOTE) | (length == PACKET_FULL)
        volume = np.where(has_volume, t["volume_traded"], -1)

        # One segment per (token, minute), in arrival order within it.
        order = np.lexsort((minute, tokens))
        tokens, minute, price, volume = tokens[order], minute[order], price[order], volume[order]
        n = tokens.size
        starts_mask = np.ones(n, dtype=bool)
        starts_mask[1:] = (tokens[1:] != tokens[:-1]) | (minute[1:] != minute[:-1])
        starts = np.flatnonzero(starts_mask)
        ends = np.append(starts[1:], n) - 1
        highs = np.maximum.reduceat(price, starts)
        lows = np.minimum.reduceat(price, starts)
        counts = np.diff(np.append(starts, n))
        volume_last = np.maximum.reduceat(volume, starts)  # cumulative: the largest is the last
        masked = np.where(volume >= 0, volume, np.iinfo(np.int64).max)
        volume_first = np.minimum.reduceat(masked, starts)
        volume_first = np.where(volume_first == np.iinfo(np.int64).max, -1, volume_first)

        closed: list[Bar] = []
        for token, m, o, h, lo, c, k, v_first, v_last in zip(
            tokens[starts].tolist(),
            minute[starts].tolist(),
            price[starts].tolist(),
            highs.tolist(),
            lows.tolist(),
            price[ends].tolist(),
            counts.tolist(),
            volume_first.tolist(),
            volume_last.tolist(),
            strict=True,
        ):
            self._merge(closed, token, m, o, h, lo, c, k, v_first, v_last, is_mock)
        return closed

    def _merge(
        self,
        closed: list[Bar],
        token: int,
        minute: int,
        o: float,
        h: float,
        lo: float,
        c: float,
        n: int,
        v_first: int,
        v_last: int,
        mock: bool,
    ) -> None:
        bar = self._open.get(token)
        if bar is not None and bar.is_mock != mock:
            closed.append(self._close(token, bar))
            self._closed.pop(token, None)  # no gaps or volume base across a source switch
            bar = None
        if bar is not None:
            if minute < bar.minute:
                self.late_ticks += n
                return
            if minute == bar.minute:
                bar.high = max(bar.high, h)
                bar.low = min(bar.low, lo)
                bar.close = c
                bar.ticks += n
                bar.volume_last = max(bar.volume_last, v_last)
                return
            closed.append(self._close(token, bar))
        last = self._closed.get(token)
        if last is not None and last[1] != mock:
            last = None
        if last is not None and minute <= last[0]:
            self.late_ticks += n
            return
        base = v_first
        if last is not None:
            last_minute, _, last_volume = last
            if _ist_day(last_minute) == _ist_day(minute):
                name = self._names[token]
                closed.extend(
                    Bar(token, name, g * SECONDS_PER_MINUTE, None, None, None, None, 0, 0, True, mock)
                    for g in range(last_minute + 1, minute)
                )
            if last_volume >= 0:
                base = last_volume
        self._open[token] = _Open(minute, o, h, lo, c, n, base, v_last, mock)

    def _close(self, token: int, bar: _Open) -> Bar:
        del self._open[token]
        if bar.volume_last < 0 or bar.volume_base < 0:
            volume = 0
        elif bar.volume_last >= bar.volume_base:
            volume = bar.volume_last - bar.volume_base
        else:  # the cumulative count restarted (a new session): all of it is this bar's
            volume = bar.volume_last
        self._closed[token] = (bar.minute, bar.is_mock, bar.volume_last)
        return Bar(
            token=token,
            name=self._names[token],
            start_epoch_s=bar.minute * SECONDS_PER_MINUTE,
            open=bar.open,
            high=bar.high,
            low=bar.low,
            close=bar.close,
            volume=volume,
            ticks=bar.ticks,
            is_gap=False,
            is_mock=bar.is_mock,
        )

    def close_due(self, now_epoch_s: float) -> list[Bar]:
        """Close the bars whose minute ended more than ``grace_s`` before ``now_epoch_s``."""
        due = [
            token
            for token, bar in self._open.items()
            if (bar.minute + 1) * SECONDS_PER_MINUTE + self._grace_s <= now_epoch_s
        ]
        bars = [self._close(token, self._open[token]) for token in due]
        bars.sort(key=lambda b: (b.start_epoch_s, b.token))
        return bars

    def close_all(self) -> list[Bar]:
        """Close every bar in progress, the open minute included (the engine is stopping)."""
        bars = [self._close(token, bar) for token, bar in list(self._open.items())]
        bars.sort(key=lambda b: (b.start_epoch_s, b.token))
        return bars

    def open_bars(self) -> dict[int, dict[str, Any]]:
        """The bars in progress (for a chart's current candle): token -> fields."""
        return {
            token: {
                "start_epoch_s": bar.minute * SECONDS_PER_MINUTE,
                "open": bar.open,
                "high": bar.high,
                "low": bar.low,
                "close": bar.close,
                "ticks": bar.ticks,
                "is_mock": bar.is_mock,
            }
            for token, bar in self._open.items()
        }
