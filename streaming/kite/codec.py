"""Kite WebSocket tick codec: binary frames <-> numpy structured arrays, and text messages.

Wire format (kiteconnect's ``ticker.py`` is the reference parser; the tests check this module
against it field by field): a binary frame is ``uint16 packet count`` then, per packet,
``uint16 length`` and the packet, all big-endian. The packet length says what it is:

====== ============ ===================================================================
length kind         fields (uint32 each unless noted)
====== ============ ===================================================================
8      LTP          token, last_price
28     index quote  token, last_price, high, low, open, close, change (int32, ignored)
32     index full   index quote + exchange_timestamp
44     quote        token, last_price, last_traded_quantity, average_traded_price,
                    volume_traded, total_buy_quantity, total_sell_quantity,
                    open, high, low, close
184    full         quote + last_trade_time, oi, oi_day_high, oi_day_low,
                    exchange_timestamp, 10 depth entries (5 buy then 5 sell) of
                    quantity u32, price u32, orders u16, 2 bytes padding
====== ============ ===================================================================

Prices are integers divided by a per-segment divisor taken from ``token & 0xff``. A frame of
one byte is a heartbeat. Text frames are JSON ``{"type": "order" | "error" | "message"}``.

Decoding runs in one numba-compiled pass over the frame: packet boundaries are sequential
(each length prefix locates the next packet), so a pure-numpy split would need a Python
loop per packet, and per-field numpy calls cost more than a whole 100-packet frame's decode.
Encoding is numpy: each packet kind is a big-endian structured dtype filled column-wise.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Final, Literal, NamedTuple

import numba
import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streaming.kite.limits import MODES, Mode

# --- segments and price divisors ------------------------------------------------------------

SEGMENT_CDS: Final = 3
SEGMENT_BCD: Final = 6
SEGMENT_INDICES: Final = 9
SEGMENT_NCO: Final = 12

PRICE_DIVISOR_CDS: Final = 10_000_000.0
PRICE_DIVISOR_BCD_NCO: Final = 10_000.0
PRICE_DIVISOR_DEFAULT: Final = 100.0

# --- packet lengths (bytes); the length is the packet's kind and, for consumers, its mode ---

PACKET_LTP: Final = 8
PACKET_INDEX_QUOTE: Final = 28
PACKET_INDEX_FULL: Final = 32
PACKET_QUOTE: Final = 44
PACKET_FULL: Final = 184
PACKET_LENGTHS: Final = (
    PACKET_LTP,
    PACKET_INDEX_QUOTE,
    PACKET_INDEX_FULL,
    PACKET_QUOTE,
    PACKET_FULL,
)
PACKET_MODE: Final[dict[int, Mode]] = {
    PACKET_LTP: "ltp",
    PACKET_INDEX_QUOTE: "quote",
    PACKET_INDEX_FULL: "full",
    PACKET_QUOTE: "quote",
    PACKET_FULL: "full",
}

DEPTH_LEVELS: Final = 5
MAX_PACKETS_PER_FRAME: Final = 0xFFFF
_FRAME_HEADER_BYTES: Final = 2
_MIN_PACKET_WITH_PREFIX_BYTES: Final = 2 + PACKET_LTP
_U32_LIMIT: Final = 1 << 32

# --- decoded ticks --------------------------------------------------------------------------

# One row per packet. Fields a packet kind does not carry are zero; ``packet_length`` says
# which are valid. Counts are int64 (the wire's uint32 fits, and differences such as volume
# deltas cannot wrap); timestamps are epoch seconds, 0 when absent; ``change`` is the percentage
# the Python client reports, 0 when close is 0 or absent. ``is_index`` means segment 9
# (indices), which is also exactly when ``tradable`` is False.
TICK_DTYPE: Final = np.dtype(
    [
        ("instrument_token", np.uint32),
        ("packet_length", np.uint16),
        ("tradable", np.bool_),
        ("is_index", np.bool_),
        ("last_price", np.float64),
        ("last_traded_quantity", np.int64),
        ("average_traded_price", np.float64),
        ("volume_traded", np.int64),
        ("total_buy_quantity", np.int64),
        ("total_sell_quantity", np.int64),
        ("open", np.float64),
        ("high", np.float64),
        ("low", np.float64),
        ("close", np.float64),
        ("change", np.float64),
        ("last_trade_time", np.int64),
        ("oi", np.int64),
        ("oi_day_high", np.int64),
        ("oi_day_low", np.int64),
        ("exchange_timestamp", np.int64),
        ("depth_buy_quantity", np.int64, (DEPTH_LEVELS,)),
        ("depth_buy_price", np.float64, (DEPTH_LEVELS,)),
        ("depth_sell_quantity", np.int64, (DEPTH_LEVELS,)),
        ("depth_sell_price", np.float64, (DEPTH_LEVELS,)),
        # The two int32 blocks sit together at the end so no field needs padding.
        ("depth_buy_orders", np.int32, (DEPTH_LEVELS,)),
        ("depth_sell_orders", np.int32, (DEPTH_LEVELS,)),
    ],
    align=True,
)
# No padding bytes: a row's bytes are all field bytes, so equal ticks have equal bytes.
assert TICK_DTYPE.itemsize == sum(TICK_DTYPE.fields[name][0].itemsize for name in TICK_DTYPE.names)


def empty_ticks(n: int) -> np.ndarray:
    """Return ``n`` zeroed tick rows, the starting point for building ticks to encode."""
    return np.zeros(n, dtype=TICK_DTYPE)


# --- malformed-input accounting -------------------------------------------------------------

MALFORMED_REASONS: Final = (
    "empty_frame",  # a zero-byte binary message
    "count_exceeds_frame",  # the header promises more packets than the frame holds
    "truncated_packet",  # a length prefix points past the end of the frame
    "unknown_packet_length",  # a length that is none of 8/28/32/44/184; packet skipped
    "zero_length_packet",  # a length prefix of 0
    "trailing_bytes",  # bytes left over after the promised packets
)


class DecodedFrame(NamedTuple):
    """What one binary WebSocket message held: ticks, or a heartbeat, and what was skipped."""

    ticks: np.ndarray
    heartbeat: bool = False
    malformed: int = 0
    # One entry per skipped bad part, from MALFORMED_REASONS; empty for a clean frame.
    malformed_reasons: tuple[str, ...] = ()


_EMPTY_TICKS: Final = np.zeros(0, dtype=TICK_DTYPE)
_EMPTY_TICKS.flags.writeable = False


# --- decoder kernel -------------------------------------------------------------------------

_DIVISOR_BY_SEGMENT: Final = np.full(256, PRICE_DIVISOR_DEFAULT)
_DIVISOR_BY_SEGMENT[SEGMENT_CDS] = PRICE_DIVISOR_CDS
_DIVISOR_BY_SEGMENT[[SEGMENT_BCD, SEGMENT_NCO]] = PRICE_DIVISOR_BCD_NCO
_DIVISOR_BY_SEGMENT.flags.writeable = False


@numba.njit(inline="always")
def _u16(buf, o):  # pragma: no cover - compiled
    return (np.int64(buf[o]) << 8) | np.int64(buf[o + 1])


@numba.njit(inline="always")
def _u32(buf, o):  # pragma: no cover - compiled
    return (
        (np.int64(buf[o]) << 24)
        | (np.int64(buf[o + 1]) << 16)
        | (np.int64(buf[o + 2]) << 8)
        | np.int64(buf[o + 3])
    )


@numba.njit(inline="always")
def _set_change(r):  # pragma: no cover - compiled
    # Same operations in the same order as kiteconnect, so the float results are identical.
    if r.close != 0.0:
        r.change = (r.last_price - r.close) * 100.0 / r.close
    else:
        r.change = 0.0


@numba.njit(inline="always")
def _decode_packet(buf, p, length, r):  # pragma: no cover - compiled
    """Decode the packet at ``buf[p:p+length]`` into the zeroed row ``r``."""
    token = _u32(buf, p)
    segment = token & 0xFF
    divisor = _DIVISOR_BY_SEGMENT[segment]  # a table, not branches: mixed segments mispredict
    r.instrument_token = token
    r.packet_length = length
    r.is_index = segment == 9
    r.tradable = segment != 9
    r.last_price = _u32(buf, p + 4) / divisor
    if length == 28 or length == 32:
        r.high = _u32(buf, p + 8) / divisor
        r.low = _u32(buf, p + 12) / divisor
        r.open = _u32(buf, p + 16) / divisor
        r.close = _u32(buf, p + 20) / divisor
        _set_change(r)
        if length == 32:
            r.exchange_timestamp = _u32(buf, p + 28)
    elif length == 44 or length == 184:
        r.last_traded_quantity = _u32(buf, p + 8)
        r.average_traded_price = _u32(buf, p + 12) / divisor
        r.volume_traded = _u32(buf, p + 16)
        r.total_buy_quantity = _u32(buf, p + 20)
        r.total_sell_quantity = _u32(buf, p + 24)
        r.open = _u32(buf, p + 28) / divisor
        r.high = _u32(buf, p + 32) / divisor
        r.low = _u32(buf, p + 36) / divisor
        r.close = _u32(buf, p + 40) / divisor
        _set_change(r)
        if length == 184:
            r.last_trade_time = _u32(buf, p + 44)
            r.oi = _u32(buf, p + 48)
            r.oi_day_high = _u32(buf, p + 52)
            r.oi_day_low = _u32(buf, p + 56)
            r.exchange_timestamp = _u32(buf, p + 60)
            for i in range(5):
                d = p + 64 + 12 * i
                r.depth_buy_quantity[i] = _u32(buf, d)
                r.depth_buy_price[i] = _u32(buf, d + 4) / divisor
                r.depth_buy_orders[i] = _u16(buf, d + 8)
                d += 60
                r.depth_sell_quantity[i] = _u32(buf, d)
                r.depth_sell_price[i] = _u32(buf, d + 4) / divisor
                r.depth_sell_orders[i] = _u16(buf, d + 8)


_RECORD_ARRAY = numba.from_dtype(TICK_DTYPE)[::1]
_DECODE_SIGNATURES = [
    numba.types.Tuple((_RECORD_ARRAY, numba.types.int64))(buffer_type, numba.types.int64)
    for buffer_type in (
        numba.typeof(b""),  # websockets hands us bytes: no numpy wrapper needed
        numba.types.Array(numba.types.uint8, 1, "C", readonly=True),
    )
]
# Fault counts travel packed in one int64 (cheaper to return than an array): the two
# per-packet faults can happen at most 65535 times a frame, the other three at most once.
_FAULT_SHIFT: Final = {
    "unknown_packet_length": 0,
    "zero_length_packet": 16,
    "count_exceeds_frame": 32,
    "truncated_packet": 33,
    "trailing_bytes": 34,
}
_FAULT_MASK: Final = {name: 0xFFFF if shift < 32 else 1 for name, shift in _FAULT_SHIFT.items()}


# Compiled eagerly (explicit signatures) and cached on disk, so the first frame after start-up
# does not pay for compilation. The output is allocated here rather than by the caller:
# numpy's own constructor spends ~1.5 µs per call checking a 26-field dtype, numba ~0.1 µs.
# It is allocated zeroed (one memset, ~7 ns a row) so each packet writes only its own fields;
# zeroing the absent fields row by row cost ~35 ns a row.
@numba.njit(_DECODE_SIGNATURES, cache=True, nogil=True)
def _decode(buf, capacity):  # pragma: no cover - compiled
    """Decode a frame of at least 2 bytes; return (ticks, packed fault counts)."""
    out = np.zeros(capacity, dtype=TICK_DTYPE)
    n = len(buf)
    count = _u16(buf, 0)
    j = 2
    k = 0
    faults = 0
    for _ in range(count):
        if j + 2 > n:
            return out[:k], faults | (1 << 32)  # count_exceeds_frame
        length = _u16(buf, j)
        j += 2
        if length == 0:
            faults += 1 << 16  # zero_length_packet
            continue
        if j + length > n:
            return out[:k], faults | (1 << 33)  # truncated_packet
        if length == 8 or length == 28 or length == 32 or length == 44 or length == 184:
            _decode_packet(buf, j, length, out[k])
            k += 1
        else:
            faults += 1  # unknown_packet_length
        j += length
    if j < n:
        faults |= 1 << 34  # trailing_bytes
    return out[:k], faults


_CLEAN: Final = tuple[str, ...]()


def _fault_names(faults: int) -> tuple[str, ...]:
    return tuple(
        name
        for name in MALFORMED_REASONS
        if name in _FAULT_SHIFT
        for _ in range((faults >> _FAULT_SHIFT[name]) & _FAULT_MASK[name])
    )


def decode_frame(data: bytes | bytearray | memoryview) -> DecodedFrame:
    """Decode one binary WebSocket message; never raises on malformed input.

    Bad parts (see ``MALFORMED_REASONS``) are counted and skipped; every well-formed packet
    before them is kept. ``ticks`` is a fresh array per frame (possibly a view of a slightly
    larger one), except that frames without ticks share one read-only empty array.
    """
    n = len(data)
    if n == 1:
        return DecodedFrame(_EMPTY_TICKS, True, 0, _CLEAN)
    if n < _FRAME_HEADER_BYTES:
        return DecodedFrame(_EMPTY_TICKS, False, 1, ("empty_frame",))
    count = (data[0] << 8) | data[1]
    capacity = min(count, (n - _FRAME_HEADER_BYTES) // _MIN_PACKET_WITH_PREFIX_BYTES)
    buf = data if type(data) is bytes else np.frombuffer(data, dtype=np.uint8)
    ticks, faults = _decode(buf, capacity)
    if not faults:
        return DecodedFrame(ticks, False, 0, _CLEAN)
    named = _fault_names(faults)
    return DecodedFrame(ticks, False, len(named), named)


# --- encoder --------------------------------------------------------------------------------


class TickEncodeError(ValueError):
    """Ticks that cannot be written in Kite's wire format (out-of-range value, bad length)."""

    def __init__(self, *, field: str, row: int, got: object, expected: str) -> None:
        self.field = field
        self.row = row
        self.got = got
        self.expected = expected
        super().__init__(f"cannot encode tick row {row}: {field}={got!r}, expected {expected}")


