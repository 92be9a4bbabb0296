"""What the streaming scenarios (kite, engines, clients, orders) share: which runticker holds
which account, what an account streams at the simulator, polling with deadlines, runticker
log events, a watching WebSocket client that notices stale (duplicate) publishing, and a
process of extra WebSocket clients (stuck ones, or many).

It registers no scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

POLL_S = 0.02


# --- waiting -------------------------------------------------------------------------------


def poll_until(predicate: Callable[[], object], *, timeout_s: float,
               interval_s: float = POLL_S) -> float | None:
    """Seconds until ``predicate()`` is true, or None past ``timeout_s`` (never raises on it:
    a condition that never came is a figure, not an error)."""
    began = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - began
        if time.monotonic() - began > timeout_s:
            return None
        time.sleep(interval_s)


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --- accounts, leases, the simulator ---------------------------------------------------------


def fresh_db() -> None:
    """After a PostgreSQL fault (or a long wait): drop the runner's dead connections."""
    from django.db import close_old_connections

    close_old_connections()


def account_ids_by_key(dep) -> dict[str, int]:
    from accounts.models import KiteAccount

    fresh_db()
    return dict(KiteAccount.objects.filter(pk__in=dep.accounts).values_list("api_key", "pk"))


def proc_of_engine(owner: str) -> str:
    """The process name of an engine id: ``engine-a:1f2e...`` runs as ``runticker-a``."""
    return "runticker-" + owner.split(":", 1)[0].removeprefix("engine-")


def lease_holders(dep) -> dict[str, str]:
    """api_key -> the runticker process ("runticker-a") whose lease on it has not expired."""
    from django.db.models.functions import Now

    from streaming.models import AccountLease

    fresh_db()
    rows = AccountLease.objects.filter(expires_at__gt=Now(), account_id__in=dep.accounts)
    return {key: proc_of_engine(owner) for key, owner in rows.values_list("account__api_key", "owner")}


def sim_view(dep, api_key: str) -> tuple[dict[int, str], set[int]]:
    """The key's subscriptions (token -> mode) and its live connection ids at the simulator."""
    ids = {c.id for c in dep.sim("connections", api_key)}
    return dep.sim("subscriptions", api_key), ids


def streamed_keys(dep) -> list[str]:
    """The api_keys that stream instruments now (an account may be allocated nothing)."""
    return [key for key in dep.api_keys if sim_view(dep, key)[0]]


# --- runticker logs ---------------------------------------------------------------------------


def log_events(path: Path, event: str, *, since_epoch_s: float, **match: Any) -> list[float]:
    """Epoch seconds of each JSON log line of ``event`` (with ``match`` fields) at or after
    ``since_epoch_s`` in ``path``."""
    found = []
    try:
        text = path.read_bytes()
    except OSError:
        return found
    needle = f'"{event}"'.encode()
    for line in text.splitlines():
        if needle not in line or not line.startswith(b"{"):
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if record.get("event") != event or any(record.get(k) != v for k, v in match.items()):
            continue
        stamp = record.get("timestamp")
        if not stamp:
            continue
        at = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        if at >= since_epoch_s:
            found.append(at)
    return found


def first_log_event(dep, event: str, *, since_epoch_s: float, procs: tuple[str, ...] = (
        "runticker-a", "runticker-b"), **match: Any) -> float | None:
    """Seconds after ``since_epoch_s`` of the first ``event`` logged by any of ``procs``."""
    times = [t for name in procs
             for t in log_events(dep.procs[name].log_path, event, since_epoch_s=since_epoch_s, **match)]
    return min(times) - since_epoch_s if times else None


# --- the metrics the probe scrapes ---------------------------------------------------------------


def metric_now(dep, source: str, name: str, **labels: str) -> float | None:
    scrape = dep.probe.latest_metrics(source)
    return None if scrape is None else scrape.get(name, **labels)


def metric_total(dep, name: str, sources: tuple[str, ...] = ("runticker-a", "runticker-b"),
                 **labels: str) -> float:
    return sum(metric_now(dep, s, name, **labels) or 0.0 for s in sources)


def wait_next_scrape(dep, *, timeout_s: float = 5.0) -> None:
    """Until every runticker has been scraped again after now (the probe scrapes every 500 ms)."""
    now = time.monotonic()

    def scraped() -> bool:
        return all(any(s.ok and s.t > now for s in dep.probe.scrapes(src, since=now))
                   for src in ("runticker-a", "runticker-b") if dep.procs[src].alive())

    poll_until(scraped, timeout_s=timeout_s, interval_s=0.1)


