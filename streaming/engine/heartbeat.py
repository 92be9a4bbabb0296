"""The engine's heartbeat: its status document written to EngineHeartbeat every few seconds.

The document is :class:`streaming.status.EngineStatus`, built by the engine (``Engine.status``)
and read back with ``streaming.status.parse`` by /health, the chain page, the drift report and
the rebalancer; this class only owns the timing and the write.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
from collections.abc import Callable

import structlog
from django.db import DatabaseError

from streaming.engine.store import heartbeat_prune, heartbeat_write, run_db
from streaming.status import EngineStatus

log = structlog.get_logger(__name__)

PRUNE_AFTER_S = 7 * 86400
"""Heartbeat rows not updated for this long (engines that died) are deleted at start-up."""


class HeartbeatWriter:
    """Writes ``status_fn()`` to this engine's heartbeat row every ``interval_s``."""

    def __init__(
        self,
        *,
        engine_id: str,
        interval_s: float,
        started_at: dt.datetime,
        write_timeout_s: float = 5.0,
    ) -> None:
        self.engine_id = engine_id
        self.interval_s = interval_s
        self._started_at = started_at
        self._write_timeout_s = write_timeout_s
        self._hostname = socket.gethostname()
        self._pid = os.getpid()
        self.writes = 0

    async def run(self, status_fn: Callable[[], EngineStatus]) -> None:
        """The supervised loop: a failed write is logged and retried at the next beat."""
        await self._prune()
        while True:
            await self.write_once(status_fn())
            await asyncio.sleep(self.interval_s)

    async def _prune(self) -> None:
        older_than = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=PRUNE_AFTER_S)
        try:
            pruned = await run_db(heartbeat_prune, older_than=older_than)
        except DatabaseError as exc:
            log.warning("heartbeat.prune_failed", error=repr(exc))
            return
        if pruned:
            log.info("heartbeat.pruned", rows=pruned)

    async def write_once(self, status: EngineStatus) -> bool:
        state = status.to_json()
        try:
            await asyncio.wait_for(
                run_db(
                    heartbeat_write,
                    engine_id=self.engine_id,
                    hostname=self._hostname,
                    pid=self._pid,
                    started_at=self._started_at,
                    state=state,
                ),
                timeout=self._write_timeout_s,
            )
        except (DatabaseError, TimeoutError) as exc:
            # A missing heartbeat is exactly what /health reports; nothing else to do here.
            log.warning("heartbeat.write_failed", engine_id=self.engine_id, error=repr(exc))
            return False
        self.writes += 1
        return True
