"""The instruments one engine streams, as arrays: token -> slot, kinds, strikes, chains, groups.

An :class:`InstrumentUniverse` is immutable and built once per (re)load from instrument rows
(``subscriptions.Instrument`` values, or ``SyntheticMarket.instruments`` in mock mode). Every
per-instrument array is indexed by *slot*: the position of the token in the sorted token
array, so ``slots_of`` is one ``searchsorted``. The pipeline's state arrays use the same slots.

Underlyings
    Options and futures name their underlying in the ``name`` column ("NIFTY"); an index row
    calls itself "NIFTY 50", so index tradingsymbols map to derivative names through
    ``index_underlyings`` (Kite's indices by default; the synthetic market passes its own).
    An equity is its own underlying, by tradingsymbol. The spot of an underlying is its index,
    else its NSE equity, else any equity row of that name.

Chains
    A chain is the options of one (underlying, expiry). Each chain knows its same-expiry
    future (if the universe holds one) and its strikes where both a call and a put exist,
    for the put-call-parity forward. Each option knows its pair (same strike, other kind).

Groups
    Options publish to ``chain.<NAME>.<YYYYMMDD>``, everything else to ``und.<NAME>``; names
    come from :mod:`streaming.schema`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, Final

import numpy as np

from streaming import schema
from streaming.greeks import expiry_close_epoch_s
from streaming.kite.instruments import KITE_INDEX_UNDERLYINGS
from streaming.schema import InstrumentKind as Kind

__all__ = [
    "UNIVERSE_FIELDS",
    "InstrumentUniverse",
    "UniverseError",
]

#: Instrument columns the universe reads (``Instrument.objects.values(*UNIVERSE_FIELDS)``).
UNIVERSE_FIELDS: Final = (
    "instrument_token",
    "tradingsymbol",
    "name",
    "exchange",
    "segment",
    "instrument_type",
    "expiry",
    "strike",
    "lot_size",
)

_INDEX_SEGMENT: Final = "INDICES"
_TYPE_KINDS: Final = {"EQ": Kind.EQ, "FUT": Kind.FUT, "CE": Kind.CE, "PE": Kind.PE}
_SPOT_EXCHANGE_PREFERENCE: Final = ("NSE", "BSE")


class UniverseError(ValueError):
    """An instrument row the universe cannot place (unknown type, option without expiry...)."""

    def __init__(self, *, token: object, field: str, got: object, expected: str) -> None:
        self.token = token
        self.field = field
        self.got = got
        self.expected = expected
        super().__init__(
            f"instrument {token}: {field}={got!r}, expected {expected}"
        )


def _as_date(value: Any, *, token: int) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError as exc:
            raise UniverseError(
                token=token, field="expiry", got=value, expected="an ISO date"
            ) from exc
    raise UniverseError(token=token, field="expiry", got=value, expected="a date or None")


class InstrumentUniverse:
    """Immutable arrays describing the instruments one engine streams, indexed by slot.

    Per slot: ``tokens`` (sorted int64), ``kind`` (InstrumentKind), ``strike`` (NaN unless an option),
    ``expiry_epoch_s`` (15:30 IST on the expiry, NaN if none), ``und`` (underlying id),
    ``chain`` (chain id of options and of same-expiry futures, else -1), ``group`` (group id),
    ``pair`` (slot of the same-strike other-kind option, else -1), ``prefixes`` (the static
    start of the snapshot JSON), ``lot_size`` (Kite's, -1 when the row has none). Per underlying id: ``underlyings`` (names), ``und_spot``
    (spot slot or -1). Per chain id: ``chain_und``, ``chain_expiry`` (dates),
    ``chain_expiry_epoch_s``, ``chain_future`` (slot or -1). Parity pairs, sorted by chain:
    ``pair_chain``, ``pair_call``, ``pair_put``, ``pair_strike``. ``group_names`` by group id.
    """

    __slots__ = (
        "_group_index",
        "chain",
        "chain_expiry",
        "chain_expiry_epoch_s",
        "chain_future",
        "chain_und",
        "expiry_epoch_s",
        "group",
        "group_names",
        "is_call",
        "is_option",
        "kind",
        "lot_size",
        "pair",
        "pair_call",
        "pair_chain",
        "pair_put",
        "pair_strike",
        "prefixes",
        "strike",
        "symbols",
        "tokens",
        "und",
        "und_spot",
        "underlyings",
    )

    tokens: np.ndarray
    kind: np.ndarray
    strike: np.ndarray
    lot_size: np.ndarray
    expiry_epoch_s: np.ndarray
    und: np.ndarray
    chain: np.ndarray
    group: np.ndarray
    pair: np.ndarray
    is_option: np.ndarray
    is_call: np.ndarray
    prefixes: np.ndarray
    symbols: tuple[str, ...]
    underlyings: tuple[str, ...]
    und_spot: np.ndarray
    chain_und: np.ndarray
    chain_expiry: tuple[dt.date, ...]
    chain_expiry_epoch_s: np.ndarray
    chain_future: np.ndarray
    pair_chain: np.ndarray
    pair_call: np.ndarray
    pair_put: np.ndarray
    pair_strike: np.ndarray
    group_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __repr__(self) -> str:
        return (
            f"InstrumentUniverse(instruments={len(self)}, underlyings={len(self.underlyings)}, "
            f"chains={len(self.chain_und)}, groups={len(self.group_names)})"
        )

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def empty(cls) -> InstrumentUniverse:
        return cls.from_rows([])

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        *,
        index_underlyings: Mapping[str, str] = KITE_INDEX_UNDERLYINGS,
    ) -> InstrumentUniverse:
        """Build from instrument rows with the :data:`UNIVERSE_FIELDS` keys (extra keys ignored).

        ``index_underlyings`` maps an index tradingsymbol to its derivatives' ``name``.
        Raises :class:`UniverseError` for a duplicate token, an unknown instrument type or an
        option or future without an expiry.
        """
        tokens: list[int] = []
        kinds: list[int] = []
        strikes: list[float] = []
        expiries: list[dt.date | None] = []
        und_names: list[str] = []
        symbols: list[str] = []
        exchanges: list[str] = []
        lot_sizes: list[int] = []
        for row in rows:
            token = int(row["instrument_token"])
            symbol = str(row["tradingsymbol"])
            itype = str(row["instrument_type"])
            if row.get("segment") == _INDEX_SEGMENT:
                kind = Kind.INDEX
            elif itype in _TYPE_KINDS:
                kind = _TYPE_KINDS[itype]
            else:
                raise UniverseError(
                    token=token, field="instrument_type", got=itype, expected="EQ, FUT, CE or PE"
                )
            expiry = _as_date(row.get("expiry"), token=token)
            if kind in (Kind.FUT, Kind.CE, Kind.PE):
                if expiry is None:
                    raise UniverseError(
                        token=token, field="expiry", got=None, expected="a date for a derivative"
                    )
                und_name = str(row["name"]) or symbol
            elif kind == Kind.INDEX:
                und_name = index_underlyings.get(symbol, symbol)
            else:
                und_name = symbol
            tokens.append(token)
            kinds.append(kind)
            strikes.append(float(row.get("strike") or 0.0))
            expiries.append(expiry)
            und_names.append(und_name)
            symbols.append(symbol)
            exchanges.append(str(row.get("exchange", "")))
            lot_sizes.append(int(row.get("lot_size") or -1))
        return cls._build(
            tokens, kinds, strikes, expiries, und_names, symbols, exchanges, lot_sizes
        )

    @classmethod
    def _build(
        cls,
        tokens_in: list[int],
        kinds_in: list[int],
        strikes_in: list[float],
        expiries_in: list[dt.date | None],
        und_names_in: list[str],
        symbols_in: list[str],
        exchanges_in: list[str],
        lot_sizes_in: list[int],
    ) -> InstrumentUniverse:
        self = cls.__new__(cls)
        raw_tokens = np.asarray(tokens_in, dtype=np.int64)
        order = np.argsort(raw_tokens, kind="stable")
        tokens = raw_tokens[order]
        if tokens.size > 1 and np.any(dup := tokens[1:] == tokens[:-1]):
            token = int(tokens[1:][dup][0])
            raise UniverseError(token=token, field="instrument_token", got=token, expected="unique")
        n = tokens.size
        idx = order.tolist()
        kind = np.asarray(kinds_in, dtype=np.int8)[order]
        expiries = [expiries_in[i] for i in idx]
        und_names = [und_names_in[i] for i in idx]
        symbols = tuple(symbols_in[i] for i in idx)
        exchanges = [exchanges_in[i] for i in idx]
        is_option = (kind == Kind.CE) | (kind == Kind.PE)
        strike = np.where(is_option, np.asarray(strikes_in, dtype=np.float64)[order], np.nan)

        # Underlyings, in order of first appearance by token.
        und_index: dict[str, int] = {}
        und = np.fromiter(
            (und_index.setdefault(name, len(und_index)) for name in und_names), np.int32, n
        )
        underlyings = tuple(und_index)
        und_spot = np.full(len(underlyings), -1, dtype=np.int32)
        spot_rank = np.full(len(underlyings), np.iinfo(np.int32).max, dtype=np.int64)
        for s in np.flatnonzero((kind == Kind.INDEX) | (kind == Kind.EQ)).tolist():
            exchange = exchanges[s]
            pref = (
                _SPOT_EXCHANGE_PREFERENCE.index(exchange)
                if exchange in _SPOT_EXCHANGE_PREFERENCE
                else len(_SPOT_EXCHANGE_PREFERENCE)
            )
            rank = (0 if kind[s] == Kind.INDEX else 10) + pref
            u = int(und[s])
            if rank < spot_rank[u]:
                spot_rank[u] = rank
                und_spot[u] = s

        # Expiries: one close time per distinct date.
        close_of: dict[dt.date, float] = {
            d: expiry_close_epoch_s(d) for d in set(expiries) if d is not None
        }
        expiry_epoch_s = np.fromiter(
            (close_of[d] if d is not None else np.nan for d in expiries), np.float64, n
        )
        expiry_ord = np.fromiter((d.toordinal() if d is not None else 0 for d in expiries), np.int64, n)

        # Chains: options of one (underlying, expiry); same-expiry futures point to theirs.
        chain = np.full(n, -1, dtype=np.int32)
        key = und.astype(np.int64) * (1 << 32) + expiry_ord
        option_slots = np.flatnonzero(is_option)
        chain_keys, chain_of_option = np.unique(key[option_slots], return_inverse=True)
        chain[option_slots] = chain_of_option.astype(np.int32)
        n_chains = chain_keys.size
        chain_und = (chain_keys >> 32).astype(np.int32)
        chain_ord = (chain_keys & 0xFFFFFFFF).astype(np.int64)
        chain_expiry = tuple(dt.date.fromordinal(int(o)) for o in chain_ord.tolist())
        chain_expiry_epoch_s = np.fromiter(
            (close_of[d] for d in chain_expiry), np.float64, n_chains
        )
        chain_future = np.full(n_chains, -1, dtype=np.int32)
        future_slots = np.flatnonzero(kind == Kind.FUT)
        if n_chains and future_slots.size:
            pos = np.searchsorted(chain_keys, key[future_slots])
            pos = np.minimum(pos, n_chains - 1)
            hit = chain_keys[pos] == key[future_slots]
            # Reversed so that, for two futures of one chain, the lowest token wins.
            for s, c in reversed(list(zip(future_slots[hit].tolist(), pos[hit].tolist(), strict=True))):
                chain_future[c] = s
            chain[future_slots[hit]] = pos[hit].astype(np.int32)

        # Pairs: same chain and strike, one CE and one PE.
        pair = np.full(n, -1, dtype=np.int32)
        by = option_slots[
            np.lexsort((kind[option_slots], strike[option_slots], chain[option_slots]))
        ]
        if by.size > 1:
            a, b = by[:-1], by[1:]
            matched = (
                (chain[a] == chain[b])
                & (strike[a] == strike[b])
                & (kind[a] == Kind.CE)
                & (kind[b] == Kind.PE)
            )
            calls, puts = a[matched], b[matched]
        else:
            calls = puts = np.zeros(0, dtype=np.int64)
        pair[calls] = puts
        pair[puts] = calls

        # Groups.
        group_index: dict[str, int] = {}
        und_group = [schema.underlying_group(name) for name in underlyings]
        chain_group_names = [
            schema.chain_group(underlyings[u], d)
            for u, d in zip(chain_und.tolist(), chain_expiry, strict=True)
        ]
        group = np.empty(n, dtype=np.int32)
        und_list = und.tolist()
        chain_list = chain.tolist()
        is_option_list = is_option.tolist()
        for s in range(n):
            name = chain_group_names[chain_list[s]] if is_option_list[s] else und_group[und_list[s]]
            group[s] = group_index.setdefault(name, len(group_index))

        # Static JSON prefixes.
        kind_names = schema.KINDS
        strike_list = strike.tolist()
        prefixes = np.empty(n, dtype=object)
        prefixes[:] = [
            schema.snapshot_prefix(
                token=t,
                symbol=symbols[s],
                exchange=exchanges[s],
                name=und_names[s],
                kind=kind_names[k],
                expiry=expiries[s],
                strike=strike_list[s] if is_option_list[s] else None,
            )
            for s, (t, k) in enumerate(zip(tokens.tolist(), kind.tolist(), strict=True))
        ]

        self.tokens = tokens
        self.kind = kind
        self.strike = strike
        self.lot_size = np.asarray(lot_sizes_in, dtype=np.int64)[order]
        self.expiry_epoch_s = expiry_epoch_s
        self.und = und
        self.chain = chain
        self.group = group
        self.pair = pair
        self.is_option = is_option
        self.is_call = kind == Kind.CE
        self.prefixes = prefixes
        self.symbols = symbols
        self.underlyings = underlyings
        self.und_spot = und_spot
        self.chain_und = chain_und
        self.chain_expiry = chain_expiry
        self.chain_expiry_epoch_s = chain_expiry_epoch_s
        self.chain_future = chain_future
        order_pairs = np.argsort(chain[calls], kind="stable")
        self.pair_call = calls[order_pairs].astype(np.int64)
        self.pair_put = puts[order_pairs].astype(np.int64)
        self.pair_chain = chain[self.pair_call].astype(np.int64)
        self.pair_strike = strike[self.pair_call]
        self.group_names = tuple(group_index)
        self._group_index = group_index
        for name in cls.__slots__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray) and value.dtype != object:
                value.flags.writeable = False
        return self

    # --- lookups ----------------------------------------------------------------------------

    def slots_of(self, tokens: np.ndarray | Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(slots of the known tokens, mask of which input tokens are known)."""
        t = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64)
        if self.tokens.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(t.shape, dtype=bool)
        pos = np.searchsorted(self.tokens, t)
        np.minimum(pos, self.tokens.size - 1, out=pos)
        known = self.tokens[pos] == t
        return pos[known], known

    def group_of(self, token: int) -> str:
        """The channel-layer group of one token; KeyError if the universe does not hold it."""
        slots, known = self.slots_of([token])
        if not known[0]:
            raise KeyError(f"instrument_token not in universe: {token}")
        return self.group_names[int(self.group[slots[0]])]

    def groups_of(self, tokens: np.ndarray | Iterable[int]) -> set[str]:
        """The groups of the known tokens among ``tokens``."""
        slots, _ = self.slots_of(tokens)
        return {self.group_names[g] for g in np.unique(self.group[slots]).tolist()}

    def group_id(self, name: str) -> int:
        """The id of a group name; KeyError if no instrument publishes to it."""
        return self._group_index[name]

    def spot_tokens(self) -> dict[int, str]:
        """Token -> underlying name of every underlying's spot (index or equity): bar sources."""
        return {
            int(self.tokens[s]): self.underlyings[u]
            for u, s in enumerate(self.und_spot.tolist())
            if s >= 0
        }