_U32 = ">u4"
_PREFIX: Final = [("packet_length", ">u2")]
_LTP_WIRE: Final = [("instrument_token", _U32), ("last_price", _U32)]
_INDEX_QUOTE_WIRE: Final = [
    *_LTP_WIRE,
    ("high", _U32),
    ("low", _U32),
    ("open", _U32),
    ("close", _U32),
    ("change", ">i4"),  # absolute price change; Kite sends it, kiteconnect ignores it
]
_INDEX_FULL_WIRE: Final = [*_INDEX_QUOTE_WIRE, ("exchange_timestamp", _U32)]
_QUOTE_WIRE: Final = [
    *_LTP_WIRE,
    ("last_traded_quantity", _U32),
    ("average_traded_price", _U32),
    ("volume_traded", _U32),
    ("total_buy_quantity", _U32),
    ("total_sell_quantity", _U32),
    ("open", _U32),
    ("high", _U32),
    ("low", _U32),
    ("close", _U32),
]
_DEPTH_ENTRY_WIRE: Final = np.dtype(
    [("quantity", _U32), ("price", _U32), ("orders", ">u2"), ("padding", "V2")]
)
_FULL_WIRE: Final = [
    *_QUOTE_WIRE,
    ("last_trade_time", _U32),
    ("oi", _U32),
    ("oi_day_high", _U32),
    ("oi_day_low", _U32),
    ("exchange_timestamp", _U32),
    ("depth", _DEPTH_ENTRY_WIRE, (2 * DEPTH_LEVELS,)),
]
# Each packet kind with its uint16 length prefix, so a run of packets is one numpy array.
WIRE_DTYPES: Final[dict[int, np.dtype]] = {
    length: np.dtype(_PREFIX + fields)
    for length, fields in (
        (PACKET_LTP, _LTP_WIRE),
        (PACKET_INDEX_QUOTE, _INDEX_QUOTE_WIRE),
        (PACKET_INDEX_FULL, _INDEX_FULL_WIRE),
        (PACKET_QUOTE, _QUOTE_WIRE),
        (PACKET_FULL, _FULL_WIRE),
    )
}
assert all(dt.itemsize == 2 + length for length, dt in WIRE_DTYPES.items())

