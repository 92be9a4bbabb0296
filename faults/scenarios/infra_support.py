"""What the Redis, PostgreSQL and Celery scenarios measure with, beside the probe and the fleet.

Each helper runs on a thread of its own (the scenario's main thread injects the fault) and
keeps its raw observations; a scenario turns them into figures afterwards. Nothing here
waits by sleeping for a condition: loops poll with deadlines.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

#: channels-redis keeps a group as the sorted set ``<prefix>:group:<name>`` of channel names.
_GROUP_COUNTS_LUA = (
    "local out = {} "
    "for _, key in ipairs(redis.call('KEYS', ARGV[1])) do "
    "  table.insert(out, key) table.insert(out, redis.call('ZCARD', key)) "
    "end return out"
)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def wait_until(predicate: Callable[[], Any], *, timeout_s: float, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it is true (its value) or ``timeout_s`` passes (None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)


class Background:
    """A loop on a daemon thread, calling ``step()`` every ``interval_s`` until stopped.

    Use as a context manager around the fault; ``step`` must not raise for expected failures
    (it records them). An unexpected raise ends the loop and is re-raised by ``stop``.
    """

    interval_s = 0.5

    def __init__(self) -> None:
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def step(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _loop(self) -> None:
        try:
            while not self._halt.is_set():
                began = time.monotonic()
                self.step()
                self._halt.wait(max(0.0, self.interval_s - (time.monotonic() - began)))
        except BaseException as exc:  # noqa: BLE001 - handed to the scenario by stop()
            self._error = exc

    def start(self) -> Background:
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._error is not None:
            raise self._error

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    t: float  #: monotonic time the request began
    label: str
    status: int  #: 0: no answer (refused, reset, timed out)
    seconds: float


class HttpLoad(Background):
    """GETs each of ``targets`` (label, path, headers) in turn, one at a time, and records it."""

    def __init__(self, dep, targets: list[tuple[str, str, dict[str, str]]], *,
                 interval_s: float = 0.2, timeout_s: float = 60.0) -> None:
        super().__init__()
        self._port = dep.http_port
        self._targets = targets
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self._turn = 0
        self.hits: list[Hit] = []

    def step(self) -> None:
        label, path, headers = self._targets[self._turn % len(self._targets)]
        self._turn += 1
        began = time.monotonic()
        status = http_get(self._port, path, headers=headers, timeout_s=self._timeout_s)
        self.hits.append(Hit(t=began, label=label, status=status, seconds=time.monotonic() - began))

    def during(self, since: float, until: float, label: str | None = None) -> list[Hit]:
        return [h for h in self.hits if since <= h.t <= until and (label is None or h.label == label)]


def http_get(port: int, path: str, *, headers: dict[str, str] | None = None,
             timeout_s: float = 30.0) -> int:
    """The status of one GET on a fresh connection; 0 when there was no answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def api_targets(dep) -> list[tuple[str, str, dict[str, str]]]:
    """HTTP API reads that touch the database (token lookup, then a query)."""
    headers = {"Authorization": f"Token {dep.tokens['read']}"}
    underlying = dep.chain["underlying"]
    return [
        ("api", "/api/v1/underlyings", headers),
        ("api", f"/api/v1/underlyings/{underlying}/expiries", headers),
    ]


class AdminSession:
    """A logged-in staff session on daphne (login form with its CSRF token, as a browser)."""

    def __init__(self, dep, *, username: str, password: str) -> None:
        import re
        from http.cookies import SimpleCookie

        self._port = dep.http_port
        self._origin = dep.origin
        cookies: dict[str, str] = {}

        def remember(response: http.client.HTTPResponse) -> None:
            for header in response.headers.get_all("Set-Cookie") or []:
                jar = SimpleCookie()
                jar.load(header)
                cookies.update({k: m.value for k, m in jar.items()})

        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        conn.request("GET", "/admin/login/")
        page = conn.getresponse()
        body = page.read().decode()
        remember(page)
        match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', body)
        if match is None:
            raise RuntimeError("the admin login page has no CSRF token")
        from urllib.parse import urlencode

        form = urlencode({"username": username, "password": password, "next": "/admin/",
                          "csrfmiddlewaretoken": match.group(1)})
        conn.request("POST", "/admin/login/", body=form, headers={
            "Content-Type": "application/x-www-form-urlencoded", "Origin": self._origin,
            "Referer": f"{self._origin}/admin/login/", "Cookie": self._cookie_header(cookies),
        })
        answer = conn.getresponse()
        answer.read()
        remember(answer)
        conn.close()
        if answer.status != 302 or "sessionid" not in cookies:
            raise RuntimeError(f"admin login failed: HTTP {answer.status}")
        self.headers = {"Cookie": self._cookie_header(cookies)}

    @staticmethod
    def _cookie_header(cookies: dict[str, str]) -> str:
        return "; ".join(f"{k}={v}" for k, v in cookies.items())


