"""The snapshot pipeline: ticks in, one pre-serialised message per channel-layer group out.

How the engine drives it (every call from the one thread of streaming.engine.worker, so the
pipeline needs no lock)::

    pipeline = SnapshotPipeline(universe, r=settings.RISK_FREE_RATE,
                                stale_after_s=settings.TICKER_STALE_UNDERLYING_S)
    pipeline.ingest(decoded.ticks, is_mock=False)        # per frame, vectorised
    batches = pipeline.flush(time.time(), watched=publisher.watched)   # when the trigger says
    await publisher.publish(batches)                     # one group_send per group
    tokens, items = pipeline.latest(request.tokens)      # initial state for a subscriber
    pipeline.set_universe(new_universe)                  # on reload; state of kept tokens stays

A flush does, in order and vectorised over what changed (never over the whole universe):

1. takes the slots whose published fields changed since the last flush;
2. computes the forward of each chain (underlying, expiry) that took a tick or whose source
   went stale since (every chain after a universe install): the same-expiry future's LTP if
   it has ticked within ``stale_after_s``, else put-call parity near the money (the pair with
   the smallest |C - P|, as :func:`streaming.greeks.forward_from_parity`), else the stale
   future, else stale parity (both flagged STALE_UNDERLYING), else none (NO_FORWARD);
3. recomputes IV and Greeks, in one :func:`streaming.greeks.compute_greeks` call, for the
   options that changed, their pairs (the OTM convention takes an ITM option's IV from its
   pair), and every option of a chain whose forward changed. A chain whose forward moves
   while its options do not is refreshed once per ``chain_refresh_interval_s`` at most, at
   a phase of its own so that refreshes spread over the interval: without that bound a
   ticking future would recompute every option of its chains on every flush;
4. writes the JSON of each changed instrument in a watched group (column-wise, see
   :func:`streaming.schema.encode_snapshots`), caches it as the slot's latest item, and
   returns one :class:`GroupBatch` per group. Changed instruments in unwatched groups are
   only marked; :meth:`latest` serialises them on demand.

An instrument subscribed by several accounts is one slot: it is computed and published once.
Mock and live data never mix: a slot takes the source of its last tick (switching resets it),
and an option's Greeks use a forward, pair and underlying of the same source only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import structlog

from streaming import schema
from streaming.engine.state import IngestResult, TickState, differs, unique_slots
from streaming.engine.universe import InstrumentUniverse
from streaming.greeks import (
    DEFAULT_MIN_VEGA_PER_POINT,
    compute_greeks,
    flag_names,
    years_to_expiry,
)

__all__ = ["FlushStats", "GroupBatch", "SnapshotPipeline"]

log = structlog.get_logger(__name__)

#: A chain whose forward moved while its options did not is recomputed at most this often.
DEFAULT_CHAIN_REFRESH_INTERVAL_S: Final = 1.0

# Where a chain's forward came from (heartbeat and tests).
FORWARD_NONE: Final = 0
FORWARD_FUTURE: Final = 1
FORWARD_PARITY: Final = 2

_GREEK_COLUMNS: Final = ("iv", "delta", "gamma", "theta", "vega", "rho")
# A parity forward drifts with time through e^{rT} (about 1e-9 of its value per second);
# a real move is at least one 0.05 tick of a premium (about 2e-6 of an index forward).
# Changes below this fraction do not make a chain's options "changed".
_FORWARD_CHANGE_RELATIVE: Final = 1e-7
GOLDEN_FRACTION: Final = 0.6180339887498949
"""Phases ``i * GOLDEN_FRACTION % 1`` spread any number of items evenly over an interval."""


@dataclass(frozen=True, slots=True)
class GroupBatch:
    """The snapshots of one channel-layer group in one flush: ``items[i]`` is ``tokens[i]``'s."""

    group: str
    tokens: list[int]
    items: list[bytes]

    def message(self, *, initial: bool = False) -> dict[str, Any]:
        """The ``snapshots.batch`` channel-layer message of this batch."""
        return schema.snapshots_batch_message(
            group=self.group, tokens=self.tokens, items=self.items, initial=initial
        )


