"""HTTP API v1: net positions with live portfolio Greeks (mounted in tickerproj/api.py)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from ninja import Field, Query, Router, Schema
from redis.exceptions import RedisError

from accounts.models import ApiToken
from accounts.positions import PositionsReader, positions_visible
from streaming.snapshots import SnapshotReader
from tickerproj.api_support import ApiError, caller_user, require_scope

router = Router(tags=["positions"])


class GreekTotalsOut(Schema):
    delta_rs: float
    gamma_rs: float
    theta_rs: float
    vega_rs: float
    pnl: float
    positions: int
    complete: bool = Field(description="False when an option here has no Greeks (see 'missing').")


class MissingOut(Schema):
    account_id: int
    token: int | None
    tradingsymbol: str
    reason: str | None


class PositionOut(Schema):
    account_id: int
    token: int | None
    exchange: str
    tradingsymbol: str
    product: str
    underlying: str | None
    kind: str | None
    quantity: int = Field(description="Net quantity in units (lots x lot_size), negative short.")
    lots: float
    lot_size: int
    buy_quantity: int
    sell_quantity: int
    buy_value: float
    sell_value: float
    ltp: float | None
    pnl: float | None = Field(description="sell_value - buy_value + quantity x ltp.")
    greeks: dict[str, float | None] = Field(description="The live snapshot's per-unit Greeks.")
    greeks_rs: dict[str, float] | None = Field(description="quantity x the per-unit Greek.")
    missing: str | None = Field(description="Why an option has no Greeks (then not summed).")


class AccountPositionsOut(Schema):
    account_id: int
    label: str
    is_paper: bool
    error: str | None = Field(description="Kite's positions could not be read (live accounts).")
    positions: list[PositionOut]
    by_underlying: dict[str, GreekTotalsOut]
    total: GreekTotalsOut
    missing: list[MissingOut]


class PositionsOut(Schema):
    convention: str
    accounts: list[AccountPositionsOut]
    by_underlying: dict[str, GreekTotalsOut]
    total: GreekTotalsOut
    missing: list[MissingOut]


class PositionFilters(Schema):
    account: int | None = Field(None, description="One account's id; default: every visible one.")


def positions_reader() -> PositionsReader:
    """The web process's reader: the engines' snapshots over the channel layer."""
    reader = SnapshotReader(get_channel_layer(), timeout_s=settings.POSITIONS_SNAPSHOT_TIMEOUT_S)
    return PositionsReader(quotes=async_to_sync(reader.latest),
                           kite_ttl_s=settings.POSITIONS_PUSH_INTERVAL_S)


def positions_document(*, user, account_id: int | None) -> dict[str, Any]:
    try:
        document = positions_visible(user=user, account_id=account_id, reader=positions_reader())
    except (OSError, RedisError) as exc:
        raise ApiError(503, "unavailable", "live prices are unavailable (channel layer); try again") from exc
    if document is None:
        raise ApiError(404, "account_not_found", f"no account {account_id} visible to you",
                       field="account")  # fmt: skip
    return document


@router.get("/positions", response=PositionsOut,
            summary="Net positions with live portfolio Greeks in rupees ('read')")  # fmt: skip
def positions_list(request, filters: Query[PositionFilters]):
    require_scope(request, ApiToken.Scope.READ)
    return positions_document(user=caller_user(request), account_id=filters.account)
