"""The snapshot schema, channel-layer group names and engine messages: the one truth.

Everything that names a group, builds an engine message or writes a snapshot's JSON imports
it from here; ``docs/snapshot-schema.md`` documents the same things for readers (a test checks
that the document lists exactly :data:`SNAPSHOT_FIELDS`).

Version policy
    :data:`SCHEMA_VERSION` is sent in every snapshot as ``v``. Adding a field is backwards
    compatible and keeps the version; removing or renaming a field, or changing a field's
    type or unit, bumps it. Consumers ignore fields they do not know.

No Django import: the engine's plain classes and the consumers both use this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import date
from enum import IntEnum
from typing import Any, Final, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ANALYTICS_REQUEST_TYPE",
    "BAR_CLOSED_TYPE",
    "BAR_FIELDS",
    "CHAIN_ANALYTICS_TYPE",
    "KINDS",
    "ORDER_EVENT_TYPE",
    "SCHEMA_VERSION",
    "SNAPSHOTS_BATCH_TYPE",
    "SNAPSHOT_FIELDS",
    "SNAPSHOT_REQUESTS_GROUP",
    "SNAPSHOT_REQUEST_TYPE",
    "InstrumentKind",
    "SnapshotRequest",
    "SnapshotRequestError",
    "analytics_request_message",
    "bar_closed_message",
    "bars_group",
    "chain_analytics_message",
    "chain_group",
    "encode_bar",
    "encode_snapshots",
    "flags_piece",
    "order_event_message",
    "orders_group",
    "snapshot_prefix",
    "snapshot_request_message",
    "snapshots_batch_message",
    "underlying_group",
]

SCHEMA_VERSION: Final = 1

#: Snapshot keys, in the order they appear in the JSON. See docs/snapshot-schema.md.
SNAPSHOT_FIELDS: Final = (
    "v",
    "token",
    "symbol",
    "exchange",
    "name",
    "kind",
    "expiry",
    "strike",
    "ltp",
    "change",
    "bid",
    "ask",
    "bid_qty",
    "ask_qty",
    "volume",
    "oi",
    "iv",
    "delta",
    "gamma",
    "theta",
    "vega",
    "rho",
    "forward",
    "underlying",
    "flags",
    "exchange_ts",
    "is_mock",
    "rest_fallback",
)


class InstrumentKind(IntEnum):
    """The one numbering of instrument kinds, in the engine's arrays and the synthetic market's.

    The value is the index into :data:`KINDS`, the names a snapshot carries.
    """

    INDEX = 0
    EQ = 1
    FUT = 2
    CE = 3
    PE = 4


#: The ``kind`` of a snapshot: an index, an equity, a future, a call or a put.
KINDS: Final = tuple(kind.name for kind in InstrumentKind)

# --- group names ----------------------------------------------------------------------------

#: Every engine listens on this group for initial-state requests from consumers.
SNAPSHOT_REQUESTS_GROUP: Final = "engine.snapshot_requests"

# Channels accepts group names of [a-zA-Z0-9-_.] shorter than 100 characters. A dot
# separates the parts of our names, so it is replaced inside a part as well.
_GROUP_PART_DISALLOWED: Final = re.compile(r"[^A-Za-z0-9_-]")
_GROUP_NAME_MAX_CHARS: Final = 99


def _group_part(name: str) -> str:
    part = _GROUP_PART_DISALLOWED.sub("_", name.strip().upper())
    if not part:
        raise ValueError(f"cannot build a group name from an empty underlying name: got={name!r}")
    return part


def _checked_group(group: str) -> str:
    if len(group) > _GROUP_NAME_MAX_CHARS:
        raise ValueError(f"group name too long: got={group!r} max_chars={_GROUP_NAME_MAX_CHARS}")
    return group


def chain_group(name: str, expiry: date) -> str:
    """The group of an option chain: ``chain.NIFTY.20261124``."""
    return _checked_group(f"chain.{_group_part(name)}.{expiry:%Y%m%d}")


def underlying_group(name: str) -> str:
    """The group of an underlying's non-option instruments (index, equity, futures): ``und.NIFTY``."""
    return _checked_group(f"und.{_group_part(name)}")


def bars_group(name: str) -> str:
    """The group an underlying's closed 1-minute bars go to: ``bars.NIFTY``."""
    return _checked_group(f"bars.{_group_part(name)}")


def orders_group(account_id: int) -> str:
    """The group a broker account's order events go to: ``orders.12``."""
    return _checked_group(f"orders.{int(account_id)}")


# --- engine -> consumer messages ------------------------------------------------------------

