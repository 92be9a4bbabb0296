"""Net positions per account joined with the engine's live Greeks (reads; no writes).

Where positions come from: a live account's from Kite's ``/portfolio/positions`` through its
broker (``broker_for``); a paper account's from its own trades (the paper engine writes them
through ``trade_record`` as Kite's fills are written). Each position is joined with the
latest live snapshot of its instrument (:class:`streaming.snapshots.SnapshotReader`) and summed
in rupees by :class:`accounts.portfolio_greeks.PortfolioGreeks` (the convention is there and
in docs/paper-trading.md). The API (``accounts/positions_api.py``), the WebSocket ``positions``
subscription and the positions page all read :meth:`PositionsReader.read`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog
from django.core.cache import cache

from accounts.brokers import Broker, BrokerError, broker_for
from accounts.order_models import Trade
from accounts.order_selectors import accounts_visible_to
from accounts.portfolio_greeks import NetPosition, Portfolio, PortfolioGreeks, PositionRow
from streaming.snapshots import LiveSnapshot
from subscriptions.models import Instrument
from subscriptions.selectors import (
    instrument_list_by_symbols,
    instrument_list_by_tokens,
    subscription_tokens_active,
)

log = structlog.get_logger(__name__)

CONVENTION = (
    "quantity in units (lots x lot size); delta_rs, gamma_rs, theta_rs, vega_rs = units x the "
    "snapshot's per-unit Greek: rupees per 1-rupee move of the underlying's forward, change of "
    "delta_rs per 1-rupee move, rupees per calendar day, rupees per volatility point; a future "
    "or equity counts delta 1 per unit. Options without Greeks are listed in 'missing' and "
    "left out of the sums ('complete': false)."
)


@dataclass(frozen=True, slots=True)
class _Details:
    token: int
    lot_size: int
    underlying: str
    kind: str


def _kind(instrument: Instrument) -> str:
    return "INDEX" if instrument.segment == "INDICES" else instrument.instrument_type


def _details(instruments: Iterable[Instrument]) -> dict[int, _Details]:
    return {
        i.instrument_token: _Details(token=i.instrument_token, lot_size=max(int(i.lot_size or 1), 1),
                                     underlying=i.name, kind=_kind(i))
        for i in instruments
    }  # fmt: skip


def paper_net_positions(*, account) -> list[NetPosition]:
    """A paper account's net positions, summed from its trades (quantities in units)."""
    sums: dict[tuple[str, str, str], dict[str, Any]] = {}
    for trade in Trade.objects.filter(account=account).order_by("pk"):
        key = (trade.exchange, trade.tradingsymbol, trade.product)
        entry = sums.setdefault(key, {"token": trade.instrument_token, "bq": 0, "sq": 0,
                                      "bv": Decimal(0), "sv": Decimal(0)})  # fmt: skip
        value = trade.average_price * trade.quantity
        if trade.transaction_type == "BUY":
            entry["bq"] += trade.quantity
            entry["bv"] += value
        else:
            entry["sq"] += trade.quantity
            entry["sv"] += value
        entry["token"] = entry["token"] or trade.instrument_token
    details = _details(instrument_list_by_tokens(tokens=[e["token"] for e in sums.values() if e["token"]]))
    positions = []
    for (exchange, symbol, product), e in sums.items():
        d = details.get(e["token"])
        positions.append(NetPosition(
            account_id=account.pk, token=e["token"], exchange=exchange, tradingsymbol=symbol,
            product=product, quantity=e["bq"] - e["sq"], buy_quantity=e["bq"],
            sell_quantity=e["sq"], buy_value=float(e["bv"]), sell_value=float(e["sv"]),
            lot_size=d.lot_size if d else 1, underlying=d.underlying if d else None,
            kind=d.kind if d else None,
        ))  # fmt: skip
    return positions