# --- a watching client: stale publishing ----------------------------------------------------------


@dataclass
class WatchReport:
    frames: int
    snapshots: int
    #: Snapshots whose exchange_ts was older than one already received for the instrument:
    #: stale data published after fresher (two publishers of one instrument).
    regressions: int
    regressed_tokens: int
    #: The longest time, over instruments, without a snapshot of the instrument.
    max_gap_s: float
    connects: int


class Watcher:
    """One acknowledging WebSocket client of the chain, on a thread of the runner, keeping
    per instrument the latest exchange time and the times of its snapshots."""

    def __init__(self, dep, *, scope: str = "read", local_addr: str = "127.3.0.1") -> None:
        self._url = dep.ws_url
        self._origin = dep.origin
        self._token = dep.tokens[scope]
        self._chain = {"underlying": dep.chain["underlying"], "expiry": dep.chain["expiry"]}
        self._local_addr = (local_addr, 0)
        self._lock = threading.Lock()
        self._latest: dict[int, int] = {}
        self._last_seen: dict[int, float] = {}
        self._max_gap: dict[int, float] = {}
        self._regressions = 0
        self._regressed: set[int] = set()
        self._frames = 0
        self._snapshots = 0
        self._connects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._main, name="faults-watcher", daemon=True)
        self._started = threading.Event()

    def __enter__(self) -> Watcher:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)

    def wait_streaming(self, timeout_s: float = 30.0) -> bool:
        return poll_until(lambda: self._snapshots > 0, timeout_s=timeout_s) is not None

    def reset_gaps(self) -> None:
        """Measure gaps from now on."""
        now = time.monotonic()
        with self._lock:
            self._last_seen = dict.fromkeys(self._last_seen, now)
            self._max_gap = {}

    def report(self) -> WatchReport:
        now = time.monotonic()
        with self._lock:
            gaps = [max(self._max_gap.get(t, 0.0), now - seen) for t, seen in self._last_seen.items()]
            return WatchReport(frames=self._frames, snapshots=self._snapshots,
                               regressions=self._regressions, regressed_tokens=len(self._regressed),
                               max_gap_s=max(gaps, default=0.0), connects=self._connects)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._task = self._loop.create_task(self._run())
            self._started.set()
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(self._task)
        finally:
            self._loop.close()

    async def _run(self) -> None:
        from websockets.asyncio.client import connect

        while True:
            try:
                async with connect(
                    self._url, additional_headers=[("Authorization", f"Token {self._token}")],
                    subprotocols=["tickerproj.v1"], origin=self._origin, open_timeout=20,
                    local_addr=self._local_addr, max_size=2**24,
                ) as ws:
                    self._connects += 1
                    await ws.send(orjson.dumps({"action": "subscribe", "id": "watch",
                                                "chain": self._chain}).decode())
                    async for raw in ws:
                        message = orjson.loads(raw)
                        if message.get("type") != "snapshots":
                            continue
                        await ws.send(orjson.dumps({"action": "ack", "seq": message["seq"]}).decode())
                        self._record(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - any failure: reconnect, as a browser does
                await asyncio.sleep(0.5)

    def _record(self, snapshots: list[dict]) -> None:
        now = time.monotonic()
        with self._lock:
            self._frames += 1
            for snap in snapshots:
                token = snap.get("token")
                if token is None:
                    continue
                self._snapshots += 1
                seen = self._last_seen.get(token)
                if seen is not None:
                    self._max_gap[token] = max(self._max_gap.get(token, 0.0), now - seen)
                self._last_seen[token] = now
                ts = snap.get("exchange_ts")
                if not ts:
                    continue
                latest = self._latest.get(token)
                if latest is not None and ts < latest:
                    self._regressions += 1
                    self._regressed.add(token)
                else:
                    self._latest[token] = ts


# --- extra clients in a process of their own -----------------------------------------------------


def _extra_clients_main(url: str, origin: str, tokens: list[str], chain: dict, count: int,
                        behaviour: str, first_addr: int, ramp_s: float, control) -> None:
    asyncio.run(_extra_clients(url, origin, tokens, chain, count, behaviour, first_addr, ramp_s,
                               control))


async def _extra_clients(url, origin, tokens, chain, count, behaviour, first_addr, ramp_s,
                         control) -> None:
    """``behaviour``: "ack" (well-behaved), "no_ack" (reads, never acknowledges: a hidden tab)
    or "frozen" (neither reads nor acknowledges once subscribed: a suspended laptop)."""
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    state = {"connected": 0, "connects": 0, "closed": 0, "errors": 0}

    async def session(index: int) -> None:
        addr = (f"127.{first_addr}.{1 + index // 250}.{1 + index % 250}", 0)
        async with connect(
            url, additional_headers=[("Authorization", f"Token {tokens[index // 10]}")],
            subprotocols=["tickerproj.v1"], origin=origin, open_timeout=60, local_addr=addr,
            max_size=2**24, max_queue=1 if behaviour == "frozen" else 16,
            ping_interval=None if behaviour == "frozen" else 20,
        ) as ws:
            state["connects"] += 1
            state["connected"] += 1
            try:
                await ws.send(orjson.dumps({"action": "subscribe", "id": "x", "chain": chain}).decode())
                if behaviour == "frozen":
                    await asyncio.Event().wait()  # never reads again
                async for raw in ws:
                    if behaviour == "ack":
                        message = orjson.loads(raw)
                        if message.get("type") == "snapshots":
                            await ws.send(orjson.dumps({"action": "ack", "seq": message["seq"]}).decode())
            finally:
                state["connected"] -= 1
                state["closed"] += 1

    async def one(index: int) -> None:
        """Well-behaved clients reconnect as the page does (0.5 s, doubling to 5 s); stuck
        ones do not."""
        backoff_s = 0.5
        while True:
            try:
                await session(index)
                backoff_s = 0.5
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - counted; the scenario reads the counts
                state["errors"] += 1
            if behaviour != "ack":
                return
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.5))  # jittered, as the page
            backoff_s = min(5.0, backoff_s * 2)

    tasks = []
    for i in range(count):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(ramp_s)  # users arriving, not a thundering herd
    control.send(("ready", None))
    try:
        while True:
            command = await loop.run_in_executor(None, control.recv)
            if command == "stop":
                control.send(("ok", dict(state)))
                return
            control.send(("ok", dict(state)))
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, timeout=5)


