"""Every setting the engine uses, read once at the edge (the runticker command or the demo)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.control import control_channel
from streaming.engine.leases import make_engine_id
from streaming.engine.market_hours import EngineMode
from streaming.kite.recording import ZSTD_LEVEL
from streaming.nse_calendar import parse_holidays


@dataclass(frozen=True)
class EngineConfig:
    """Every setting the engine uses, read once at the edge (the command or the demo)."""

    engine_id: str
    #: The longest a change waits for its flush to start (the trigger's cap).
    flush_interval_ms: int = 100
    #: The shortest wait after the first unflushed change (the trigger's window when idle).
    flush_window_ms: int = 15
    heartbeat_interval_s: float = 2.0
    lease_ttl_s: float = 15.0
    watchdog_s: float = 10.0
    #: Poll a stalled connection's instruments over REST after this long (0: never).
    rest_fallback_after_s: float = 5.0
    risk_free_rate: float = 0.065
    stale_underlying_s: float = 30.0
    mock_enabled: bool = True
    force_mode: EngineMode | None = None
    holidays: frozenset[dt.date] = frozenset()
    #: MARKET_HOURS_ALWAYS_OPEN: the session never closes (live on any date, simulator only).
    market_always_open: bool = False
    kite_ws_url: str = "wss://ws.kite.trade"
    kite_api_root: str = "https://api.kite.trade"
    redis_url: str = ""
    #: Redis pub/sub channel of change notices (streaming.control.control_channel).
    control_channel: str = ""
    account_labels: frozenset[str] | None = None
    mock_interval_ms: int = 250
    mock_seed: int = 0
    reload_debounce_ms: int = 200
    safety_reload_s: float = 60.0
    mode_check_interval_s: float = 1.0
    recording_dir: Path = Path("var/recordings")
    recording_max_file_bytes: int = 256 * 1024 * 1024
    recording_max_total_bytes: int = 4096 * 1024 * 1024
    recording_zstd_level: int = ZSTD_LEVEL
    analytics_interval_s: float = 1.0
    analytics_iv_window_days: int = 365

    def __post_init__(self) -> None:
        if self.redis_url and not self.control_channel:
            raise ValueError("an engine on Redis needs its control channel")
        if not 0 < self.flush_window_ms <= self.flush_interval_ms:
            raise ValueError(
                "TICKER_FLUSH_WINDOW_MS must be above 0 and at most TICKER_FLUSH_INTERVAL_MS: "
                f"got {self.flush_window_ms} and {self.flush_interval_ms}"
            )

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        engine_id: str | None = None,
        force_mode: EngineMode | None = None,
        account_labels: Iterable[str] | None = None,
    ) -> EngineConfig:
        labels = frozenset(account_labels) if account_labels else None
        return cls(
            engine_id=engine_id or make_engine_id(),
            flush_interval_ms=settings.TICKER_FLUSH_INTERVAL_MS,
            flush_window_ms=settings.TICKER_FLUSH_WINDOW_MS,
            heartbeat_interval_s=settings.TICKER_HEARTBEAT_INTERVAL_S,
            lease_ttl_s=settings.TICKER_LEASE_TTL_S,
            watchdog_s=settings.TICKER_WATCHDOG_S,
            rest_fallback_after_s=settings.TICKER_REST_FALLBACK_AFTER_S,
            risk_free_rate=settings.RISK_FREE_RATE,
            stale_underlying_s=settings.TICKER_STALE_UNDERLYING_S,
            mock_enabled=settings.MOCK_MARKET_ENABLED,
            force_mode=force_mode,
            holidays=parse_holidays(settings.MARKET_HOLIDAYS),
            market_always_open=settings.MARKET_HOURS_ALWAYS_OPEN,
            kite_ws_url=settings.KITE_WS_URL,
            kite_api_root=settings.KITE_API_ROOT,
            redis_url=settings.REDIS_URL,
            control_channel=control_channel(settings.CHANNEL_LAYER_PREFIX),
            account_labels=labels,
            mock_interval_ms=settings.MOCK_TICK_INTERVAL_MS,
            mock_seed=settings.MOCK_MARKET_SEED,
            reload_debounce_ms=settings.TICKER_RELOAD_DEBOUNCE_MS,
            safety_reload_s=settings.TICKER_SAFETY_RELOAD_S,
            recording_dir=Path(settings.TICKER_RECORDING_DIR),
            recording_max_file_bytes=settings.TICKER_RECORDING_MAX_FILE_MB * 1024 * 1024,
            recording_max_total_bytes=settings.TICKER_RECORDING_MAX_TOTAL_MB * 1024 * 1024,
            recording_zstd_level=settings.TICKER_RECORDING_ZSTD_LEVEL,
            analytics_interval_s=settings.ANALYTICS_INTERVAL_S,
            analytics_iv_window_days=settings.ANALYTICS_IV_WINDOW_DAYS,
        )
