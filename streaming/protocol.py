"""The WebSocket protocol (version 1): client messages as pydantic models, server messages as bytes.

Documented for users in docs/websocket-protocol.md; this module is its one truth. Everything
here is pure (no Django, no I/O) so that the consumer, the tests and the docs' examples agree.

Client -> server (JSON text frames, one object each, ``action`` names the message):
``subscribe``, ``unsubscribe`` (instruments, a chain, an underlying's bars, or alone
``orders``), ``ping``, ``ack`` (credit-based flow control) and ``positions`` (start or stop the
positions pushes).

Server -> client (JSON text frames, ``type`` names the message): ``hello``, ``subscribed``,
``unsubscribed``, ``snapshots`` (pre-serialised engine items, never re-encoded here),
``analytics`` (a chain's analytics, written by the engine), ``analytics_series`` (the
intraday series of a chain), ``bars`` and ``bar`` (an underlying's 1-minute bars, the stored
items wrapped, never re-encoded), ``orders_subscribed``, ``orders_unsubscribed``, ``order``,
``pong``, ``positions`` / ``positions_stopped`` and ``error``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection, Container, Iterable, Sequence
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

PROTOCOL_VERSION: Final = 1
SUBPROTOCOL: Final = "tickerproj.v1"
"""The WebSocket subprotocol the server selects whenever a client offers it."""
TOKEN_SUBPROTOCOL_PREFIX: Final = "tickerproj.token."  # noqa: S105 (a prefix, not a secret)
"""A client may carry its API token as the subprotocol ``tickerproj.token.<key>``."""

MAX_TEXT_FRAME_BYTES: Final = 128 * 1024
"""Larger client frames (UTF-8 bytes) are refused before parsing: 2000 references written as
``EXCHANGE:TRADINGSYMBOL`` are ~60 KiB, so a full connection fits in one message."""
MAX_INSTRUMENTS_PER_MESSAGE: Final = 20_000
"""The absolute cap; a subscribe is also capped, before validation, at the connection's room."""
MAX_STRIKES_AROUND_ATM: Final = 1_000
MAX_ID_LENGTH: Final = 64
MAX_INSTRUMENTS_PER_REPLY: Final = 2000
"""A ``subscribed`` reply lists at most this many instruments per part (~300 KB)."""
MAX_UNRESOLVED_LISTED: Final = 100
"""Replies list at most this many unresolved references (and say how many there were)."""
MAX_ERROR_MESSAGE_CHARS: Final = 500
MAX_ORDER_ACCOUNTS_PER_MESSAGE: Final = 100
MAX_BARS_PER_MESSAGE: Final = 20
"""A subscribe or unsubscribe names at most this many underlyings' bars."""
MAX_BARS_SUBSCRIPTIONS: Final = 50
"""A connection follows the bars of at most this many underlyings."""
RECENT_BARS: Final = 375
"""Stored bars sent on a bars subscribe: the latest 375 minutes, one NSE session (09:15-15:30)."""
UNDERLYING_NAME_PATTERN: Final = r"^[A-Za-z0-9&_-][A-Za-z0-9&_ .-]{0,31}$"
"""An underlying's derivative name as Kite writes it (``NIFTY``, ``M&M``, ``BAJAJ-AUTO``)."""

KNOWN_ACTIONS: Final = frozenset({"subscribe", "unsubscribe", "ping", "ack", "positions"})


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message; clients branch on these, never on ``message``."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_ACTION = "unknown_action"
    UNKNOWN_INSTRUMENT = "unknown_instrument"
    UNKNOWN_ACCOUNT = "unknown_account"
    UNKNOWN_UNDERLYING = "unknown_underlying"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    MESSAGE_TOO_LARGE = "message_too_large"
    RATE_LIMITED = "rate_limited"
    FLOOD = "flood"
    UNAUTHORIZED = "unauthorized"
    SUBPROTOCOL_REQUIRED = "subprotocol_required"
    UNAVAILABLE = "unavailable"
    ACCOUNT_NOT_VISIBLE = "account_not_visible"


class CloseCode:
    """WebSocket close codes the server uses (4000-4999 are the application's own)."""

    SUBPROTOCOL_REQUIRED: Final = 4400
    UNAUTHORIZED: Final = 4401
    FLOOD: Final = 4008
    TOO_MANY_CONNECTIONS: Final = 4429


