"""How an option's underlying is found in the instrument dump: its futures and its spot.

Kite's dump names an index's derivatives (the ``name`` column of NFO/BFO rows, e.g. NIFTY)
differently from the index's own tradingsymbol (NIFTY 50); a stock's derivatives use the
stock's tradingsymbol. ``streaming.kite.instruments.KITE_INDEX_UNDERLYINGS`` is the one table
of that difference; this module looks instruments up by it.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from django.db.models import Q

from streaming.kite.instruments import KITE_INDEX_UNDERLYINGS
from subscriptions.models import Instrument

#: Derivative name -> the index's tradingsymbol; the engine's universe keeps the one table.
INDEX_TRADINGSYMBOLS: Final[dict[str, str]] = {
    name: symbol for symbol, name in KITE_INDEX_UNDERLYINGS.items()
}


def underlying_spot(*, name: str) -> Instrument | None:
    """The index (segment INDICES) or cash-market stock whose derivatives are named ``name``."""
    symbol = INDEX_TRADINGSYMBOLS.get(name, name)
    return (
        Instrument.objects.filter(tradingsymbol=symbol, instrument_type=Instrument.Type.EQUITY)
        .filter(Q(segment="INDICES") | Q(exchange__in=["NSE", "BSE"]))
        .order_by("segment", "exchange")  # INDICES first, then NSE before BSE
        .first()
    )


def underlying_future(*, name: str, expiry: dt.date, exchange: str | None = None) -> Instrument | None:
    """The future of ``name`` expiring on ``expiry`` (on ``exchange`` if given), if listed."""
    qs = Instrument.objects.filter(name=name, instrument_type=Instrument.Type.FUTURE, expiry=expiry)
    if exchange:
        qs = qs.filter(exchange=exchange)
    return qs.order_by("instrument_token").first()


def underlying_futures(*, name: str, on_or_after: dt.date) -> list[Instrument]:
    """Listed futures of ``name`` from a date on, nearest expiry first."""
    return list(
        Instrument.objects.filter(
            name=name, instrument_type=Instrument.Type.FUTURE, expiry__gte=on_or_after
        ).order_by("expiry", "instrument_token")
    )