_PRICE_FIELDS: Final = frozenset({"last_price", "average_traded_price", "open", "high", "low", "close"})
_WIRE_LENGTHS: Final = np.array(PACKET_LENGTHS, dtype=np.uint16)


def price_divisors(tokens: np.ndarray) -> np.ndarray:
    """Return each instrument token's price divisor (float64), by segment ``token & 0xff``."""
    return _DIVISOR_BY_SEGMENT[np.asarray(tokens, dtype=np.uint32) & 0xFF]


def _checked(
    values: np.ndarray, *, field: str, rows: np.ndarray, low: int, high: int
) -> np.ndarray:
    bad = (values < low) | (values >= high)
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))[0])
        raise TickEncodeError(
            field=field,
            row=int(rows[i]),
            got=values[i].tolist(),
            expected=f"a wire value in [{low}, {high})",
        )
    return values


def _wire_price(values: np.ndarray, divisors: np.ndarray, *, field: str, rows: np.ndarray):
    if not np.isfinite(values).all():
        i = int(np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(axis=1))[0])
        raise TickEncodeError(field=field, row=int(rows[i]), got=values[i].tolist(), expected="a finite price")
    scaled = np.rint(values * (divisors if values.ndim == 1 else divisors[:, None]))
    return _checked(scaled, field=field, rows=rows, low=0, high=_U32_LIMIT)