# --- client messages --------------------------------------------------------------------------

RequestId = StrictInt | Annotated[StrictStr, Field(max_length=MAX_ID_LENGTH)]
"""A client-chosen id echoed in the replies to that request."""


class InstrumentRef(BaseModel):
    """One instrument as a client names it: an instrument_token or ``EXCHANGE:TRADINGSYMBOL``."""

    model_config = ConfigDict(frozen=True)

    token: int | None = None
    exchange: str | None = None
    tradingsymbol: str | None = None

    @property
    def label(self) -> str | int:
        """The reference as the client wrote it, for replies."""
        if self.token is not None:
            return self.token
        return f"{self.exchange}:{self.tradingsymbol}"


def _parse_instrument_ref(value: Any) -> InstrumentRef:
    if isinstance(value, bool):
        raise ValueError("an instrument is a token (integer) or 'EXCHANGE:TRADINGSYMBOL'")
    if isinstance(value, int):
        if not 0 < value < 2**63:
            raise ValueError("instrument_token out of range")
        return InstrumentRef(token=value)
    if isinstance(value, str):
        if value.isascii() and value.isdigit() and 0 < len(value) <= 19:
            return _parse_instrument_ref(int(value))
        exchange, sep, symbol = value.partition(":")
        if not sep or not exchange or not symbol or len(value) > 100:
            raise ValueError(f"expected 'EXCHANGE:TRADINGSYMBOL', got {value[:100]!r}")
        return InstrumentRef(exchange=exchange.upper(), tradingsymbol=symbol)
    raise ValueError("an instrument is a token (integer) or 'EXCHANGE:TRADINGSYMBOL'")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChainSpec(_Strict):
    """A whole option chain: one underlying and expiry, optionally N strikes each side of ATM."""

    underlying: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    expiry: dt.date
    strikes_around_atm: Annotated[StrictInt, Field(ge=0, le=MAX_STRIKES_AROUND_ATM)] | None = None


InstrumentRefField = Annotated[InstrumentRef, BeforeValidator(_parse_instrument_ref)]
_UNDERLYING_NAME: Final = re.compile(UNDERLYING_NAME_PATTERN)


def _parse_underlying_name(value: Any) -> str:
    if not isinstance(value, str) or not _UNDERLYING_NAME.match(value):
        shown = repr(value[:40]) if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"expected an underlying name such as 'NIFTY' (1-32 letters, digits, '&', '_', "
            f"'-', '.', spaces), got {shown}"
        )
    return value.upper()


UnderlyingName = Annotated[str, BeforeValidator(_parse_underlying_name)]


AccountIds = Annotated[
    list[Annotated[StrictInt, Field(gt=0, lt=2**63)]],
    Field(min_length=1, max_length=MAX_ORDER_ACCOUNTS_PER_MESSAGE),
]
"""Broker accounts named by id (``KiteAccount.id``), as the orders API lists them."""


class _Selection(_Strict):
    id: RequestId | None = None
    instruments: Annotated[
        list[InstrumentRefField], Field(max_length=MAX_INSTRUMENTS_PER_MESSAGE)
    ] = Field(default_factory=list)
    chain: ChainSpec | None = None
    bars: Annotated[list[UnderlyingName], Field(max_length=MAX_BARS_PER_MESSAGE)] = Field(
        default_factory=list
    )
    """Underlyings whose 1-minute bars to follow, upper-cased (duplicates count once)."""
    orders: Literal[True] | AccountIds | None = None
    """``true``: every account the user may see; a list: those accounts only."""

    def _orders_alone(self) -> None:
        if self.orders is not None and (self.instruments or self.chain is not None or self.bars):
            raise ValueError(
                "'orders' goes in a message of its own, without 'instruments', 'chain' or 'bars'"
            )


class Subscribe(_Selection):
    """Add instruments, a chain and/or bars (reply ``subscribed``), or order events of broker
    accounts (reply ``orders_subscribed``), to the connection."""

    action: Literal["subscribe"]

    @model_validator(mode="after")
    def _something(self) -> Subscribe:
        if not self.instruments and self.chain is None and not self.bars and self.orders is None:
            raise ValueError("subscribe needs 'instruments', 'chain', 'bars' or 'orders'")
        self._orders_alone()
        return self


