"""The latest market state of every instrument, in numpy columns indexed by universe slot.

Ingest is vectorised over a batch of decoded ticks (one Kite frame, or one mock step):
tokens become slots with one ``searchsorted`` in the universe, duplicates within the batch
keep the last, and each column is written with one fancy-indexed assignment. Nothing loops
per tick in Python.

Rules
    * Fields a packet does not carry are cleared, not kept: an instrument moved from full to
      LTP mode stops showing a bid it no longer receives. ``close`` is the exception (it
      does not change during the day and LTP packets need it for ``change``).
    * A tick older than the slot's state (by exchange timestamp, when both have one) is
      ignored: two accounts streaming one instrument cannot move it backwards.
    * A slot is marked dirty only when a published field changed, so the same tick arriving
      from two accounts on either side of a flush is published once.
    * Live and mock data never mix in a slot: a tick from the other source resets the slot
      (every field cleared) before it is applied.

Null conventions: float columns NaN, integer columns -1, ``exchange_ts`` 0, ``received_s`` NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from streaming.kite.codec import PACKET_FULL, PACKET_INDEX_FULL, PACKET_LTP, PACKET_QUOTE

__all__ = ["IngestResult", "TickState", "differs", "unique_slots"]

_FLOAT_COLUMNS: Final = ("ltp", "close", "bid", "ask", "received_s")
_INT_COLUMNS: Final = ("bid_qty", "ask_qty", "volume", "oi")


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one ingest did, for metrics: counts, never per-tick detail."""

    ticks: int
    unknown: int = 0  # tokens outside the universe
    older: int = 0  # older than the slot's state, ignored
    changed: int = 0  # slots whose published fields changed (marked dirty)
    source_resets: int = 0  # slots reset because the tick came from the other source