def _fill_wire(wire: np.ndarray, ticks: np.ndarray, rows: np.ndarray, length: int) -> None:
    divisors = price_divisors(ticks["instrument_token"])
    wire["packet_length"] = length
    for name in wire.dtype.names:
        if name in ("packet_length", "depth"):
            continue
        if name == "change":
            change = np.rint((ticks["last_price"] - ticks["close"]) * divisors)
            wire["change"] = np.clip(np.nan_to_num(change), -(1 << 31), (1 << 31) - 1)
        elif name in _PRICE_FIELDS:
            wire[name] = _wire_price(ticks[name], divisors, field=name, rows=rows)
        else:
            wire[name] = _checked(ticks[name], field=name, rows=rows, low=0, high=_U32_LIMIT)
    if length == PACKET_FULL:
        depth = wire["depth"]
        for side, levels in (("buy", slice(0, DEPTH_LEVELS)), ("sell", slice(DEPTH_LEVELS, None))):
            qty, price, orders = (f"depth_{side}_{part}" for part in ("quantity", "price", "orders"))
            depth["quantity"][:, levels] = _checked(
                ticks[qty], field=qty, rows=rows, low=0, high=_U32_LIMIT
            )
            depth["price"][:, levels] = _wire_price(ticks[price], divisors, field=price, rows=rows)
            depth["orders"][:, levels] = _checked(
                ticks[orders], field=orders, rows=rows, low=0, high=1 << 16
            )