class Unsubscribe(_Selection):
    """Remove instruments, a chain, bars or everything (``all``); the server replies
    ``unsubscribed`` (and ``orders_unsubscribed`` for ``orders`` or ``all``)."""

    action: Literal["unsubscribe"]
    all: StrictBool = False

    @model_validator(mode="after")
    def _something(self) -> Unsubscribe:
        if (not self.instruments and self.chain is None and not self.bars and not self.all
                and self.orders is None):
            raise ValueError(
                "unsubscribe needs 'instruments', 'chain', 'bars', 'orders' or 'all': true"
            )
        self._orders_alone()
        return self


class Ping(_Strict):
    """Liveness check; the server replies ``pong`` with the same id."""

    action: Literal["ping"]
    id: RequestId | None = None


class Ack(_Strict):
    """Acknowledges every ``snapshots`` frame up to and including ``seq`` (cumulative)."""

    action: Literal["ack"]
    seq: Annotated[StrictInt, Field(ge=0, lt=2**53)]


class Positions(_Strict):
    """Start (``enabled``, the default) or stop the ``positions`` pushes: the net positions
    with live portfolio Greeks of the accounts the user may see, or of one ``account_id``."""

    action: Literal["positions"]
    id: RequestId | None = None
    enabled: StrictBool = True
    account_id: Annotated[StrictInt, Field(gt=0, lt=2**63)] | None = None


ClientMessage = Annotated[
    Subscribe | Unsubscribe | Ping | Ack | Positions, Field(discriminator="action")
]
_CLIENT_MESSAGE: Final = TypeAdapter(ClientMessage)


class ProtocolError(Exception):
    """A client message the server refuses; becomes an ``error`` frame, never a crash."""

    def __init__(self, code: ErrorCode, message: str, *, request_id: Any = None, **detail: Any):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.detail = detail


def text_frame_bytes(text: str) -> int:
    """The UTF-8 size of a text frame, without encoding it when it is plain ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _is_held(value: Any, tokens: Container[int], symbols: Container[tuple[str, str]]) -> bool:
    """Whether a raw reference names an instrument the connection already holds."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value in tokens
    if isinstance(value, str):
        if value.isascii() and value.isdigit() and 0 < len(value) <= 19:
            return int(value) in tokens
        exchange, _, symbol = value.partition(":")
        return (exchange.upper(), symbol) in symbols
    return False


def parse_client_message(
    text: str,
    *,
    subscribe_room: int = MAX_INSTRUMENTS_PER_MESSAGE,
    held_tokens: Collection[int] = frozenset(),
    held_symbols: Container[tuple[str, str]] = frozenset(),
) -> Subscribe | Unsubscribe | Ping | Ack | Positions:
    """Parse one client text frame; raises ProtocolError with the right code on any problem.

    ``subscribe_room`` is how many more instruments the connection may hold: a subscribe
    naming more that it does not already hold (``held_*``) is refused after the JSON decode,
    before any reference is validated or looked up.
    """
    size = text_frame_bytes(text)
    if size > MAX_TEXT_FRAME_BYTES:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"message of {size} bytes exceeds {MAX_TEXT_FRAME_BYTES}",
            limit=MAX_TEXT_FRAME_BYTES,
        )
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"expected a JSON object, got {type(raw).__name__}"
        )
    request_id = raw.get("id")
    if not isinstance(request_id, int | str) or isinstance(request_id, bool) or (isinstance(request_id, str) and len(request_id) > MAX_ID_LENGTH):
        request_id = None
    action = raw.get("action")
    if not isinstance(action, str):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "missing 'action' (a string)", request_id=request_id
        )
    if action not in KNOWN_ACTIONS:
        raise ProtocolError(
            ErrorCode.UNKNOWN_ACTION,
            f"unknown action {action[:40]!r}; expected one of {sorted(KNOWN_ACTIONS)}",
            request_id=request_id,
        )
    instruments = raw.get("instruments")
    if action == "subscribe" and isinstance(instruments, list) and len(instruments) > subscribe_room:
        if len(instruments) > subscribe_room + len(held_tokens):
            new = len(instruments)  # cannot fit whatever is held: no reference is looked at
        else:
            new = sum(1 for v in instruments if not _is_held(v, held_tokens, held_symbols))
        if new > subscribe_room:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"{new} instruments not yet subscribed named, but this connection has room for "
                f"{subscribe_room} more; nothing was subscribed",
                request_id=request_id,
                requested=new,
                room=subscribe_room,
            )
    try:
        return _CLIENT_MESSAGE.validate_python(raw)
    except ValidationError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"invalid {action}: {_validation_summary(exc)}",
            request_id=request_id,
        ) from None


