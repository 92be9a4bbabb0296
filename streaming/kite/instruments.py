"""Facts of Kite's instrument list that are not in its CSV: which index is whose underlying."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

#: Kite's index tradingsymbols and the ``name`` their futures and options carry.
KITE_INDEX_UNDERLYINGS: Final[Mapping[str, str]] = {
    "NIFTY 50": "NIFTY",
    "NIFTY BANK": "BANKNIFTY",
    "NIFTY FIN SERVICE": "FINNIFTY",
    "NIFTY MID SELECT": "MIDCPNIFTY",
    "NIFTY NEXT 50": "NIFTYNXT50",
    "SENSEX": "SENSEX",
    "BANKEX": "BANKEX",
}