def paper_positions_kite(*, account) -> dict[str, list[dict[str, Any]]]:
    """A paper account's positions in the shape of Kite's ``/portfolio/positions``."""
    net = [
        {"tradingsymbol": p.tradingsymbol, "exchange": p.exchange, "instrument_token": p.token,
         "product": p.product, "quantity": p.quantity, "buy_quantity": p.buy_quantity,
         "sell_quantity": p.sell_quantity, "buy_value": p.buy_value, "sell_value": p.sell_value,
         "multiplier": 1}
        for p in paper_net_positions(account=account)
    ]  # fmt: skip
    return {"net": net, "day": net}


def kite_positions_shared(*, account, broker: Broker, ttl_s: float) -> dict[str, list[dict[str, Any]]]:
    """Kite's positions of a live account, one call per ``ttl_s`` per web process shared by
    every reader (the API and each WebSocket push): the calls book the same 10/s of Kite's
    that placing orders needs."""
    if ttl_s <= 0:
        return broker.positions()
    key = f"positions.kite.{account.pk}"
    found = cache.get(key)
    if found is None:
        found = broker.positions()
        cache.set(key, found, ttl_s)
    return found


def kite_net_positions(*, account, broker: Broker, ttl_s: float = 0.0) -> list[NetPosition]:
    """A live account's net positions, from Kite's answer through its broker."""
    rows = kite_positions_shared(account=account, broker=broker, ttl_s=ttl_s).get("net", [])
    tokens = [int(r["instrument_token"]) for r in rows if r.get("instrument_token")]
    details = _details(instrument_list_by_tokens(tokens=tokens))
    missing = [(r.get("exchange", ""), r.get("tradingsymbol", "")) for r in rows
               if int(r.get("instrument_token") or 0) not in details]  # fmt: skip
    by_symbol = {(i.exchange, i.tradingsymbol): i for i in instrument_list_by_symbols(keys=missing)}
    positions = []
    for r in rows:
        token = int(r.get("instrument_token") or 0)
        d = details.get(token)
        if d is None and (i := by_symbol.get((r.get("exchange", ""), r.get("tradingsymbol", "")))):
            d = _details([i])[i.instrument_token]
        multiplier = float(r.get("multiplier") or 1)
        positions.append(NetPosition(
            account_id=account.pk, token=d.token if d else (token or None),
            exchange=str(r.get("exchange", "")), tradingsymbol=str(r.get("tradingsymbol", "")),
            product=str(r.get("product", "")), quantity=int(r.get("quantity") or 0),
            buy_quantity=int(r.get("buy_quantity") or 0), sell_quantity=int(r.get("sell_quantity") or 0),
            buy_value=float(r.get("buy_value") or 0), sell_value=float(r.get("sell_value") or 0),
            lot_size=d.lot_size if d else 1, underlying=d.underlying if d else None,
            kind=d.kind if d else None, last_price=r.get("last_price"), multiplier=multiplier,
        ))  # fmt: skip
    return positions


def _row(row: PositionRow) -> dict[str, Any]:
    p = row.position
    return {
        "account_id": p.account_id, "token": p.token, "exchange": p.exchange,
        "tradingsymbol": p.tradingsymbol, "product": p.product, "underlying": p.underlying,
        "kind": p.kind, "quantity": p.quantity, "lots": row.lots, "lot_size": p.lot_size,
        "buy_quantity": p.buy_quantity, "sell_quantity": p.sell_quantity,
        "buy_value": round(p.buy_value, 2), "sell_value": round(p.sell_value, 2),
        "ltp": row.ltp, "pnl": None if row.pnl is None else round(row.pnl, 2),
        "greeks": row.greeks,
        "greeks_rs": row.greeks_rs,
        "missing": row.missing,
    }  # fmt: skip


def _summary(portfolio: Portfolio) -> dict[str, Any]:
    return {
        "by_underlying": {k: v.as_dict() for k, v in sorted(portfolio.by_underlying.items())},
        "total": portfolio.total.as_dict(),
        "missing": portfolio.missing,
    }


