"""The engine status document: what a runticker process writes to its heartbeat row.

One writer (the engine's heartbeat, :meth:`EngineStatus.to_json`), one parser (:func:`parse`)
for every reader (``/health``, the chain page's reference price, the drift report, the
rebalancer), and the one rule for a fresh live price (:func:`live_prices`). The models forbid
missing and unknown fields: a renamed field makes every reader fail loudly with a
:class:`StatusError`, never read a default in silence.

No Django import: the document is plain JSON in ``EngineHeartbeat.state``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

EngineMode = Literal["live", "mock", "stopped"]
AccountState = Literal["connecting", "streaming", "stopped", "session_expired", "error"]
TaskState = Literal["running", "restarting", "failed", "finished", "stopped"]


class StatusError(ValueError):
    """A status document that does not match the models (a renamed field, another version)."""

    def __init__(self, *, engine_id: str, error: str) -> None:
        self.engine_id = engine_id
        self.error = error
        super().__init__(f"engine {engine_id}: status document invalid: {error}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccountStatus(_Model):
    """One account this engine holds (or saw refused): its connections and tick flow."""

    account_id: int
    state: AccountState
    connections: int
    instruments: int
    ticks_per_s: float
    last_tick_age_s: float | None
    reconnects: int
    session: Literal["ok", "expired"]

    @property
    def needs_login(self) -> bool:
        return self.session == "expired" or self.state == "session_expired"


class TaskStatus(_Model):
    """One supervised task: its state, restarts and last error (already redacted)."""

    owner: str
    state: TaskState
    restarts: int
    last_error: str
    last_crash_age_s: float | None


class UnderlyingStatus(_Model):
    """An underlying's last spot price, its exchange time (epoch s) and forwards by expiry."""

    price: float | None
    ts: float | None
    forwards: dict[dt.date, float]


class EngineStatus(_Model):
    """The whole document of one engine."""

    engine_id: str
    mode: EngineMode
    market_open: bool
    accounts: dict[str, AccountStatus]
    tasks: dict[str, TaskStatus]
    underlyings: dict[str, UnderlyingStatus]
    streamed_count: int
    mocked_count: int
    unassigned_count: int
    holds_mock_pool: bool
    flush_ms_p50: float | None
    loop_lag_ms: float
    ticks_per_s: float
    reloads: int

    def to_json(self) -> dict[str, Any]:
        """The JSON value stored in ``EngineHeartbeat.state``."""
        return self.model_dump(mode="json")


def parse(raw: object, *, engine_id: str) -> EngineStatus:
    """The status document of engine ``engine_id``; :class:`StatusError` if it does not fit."""
    try:
        return EngineStatus.model_validate(raw)
    except ValidationError as exc:
        raise StatusError(engine_id=engine_id, error=str(exc)[:500]) from exc


class HeartbeatRow(Protocol):
    """What a reader passes in: an ``EngineHeartbeat`` row (no Django import here)."""

    engine_id: str
    state: Any
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Parsed:
    """The heartbeats whose documents parse, with their write times, and the errors of the rest.

    Every reader shows ``errors`` its own way (a /health reason, an error log, a report that
    is not ok): an unreadable document is never taken for an engine that streams nothing.
    """

    statuses: list[tuple[EngineStatus, float]]
    errors: list[StatusError]


def parse_heartbeats(rows: Iterable[HeartbeatRow]) -> Parsed:
    statuses: list[tuple[EngineStatus, float]] = []
    errors: list[StatusError] = []
    for row in rows:
        try:
            statuses.append((parse(row.state, engine_id=row.engine_id), row.updated_at.timestamp()))
        except StatusError as exc:
            errors.append(exc)
    return Parsed(statuses, errors)


# --- the one rule for a fresh live price ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LivePrice:
    """An underlying's price and forwards as an engine last streamed them, and how old."""

    price: float | None
    forwards: Mapping[dt.date, float]
    age_s: float

    def for_expiry(self, expiry: dt.date) -> tuple[float, Literal["forward", "underlying"]] | None:
        """The expiry's forward if known, else the underlying's price."""
        forward = self.forwards.get(expiry)
        if forward is not None:
            return forward, "forward"
        if self.price is not None:
            return self.price, "underlying"
        return None


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def live_prices(
    statuses: Iterable[tuple[EngineStatus, float]],
    *,
    now_s: float,
    max_age_s: float,
    include_mock: bool,
) -> dict[str, LivePrice]:
    """Fresh prices per underlying from ``(status, written_at_epoch_s)`` pairs, freshest first.

    A price is fresh when its own exchange time (the heartbeat's write time if it has none)
    is at most ``max_age_s`` old, and it is finite and positive. Engines in mock mode stream
    the synthetic market: their prices count only with ``include_mock`` (the demo), so no
    decision follows made-up prices by accident.
    """
    out: dict[str, LivePrice] = {}
    for status, written_at_s in statuses:
        if status.mode != "live" and not (include_mock and status.mode == "mock"):
            continue
        for name, entry in status.underlyings.items():
            age_s = now_s - (entry.ts if entry.ts is not None else written_at_s)
            if age_s > max_age_s:
                continue
            forwards = {d: f for d, f in entry.forwards.items() if _usable(f)}
            price = entry.price if _usable(entry.price) else None
            if price is None and not forwards:
                continue
            known = out.get(name)
            if known is None or age_s < known.age_s:
                out[name] = LivePrice(price, forwards, age_s)
    return out