SNAPSHOTS_BATCH_TYPE: Final = "snapshots.batch"
SNAPSHOT_REQUEST_TYPE: Final = "snapshot.request"
BAR_CLOSED_TYPE: Final = "bar.closed"
ORDER_EVENT_TYPE: Final = "order.event"


def snapshots_batch_message(
    *, group: str, tokens: list[int], items: list[bytes], initial: bool = False
) -> dict[str, Any]:
    """The channel-layer message carrying pre-serialised snapshots; ``items[i]`` is ``tokens[i]``'s."""
    message: dict[str, Any] = {
        "type": SNAPSHOTS_BATCH_TYPE,
        "group": group,
        "tokens": tokens,
        "items": items,
    }
    if initial:
        message["initial"] = True
    return message


def bar_closed_message(item: bytes) -> dict[str, Any]:
    """The channel-layer message announcing one closed bar (``item`` from :func:`encode_bar`)."""
    return {"type": BAR_CLOSED_TYPE, "item": item}


def order_event_message(*, account_id: int, item: bytes) -> dict[str, Any]:
    """The channel-layer message of one order change; ``item`` is the serialised OrderEvent."""
    return {"type": ORDER_EVENT_TYPE, "account": int(account_id), "item": item}


def snapshot_request_message(*, reply_to: str, tokens: Sequence[int]) -> dict[str, Any]:
    """What a consumer sends to :data:`SNAPSHOT_REQUESTS_GROUP` to get the latest snapshots."""
    return {"type": SNAPSHOT_REQUEST_TYPE, "reply_to": reply_to, "tokens": [int(t) for t in tokens]}


#: More tokens than this in one request is a bug or abuse; the consumers' own limit is lower.
MAX_REQUEST_TOKENS: Final = 20_000


class SnapshotRequest(BaseModel):
    """A consumer's request for the latest snapshots of some tokens, validated."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["snapshot.request"]
    reply_to: str = Field(min_length=1, max_length=200)
    tokens: list[int] = Field(max_length=MAX_REQUEST_TOKENS)


class SnapshotRequestError(ValueError):
    """A snapshot request on the channel layer that does not have the agreed shape."""

    def __init__(self, *, reason: str, got: object) -> None:
        self.reason = reason
        self.got = got
        super().__init__(f"invalid snapshot request ({reason}): {str(got)[:200]}")


def parse_snapshot_request(message: Mapping[str, Any]) -> SnapshotRequest:
    """Validate a ``snapshot.request`` message; raises :class:`SnapshotRequestError`."""
    try:
        return SnapshotRequest.model_validate(message)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise SnapshotRequestError(reason=reasons, got=message) from exc


# --- chain analytics messages ---------------------------------------------------------------

CHAIN_ANALYTICS_TYPE: Final = "chain.analytics"
ANALYTICS_REQUEST_TYPE: Final = "analytics.request"
#: Chains one analytics request may name (a consumer names the one chain it subscribed).
MAX_REQUEST_CHAINS: Final = 100


def chain_analytics_message(*, group: str, item: bytes) -> dict[str, Any]:
    """A chain's ``analytics`` client message (``item``, streaming.protocol), on its chain group."""
    return {"type": CHAIN_ANALYTICS_TYPE, "group": group, "item": item}


def analytics_request_message(*, reply_to: str, groups: Sequence[str]) -> dict[str, Any]:
    """What a consumer sends to :data:`SNAPSHOT_REQUESTS_GROUP` for chains' latest analytics."""
    return {"type": ANALYTICS_REQUEST_TYPE, "reply_to": reply_to, "groups": list(groups)}