@dataclass(frozen=True, slots=True)
class LoadedPositions:
    """The database and broker half of a read: each account's positions, and which of their
    instruments are streamed (only those are asked of the engines)."""

    accounts: list[tuple[Any, list[NetPosition], str | None]]
    streamed: list[int]


class PositionsReader:
    """Positions of some accounts with live portfolio Greeks, as one JSON-ready document.

    :meth:`read` for sync callers; an async caller (the WebSocket push) runs :meth:`load` on
    a database thread, awaits the snapshots itself and calls :meth:`assemble`.
    """

    def __init__(
        self, *, quotes: Callable[[Sequence[int]], dict[int, LiveSnapshot]] | None = None,
        brokers: Callable[..., Broker] = broker_for, greeks: PortfolioGreeks | None = None,
        kite_ttl_s: float = 0.0,
    ) -> None:  # fmt: skip
        """``kite_ttl_s``: how long Kite's answer for a live account is shared (0: not)."""
        self._kite_ttl_s = kite_ttl_s
        self._quotes = quotes
        self._brokers = brokers
        self._greeks = greeks or PortfolioGreeks()

    def read(self, *, accounts: Iterable[Any]) -> dict[str, Any]:
        if self._quotes is None:
            raise TypeError("PositionsReader.read needs quotes; async callers use load/assemble")
        loaded = self.load(accounts=accounts)
        return self.assemble(loaded, self._quotes(loaded.streamed) if loaded.streamed else {})

    def load(self, *, accounts: Iterable[Any]) -> LoadedPositions:
        per_account: list[tuple[Any, list[NetPosition], str | None]] = []
        for account in accounts:
            error = None
            try:
                if account.is_paper:
                    positions = paper_net_positions(account=account)
                else:
                    positions = kite_net_positions(account=account, broker=self._brokers(account=account),
                                                   ttl_s=self._kite_ttl_s)
            except BrokerError as exc:
                log.warning("positions.broker_failed", account_id=account.pk, error=exc.message[:200])
                positions, error = [], f"Kite's positions could not be read: {exc.message[:200]}"
            per_account.append((account, positions, error))
        tokens = sorted({p.token for _, ps, _ in per_account for p in ps if p.token})
        # Waiting on a token no engine streams would only run out the reader's timeout.
        streamed = sorted(subscription_tokens_active(tokens=tokens)) if tokens else []
        return LoadedPositions(accounts=per_account, streamed=streamed)

    def assemble(self, loaded: LoadedPositions, snapshots: dict[int, LiveSnapshot]) -> dict[str, Any]:
        """The document; mock snapshots never price a position (live only)."""
        live = {t: s for t, s in snapshots.items() if not s.is_mock}
        everything = self._greeks.build([p for _, ps, _ in loaded.accounts for p in ps], live)
        documents = []
        for account, positions, error in loaded.accounts:
            portfolio = self._greeks.build(positions, live)
            documents.append({
                "account_id": account.pk, "label": account.label, "is_paper": account.is_paper,
                "error": error, "positions": [_row(r) for r in portfolio.rows],
                **_summary(portfolio),
            })  # fmt: skip
        return {"convention": CONVENTION, "accounts": documents, **_summary(everything)}


def accounts_for_positions(*, user, account_id: int | None) -> list[Any] | None:
    """The accounts ``user`` may see (or the one ``account_id``); None when that one is not."""
    accounts = accounts_visible_to(user=user)
    if account_id is not None:
        accounts = accounts.filter(pk=account_id)
        if not accounts.exists():
            return None
    return list(accounts)


def positions_visible(*, user, account_id: int | None, reader: PositionsReader) -> dict[str, Any] | None:
    """The positions document of the accounts ``user`` may see (or of the one ``account_id``);
    None when that account is not visible to them."""
    accounts = accounts_for_positions(user=user, account_id=account_id)
    return None if accounts is None else reader.read(accounts=accounts)
