"""Net positions joined with the engine's live Greeks: the portfolio in rupees, pure.

No Django, no I/O. The convention (docs/paper-trading.md, "Positions and portfolio Greeks"): a
snapshot's Greeks are per unit of premium (docs/snapshot-schema.md: ``delta`` is dV/dF of the
premium, ``gamma`` per rupee of forward, ``theta`` rupees per calendar day, ``vega`` rupees
per volatility point). A position of ``lots`` lots of ``lot_size`` units carries

- ``delta_rs`` = lots x lot_size x delta: rupees of P&L per 1-rupee move of the underlying
  (its forward for the option's expiry); a future counts delta 1 per unit, an equity too;
- ``gamma_rs`` = lots x lot_size x gamma: change of ``delta_rs`` per 1-rupee move;
- ``theta_rs`` = lots x lot_size x theta: rupees per calendar day of time decay;
- ``vega_rs``  = lots x lot_size x vega: rupees per volatility point.

Kite gives F&O quantities in units, so lots x lot_size is the signed net quantity (times
Kite's ``multiplier``, 1 on NSE and NFO); a short position has negative Greeks. An option whose snapshot or Greeks are missing is left out of
the sums and listed in ``missing`` with the reason, and the sums say they are incomplete:
never a silent zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from streaming.snapshots import LiveSnapshot

GREEKS = ("delta", "gamma", "theta", "vega")


@dataclass(frozen=True, slots=True)
class NetPosition:
    """One account's net position in one instrument (quantities in units, as Kite's)."""

    account_id: int
    token: int | None
    exchange: str
    tradingsymbol: str
    product: str
    quantity: int
    buy_quantity: int = 0
    sell_quantity: int = 0
    buy_value: float = 0.0
    sell_value: float = 0.0
    lot_size: int = 1
    underlying: str | None = None
    kind: str | None = None
    last_price: float | None = None
    """The broker's last price (live accounts), used when no live snapshot is known."""
    multiplier: float = 1.0
    """Kite's contract multiplier (1 on NSE/NFO; currency and commodity contracts differ)."""


@dataclass(frozen=True, slots=True)
class GreekTotals:
    delta_rs: float = 0.0
    gamma_rs: float = 0.0
    theta_rs: float = 0.0
    vega_rs: float = 0.0
    pnl: float = 0.0
    positions: int = 0
    complete: bool = True
    """False when an option of this group has no Greeks (it is in ``missing``)."""

    def plus(self, row: PositionRow) -> GreekTotals:
        greeks = row.greeks_rs
        complete = self.complete and greeks is not None
        g = greeks or dict.fromkeys(GREEKS, 0.0)
        return GreekTotals(
            delta_rs=self.delta_rs + g["delta"], gamma_rs=self.gamma_rs + g["gamma"],
            theta_rs=self.theta_rs + g["theta"], vega_rs=self.vega_rs + g["vega"],
            pnl=self.pnl + (row.pnl or 0.0), positions=self.positions + 1, complete=complete,
        )  # fmt: skip

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "delta_rs": round(self.delta_rs, 4), "gamma_rs": round(self.gamma_rs, 6),
            "theta_rs": round(self.theta_rs, 4), "vega_rs": round(self.vega_rs, 4),
            "pnl": round(self.pnl, 2), "positions": self.positions, "complete": self.complete,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class PositionRow:
    position: NetPosition
    lots: float
    ltp: float | None
    pnl: float | None
    greeks: dict[str, float | None]
    """The snapshot's per-unit Greeks (None each when unknown)."""
    greeks_rs: dict[str, float] | None
    """Rupee Greeks of the position; None when an option's Greeks are missing."""
    missing: str | None = None


@dataclass(slots=True)
class Portfolio:
    rows: list[PositionRow] = field(default_factory=list)
    by_underlying: dict[str, GreekTotals] = field(default_factory=dict)
    total: GreekTotals = field(default_factory=GreekTotals)

    @property
    def missing(self) -> list[dict[str, str | int | None]]:
        return [
            {"account_id": r.position.account_id, "token": r.position.token,
             "tradingsymbol": r.position.tradingsymbol, "reason": r.missing}
            for r in self.rows if r.missing is not None
        ]  # fmt: skip


class PortfolioGreeks:
    """Joins net positions with live snapshots and sums rupee Greeks per underlying."""

    def build(
        self, positions: Iterable[NetPosition], snapshots: Mapping[int, LiveSnapshot]
    ) -> Portfolio:
        portfolio = Portfolio()
        for position in positions:
            if position.quantity == 0 and position.buy_quantity == 0 and position.sell_quantity == 0:
                continue
            row = self.row(position, snapshots.get(position.token) if position.token else None)
            portfolio.rows.append(row)
            key = position.underlying or position.tradingsymbol
            portfolio.by_underlying[key] = portfolio.by_underlying.get(key, GreekTotals()).plus(row)
            portfolio.total = portfolio.total.plus(row)
        return portfolio

    def row(self, position: NetPosition, snapshot: LiveSnapshot | None) -> PositionRow:
        kind = snapshot.kind if snapshot is not None else position.kind
        ltp = snapshot.ltp if snapshot is not None else position.last_price
        units = position.quantity * position.multiplier
        pnl = None
        if ltp is not None:
            # Kite's own formula: what was sold, less what was bought, plus what is held now.
            pnl = position.sell_value - position.buy_value + units * ltp
        per_unit: dict[str, float | None] = dict.fromkeys(GREEKS)
        missing = None
        if kind in ("CE", "PE"):
            if snapshot is None:
                missing = "no_snapshot"
            else:
                per_unit = {g: getattr(snapshot, g) for g in GREEKS}
                if any(v is None for v in per_unit.values()):
                    missing = ",".join(snapshot.flags) or "no_greeks"
        elif kind in ("FUT", "EQ"):
            per_unit = {"delta": 1.0, "gamma": 0.0, "theta": 0.0, "vega": 0.0}
        else:
            missing = "unknown_instrument"
        greeks_rs = None
        if missing is None:
            greeks_rs = {g: units * float(per_unit[g]) for g in GREEKS}  # type: ignore[arg-type]
        return PositionRow(
            position=position, lots=position.quantity / max(position.lot_size, 1), ltp=ltp, pnl=pnl,
            greeks=per_unit, greeks_rs=greeks_rs, missing=missing,
        )  # fmt: skip