class AnalyticsRequest(BaseModel):
    """A consumer's request for the latest analytics of some chain groups, validated."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["analytics.request"]
    reply_to: str = Field(min_length=1, max_length=200)
    groups: list[str] = Field(max_length=MAX_REQUEST_CHAINS)


def parse_analytics_request(message: Mapping[str, Any]) -> AnalyticsRequest:
    """Validate an ``analytics.request`` message; raises :class:`SnapshotRequestError`."""
    try:
        return AnalyticsRequest.model_validate(message)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise SnapshotRequestError(reason=reasons, got=message) from exc


# --- snapshot JSON --------------------------------------------------------------------------
#
# A snapshot is written in two parts: a static prefix per instrument, built once when the
# universe is built (``{"v":1,"token":...,"strike":24000.0``), and the dynamic fields,
# written column by column for a whole flush. Writing each column with one orjson call and
# splitting it is about twice as fast as building a dict per instrument (see
# benchmarks/pipeline), and the bytes are the same.

#: Decimal places of ``change`` (percent), ``forward`` and ``underlying`` in the JSON.
CHANGE_DECIMALS: Final = 2
PRICE_DECIMALS: Final = 4
#: Significant digits of iv and the Greeks in the JSON (the engine keeps full precision).
GREEKS_SIGNIFICANT_DIGITS: Final = 6

_FLOAT_FIELDS_BEFORE_QTY: Final = ("ltp", "change", "bid", "ask")
_INT_FIELDS: Final = ("bid_qty", "ask_qty", "volume", "oi")
_GREEK_FIELDS: Final = ("iv", "delta", "gamma", "theta", "vega", "rho")
_PRICE_FIELDS_AFTER_GREEKS: Final = ("forward", "underlying")
_ROUNDING_LIMIT: Final = 1e15
_SEPARATOR: Final = b"\x00"  # never appears in orjson number output
_NUMPY: Final = orjson.OPT_SERIALIZE_NUMPY


def snapshot_prefix(
    *,
    token: int,
    symbol: str,
    exchange: str,
    name: str,
    kind: str,
    expiry: date | None,
    strike: float | None,
) -> bytes:
    """The static start of an instrument's snapshot JSON, without the closing brace."""
    if kind not in KINDS:
        raise ValueError(f"unknown snapshot kind: got={kind!r} expected one of {KINDS}")
    static = {
        "v": SCHEMA_VERSION,
        "token": int(token),
        "symbol": symbol,
        "exchange": exchange,
        "name": name,
        "kind": kind,
        "expiry": expiry.isoformat() if expiry is not None else None,
        "strike": strike,
    }
    return orjson.dumps(static)[:-1]


def flags_piece(names: Sequence[str]) -> bytes:
    """The ``,"flags":[...]`` piece of a snapshot for flag names (cache it per flag value)."""
    return b',"flags":' + orjson.dumps(list(names))


def _round_decimals(x: np.ndarray, decimals: int) -> np.ndarray:
    # rint(x * 10^d) / 10^d is the double nearest the short decimal (IEEE division is
    # correctly rounded), so orjson's shortest repr prints the short decimal.
    scale = 10.0**decimals
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = np.rint(x * scale) / scale
    # From 1e15 up a double has no decimals left to round (and x * scale could overflow).
    return np.where(np.abs(x) < _ROUNDING_LIMIT, rounded, x)


def _round_significant(x: np.ndarray, digits: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log10(np.abs(x)))
    shift = np.where(np.isfinite(exponent), digits - 1 - exponent, 0.0)
    shift = np.clip(shift, -300, 300).astype(np.int64)
    # Multiply and divide by exact powers of ten so the result is the nearest double to the
    # rounded decimal (see _round_decimals); the branch keeps the power an integer.
    power = 10.0 ** np.abs(np.minimum(shift, 22)).astype(np.float64)
    small = shift >= 0
    with np.errstate(over="ignore", invalid="ignore"):  # only in the branch not taken
        out = np.where(small, np.rint(x * power) / power, np.rint(x / power) * power)
    # Beyond 22 decimal places the power is inexact; such magnitudes are not rounded.
    return np.where(shift > 22, x, out)


def _keyed(key: str, body: bytes) -> list[bytes]:
    """``,"key":value`` pieces from an orjson array body ``v1,v2,...`` (one split, C speed)."""
    head = b',"' + key.encode() + b'":'
    return (head + body.replace(b",", _SEPARATOR + head)).split(_SEPARATOR)


def _float_pieces(key: str, values: np.ndarray) -> list[bytes]:
    # orjson writes NaN (and inf) as null.
    body = orjson.dumps(np.ascontiguousarray(values, dtype=np.float64), option=_NUMPY)[1:-1]
    return _keyed(key, body)