def _validation_summary(exc: ValidationError, limit: int = 3) -> str:
    """pydantic's errors as one short line (location: message), without input values."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:limit]:
        # Locations can be the client's own keys: cut them so an error never echoes a payload.
        loc = ".".join(str(p)[:40] for p in err["loc"][1:])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)[:MAX_ERROR_MESSAGE_CHARS]


# --- server messages --------------------------------------------------------------------------


def _dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def hello_message(*, user: str, auth: str, limits: dict[str, int]) -> str:
    return _dumps(
        {"type": "hello", "v": PROTOCOL_VERSION, "user": user, "auth": auth, "limits": limits}
    )


def error_message(
    code: ErrorCode | str, message: str, *, request_id: Any = None, **detail: Any
) -> str:
    body: dict[str, Any] = {"type": "error", "code": str(code), "message": message}
    if request_id is not None:
        body["id"] = request_id
    body.update(detail)
    return _dumps(body)


def pong_message(*, request_id: Any, server_ts_ms: int) -> str:
    return _dumps({"type": "pong", "id": request_id, "ts": server_ts_ms})


def subscribed_messages(
    *,
    request_id: Any,
    instruments: Sequence[dict[str, Any]],
    chain: dict[str, Any] | None,
    unresolved: Sequence[Any],
    subscriptions: int,
    bars: Sequence[str] = (),
) -> list[str]:
    """The ``subscribed`` reply, in parts of at most MAX_INSTRUMENTS_PER_REPLY instruments.

    daphne refuses to send a message over 1 MiB, and 9000 instrument descriptions are 1.4 MB.
    Every part repeats the request's id, chain, bars, unresolved references and count.
    """
    chunks = [
        instruments[i : i + MAX_INSTRUMENTS_PER_REPLY]
        for i in range(0, len(instruments), MAX_INSTRUMENTS_PER_REPLY)
    ] or [[]]
    listed = list(unresolved[:MAX_UNRESOLVED_LISTED])
    return [
        _dumps(
            {
                "type": "subscribed",
                "id": request_id,
                "part": n,
                "parts": len(chunks),
                "instruments": list(chunk),
                "chain": chain,
                "bars": list(bars),
                "unresolved": listed,
                "unresolved_count": len(unresolved),
                "subscriptions": subscriptions,
            }
        )
        for n, chunk in enumerate(chunks, start=1)
    ]


def unsubscribed_message(
    *, request_id: Any, tokens: Iterable[int], subscriptions: int, bars: Iterable[str] = ()
) -> str:
    return _dumps(
        {
            "type": "unsubscribed",
            "id": request_id,
            "tokens": sorted(tokens),
            "bars": sorted(bars),
            "subscriptions": subscriptions,
        }
    )


def orders_subscribed_message(*, request_id: Any, accounts: Iterable[dict[str, Any]]) -> str:
    """The accounts whose order events this connection now receives (all of them)."""
    return _dumps({"type": "orders_subscribed", "id": request_id, "accounts": list(accounts)})


def orders_unsubscribed_message(*, request_id: Any, accounts: Iterable[int]) -> str:
    """The accounts whose order events this connection still receives after an unsubscribe."""
    return _dumps({"type": "orders_unsubscribed", "id": request_id, "accounts": sorted(accounts)})


_ORDER_HEAD: Final = b'{"type":"order","v":%d,"account":%d,"data":'


def order_frame(*, account_id: int, item: bytes) -> str:
    """One ``order`` frame around a pre-serialised OrderEvent (never re-encoded here)."""
    return ((_ORDER_HEAD % (PROTOCOL_VERSION, account_id)) + item + b"}").decode()


def positions_message(*, request_id: Any, seq: int, document: dict[str, Any]) -> str:
    """One ``positions`` push: the document of ``GET /api/v1/positions``, numbered."""
    return _dumps({"type": "positions", "id": request_id, "seq": seq, "data": document})


def positions_stopped_message(*, request_id: Any) -> str:
    return _dumps({"type": "positions_stopped", "id": request_id})


_FRAME_HEAD: Final = b'{"type":"snapshots","v":%d,"seq":%d,"data":['
_FRAME_TAIL: Final = b"]}"


def snapshots_frame(*, seq: int, items: Iterable[bytes]) -> str:
    """One ``snapshots`` frame from pre-serialised items: concatenated, never re-encoded.

    Returned as text (a UTF-8 decode, a copy at memory speed) so that browsers and programs
    receive a text frame they can JSON.parse directly.
    """
    return (
        (_FRAME_HEAD % (PROTOCOL_VERSION, seq)) + b",".join(items) + _FRAME_TAIL
    ).decode()



# --- analytics and bars -----------------------------------------------------------------------
#
# The models below are the shapes of the analytics messages (docs/websocket-protocol.md,
# "Chain analytics"); the builders write the same JSON without building the models, and the
# tests validate what the server sends against the models. Every number a value cannot be
# known for is null, never a made-up zero.

Buildup = Literal["long_buildup", "short_buildup", "long_unwinding", "short_covering"]
ForwardSource = Literal["future", "parity"]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnalyticsLeg(_Shape):
    """One option of a strike row: its quote, open interest and build-up."""

    token: int
    ltp: float | None
    bid: float | None
    bid_qty: int | None
    ask: float | None
    ask_qty: int | None
    volume: int | None
    oi: int | None
    oi_change: int | None
    """``oi`` minus the day's baseline OI (see ``AnalyticsSummary.oi_change_since``)."""
    buildup: Buildup | None


