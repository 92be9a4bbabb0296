"""Pydantic models of the Kite Connect REST responses the project uses.

One model per response item. They accept Kite's wire format (the JSON ``data`` of each
endpoint, or one row of the instruments CSV as strings) and reject anything that is not a
well-formed value: missing fields, wrong types, NaN or infinite prices, negative quantities,
unknown instrument types. Kite's timestamps are IST wall-clock strings without an offset;
they become timezone-aware datetimes here.

Fields Kite legitimately leaves out (an index quote has no depth or volume) are ``None``
when absent, never a made-up zero. Unknown extra fields are ignored so a new Kite field does
not break the service. The models raise pydantic's ValidationError; streaming/kite/rest.py
turns it into a KiteResponseError that names the endpoint, the instrument and the field.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streaming.greeks import IST

SECRET_FIELDS: Final = frozenset({"access_token", "public_token", "enctoken", "refresh_token"})
"""Fields whose values never appear in an error message or a log."""


def _empty_to_none(value: Any) -> Any:
    return None if value == "" else value


def _as_ist(value: dt.datetime) -> dt.datetime:
    """Kite sends IST wall-clock time without an offset; make it aware."""
    return value.replace(tzinfo=IST) if value.tzinfo is None else value


Price = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A price or amount: finite and never negative."""
SignedFloat = Annotated[float, Field(allow_inf_nan=False)]
Quantity = Annotated[int, Field(ge=0)]
KiteDateTime = Annotated[dt.datetime, AfterValidator(_as_ist)]
OptionalKiteDateTime = Annotated[KiteDateTime | None, BeforeValidator(_empty_to_none)]
OptionalStr = Annotated[str | None, BeforeValidator(_empty_to_none)]


class _KiteModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- instruments dump (CSV) ---------------------------------------------------------------

INSTRUMENT_CSV_COLUMNS: Final = (
    "instrument_token",
    "exchange_token",
    "tradingsymbol",
    "name",
    "last_price",
    "expiry",
    "strike",
    "tick_size",
    "lot_size",
    "instrument_type",
    "segment",
    "exchange",
)

InstrumentType = Literal["EQ", "FUT", "CE", "PE"]


class InstrumentRow(_KiteModel):
    """One row of the instrument dump; lengths match the Instrument model's columns."""

    # Declared before expiry and strike so their validators can read it.
    instrument_type: InstrumentType
    instrument_token: Annotated[int, Field(gt=0)]
    exchange_token: Annotated[int, Field(ge=0)]
    tradingsymbol: Annotated[str, Field(min_length=1, max_length=64)]
    name: Annotated[str, Field(max_length=128)]
    last_price: Price
    expiry: Annotated[dt.date | None, BeforeValidator(_empty_to_none)]
    strike: Price
    # Index rows carry a zero tick size and lot size in Kite's dump.
    tick_size: Price
    lot_size: Quantity
    segment: Annotated[str, Field(min_length=1, max_length=16)]
    exchange: Annotated[str, Field(min_length=1, max_length=8)]

    @field_validator("expiry")
    @classmethod
    def _derivatives_expire(cls, value: dt.date | None, info: ValidationInfo) -> dt.date | None:
        kind = info.data.get("instrument_type")
        if value is None and kind in ("FUT", "CE", "PE"):
            raise ValueError(f"empty for a {kind}")
        return value

    @field_validator("strike")
    @classmethod
    def _options_have_strike(cls, value: float, info: ValidationInfo) -> float:
        kind = info.data.get("instrument_type")
        if value <= 0 and kind in ("CE", "PE"):
            raise ValueError(f"not positive for a {kind}")
        return value


# --- quotes -------------------------------------------------------------------------------


class OHLC(_KiteModel):
    open: Price
    high: Price
    low: Price
    close: Price


class DepthLevel(_KiteModel):
    price: Price
    quantity: Quantity
    orders: Quantity


class Depth(_KiteModel):
    buy: list[DepthLevel]
    sell: list[DepthLevel]


class LtpQuote(_KiteModel):
    """An entry of /quote/ltp."""

    instrument_token: Annotated[int, Field(gt=0)]
    last_price: Price


class OhlcQuote(_KiteModel):
    """An entry of /quote/ohlc."""

    instrument_token: Annotated[int, Field(gt=0)]
    last_price: Price
    ohlc: OHLC


