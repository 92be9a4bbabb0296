"""Kite Connect's published limits: the one place every module reads them from.

Sources: Kite Connect docs (WebSocket streaming, rate limits, historical data) and
kiteconnect's own ``KiteTicker`` (modes).
"""

from __future__ import annotations

from typing import Final, Literal

# WebSocket streaming: per API key, at most 3 connections of at most 3000 instruments each.
MAX_CONNECTIONS_PER_API_KEY: Final = 3
MAX_INSTRUMENTS_PER_CONNECTION: Final = 3000
MAX_INSTRUMENTS_PER_API_KEY: Final = MAX_CONNECTIONS_PER_API_KEY * MAX_INSTRUMENTS_PER_CONNECTION

# REST rate limits, requests per second per API key.
QUOTE_REQUESTS_PER_S: Final = 1
HISTORICAL_REQUESTS_PER_S: Final = 3
OTHER_REQUESTS_PER_S: Final = 10

# Longest span, in days, one historical-data request may cover for each candle interval.
HISTORICAL_MAX_DAYS_PER_INTERVAL: Final[dict[str, int]] = {
    "minute": 60,
    "3minute": 100,
    "5minute": 100,
    "10minute": 100,
    "15minute": 200,
    "30minute": 200,
    "60minute": 400,
    "day": 2000,
}

# Instruments one /quote (also /quote/ohlc, /quote/ltp) call accepts.
QUOTE_MAX_INSTRUMENTS_PER_CALL: Final = 500

# Streaming modes, spelled as Kite's WebSocket protocol spells them.
MODE_LTP: Final = "ltp"
MODE_QUOTE: Final = "quote"
MODE_FULL: Final = "full"
MODES: Final = (MODE_LTP, MODE_QUOTE, MODE_FULL)
Mode = Literal["ltp", "quote", "full"]