class ExtraClients:
    """``count`` WebSocket clients of the chain in a process of their own (spawned), each of
    one ``behaviour`` (see ``_extra_clients``); ``tokens``: one API token per 10 clients."""

    def __init__(self, dep, *, count: int, behaviour: str, tokens: list[str],
                 first_addr: int = 10, ramp_s: float = 0.1) -> None:
        chain = {"underlying": dep.chain["underlying"], "expiry": dep.chain["expiry"]}
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_extra_clients_main,
            args=(dep.ws_url, dep.origin, tokens, chain, count, behaviour, first_addr, ramp_s, child),
            name=f"faults-extra-{behaviour}", daemon=True,
        )
        self.process.start()
        if not self._conn.poll(120):
            self.process.kill()
            raise TimeoutError("the extra clients did not start")
        self._conn.recv()

    def state(self) -> dict[str, int]:
        self._conn.send("state")
        if not self._conn.poll(10):
            raise TimeoutError("the extra clients did not answer")
        return self._conn.recv()[1]

    def stop(self) -> dict[str, int]:
        state: dict[str, int] = {}
        with contextlib.suppress(Exception):
            self._conn.send("stop")
            if self._conn.poll(10):
                state = self._conn.recv()[1]
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        return state


def client_tokens(*, count: int, prefix: str) -> list[str]:
    """API tokens (read scope) of new users, one per 10 clients (WS_MAX_CONNECTIONS_PER_USER
    is 20)."""
    from django.contrib.auth import get_user_model

    from accounts.services import apitoken_create

    fresh_db()
    users = get_user_model().objects
    tokens = []
    for u in range((count + 9) // 10):
        name = f"{prefix}-{u}"
        # No password (unusable): hashing one costs seconds on a loaded machine.
        user = users.filter(username=name).first() or users.create_user(username=name, password=None)
        tokens.append(apitoken_create(user=user, name=prefix)[1])
    return tokens


def account_labels_by_key(dep) -> dict[str, str]:
    from accounts.models import KiteAccount

    fresh_db()
    return dict(KiteAccount.objects.filter(pk__in=dep.accounts).values_list("api_key", "label"))


def health_codes(dep) -> set[str]:
    """The reason codes /health reports now (empty when it does not answer)."""
    _status, body = dep.health()
    return {reason.get("code") for reason in body.get("reasons", [])}


def subscribed_on_new(dep, api_key: str, old_ids: set[int]) -> dict[int, str]:
    """token -> mode over the key's live connections that are not among ``old_ids``."""
    out: dict[int, str] = {}
    for conn in dep.sim("connections", api_key):
        if conn.id not in old_ids:
            out.update(conn.subscriptions)
    return out