@dataclass(frozen=True, slots=True)
class FlushStats:
    """What one flush did, for metrics and the heartbeat."""

    changed: int  # slots whose fields changed since the last flush
    greeks: int  # options whose IV and Greeks were recomputed
    snapshots: int  # snapshots serialised and returned in batches
    groups: int  # batches returned (one per watched group with changes)
    duration_s: float


class SnapshotPipeline:
    """Latest state per instrument in arrays, flushed as Greeks snapshots grouped per group.

    ``r`` discounts option premia (RISK_FREE_RATE); ``stale_after_s`` is how old the forward
    source's last tick may be before options are flagged STALE_UNDERLYING
    (TICKER_STALE_UNDERLYING_S). ``clock`` stamps ticks as received (injectable for tests).
    """

    def __init__(
        self,
        universe: InstrumentUniverse,
        *,
        r: float,
        stale_after_s: float,
        chain_refresh_interval_s: float = DEFAULT_CHAIN_REFRESH_INTERVAL_S,
        min_vega_per_point: float = DEFAULT_MIN_VEGA_PER_POINT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(r) and math.isfinite(stale_after_s) and stale_after_s > 0):
            raise ValueError(f"bad pipeline settings: r={r} stale_after_s={stale_after_s}")
        self._r = float(r)
        self._stale_after_s = float(stale_after_s)
        self._chain_refresh_interval_s = float(chain_refresh_interval_s)
        self._min_vega_per_point = float(min_vega_per_point)
        self._clock = clock
        self._flag_pieces: dict[int, bytes] = {}
        self._watched_source: object = None
        self._watched_mask: np.ndarray | None = None
        self.last_flush: FlushStats | None = None
        #: Slots whose snapshot changed in the last flush, watched or not (chain analytics).
        self.changed_slots = np.zeros(0, dtype=np.int64)
        self._install(universe, _empty_carry(universe))

    # --- universe ---------------------------------------------------------------------------

    @property
    def universe(self) -> InstrumentUniverse:
        return self._u

    def _install(self, u: InstrumentUniverse, carry: _Carry) -> None:
        n_chains = len(u.chain_und)
        self._u = u
        self._state = carry.state
        self._greeks = carry.greeks
        self._flags = carry.flags
        self._forward_used = carry.forward_used
        self._items = carry.items
        self._chain_forward = carry.chain_forward
        self._chain_stale = carry.chain_stale
        self._chain_forward_mock = carry.chain_forward_mock
        self._chain_source = carry.chain_source
        self._chain_pending = carry.chain_pending
        self._chain_refreshed_s = carry.chain_refreshed_s
        self._option_slots = np.flatnonzero(u.is_option)
        # Golden-ratio phases: evenly spread whatever the number of chains.
        self._chain_phase_s = (
            np.arange(n_chains) * GOLDEN_FRACTION % 1.0 * self._chain_refresh_interval_s
        )
        # Parity pairs are sorted by chain: each chain's run of pairs, and of options, so
        # that a flush touches only the chains that changed.
        chain_ids = np.arange(n_chains)
        self._pair_lo = np.searchsorted(u.pair_chain, chain_ids, side="left")
        self._pair_hi = np.searchsorted(u.pair_chain, chain_ids, side="right")
        options = self._option_slots
        self._options_by_chain = options[np.argsort(u.chain[options], kind="stable")]
        option_chains = u.chain[self._options_by_chain]
        self._option_lo = np.searchsorted(option_chains, chain_ids, side="left")
        self._option_hi = np.searchsorted(option_chains, chain_ids, side="right")
        #: When each chain's forward source goes stale by time alone (no tick needed).
        self._chain_recheck_s = np.full(n_chains, np.inf)
        self._forwards_all_due = True
        self._watched_source = None
        self._watched_mask = None
        assert self._chain_forward.shape == (n_chains,)

    def set_universe(self, universe: InstrumentUniverse) -> None:
        """Switch to a new universe; tokens in both keep their state, Greeks and latest item.

        Removed tokens are forgotten; added tokens start empty. Nothing is marked changed, so
        instruments in both universes see no extra snapshot. Chains are matched by
        (underlying, expiry), so their forward history carries over too.
        """
        old = self._u
        _, old_slots, new_slots = np.intersect1d(
            old.tokens, universe.tokens, assume_unique=True, return_indices=True
        )
        carry = _empty_carry(universe)
        carry.state = self._state.carried_to(len(universe), old_slots, new_slots)
        for name in _GREEK_COLUMNS:
            carry.greeks[name][new_slots] = self._greeks[name][old_slots]
        carry.flags[new_slots] = self._flags[old_slots]
        carry.forward_used[new_slots] = self._forward_used[old_slots]
        carry.items[new_slots] = self._items[old_slots]
        old_chain = {
            (old.underlyings[u], d): c
            for c, (u, d) in enumerate(zip(old.chain_und.tolist(), old.chain_expiry, strict=True))
        }
        pairs = [
            (old_chain[key], c)
            for c, key in enumerate(
                (universe.underlyings[u], d)
                for u, d in zip(universe.chain_und.tolist(), universe.chain_expiry, strict=True)
            )
            if key in old_chain
        ]
        if pairs:
            oc, nc = (np.asarray(x, dtype=np.int64) for x in zip(*pairs, strict=True))
            carry.chain_forward[nc] = self._chain_forward[oc]
            carry.chain_stale[nc] = self._chain_stale[oc]
            carry.chain_forward_mock[nc] = self._chain_forward_mock[oc]
            carry.chain_source[nc] = self._chain_source[oc]
            carry.chain_pending[nc] = self._chain_pending[oc]
            carry.chain_refreshed_s[nc] = self._chain_refreshed_s[oc]
        self._install(universe, carry)
        log.info(
            "pipeline.universe_set",
            instruments=len(universe),
            kept=int(new_slots.size),
            added=len(universe) - int(new_slots.size),
            removed=len(old) - int(old_slots.size),
        )

    # --- ingest -----------------------------------------------------------------------------

    def ingest(
        self,
        ticks: np.ndarray,
        *,
        is_mock: bool,
        received_epoch_s: float | None = None,
        rest_fallback: bool = False,
    ) -> IngestResult:
        """Take a batch of decoded ticks (TICK_DTYPE); unknown tokens are counted and dropped.

        ``rest_fallback``: the ticks were built from Kite's quote API during a stall.
        """
        if len(ticks) == 0:
            return IngestResult(ticks=0)
        received = self._clock() if received_epoch_s is None else received_epoch_s
        slots, known = self._u.slots_of(ticks["instrument_token"])
        unknown = len(ticks) - slots.size
        if unknown:
            ticks = ticks[known]
        result = self._state.ingest(
            slots, ticks, is_mock=is_mock, received_s=received, rest_fallback=rest_fallback
        )
        if unknown:
            return IngestResult(
                ticks=result.ticks + unknown,
                unknown=unknown,
                older=result.older,
                changed=result.changed,
                source_resets=result.source_resets,
            )
        return result

    def clear_rest_fallback(self, tokens: Iterable[int]) -> None:
        """The socket of ``tokens`` is back: their snapshots lose the ``rest_fallback`` flag."""
        slots, _ = self._u.slots_of(list(tokens))
        self._state.clear_rest_fallback(slots)

    @property
    def pending(self) -> int:
        """Instruments changed since the last flush (the backlog a flush drains)."""
        return self._state.pending

    def next_due_in(self, now_epoch_s: float) -> float | None:
        """Seconds until time alone gives a flush work (a forward source going stale, a
        chain refresh at its phase); None when nothing waits on the clock."""
        due = float(self._chain_recheck_s.min(initial=np.inf)) - now_epoch_s
        if self._chain_pending.any():
            interval = self._chain_refresh_interval_s
            phase = self._chain_phase_s[self._chain_pending]
            next_slot = (np.floor((now_epoch_s + phase) / interval) + 1) * interval - phase
            due = min(due, float(next_slot.min()) - now_epoch_s)
        return max(due, 0.0) if math.isfinite(due) else None

    # --- flush ------------------------------------------------------------------------------

    def flush(
        self, now_epoch_s: float, *, watched: Collection[str] | None = None
    ) -> list[GroupBatch]:
        """Compute and serialise what changed; one :class:`GroupBatch` per watched group.

        ``watched`` holds the group names someone listens to (``Publisher.watched``); None
        means every group. Pass the same object again to reuse its compiled mask.
        """
        started = time.perf_counter()
        u, st = self._u, self._state
        dirty = st.take_dirty()
        forward_changed = self._update_forwards(now_epoch_s, st.take_touched())
        recompute = self._options_to_recompute(dirty, forward_changed, now_epoch_s)
        moved = self._compute_greeks(recompute, now_epoch_s) if recompute.size else recompute
        published = unique_slots((dirty, moved), st.n)
        published = published[st.has_data[published]]
        self._items[published] = None
        self.changed_slots = published
        if published.size:
            mask = self._watched(watched)
            if mask is not None:
                published = published[mask[u.group[published]]]
        batches = self._batches(published)
        self.last_flush = FlushStats(
            changed=int(dirty.size),
            greeks=int(recompute.size),
            snapshots=int(published.size),
            groups=len(batches),
            duration_s=time.perf_counter() - started,
        )
        return batches

    def _watched(self, watched: Collection[str] | None) -> np.ndarray | None:
        if watched is None:
            return None
        if watched is not self._watched_source or self._watched_mask is None:
            names = self._u.group_names
            self._watched_mask = np.fromiter(
                (name in watched for name in names), dtype=bool, count=len(names)
            )
            self._watched_source = watched
        return self._watched_mask

    def _update_forwards(self, now: float, touched: np.ndarray) -> np.ndarray:
        """Recompute the forward of each chain whose inputs changed (a tick of its future or
        options, ``touched``) or whose source went stale since; return the mask of chains
        whose forward changed. Every chain after a universe install."""
        u, st = self._u, self._state
        n_chains = len(u.chain_und)
        changed = np.zeros(n_chains, dtype=bool)
        if n_chains == 0:
            return changed
        if self._forwards_all_due:
            self._forwards_all_due = False
            c = np.arange(n_chains)
        else:
            due = self._chain_recheck_s < now
            chains = u.chain[touched]
            due[chains[chains >= 0]] = True
            c = np.flatnonzero(due)
            if c.size == 0:
                return changed
        t_years = np.maximum(
            years_to_expiry(now_epoch_s=now, expiry_epoch_s=u.chain_expiry_epoch_s[c]), 0.0
        )
        stale_before = now - self._stale_after_s

        fut = u.chain_future[c]
        has_fut = fut >= 0
        f = np.where(has_fut, fut, 0)
        fut_price = np.where(has_fut & st.has_data[f], st.ltp[f], np.nan)
        fut_ok = fut_price > 0
        fut_fresh = fut_ok & (st.received_s[f] >= stale_before)

        par_price, par_received, par_mock = parity_forwards(
            u, st, chains=c, pair_lo=self._pair_lo[c], pair_hi=self._pair_hi[c], r=self._r,
            t_years=t_years,
        )
        par_ok = par_price > 0
        par_fresh = par_ok & (par_received >= stale_before)

        # Preference: fresh future, fresh parity, stale future, stale parity.
        use_fut = fut_fresh | (fut_ok & ~par_fresh)
        use_par = ~use_fut & par_ok
        forward = np.where(use_fut, fut_price, np.where(use_par, par_price, np.nan))
        stale = np.where(use_fut, ~fut_fresh, use_par & ~par_fresh)
        forward_mock = np.where(use_fut, st.is_mock[f], use_par & par_mock)
        source = np.where(use_fut, FORWARD_FUTURE, np.where(use_par, FORWARD_PARITY, FORWARD_NONE))

        old = self._chain_forward[c]
        with np.errstate(invalid="ignore"):
            moved = np.abs(forward - old) > _FORWARD_CHANGE_RELATIVE * np.abs(old)
        moved |= np.isnan(old) != np.isnan(forward)
        moved |= self._chain_stale[c] != stale
        moved |= self._chain_forward_mock[c] != forward_mock
        changed[c] = moved
        self._chain_forward[c] = forward
        self._chain_stale[c] = stale
        self._chain_forward_mock[c] = forward_mock
        self._chain_source[c] = source
        # A fresh source turns stale with time alone: look at the chain again then.
        stale_at = self._stale_after_s
        self._chain_recheck_s[c] = np.minimum(
            np.where(fut_fresh, st.received_s[f] + stale_at, np.inf),
            np.where(par_fresh, par_received + stale_at, np.inf),
        )
        return changed

    def _options_to_recompute(
        self, dirty: np.ndarray, forward_changed: np.ndarray, now: float
    ) -> np.ndarray:
        u = self._u
        dirty_options = dirty[u.is_option[dirty]]
        # An in-the-money option takes its IV from its OTM pair: recompute the ITM pairs of
        # changed options (an OTM option's own numbers do not depend on its pair).
        pairs = u.pair[dirty_options]
        pairs = pairs[pairs >= 0]
        forward = self._chain_forward[u.chain[pairs]]
        strike = u.strike[pairs]
        itm = np.where(u.is_call[pairs], forward > strike, forward < strike)
        marked = [dirty_options, pairs[itm]]
        if forward_changed.size:
            pending = self._chain_pending | forward_changed
            # Each chain refreshes at most once per period of its own phase, so the chains of
            # a universe whose forwards all move are spread evenly over the interval instead
            # of all landing on one flush (a 100k-option spike every second).
            interval = self._chain_refresh_interval_s
            phase = self._chain_phase_s
            with np.errstate(invalid="ignore"):
                due = pending & (
                    np.floor((now + phase) / interval)
                    > np.floor((self._chain_refreshed_s + phase) / interval)
                )
            if due.any():
                chains = np.flatnonzero(due)
                marked.append(
                    self._options_by_chain[
                        concat_ranges(self._option_lo[chains], self._option_hi[chains])
                    ]
                )
                self._chain_refreshed_s[due] = now
            self._chain_pending = pending & ~due
        slots = unique_slots(marked, len(u))
        return slots[self._state.has_data[slots]]

    def _compute_greeks(self, slots: np.ndarray, now: float) -> np.ndarray:
        """Recompute ``slots``' IV and Greeks; return those whose numbers or flags changed."""
        u, st = self._u, self._state
        chain = u.chain[slots]
        mock = st.is_mock[slots]
        forward = np.where(
            self._chain_forward_mock[chain] == mock, self._chain_forward[chain], np.nan
        )
        pair = u.pair[slots]
        p = np.where(pair >= 0, pair, 0)
        pair_ok = (pair >= 0) & st.has_data[p] & (st.is_mock[p] == mock)
        batch = compute_greeks(
            price=st.ltp[slots],
            forward=forward,
            strike=u.strike[slots],
            t_years=years_to_expiry(now_epoch_s=now, expiry_epoch_s=u.expiry_epoch_s[slots]),
            is_call=u.is_call[slots],
            r=self._r,
            pair_price=np.where(pair_ok, st.ltp[p], np.nan),
            stale=self._chain_stale[chain],
            min_vega_per_point=self._min_vega_per_point,
        )
        moved = (self._flags[slots] != batch.flags) | differs(self._forward_used[slots], forward)
        for name in _GREEK_COLUMNS:
            column = self._greeks[name]
            values = getattr(batch, name)
            moved |= differs(column[slots], values)
            column[slots] = values
        self._flags[slots] = batch.flags
        self._forward_used[slots] = forward
        return slots[moved]

    # --- serialisation ----------------------------------------------------------------------

    def _encode(self, slots: np.ndarray) -> list[bytes]:
        """Serialise the snapshots of ``slots`` and cache them as their latest items."""
        if slots.size == 0:
            return []
        u, st = self._u, self._state
        ltp = st.ltp[slots]
        close = st.close[slots]
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.where(close > 0, (ltp - close) * 100.0 / close, np.nan)
        mock = st.is_mock[slots]
        spot = u.und_spot[u.und[slots]]
        s = np.where(spot >= 0, spot, 0)
        underlying = np.where(
            (spot >= 0) & st.has_data[s] & (st.is_mock[s] == mock), st.ltp[s], np.nan
        )
        ts = st.exchange_ts[slots]
        g = self._greeks
        items = schema.encode_snapshots(
            prefixes=u.prefixes[slots].tolist(),
            ltp=ltp,
            change=change,
            bid=st.bid[slots],
            ask=st.ask[slots],
            bid_qty=st.bid_qty[slots],
            ask_qty=st.ask_qty[slots],
            volume=st.volume[slots],
            oi=st.oi[slots],
            iv=g["iv"][slots],
            delta=g["delta"][slots],
            gamma=g["gamma"][slots],
            theta=g["theta"][slots],
            vega=g["vega"][slots],
            rho=g["rho"][slots],
            forward=self._forward_used[slots],
            underlying=underlying,
            flags=flag_piece_list(self._flag_pieces, self._flags[slots]),
            exchange_ts=np.where(ts > 0, ts * 1000, -1),
            is_mock=mock,
            rest_fallback=st.rest_fallback[slots],
        )
        self._items[slots] = items
        return items

    def _batches(self, slots: np.ndarray) -> list[GroupBatch]:
        if slots.size == 0:
            return []
        u = self._u
        groups = u.group[slots]
        order = np.argsort(groups, kind="stable")
        slots = slots[order]
        groups = groups[order]
        items = self._encode(slots)
        tokens = u.tokens[slots].tolist()
        bounds = np.flatnonzero(groups[1:] != groups[:-1]) + 1
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), slots.size]
        names = u.group_names
        group_ids = groups[starts].tolist()
        return [
            GroupBatch(group=names[g], tokens=tokens[a:b], items=items[a:b])
            for g, a, b in zip(group_ids, starts, ends, strict=True)
        ]

    # --- reads ------------------------------------------------------------------------------

    @property
    def state(self) -> TickState:
        """The latest tick fields per slot (read-only use: chain analytics)."""
        return self._state

    @property
    def iv(self) -> np.ndarray:
        """Each slot's IV as last computed (NaN when unknown)."""
        return self._greeks["iv"]

    def chain_forwards(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per chain: (forward, source FORWARD_*, stale, mock), as the last flush left them."""
        return self._chain_forward, self._chain_source, self._chain_stale, self._chain_forward_mock

    def latest(self, tokens: Iterable[int] | np.ndarray) -> tuple[list[int], list[bytes]]:
        """The latest snapshot of each known token that has data: (tokens, items), in order.

        Snapshots changed in unwatched groups since their last serialisation are written now.
        """
        slots, _ = self._u.slots_of(tokens)
        slots = slots[self._state.has_data[slots]]
        if slots.size == 0:
            return [], []
        missing = np.unique(slots[np.equal(self._items[slots], None)])
        if missing.size:
            self._encode(missing)
        return self._u.tokens[slots].tolist(), self._items[slots].tolist()

    def groups_of(self, tokens: Iterable[int] | np.ndarray) -> set[str]:
        """The groups the given tokens publish to (to mark them watched on a request)."""
        return self._u.groups_of(tokens)

    def forward_of(self, name: str, expiry: Any) -> tuple[float, str, bool]:
        """(forward, source "future"|"parity"|"none", stale) of one chain, for tests and ops."""
        u = self._u
        for c, (und, d) in enumerate(zip(u.chain_und.tolist(), u.chain_expiry, strict=True)):
            if u.underlyings[und] == name and d == expiry:
                source = ("none", "future", "parity")[int(self._chain_source[c])]
                return float(self._chain_forward[c]), source, bool(self._chain_stale[c])
        raise KeyError(f"no chain {name} {expiry}")

    def underlying_summary(self) -> dict[str, dict[str, Any]]:
        """Per underlying: spot price, its exchange time and the forwards by expiry (status)."""
        return underlying_summary(self._u, self._state, self._chain_forward)


def flag_piece_list(cache: dict[int, bytes], flags: np.ndarray) -> list[bytes]:
    """The JSON piece of each flag value, each distinct value built once into ``cache``."""
    for value in np.unique(flags).tolist():
        if value not in cache:
            cache[value] = schema.flags_piece(flag_names(value))
    return list(map(cache.__getitem__, flags.tolist()))


def underlying_summary(
u: InstrumentUniverse, st: TickState, chain_forward: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per underlying: spot price, its exchange time and the forwards by expiry (heartbeat)."""
    out: dict[str, dict[str, Any]] = {}
    for und, name in enumerate(u.underlyings):
        s = int(u.und_spot[und])
        has = s >= 0 and bool(st.has_data[s])
        ts = int(st.exchange_ts[s]) if has else 0
        out[name] = {
            "price": float(st.ltp[s]) if has else None,
            "ts": ts if ts > 0 else None,
            "forwards": {},
        }
    forwards = chain_forward.tolist()
    for c, (und, d) in enumerate(zip(u.chain_und.tolist(), u.chain_expiry, strict=True)):
        if not math.isnan(forwards[c]):
            out[u.underlyings[und]]["forwards"][d.isoformat()] = round(forwards[c], 4)
    return out


def concat_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The indices ``lo[0]..hi[0]-1, lo[1]..hi[1]-1, ...`` in one array (no Python loop)."""
    lengths = hi - lo
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(total) + np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)


def parity_forwards(
    u: InstrumentUniverse,
    st: TickState,
    *,
    chains: np.ndarray,
    pair_lo: np.ndarray,
    pair_hi: np.ndarray,
    r: float,
    t_years: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chain of ``chains`` (ascending; its pairs are ``pair_lo:pair_hi``): parity
    forward (NaN if none), when its pair last ticked, its source.

    The rule of :func:`streaming.greeks.forward_from_parity` (both legs priced, smallest
    |C - P|, F = K + e^{rT}(C - P), positive), segmented over the chains in one pass;
    a pair counts only if both legs come from the same source.
    """
    n_chains = chains.size
    forward = np.full(n_chains, np.nan)
    received = np.full(n_chains, -np.inf)
    mock = np.zeros(n_chains, dtype=bool)
    has_pairs = pair_hi > pair_lo
    if not has_pairs.any():
        return forward, received, mock
    # Chains without pairs would be empty segments, which reduceat cannot take.
    with_pairs = np.flatnonzero(has_pairs)
    pairs = concat_ranges(pair_lo[with_pairs], pair_hi[with_pairs])
    lengths = (pair_hi - pair_lo)[with_pairs]
    pair_starts = np.cumsum(lengths) - lengths
    # Position of each pair's chain within ``chains``.
    pair_chain = np.repeat(with_pairs, lengths)
    calls, puts = u.pair_call[pairs], u.pair_put[pairs]
    c = st.ltp[calls]
    p = st.ltp[puts]
    usable = (c > 0) & (p > 0) & (st.is_mock[calls] == st.is_mock[puts])
    diff = c - p
    distance = np.where(usable, np.abs(diff), np.inf)
    best = np.minimum.reduceat(distance, pair_starts)
    at_best = np.flatnonzero((distance == np.repeat(best, lengths)) & usable)
    # The first pair at the minimum of each chain (lowest strike on ties).
    chains_at = pair_chain[at_best]
    first = np.ones(at_best.size, dtype=bool)
    first[1:] = chains_at[1:] != chains_at[:-1]
    chosen = at_best[first]
    chain_ids = pair_chain[chosen]
    f = u.pair_strike[pairs[chosen]] + np.exp(r * t_years[chain_ids]) * diff[chosen]
    forward[chain_ids] = np.where(f > 0, f, np.nan)
    received[chain_ids] = np.maximum(st.received_s[calls[chosen]], st.received_s[puts[chosen]])
    mock[chain_ids] = st.is_mock[calls[chosen]]
    return forward, received, mock


@dataclass
class _Carry:
    state: TickState
    greeks: dict[str, np.ndarray]
    flags: np.ndarray
    forward_used: np.ndarray
    items: np.ndarray
    chain_forward: np.ndarray
    chain_stale: np.ndarray
    chain_forward_mock: np.ndarray
    chain_source: np.ndarray
    chain_pending: np.ndarray
    chain_refreshed_s: np.ndarray


def _empty_carry(u: InstrumentUniverse) -> _Carry:
    n = len(u)
    n_chains = len(u.chain_und)
    return _Carry(
        state=TickState(n),
        greeks={name: np.full(n, np.nan) for name in _GREEK_COLUMNS},
        flags=np.zeros(n, dtype=np.uint16),
        forward_used=np.full(n, np.nan),
        items=np.full(n, None, dtype=object),
        chain_forward=np.full(n_chains, np.nan),
        chain_stale=np.zeros(n_chains, dtype=bool),
        chain_forward_mock=np.zeros(n_chains, dtype=bool),
        chain_source=np.zeros(n_chains, dtype=np.int8),
        chain_pending=np.zeros(n_chains, dtype=bool),
        chain_refreshed_s=np.full(n_chains, -np.inf),
    )
