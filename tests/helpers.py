"""Helpers shared by test modules: waiting on a condition with a deadline, free ports, status
documents."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import itertools
import socket
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from redis.connection import parse_url

from streaming.market import IST
from streaming.nse_calendar import is_trading_day, parse_holidays
from streaming.status import EngineStatus


def wait_until(predicate: Callable[[], object], *, timeout_s: float, interval_s: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true (returned); fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(interval_s)


async def async_wait_until(predicate: Callable[[], object], *, timeout_s: float = 5.0,
                           interval_s: float = 0.02, what: str = "condition") -> Any:
    """:func:`wait_until` on an event loop; ``predicate`` may return an awaitable (a database
    read), which is awaited. The loop keeps running between polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


PORT_BLOCKS_START = 12_000  # 16 blocks, one per Redis database: 12000-19999
PORT_BLOCK_SIZE = 500
_port_offsets = itertools.count()  # this process's round-robin through its block


def free_port() -> int:
    """A free loopback port for a server a test starts (daphne, a metrics endpoint, Redis).

    Not bind(0)'s: an ephemeral port is free only until the test's server binds it, and in
    between another xdist worker's server or any outgoing connection on the machine may take
    it. Each run on the machine has a Redis database of its own (an xdist worker, a suite
    beside it: docs/testing.md), so each gets its own block of ports below Linux's ephemeral
    range, handed out round-robin so that a port is not given twice in quick succession.
    """
    first = PORT_BLOCKS_START + parse_url(settings.REDIS_URL).get("db", 0) * PORT_BLOCK_SIZE
    for _ in range(PORT_BLOCK_SIZE):
        port = first + next(_port_offsets) % PORT_BLOCK_SIZE
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or in TIME_WAIT
                continue
        return port
    raise AssertionError(f"no free port in {first}-{first + PORT_BLOCK_SIZE - 1}")


def engine_status(**fields: Any) -> dict[str, Any]:
    """A whole, valid status document (as an engine writes it), with ``fields`` overridden.

    Nested values are given as the JSON the engine writes (``{"NIFTY": {"price": ...}}``);
    an underlying or account entry may leave out fields, which get neutral values.
    """
    underlyings = {
        name: {"price": None, "ts": None, "forwards": {}} | entry
        for name, entry in fields.pop("underlyings", {}).items()
    }
    accounts = {
        label: {
            "account_id": 1, "state": "streaming", "connections": 1, "instruments": 0,
            "ticks_per_s": 0.0, "last_tick_age_s": None, "reconnects": 0, "session": "ok",
        } | entry
        for label, entry in fields.pop("accounts", {}).items()
    }
    doc = {
        "engine_id": "test-engine", "mode": "live", "market_open": True, "accounts": accounts,
        "tasks": {}, "underlyings": underlyings, "streamed_count": 0, "mocked_count": 0,
        "unassigned_count": 0, "holds_mock_pool": False, "flush_ms_p50": None,
        "loop_lag_ms": 0.0, "ticks_per_s": 0.0, "reloads": 0,
    } | fields
    return EngineStatus.model_validate(doc).to_json()


async def cancel_until_done(task: asyncio.Task, *, timeout_s: float = 30.0) -> None:
    """Cancel ``task`` until it has ended, failing after ``timeout_s``.

    One ``cancel()`` is not always enough: on Python 3.11 ``asyncio.wait_for`` (inside
    channels-redis and redis-py) can swallow a cancellation that lands as its inner wait ends,
    which is also why the engine's Supervisor cancels again until its tasks end.
    """
    deadline = time.monotonic() + timeout_s
    while not task.done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{task.get_name()} did not stop within {timeout_s} s of cancelling")
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved: ending on an error while being cancelled is ending too


def next_trading_day(today: dt.date) -> dt.date:
    """The first trading day after ``today`` (weekends and MARKET_HOLIDAYS skipped)."""
    holidays = parse_holidays(settings.MARKET_HOLIDAYS)
    day = today + dt.timedelta(days=1)
    while not is_trading_day(day, holidays):
        day += dt.timedelta(days=1)
    return day


def epoch_at_ist(day: dt.date, hour: int, minute: int) -> float:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=IST).timestamp()


@contextlib.contextmanager
def statement_cancelled_on_lock(table: str):
    """Within the block, ``table`` is locked by another connection and the first statement
    that waits on it is cancelled: a real database failure, as a restarting server gives."""
    import threading

    import psycopg
    from django.db import connection

    db = connection.settings_dict
    params = {"host": db["HOST"] or "127.0.0.1", "port": db["PORT"] or 5432, "user": db["USER"],
              "dbname": db["NAME"]}
    cancel = ("SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
              " WHERE wait_event_type = 'Lock' AND datname = current_database()")

    def cancel_the_waiting_statement() -> None:
        with psycopg.connect(**params, autocommit=True) as admin:
            wait_until(lambda: any(row[0] for row in admin.execute(cancel).fetchall()),
                       timeout_s=30, what=f"a statement waiting on {table}, cancelled")

    with psycopg.connect(**params) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        canceller = threading.Thread(target=cancel_the_waiting_statement)
        canceller.start()
        try:
            yield
        finally:
            canceller.join(30)
            holder.rollback()
