"""Whether the NSE market is open now, and so whether the engine streams live or mock data.

The session is 09:15 to 15:30 IST, Monday to Friday, minus the MARKET_HOLIDAYS setting. The
calendar is ``streaming.nse_calendar`` (shared with the synthetic market), so the simulator and
the engine agree on when a session opens and closes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from streaming.nse_calendar import (
    is_trading_day,
    ist_date,
    parse_holidays,
    session_close_epoch_s,
    session_open_epoch_s,
)

__all__ = ["EngineMode", "MarketHours", "ModePolicy", "parse_holidays"]

EngineMode = Literal["live", "mock"]

_MAX_DAYS_TO_NEXT_SESSION = 30


@dataclass(frozen=True)
class MarketHours:
    """The NSE cash/F&O session calendar with a holiday list.

    ``always_open``: every moment is in session (MARKET_HOURS_ALWAYS_OPEN), for running live
    against the simulator on any date.
    """

    holidays: frozenset[dt.date] = frozenset()
    always_open: bool = False

    def is_open(self, now_epoch_s: float) -> bool:
        if self.always_open:
            return True
        day = ist_date(now_epoch_s)
        if not is_trading_day(day, self.holidays):
            return False
        return session_open_epoch_s(day) <= now_epoch_s < session_close_epoch_s(day)

    def next_change_epoch_s(self, now_epoch_s: float) -> float:
        """When the market next opens (if closed) or closes (if open)."""
        if self.always_open:
            return now_epoch_s + 86400.0  # it never closes; looked at again in a day
        day = ist_date(now_epoch_s)
        if self.is_open(now_epoch_s):
            return session_close_epoch_s(day)
        for offset in range(_MAX_DAYS_TO_NEXT_SESSION):
            candidate = day + dt.timedelta(days=offset)
            if not is_trading_day(candidate, self.holidays):
                continue
            opens = session_open_epoch_s(candidate)
            if opens > now_epoch_s:
                return opens
        # Thirty holidays in a row do not happen; re-check in a day rather than loop forever.
        return now_epoch_s + 86400.0


@dataclass(frozen=True)
class ModePolicy:
    """Chooses live or mock: forced by the command line, else by the clock and the setting."""

    hours: MarketHours
    mock_enabled: bool
    force: EngineMode | None = None

    def mode_at(self, now_epoch_s: float) -> EngineMode:
        if self.force is not None:
            return self.force
        if self.hours.is_open(now_epoch_s) or not self.mock_enabled:
            return "live"
        return "mock"

    def next_check_epoch_s(self, now_epoch_s: float) -> float | None:
        """When the mode may next change; None when it never changes (forced or mock off)."""
        if self.force is not None or not self.mock_enabled:
            return None
        return self.hours.next_change_epoch_s(now_epoch_s)