class AnalyticsRow(_Shape):
    strike: float
    ce: AnalyticsLeg | None
    pe: AnalyticsLeg | None


class AnalyticsSummary(_Shape):
    pcr_oi: float | None
    pcr_volume: float | None
    max_pain: float | None
    atm_strike: float | None
    atm_iv: float | None
    straddle: float | None
    forward: float | None
    forward_source: ForwardSource | None
    forward_stale: bool
    days_to_expiry: float | None
    lot_size: int | None
    oi_change_since: int | None
    """Epoch ms of the earliest OI baseline of the chain's rows (the first tick of the day)."""
    iv_rank: float | None
    iv_percentile: float | None
    iv_window_days: int
    is_mock: bool


class TermPoint(_Shape):
    expiry: dt.date
    atm_iv: float | None
    days_to_expiry: float | None
    forward: float | None


class AnalyticsMessage(_Shape):
    type: Literal["analytics"]
    v: Literal[1]
    underlying: str
    expiry: dt.date
    ts: int
    summary: AnalyticsSummary
    rows: list[AnalyticsRow]
    term_structure: list[TermPoint]


class SeriesPoint(_Shape):
    ts: int
    atm_iv: float | None
    straddle: float | None
    pcr_oi: float | None


class AnalyticsSeriesMessage(_Shape):
    type: Literal["analytics_series"]
    underlying: str
    expiry: dt.date
    points: list[SeriesPoint]


def analytics_message(
    *,
    underlying: str,
    expiry: dt.date,
    ts_ms: int,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    term_structure: list[dict[str, Any]],
) -> bytes:
    """One chain's ``analytics`` message, as the engine publishes it (forwarded unparsed)."""
    return orjson.dumps(
        {
            "type": "analytics",
            "v": PROTOCOL_VERSION,
            "underlying": underlying,
            "expiry": expiry.isoformat(),
            "ts": ts_ms,
            "summary": summary,
            "rows": rows,
            "term_structure": term_structure,
        }
    )


def analytics_series_message(
    *, underlying: str, expiry: dt.date, points: Sequence[dict[str, Any]]
) -> str:
    """The intraday series of one chain, oldest point first."""
    return _dumps(
        {
            "type": "analytics_series",
            "underlying": underlying,
            "expiry": expiry.isoformat(),
            "points": list(points),
        }
    )


def bars_message(*, underlying: str, items: Sequence[bytes]) -> str:
    """The recent bars of an underlying (oldest first) from bar JSON items, never re-encoded."""
    head = b'{"type":"bars","underlying":' + orjson.dumps(underlying) + b',"bars":['
    return (head + b",".join(items) + b"]}").decode()


def bar_message(*, underlying: str, item: bytes) -> str:
    """One closed bar (``item`` as the engine published it), wrapped, never re-encoded."""
    return (
        b'{"type":"bar","underlying":' + orjson.dumps(underlying) + b',"bar":' + item + b"}"
    ).decode()