def encode_frame(ticks: np.ndarray) -> bytes:
    """Write ticks (``TICK_DTYPE``) as one Kite binary frame, each row as its packet_length says.

    ``tradable``, ``is_index`` and ``change`` are derived by the decoder and not read here
    (index packets carry the absolute change computed from last_price and close).
    Raises ``TickEncodeError`` for a value the wire cannot hold, naming row and field.
    """
    if ticks.dtype != TICK_DTYPE:
        raise TypeError(f"encode_frame needs TICK_DTYPE rows, got dtype {ticks.dtype}")
    n = len(ticks)
    if n > MAX_PACKETS_PER_FRAME:
        raise TickEncodeError(
            field="len(ticks)", row=-1, got=n, expected=f"at most {MAX_PACKETS_PER_FRAME} packets"
        )
    header = struct.pack(">H", n)
    if n == 0:
        return header
    lengths = ticks["packet_length"]
    unknown = ~np.isin(lengths, _WIRE_LENGTHS)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise TickEncodeError(
            field="packet_length", row=i, got=int(lengths[i]), expected=f"one of {PACKET_LENGTHS}"
        )
    first = int(lengths[0])
    if (lengths == first).all():
        wire = np.zeros(n, dtype=WIRE_DTYPES[first])
        _fill_wire(wire, ticks, np.arange(n), first)
        return header + wire.tobytes()
    framed = lengths.astype(np.int64) + 2
    out = np.empty(_FRAME_HEADER_BYTES + int(framed.sum()), dtype=np.uint8)
    out[:2] = np.frombuffer(header, dtype=np.uint8)
    starts = _FRAME_HEADER_BYTES + np.concatenate(([0], np.cumsum(framed)[:-1]))
    for length in np.unique(lengths).tolist():
        rows = np.flatnonzero(lengths == length)
        wire = np.zeros(len(rows), dtype=WIRE_DTYPES[length])
        _fill_wire(wire, ticks[rows], rows, length)
        packet_bytes = wire.view(np.uint8).reshape(len(rows), length + 2)
        out[starts[rows][:, None] + np.arange(length + 2)] = packet_bytes
    return out.tobytes()