def _int_pieces(key: str, values: np.ndarray) -> list[bytes]:
    """Integer pieces; a negative value means "not known" and is written as null."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    missing = values < 0
    if missing.any():
        values = np.maximum(values, -1)
    head = b',"' + key.encode() + b'":'
    body = orjson.dumps(values, option=_NUMPY)[1:-1]
    # Every piece ends with the separator, so ":-1" + separator is exactly a null.
    text = head + body.replace(b",", _SEPARATOR + head) + _SEPARATOR
    if missing.any():
        text = text.replace(b":-1" + _SEPARATOR, b":null" + _SEPARATOR)
    pieces = text.split(_SEPARATOR)
    pieces.pop()
    return pieces


# Indexed by is_mock + 2 * rest_fallback.
_TAILS: Final = np.array(
    [
        b',"is_mock":false,"rest_fallback":false}',
        b',"is_mock":true,"rest_fallback":false}',
        b',"is_mock":false,"rest_fallback":true}',
        b',"is_mock":true,"rest_fallback":true}',
    ],
    dtype=object,
)


def encode_snapshots(
    *,
    prefixes: Sequence[bytes],
    ltp: np.ndarray,
    change: np.ndarray,
    bid: np.ndarray,
    ask: np.ndarray,
    bid_qty: np.ndarray,
    ask_qty: np.ndarray,
    volume: np.ndarray,
    oi: np.ndarray,
    iv: np.ndarray,
    delta: np.ndarray,
    gamma: np.ndarray,
    theta: np.ndarray,
    vega: np.ndarray,
    rho: np.ndarray,
    forward: np.ndarray,
    underlying: np.ndarray,
    flags: Sequence[bytes],
    exchange_ts: np.ndarray,
    is_mock: np.ndarray,
    rest_fallback: np.ndarray | None = None,
) -> list[bytes]:
    """Write one snapshot JSON per row from columns; returns one ``bytes`` per row.

    ``prefixes`` come from :func:`snapshot_prefix`, ``flags`` from :func:`flags_piece`.
    Float columns use NaN for null. Integer columns (quantities, volume, oi, ``exchange_ts``
    in epoch milliseconds) use -1 for null. ``rest_fallback`` (all false when None) marks
    rows whose data came from Kite's quote API while their socket was stalled. Rounding: ``change`` to 2 decimals, ``forward``
    and ``underlying`` to 4, iv and Greeks to 6 significant digits; prices as they are.
    """
    n = len(prefixes)
    if n == 0:
        return []
    columns: list[Sequence[bytes]] = [prefixes]
    columns.append(_float_pieces("ltp", ltp))
    columns.append(_float_pieces("change", _round_decimals(change, CHANGE_DECIMALS)))
    columns.append(_float_pieces("bid", bid))
    columns.append(_float_pieces("ask", ask))
    columns.extend(
        _int_pieces(key, values)
        for key, values in zip(_INT_FIELDS, (bid_qty, ask_qty, volume, oi), strict=True)
    )
    # Rounded as one 2-D array each: one set of numpy calls instead of one per column.
    greeks = _round_significant(np.stack((iv, delta, gamma, theta, vega, rho)), GREEKS_SIGNIFICANT_DIGITS)
    columns.extend(_float_pieces(key, values) for key, values in zip(_GREEK_FIELDS, greeks, strict=True))
    prices = _round_decimals(np.stack((forward, underlying)), PRICE_DECIMALS)
    columns.append(_float_pieces("forward", prices[0]))
    columns.append(_float_pieces("underlying", prices[1]))
    columns.append(flags)
    columns.append(_int_pieces("exchange_ts", exchange_ts))
    tail = np.asarray(is_mock, dtype=np.intp)
    if rest_fallback is not None:
        tail = tail + 2 * np.asarray(rest_fallback, dtype=np.intp)
    columns.append(_TAILS[tail].tolist())
    if any(len(column) != n for column in columns):
        got = {len(column) for column in columns}
        raise ValueError(f"snapshot columns differ in length: expected={n} got={sorted(got)}")
    return list(map(b"".join, zip(*columns, strict=True)))


# The order of the pieces above is the order of SNAPSHOT_FIELDS; checked at import so the
# two can never drift apart silently.
assert (
    SNAPSHOT_FIELDS[8:]
    == (
        *_FLOAT_FIELDS_BEFORE_QTY,
        *_INT_FIELDS,
        *_GREEK_FIELDS,
        *_PRICE_FIELDS_AFTER_GREEKS,
        "flags",
        "exchange_ts",
        "is_mock",
        "rest_fallback",
    )
)


# --- bars -----------------------------------------------------------------------------------

#: Keys of a closed bar's JSON (``bar.closed`` messages), in order.
BAR_FIELDS: Final = (
    "v",
    "token",
    "name",
    "start_ts",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "ticks",
    "is_gap",
    "is_mock",
    "backfilled",
)


def encode_bar(
    *,
    token: int,
    name: str,
    start_epoch_s: int,
    open: float | None,
    high: float | None,
    low: float | None,
    close: float | None,
    volume: int,
    ticks: int,
    is_gap: bool,
    is_mock: bool,
    backfilled: bool = False,
) -> bytes:
    """One closed 1-minute bar as JSON; a gap bar has null prices. ``start_ts`` in epoch ms.

    ``backfilled``: the minute had no tick and was filled from Kite's historical candles.
    """
    return orjson.dumps(
        {
            "v": SCHEMA_VERSION,
            "token": token,
            "name": name,
            "start_ts": start_epoch_s * 1000,
            "open": open,
            "high": high,
            "low": low,
            "close": close,
            "volume": volume,
            "ticks": ticks,
            "is_gap": is_gap,
            "is_mock": is_mock,
            "backfilled": backfilled,
        }
    )