def admin_user(*, username: str) -> tuple[str, str]:
    """A superuser for the admin probes (created once per deployment); (username, password)."""
    import secrets

    from django.contrib.auth import get_user_model
    from django.db import close_old_connections

    close_old_connections()
    password = secrets.token_urlsafe(16)
    users = get_user_model().objects
    user = users.filter(username=username).first()
    if user is None:
        user = users.create_superuser(username=username, password=password, email="")
    else:
        user.set_password(password)
        user.save(update_fields=["password"])
    return username, password


# --- WebSocket ------------------------------------------------------------------------------


class WsConnectTimer(Background):
    """Opens a new token-authenticated WebSocket every ``interval_s`` and times the ``hello``.

    One attempt at a time, so a hanging connect shows as one long attempt, not a pile.
    ``attempts``: (monotonic start, seconds until hello or failure, got hello).
    """

    def __init__(self, dep, *, interval_s: float = 1.0, timeout_s: float = 60.0) -> None:
        super().__init__()
        self._url = dep.ws_url
        self._origin = dep.origin
        self._token = dep.tokens["read"]
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self.attempts: list[tuple[float, float, bool]] = []

    def step(self) -> None:
        from websockets.sync.client import connect

        began = time.monotonic()
        ok = False
        try:
            with connect(self._url, additional_headers={"Authorization": f"Token {self._token}"},
                         subprotocols=["tickerproj.v1"], origin=self._origin,
                         open_timeout=self._timeout_s, close_timeout=1) as ws:
                message = orjson.loads(ws.recv(timeout=max(0.1, self._timeout_s - (time.monotonic() - began))))
                ok = message.get("type") == "hello"
        except Exception:  # noqa: BLE001 - a refused, closed or timed-out connect is a data point
            ok = False
        self.attempts.append((began, time.monotonic() - began, ok))


# --- processes and logs ---------------------------------------------------------------------