class Quote(_KiteModel):
    """An entry of /quote: the full market quote of one instrument.

    Kite omits the trading fields for indices, so they are None when absent.
    """

    instrument_token: Annotated[int, Field(gt=0)]
    last_price: Price
    ohlc: OHLC
    timestamp: OptionalKiteDateTime = None
    last_trade_time: OptionalKiteDateTime = None
    last_quantity: Quantity | None = None
    buy_quantity: Quantity | None = None
    sell_quantity: Quantity | None = None
    volume: Quantity | None = None
    average_price: Price | None = None
    oi: Quantity | None = None
    oi_day_high: Quantity | None = None
    oi_day_low: Quantity | None = None
    net_change: SignedFloat | None = None
    lower_circuit_limit: Price | None = None
    upper_circuit_limit: Price | None = None
    depth: Depth | None = None


# --- historical candles -------------------------------------------------------------------


class Candle(_KiteModel):
    """One historical candle; Kite sends ``[date, open, high, low, close, volume(, oi)]``."""

    date: KiteDateTime
    open: Price
    high: Price
    low: Price
    close: Price
    volume: Quantity
    oi: Quantity | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_array(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            if len(value) not in (6, 7):
                raise ValueError(f"candle has {len(value)} values, expected 6 or 7")
            return dict(zip(("date", "open", "high", "low", "close", "volume", "oi"), value, strict=False))
        return value

    @field_validator("low")
    @classmethod
    def _low_not_above_high(cls, value: float, info: ValidationInfo) -> float:
        high = info.data.get("high")
        if high is not None and value > high:
            raise ValueError(f"above high {high}")
        return value


# --- user and session ---------------------------------------------------------------------


class Profile(_KiteModel):
    """/user/profile."""

    user_id: Annotated[str, Field(min_length=1)]
    user_name: str
    user_shortname: OptionalStr = None
    user_type: OptionalStr = None
    email: OptionalStr = None
    broker: str
    exchanges: list[str]
    products: list[str]
    order_types: list[str]


class Session(_KiteModel):
    """/session/token: the session a request token is exchanged for."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    user_id: Annotated[str, Field(min_length=1)]
    user_name: str = ""
    api_key: Annotated[str, Field(min_length=1)]
    access_token: Annotated[str, Field(min_length=1, repr=False)]
    public_token: Annotated[str, Field(repr=False)] = ""
    login_time: OptionalKiteDateTime = None


# --- orders and trades --------------------------------------------------------------------

TransactionType = Literal["BUY", "SELL"]


class Order(_KiteModel):
    """An entry of /orders."""

    order_id: Annotated[str, Field(min_length=1)]
    exchange_order_id: OptionalStr = None
    parent_order_id: OptionalStr = None
    status: Annotated[str, Field(min_length=1)]
    status_message: OptionalStr = None
    order_timestamp: OptionalKiteDateTime = None
    exchange_timestamp: OptionalKiteDateTime = None
    exchange_update_timestamp: OptionalKiteDateTime = None
    variety: str
    exchange: str
    tradingsymbol: str
    instrument_token: Annotated[int, Field(ge=0)]
    order_type: str
    transaction_type: TransactionType
    validity: str
    product: str
    quantity: Quantity
    disclosed_quantity: Quantity = 0
    price: Price
    trigger_price: Price
    average_price: Price
    filled_quantity: Quantity
    pending_quantity: Quantity
    cancelled_quantity: Quantity
    tag: OptionalStr = None
    guid: OptionalStr = None


class Trade(_KiteModel):
    """An entry of /trades or /orders/{order_id}/trades."""

    trade_id: Annotated[str, Field(min_length=1)]
    order_id: Annotated[str, Field(min_length=1)]
    exchange_order_id: OptionalStr = None
    exchange: str
    tradingsymbol: str
    instrument_token: Annotated[int, Field(ge=0)]
    product: str
    average_price: Price
    quantity: Annotated[int, Field(gt=0)]
    transaction_type: TransactionType
    fill_timestamp: OptionalKiteDateTime = None
    exchange_timestamp: OptionalKiteDateTime = None
    # Kite sends the time of day only here ("09:16:39").
    order_timestamp: Annotated[dt.time | KiteDateTime | None, BeforeValidator(_empty_to_none)] = None


class OrderPlaced(_KiteModel):
    """The reply to placing, modifying or cancelling an order."""

    order_id: Annotated[str, Field(min_length=1)]
