"""The fleet: N WebSocket clients that subscribe to the deployment's chain and acknowledge
every frame, as a well-behaved browser does; in their own process (multiprocessing, spawn),
so their parsing never competes with the runner's probe.

A client that loses its socket reconnects (0.5 s, then backing off to 5 s), as the browser
page does. The runner reads each client's state through :class:`ClientFleet`: connected,
frames, the monotonic time of its last snapshots frame (CLOCK_MONOTONIC is system-wide, so it
compares with the runner's ``time.monotonic()``), the latest exchange timestamp per
instrument, and fleet-wide lag percentiles (wall clock now minus ``exchange_ts``, epoch ms) over the
last few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

LAG_WINDOW_S = 5.0
_RECONNECT_FIRST_S = 0.5
_RECONNECT_MAX_S = 5.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class _Client:
    def __init__(self, index: int, *, ws_url: str, origin: str, token: str, chain: dict) -> None:
        self.index = index
        self.ws_url = ws_url
        self.origin = origin
        self.token = token
        self.chain = chain
        self.connected = False
        self.connects = 0
        self.frames = 0
        self.last_frame_monotonic: float | None = None
        self.latest_ts: dict[int, int] = {}
        self.lags: deque[tuple[float, float]] = deque(maxlen=2000)
        self.frame_times: deque[float] = deque(maxlen=20000)
        self.last_error = ""
        self.ws = None
        # Each client from its own loopback address: the per-IP limits stay the product's.
        self.local_addr = (f"127.0.{1 + index // 250}.{1 + index % 250}", 0)

    async def run(self) -> None:
        import orjson
        from websockets.asyncio.client import connect

        backoff = _RECONNECT_FIRST_S
        while True:
            try:
                async with connect(
                    self.ws_url, additional_headers=[("Authorization", f"Token {self.token}")],
                    subprotocols=["tickerproj.v1"], origin=self.origin, open_timeout=20,
                    local_addr=self.local_addr, max_size=2**24,
                ) as ws:
                    self.ws = ws
                    self.connects += 1
                    await ws.send(orjson.dumps({"action": "subscribe", "id": "fleet",
                                                "chain": self.chain}).decode())
                    self.connected = True
                    backoff = _RECONNECT_FIRST_S
                    async for raw in ws:
                        message = orjson.loads(raw)
                        if message.get("type") != "snapshots":
                            continue
                        await ws.send(orjson.dumps({"action": "ack", "seq": message["seq"]}).decode())
                        now_m, now_w = time.monotonic(), time.time()
                        self.frames += 1
                        self.last_frame_monotonic = now_m
                        self.frame_times.append(now_m)
                        for snap in message["data"]:
                            ts = snap.get("exchange_ts")
                            if ts:
                                self.latest_ts[snap["token"]] = ts
                                self.lags.append((now_m, now_w - ts / 1000.0))  # epoch ms
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, as a browser does
                self.last_error = repr(exc)[:200]
            self.connected = False
            self.ws = None
            await asyncio.sleep(backoff)
            backoff = min(_RECONNECT_MAX_S, backoff * 2)

    def first_frame_after(self, since: float) -> float | None:
        times = self.frame_times
        if not times or times[-1] <= since:
            return None
        return next(t for t in times if t > since) if times[0] <= since else times[0]

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index, "connected": self.connected, "connects": self.connects,
            "frames": self.frames, "last_frame_monotonic": self.last_frame_monotonic,
            "latest_ts": dict(self.latest_ts), "last_error": self.last_error,
        }


def _fleet_main(ws_url: str, origin: str, tokens: list[str], chain: dict, count: int,
                control, log_path: str) -> None:
    logging.basicConfig(filename=log_path, level=logging.WARNING)
    asyncio.run(_fleet(ws_url, origin, tokens, chain, count, control))


async def _fleet(ws_url, origin, tokens, chain, count, control) -> None:
    loop = asyncio.get_running_loop()
    clients = [_Client(i, ws_url=ws_url, origin=origin, token=tokens[i // 10], chain=chain)
               for i in range(count)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    control.send(("ready", None))
    try:
        while True:
            command = await loop.run_in_executor(None, control.recv)
            if command[0] == "stop":
                control.send(("ok", None))
                return
            if command[0] == "stats":
                now = time.monotonic()
                lags = [lag for c in clients for (t, lag) in c.lags if now - t <= LAG_WINDOW_S]
                control.send(("ok", {
                    "clients": [c.stats() for c in clients],
                    "lag_p50_s": _percentile(lags, 0.50), "lag_p99_s": _percentile(lags, 0.99),
                }))
            elif command[0] == "reconnect":
                for c in clients:
                    if c.ws is not None:
                        await c.ws.close()
                control.send(("ok", None))
            elif command[0] == "fresh":
                control.send(("ok", [(c.connected, c.first_frame_after(command[1])) for c in clients]))
            else:
                control.send(("error", f"unknown command {command[0]!r}"))
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, timeout=5)


class ClientFleet:
    """The runner's handle on the fleet process."""

    def __init__(self, *, ws_url: str, origin: str, tokens: list[str], chain: dict, count: int,
                 log_path: Path, start_timeout_s: float = 60.0) -> None:
        self._args = (ws_url, origin, tokens, chain, count)
        self.count = count
        self.log_path = log_path
        self._lock = threading.Lock()
        self._start_timeout_s = start_timeout_s
        self.process = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_fleet_main, args=(*self._args, child, str(self.log_path)),
                                   name="faults-clients", daemon=True)
        self.process.start()
        if not self._conn.poll(self._start_timeout_s):
            self.process.kill()
            raise TimeoutError("the client fleet did not start")
        self._conn.recv()

    def ensure_running(self) -> None:
        if not self.process.is_alive():
            self._start()

    def _call(self, *command, timeout_s: float = 10.0):
        with self._lock:
            self._conn.send(command)
            if not self._conn.poll(timeout_s):
                raise TimeoutError(f"client fleet did not answer {command[0]!r} in {timeout_s} s")
            status, value = self._conn.recv()
        if status != "ok":
            raise ValueError(value)
        return value

    def stats(self) -> dict[str, Any]:
        """``clients``: per client connected, connects, frames, last_frame_monotonic,
        latest_ts {token: exchange_ts}; ``lag_p50_s`` / ``lag_p99_s`` over the last 5 s."""
        return self._call("stats")

    def summary(self) -> str:
        clients = self.stats()["clients"]
        connected = sum(c["connected"] for c in clients)
        errors = {c["last_error"] for c in clients if c["last_error"]}
        return f"{connected}/{len(clients)} connected; errors: {sorted(errors)[:3]}"

    def wait_all_fresh(self, since_monotonic: float, timeout_s: float) -> float | None:
        """Seconds from ``since_monotonic`` until every client is connected and has a
        snapshots frame received after it; None if not within ``timeout_s`` (from now)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self._call("fresh", since_monotonic)
            if all(connected and first is not None for connected, first in state):
                return max(first for _, first in state) - since_monotonic
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def reconnect_all(self) -> None:
        """Close every client's socket (each reconnects and subscribes again at once)."""
        self._call("reconnect", timeout_s=30)

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            with contextlib.suppress(Exception):
                self._call("stop", timeout_s=10)
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