class LogCursor:
    """Counts structlog events a process logs from now on (its JSON lines' ``event``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0

    def lines(self) -> list[str]:
        with contextlib.suppress(OSError), self._path.open("rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace").splitlines()
        return []

    def events(self, *names: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines():
            start = line.find("{")
            if start < 0:
                continue
            with contextlib.suppress(ValueError):
                record = orjson.loads(line[start:])
                if isinstance(record, dict) and record.get("event") in names:
                    found.append(record)
        return found

    def count(self, *names: str) -> int:
        return len(self.events(*names))

    def text(self) -> str:
        return "\n".join(self.lines())


def thread_count(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


class ThreadCounter(Background):
    """Threads of each named process, sampled every ``interval_s``."""

    def __init__(self, dep, names: list[str], *, interval_s: float = 0.25) -> None:
        super().__init__()
        self._procs = {name: dep.procs[name] for name in names}
        self.interval_s = interval_s
        self.counts: dict[str, list[tuple[float, int]]] = {name: [] for name in names}

    def step(self) -> None:
        now = time.monotonic()
        for name, proc in self._procs.items():
            n = thread_count(proc.pid) if proc.alive() else None
            if n is not None:
                self.counts[name].append((now, n))

    def max_during(self, name: str, since: float, until: float) -> int | None:
        values = [n for t, n in self.counts[name] if since <= t <= until]
        return max(values) if values else None


# --- the channel layer and the fleet --------------------------------------------------------


def group_members(dep) -> dict[str, int]:
    """Members of every channel-layer group, read straight from the private Redis."""
    prefix = dep.env["CHANNEL_LAYER_PREFIX"]
    out = dep.redis_cli("EVAL", _GROUP_COUNTS_LUA, "0", f"{prefix}:group:*").split("\n")
    values = [line.strip() for line in out if line.strip()]
    if values and ("ERR" in values[0] or "Could not connect" in values[0]):
        raise RuntimeError(f"redis-cli: {values[0]}")
    return {values[i].split(":group:", 1)[1]: int(values[i + 1]) for i in range(0, len(values) - 1, 2)}


def client_groups(members: dict[str, int]) -> dict[str, int]:
    """The groups that WebSocket connections join (the engines' request group left out)."""
    from streaming import schema

    return {g: n for g, n in members.items() if g != schema.SNAPSHOT_REQUESTS_GROUP}


def members_missing(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(max(0, n - after.get(g, 0)) for g, n in before.items())


def members_extra(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(max(0, n - before.get(g, 0)) for g, n in after.items())


def wait_group_members(dep, expected: dict[str, int], *, timeout_s: float) -> dict[str, int]:
    """The client groups once every one of ``expected`` has its members back (or at the deadline)."""
    last: dict[str, int] = {}

    def settled() -> bool:
        nonlocal last
        try:
            last = client_groups(group_members(dep))
        except (RuntimeError, OSError):
            return False
        return members_missing(expected, last) == 0

    wait_until(settled, timeout_s=timeout_s, interval_s=0.25)
    return last


def fleet_first_frame(dep, since: float) -> float | None:
    """Seconds from ``since`` until the first client got a frame after it (publishing resumed)."""
    firsts = [first for _connected, first in dep.clients._call("fresh", since) if first is not None]
    return min(firsts) - since if firsts else None


def wait_first_frame(dep, since: float, *, timeout_s: float) -> float | None:
    return wait_until(lambda: fleet_first_frame(dep, since), timeout_s=timeout_s, interval_s=0.02)


def latest_ts(dep) -> dict[int, dict[int, int]]:
    """client index -> {instrument token: latest exchange_ts} as the fleet holds it now."""
    return {c["index"]: {int(k): v for k, v in c["latest_ts"].items()}
            for c in dep.clients.stats()["clients"]}


def ticking(dep, *, window_s: float) -> dict[int, dict[int, int]]:
    """The (client, instrument) pairs whose exchange_ts advanced within ``window_s``, with
    the latest value: what each client was really receiving before a fault."""
    first = latest_ts(dep)
    time.sleep(window_s)  # an observation window, not a wait on a condition
    second = latest_ts(dep)
    return {i: {tok: ts for tok, ts in second.get(i, {}).items() if ts > first.get(i, {}).get(tok, 0)}
            for i in second}


def silent_pairs(dep, baseline: dict[int, dict[int, int]], *, timeout_s: float) -> int:
    """(client, instrument) pairs of ``baseline`` with no newer exchange_ts within ``timeout_s``."""
    missing = 0

    def all_back() -> bool:
        nonlocal missing
        now = latest_ts(dep)
        missing = sum(1 for i, toks in baseline.items() for tok, ts in toks.items()
                      if now.get(i, {}).get(tok, 0) <= ts)
        return missing == 0

    wait_until(all_back, timeout_s=timeout_s, interval_s=0.25)
    return missing


class FleetGaps(Background):
    """The longest time any connected client went without a frame, sampled every 200 ms."""

    interval_s = 0.2

    def __init__(self, dep) -> None:
        super().__init__()
        self._fleet = dep.clients
        self.samples: list[tuple[float, float]] = []  # (t, the longest current silence)

    def step(self) -> None:
        now = time.monotonic()
        try:
            clients = self._fleet.stats()["clients"]
        except (TimeoutError, ValueError, OSError):
            return
        silences = [now - c["last_frame_monotonic"] for c in clients
                    if c["last_frame_monotonic"] is not None]
        if silences:
            self.samples.append((now, max(silences)))

    def longest(self, since: float, until: float) -> float | None:
        values = [s for t, s in self.samples if since <= t <= until]
        return max(values) if values else None


# --- Celery ---------------------------------------------------------------------------------


class TaskStream(Background):
    """Queues one cheap task (Celery's built-in ``celery.accumulate``) every ``interval_s``
    through the runner's Celery app (direct to Redis), recording each id the broker took.

    A send that raises was refused (the caller knows); a task the broker took that the worker
    never ran was lost. The worker logs every run with its task id.
    """

    def __init__(self, *, interval_s: float = 0.25) -> None:
        super().__init__()
        from tickerproj.celery import app

        self._app = app
        self.interval_s = interval_s
        self.accepted: list[tuple[float, str]] = []
        self.refused = 0

    def step(self) -> None:
        import uuid

        task_id = f"faults-{uuid.uuid4().hex}"
        try:
            self._app.send_task("celery.accumulate", args=(1,), task_id=task_id, retry=False)
        except Exception:  # noqa: BLE001 - refused while Redis is away: the caller was told
            self.refused += 1
            return
        self.accepted.append((time.monotonic(), task_id))

    def lost(self, worker_log: LogCursor, *, timeout_s: float) -> list[str]:
        """The accepted ids the worker has not run within ``timeout_s``."""
        missing: list[str] = [task_id for _t, task_id in self.accepted]

        def all_ran() -> bool:
            nonlocal missing
            text = worker_log.text()
            missing = [task_id for task_id in missing if task_id not in text]
            return not missing

        wait_until(all_ran, timeout_s=timeout_s, interval_s=0.5)
        return missing


class RestartLikeSystemd(Background):
    """Starts a named process again ``restart_s`` after it exited, as the deploy units'
    ``Restart=always`` / ``RestartSec=2`` do (deploy/systemd); ``restarts`` counts them."""

    interval_s = 0.1

    def __init__(self, dep, names: list[str], *, restart_s: float = 2.0) -> None:
        super().__init__()
        self._procs = {name: dep.procs[name] for name in names}
        self._restart_s = restart_s
        self._dead_since: dict[str, float] = {}
        self.restarts: dict[str, int] = dict.fromkeys(names, 0)

    def step(self) -> None:
        now = time.monotonic()
        for name, proc in self._procs.items():
            if proc.alive():
                self._dead_since.pop(name, None)
                continue
            since = self._dead_since.setdefault(name, now)
            if now - since >= self._restart_s:
                proc.start(wait_ready=False)
                self.restarts[name] += 1
                self._dead_since.pop(name, None)