# --- text messages --------------------------------------------------------------------------


class OrderUpdate(BaseModel):
    """An order update Kite pushes on the ticker socket (same shape as a postback)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    order_id: str
    status: str
    user_id: str | None = None
    exchange_order_id: str | None = None
    parent_order_id: str | None = None
    status_message: str | None = None
    order_timestamp: str | None = None
    exchange_timestamp: str | None = None
    variety: str | None = None
    exchange: str | None = None
    tradingsymbol: str | None = None
    instrument_token: int | None = None
    order_type: str | None = None
    transaction_type: str | None = None
    validity: str | None = None
    product: str | None = None
    quantity: int | None = None
    price: float | None = None
    trigger_price: float | None = None
    average_price: float | None = None
    filled_quantity: int | None = None
    pending_quantity: int | None = None
    cancelled_quantity: int | None = None
    tag: str | None = None


class OrderMessage(BaseModel):
    """``{"type": "order", "data": {...}}``: an order changed state."""

    model_config = ConfigDict(frozen=True)

    type: Literal["order"]
    data: OrderUpdate


class ErrorMessage(BaseModel):
    """``{"type": "error", "data": "..."}``: Kite reports an error on this connection."""

    model_config = ConfigDict(frozen=True)

    type: Literal["error"]
    data: str


class InfoMessage(BaseModel):
    """``{"type": "message", "data": "..."}``: a broker notice for the user."""

    model_config = ConfigDict(frozen=True)

    type: Literal["message"]
    data: str


TextMessage = Annotated[OrderMessage | ErrorMessage | InfoMessage, Field(discriminator="type")]
_TEXT_MESSAGE: Final = TypeAdapter(TextMessage)
_EXCERPT_CHARS: Final = 200


class KiteMessageError(ValueError):
    """A text frame from Kite that is not a valid order/error/message JSON object."""

    def __init__(self, *, excerpt: str, reason: str) -> None:
        self.excerpt = excerpt
        self.reason = reason
        super().__init__(f"invalid Kite text message ({reason}): {excerpt!r}")


def parse_text_message(text: str | bytes) -> OrderMessage | ErrorMessage | InfoMessage:
    """Validate one text frame; raises ``KiteMessageError`` (with an excerpt) if it is not one."""
    try:
        return _TEXT_MESSAGE.validate_json(text)
    except ValidationError as exc:
        raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise KiteMessageError(excerpt=raw[:_EXCERPT_CHARS], reason=reasons) from exc


# --- control messages (client -> Kite) ------------------------------------------------------


def _token_list(tokens: Any) -> list[int]:
    out = [int(t) for t in tokens]
    if not out:
        raise ValueError("a Kite control message needs at least one instrument token")
    return out


def subscribe_message(tokens: Any) -> str:
    """``{"a": "subscribe", "v": [tokens]}`` as the text frame Kite expects."""
    return orjson.dumps({"a": "subscribe", "v": _token_list(tokens)}).decode()


def unsubscribe_message(tokens: Any) -> str:
    """``{"a": "unsubscribe", "v": [tokens]}`` as the text frame Kite expects."""
    return orjson.dumps({"a": "unsubscribe", "v": _token_list(tokens)}).decode()


def mode_message(mode: Mode, tokens: Any) -> str:
    """``{"a": "mode", "v": [mode, [tokens]]}`` as the text frame Kite expects."""
    if mode not in MODES:
        raise ValueError(f"unknown Kite mode {mode!r}, expected one of {MODES}")
    return orjson.dumps({"a": "mode", "v": [mode, _token_list(tokens)]}).decode()