class TickState:
    """Latest tick fields per slot, the source (live or mock) of each, and what changed.

    Columns (arrays of length ``n``): ``ltp``, ``close``, ``bid``, ``ask`` (float64, NaN when
    unknown); ``bid_qty``, ``ask_qty``, ``volume``, ``oi`` (int64, -1 when unknown);
    ``exchange_ts`` (int64 epoch seconds, 0 when the packet has none); ``received_s``
    (float64, when the engine received the last accepted tick); ``is_mock``, ``has_data``,
    ``dirty`` (bool); ``rest_fallback`` (bool: the last accepted tick came from Kite's quote
    API, polled while the instrument's socket was stalled).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.ltp = np.full(n, np.nan)
        self.close = np.full(n, np.nan)
        self.bid = np.full(n, np.nan)
        self.ask = np.full(n, np.nan)
        self.received_s = np.full(n, np.nan)
        self.bid_qty = np.full(n, -1, dtype=np.int64)
        self.ask_qty = np.full(n, -1, dtype=np.int64)
        self.volume = np.full(n, -1, dtype=np.int64)
        self.oi = np.full(n, -1, dtype=np.int64)
        self.exchange_ts = np.zeros(n, dtype=np.int64)
        self.is_mock = np.zeros(n, dtype=bool)
        self.has_data = np.zeros(n, dtype=bool)
        self.dirty = np.zeros(n, dtype=bool)
        self.rest_fallback = np.zeros(n, dtype=bool)
        # Slots of every accepted tick since the last take_touched, one array per batch: a
        # tick that changes nothing published still refreshes ``received_s``.
        self._touched: list[np.ndarray] = []

    # --- writes -----------------------------------------------------------------------------

    def reset(self, slots: np.ndarray) -> None:
        """Forget everything about ``slots`` (they read as never ticked)."""
        for name in _FLOAT_COLUMNS:
            getattr(self, name)[slots] = np.nan
        for name in _INT_COLUMNS:
            getattr(self, name)[slots] = -1
        self.exchange_ts[slots] = 0
        self.is_mock[slots] = False
        self.has_data[slots] = False
        self.rest_fallback[slots] = False

    def ingest(
        self,
        slots: np.ndarray,
        ticks: np.ndarray,
        *,
        is_mock: bool,
        received_s: float,
        rest_fallback: bool = False,
    ) -> IngestResult:
        """Apply ``ticks`` (TICK_DTYPE, already restricted to known tokens) at ``slots``."""
        n_ticks = len(ticks)
        if n_ticks == 0:
            return IngestResult(ticks=0)
        # Keep the last tick per slot: a stable sort keeps arrival order among equal slots.
        if n_ticks > 1:
            order = np.argsort(slots, kind="stable")
            sorted_slots = slots[order]
            last = np.empty(n_ticks, dtype=bool)
            last[-1] = True
            np.not_equal(sorted_slots[1:], sorted_slots[:-1], out=last[:-1])
            keep = order[last]
            s = sorted_slots[last]
        else:
            keep = np.zeros(1, dtype=np.int64)
            s = slots
        t = ticks[keep]

        switching = self.has_data[s] & (self.is_mock[s] != is_mock)
        resets = int(np.count_nonzero(switching))
        if resets:
            self.reset(s[switching])

        length = t["packet_length"]
        ts = np.where(
            (length == PACKET_FULL) | (length == PACKET_INDEX_FULL), t["exchange_timestamp"], 0
        )
        older = (ts > 0) & (ts < self.exchange_ts[s])
        n_older = int(np.count_nonzero(older))
        if n_older:
            fresh = ~older
            s, t, length, ts = s[fresh], t[fresh], length[fresh], ts[fresh]

        self._touched.append(s)
        quote = (length == PACKET_QUOTE) | (length == PACKET_FULL)
        full = length == PACKET_FULL
        ltp = t["last_price"]
        volume = np.where(quote, t["volume_traded"], -1)
        oi = np.where(full, t["oi"], -1)
        buy_price = t["depth_buy_price"][:, 0]
        sell_price = t["depth_sell_price"][:, 0]
        bid = np.where(full & (buy_price > 0), buy_price, np.nan)
        ask = np.where(full & (sell_price > 0), sell_price, np.nan)
        bid_qty = np.where(full, t["depth_buy_quantity"][:, 0], -1)
        ask_qty = np.where(full, t["depth_sell_quantity"][:, 0], -1)
        has_close = length != PACKET_LTP
        close = np.where(has_close, t["close"], self.close[s])

        changed = ~self.has_data[s]
        changed |= differs(self.ltp[s], ltp)
        changed |= differs(self.bid[s], bid)
        changed |= differs(self.ask[s], ask)
        changed |= differs(self.close[s], close)
        changed |= self.bid_qty[s] != bid_qty
        changed |= self.ask_qty[s] != ask_qty
        changed |= self.volume[s] != volume
        changed |= self.oi[s] != oi
        changed |= self.exchange_ts[s] != ts
        changed |= self.rest_fallback[s] != rest_fallback

        self.ltp[s] = ltp
        self.close[s] = close
        self.bid[s] = bid
        self.ask[s] = ask
        self.bid_qty[s] = bid_qty
        self.ask_qty[s] = ask_qty
        self.volume[s] = volume
        self.oi[s] = oi
        self.exchange_ts[s] = ts
        self.received_s[s] = received_s
        self.is_mock[s] = is_mock
        self.has_data[s] = True
        self.rest_fallback[s] = rest_fallback
        self.dirty[s[changed]] = True
        return IngestResult(
            ticks=n_ticks,
            older=n_older,
            changed=int(np.count_nonzero(changed)),
            source_resets=resets,
        )

    def clear_rest_fallback(self, slots: np.ndarray) -> None:
        """The socket of ``slots`` is back: their snapshots lose the flag (republished)."""
        flagged = slots[self.rest_fallback[slots]]
        self.rest_fallback[flagged] = False
        self.dirty[flagged] = True

    def take_dirty(self) -> np.ndarray:
        """Slots changed since the last call (ascending), and clear the marks."""
        slots = np.flatnonzero(self.dirty)
        self.dirty[slots] = False
        return slots

    def take_touched(self) -> np.ndarray:
        """Slots that took a tick since the last call (ascending, each once)."""
        slots = unique_slots(self._touched, self.n)
        self._touched.clear()
        return slots

    @property
    def pending(self) -> int:
        """How many slots changed since the last :meth:`take_dirty`."""
        return int(np.count_nonzero(self.dirty))

    # --- reload -----------------------------------------------------------------------------

    def carried_to(self, n: int, old_slots: np.ndarray, new_slots: np.ndarray) -> TickState:
        """A state of ``n`` slots holding this state's ``old_slots`` at ``new_slots``."""
        out = TickState(n)
        for name in (*_FLOAT_COLUMNS, *_INT_COLUMNS, "exchange_ts", "is_mock", "has_data", "dirty",
                     "rest_fallback"):
            getattr(out, name)[new_slots] = getattr(self, name)[old_slots]
        return out


def unique_slots(parts: Sequence[np.ndarray], n: int) -> np.ndarray:
    """The distinct slots (of ``n``) in ``parts``, ascending, at the cost of what is in them.

    A sort for a few slots; a mask of the ``n`` slots once they are a sizeable share (cheaper
    than sorting them, and np.unique's hashing is slower still at 100k).
    """
    total = sum(len(part) for part in parts)
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if total * 16 > n:
        mask = np.zeros(n, dtype=bool)
        for part in parts:
            mask[part] = True
        return np.flatnonzero(mask)
    slots = np.sort(np.concatenate(parts).astype(np.int64, copy=False))
    keep = np.empty(slots.size, dtype=bool)
    keep[0] = True
    np.not_equal(slots[1:], slots[:-1], out=keep[1:])
    return slots[keep]


def differs(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Elementwise ``old != new`` where NaN equals NaN."""
    return (old != new) & ~(np.isnan(old) & np.isnan(new))
